"""An OVMF launch with a [kernel]: what the build tells the user.

* SEV-SNP measured direct boot needs a firmware with the kernel-hashes page: Debian
  bookworm's OVMF.fd has none, and the error names the config key to change and the firmware
  to use (ovmf-amdsev's OVMF.amdsev.fd, which the same config then builds with);
* on TDX, OVMF measures the kernel, initrd and command line into RTMRs at run time: the build
  says so, and indeed the TDX digest (MRTD) does not move when the command line does.
"""

from __future__ import annotations

from pathlib import Path

from test_build_helpers import MEMTEST, OVMF_BOOKWORM, OVMF_SID, cli, q, tdx_mrtd

from igvm_builder.format import IgvmFile


def _config(tmp_path: Path, firmware: Path, platforms: str, cmdline: str = "console=ttyS0") -> Path:
    cfg = tmp_path / "guest.toml"
    cfg.write_text(f"[image]\nplatforms = [{platforms}]\n\n[firmware]\npath = {q(firmware)}\n\n"
                   f"[kernel]\npath = {q(MEMTEST)}\ncmdline = {q(cmdline)}\n")
    return cfg


def test_kernel_hashes_error_names_the_key_and_the_firmware(tmp_path: Path) -> None:
    assert OVMF_SID.name == "sid-OVMF.amdsev.fd"  # Debian's ovmf-amdsev build, in shared/firmware
    cfg = _config(tmp_path, OVMF_BOOKWORM, '"snp"')
    proc = cli("build", str(cfg), "-o", str(tmp_path / "g.igvm"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    line = proc.stderr
    assert f"{cfg}, key 'firmware.path'" in line and str(OVMF_BOOKWORM) in line
    assert "OVMF.amdsev.fd" in line and "ovmf-amdsev" in line
    cfg = _config(tmp_path, OVMF_SID, '"snp"')
    proc = cli("build", str(cfg), "-o", str(tmp_path / "g.igvm"))
    assert proc.returncode == 0, proc.stderr


def test_tdx_notes_that_the_kernel_is_measured_into_rtmrs(tmp_path: Path) -> None:
    digests = []
    for n, cmdline in enumerate(("console=ttyS0", "console=ttyS0 quiet")):
        d = tmp_path / str(n)
        d.mkdir()
        cfg = _config(d, OVMF_BOOKWORM, '"tdx"', cmdline)
        out = d / "g.igvm"
        proc = cli("build", str(cfg), "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        notes = [x for x in proc.stderr.splitlines() if x.startswith("igvm-builder build: note: tdx:")]
        assert len(notes) == 1 and "into RTMRs at run time, not into MRTD" in notes[0]
        digests.append(tdx_mrtd(IgvmFile.load(out)))
    assert digests[0] == digests[1]  # what the note says: the command line is not in MRTD
