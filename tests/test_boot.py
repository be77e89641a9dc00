"""Issue #12: the samples boot in a real IGVM loader, the bundled QEMU 10.2.2 (TCG).

The images come from a real ``scons igvm`` over a copy of this checkout's samples (the path a
user takes); each boot reads the serial console as it comes and ends at a fixed line the guest
prints, with a bound on wall time (``qemu.run_qemu``; on failure the whole serial log is shown):

* hello (an ELF PVH kernel, IGVM native) prints its greeting and powers the VM off: QEMU exits 0;
  the same ELF also boots through QEMU's own PVH loader (``-kernel``), a check of the sample
  that does not go through igvm-builder;
* linux (a bzImage direct boot, IGVM native) reaches the marker its C ``/init`` prints and
  powers off; so does the same kernel's vmlinux (an ELF PVH kernel) built by the CLI for native;
* ovmf (Debian's OVMF, native + SNP + TDX in one file; QEMU picks native) reaches the UEFI
  ``Shell>``, and with QEMU's ``-kernel/-initrd/-append`` (the measured-direct-boot flow; the
  hashes are only checked under SEV) boots the linux sample's kernel and initrd to the marker.

Marked ``boot`` (``pytest -m boot``). Never skipped: without QEMU or its runtime libraries the
tests fail (``./dev test`` installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from qemu import run_qemu

pytestmark = pytest.mark.boot

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Lines the samples print (samples/hello/hello.c, samples/linux/init.c).
GREETING = "Hello from an IGVM-launched kernel!"
INIT_MARKER = "igvm-builder linux sample: /init reached"
SHELL_PROMPT = "Shell>"


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout (beside a link to ../shared) after ``scons igvm``."""
    parent = tmp_path_factory.mktemp("boot")
    root = parent / "main"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "build", ".sconsign*")
    shutil.copy2(REPO / "SConstruct", root / "SConstruct")
    for tree in ("site_scons", "samples", "igvm_builder"):
        shutil.copytree(REPO / tree, root / tree, ignore=ignore, symlinks=True)
    (parent / "shared").symlink_to(SHARED, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "SCONSFLAGS"}
    proc = subprocess.run([sys.executable, "-m", "SCons", "-Q", "-j2", "igvm"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"scons igvm failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return root


def linux_cmdline(samples: Path) -> str:
    with open(samples / "samples/linux/linux.toml", "rb") as fh:
        cmdline = tomllib.load(fh)["kernel"]["cmdline"]
    assert "console=ttyS0" in cmdline.split()
    return str(cmdline)


def test_hello_greets_and_powers_off(samples: Path) -> None:
    run = run_qemu(samples / "build/hello.igvm", marker=GREETING, timeout=60)
    run.check(marker=GREETING, status=0)
    assert "not a q35 machine" not in run.serial


def test_hello_elf_boots_through_qemus_own_pvh_loader(samples: Path) -> None:
    """QEMU's ``-kernel`` PVH path (SeaBIOS + pvh.bin) agrees that the sample is a PVH kernel."""
    run = run_qemu(None, "-kernel", samples / "samples/hello/build/hello.elf", marker=GREETING, timeout=60)
    run.check(marker=GREETING, status=0)


def test_linux_reaches_init_and_powers_off(samples: Path) -> None:
    run = run_qemu(samples / "build/linux.igvm", "-no-reboot", marker=INIT_MARKER, timeout=240)
    run.check(marker=INIT_MARKER, status=0)
    assert f"Kernel command line: {linux_cmdline(samples)}" in run.serial, run.report()


def test_linux_vmlinux_boots_through_its_pvh_entry(samples: Path, tmp_path: Path) -> None:
    """The same kernel as an ELF: the vmlinux inside the sample's bzImage (LZ4 payload, unpacked
    with Debian's lz4), built by the CLI for native with the sample's initrd as the PVH module and
    its command line in start_info, boots through XEN_ELFNOTE_PHYS32_ENTRY to the /init marker."""
    lz4 = shutil.which("lz4")
    if lz4 is None:
        pytest.fail("lz4 is not installed (./dev test installs Debian's lz4)", pytrace=False)
    bzimage = (samples / "samples/linux/build/vmlinuz").read_bytes()
    assert bzimage[0x202:0x206] == b"HdrS"
    setup_sects = bzimage[0x1F1] or 4
    payload_offset = int.from_bytes(bzimage[0x248:0x24C], "little")
    payload_length = int.from_bytes(bzimage[0x24C:0x250], "little")
    start = (setup_sects + 1) * 512 + payload_offset
    # the compressed vmlinux, then its uncompressed size (the kernel build appends it)
    payload = bzimage[start:start + payload_length - 4]
    size = int.from_bytes(bzimage[start + payload_length - 4:start + payload_length], "little")
    assert payload[:4] == bytes.fromhex("02214c18"), "not an LZ4 legacy frame"  # Debian's kernels use LZ4
    vmlinux = tmp_path / "vmlinux"
    with open(vmlinux, "wb") as out:
        subprocess.run([lz4, "-dc"], input=payload, stdout=out, check=True, timeout=120)
    assert vmlinux.stat().st_size == size
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"
    config = tmp_path / "pvh.toml"
    config.write_text(
        '[image]\nplatforms = ["native"]\n'
        f'[kernel]\npath = "{vmlinux}"\nformat = "elf"\ncmdline = "{linux_cmdline(samples)}"\n'
        f'initrd = "{samples / "samples/linux/build/initrd.cpio"}"\n'
        '[memory]\nsize = "512M"\n'
    )
    image = tmp_path / "pvh.igvm"
    cli = subprocess.run([sys.executable, "-m", "igvm_builder", "build", str(config), "-o", str(image), "-q"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert cli.returncode == 0, cli.stderr
    run = run_qemu(image, "-no-reboot", marker=INIT_MARKER, timeout=240)
    run.check(marker=INIT_MARKER, status=0)
    assert f"Kernel command line: {linux_cmdline(samples)}" in run.serial, run.report()


def test_ovmf_reaches_the_uefi_shell(samples: Path) -> None:
    run = run_qemu(samples / "build/ovmf.igvm", marker=SHELL_PROMPT, stop_at_marker=True, timeout=300)
    run.check(marker=SHELL_PROMPT, status=None)


def test_ovmf_boots_the_linux_sample_given_kernel_initrd_append(samples: Path) -> None:
    """OVMF from the IGVM file loads QEMU's -kernel/-initrd/-append through fw_cfg and boots it."""
    linux = samples / "samples/linux/build"
    run = run_qemu(
        samples / "build/ovmf.igvm",
        "-no-reboot",
        "-kernel", linux / "vmlinuz",
        "-initrd", linux / "initrd.cpio",
        "-append", linux_cmdline(samples),
        marker=INIT_MARKER,
        timeout=300,
    )
    run.check(marker=INIT_MARKER, status=0)
    # started by the firmware (the kernel's EFI stub ran), and powered off through ACPI
    assert "EFI stub: Loaded initrd" in run.serial, run.report()
    assert "reboot: Power down" in run.serial, run.report()


def test_scons_boot_alias_builds_and_boots_hello(samples: Path) -> None:
    """``scons boot-hello``, the README's way to boot a sample, runs the bundled QEMU on the image."""
    env = {k: v for k, v in os.environ.items() if k != "SCONSFLAGS"}
    proc = subprocess.run([sys.executable, "-m", "SCons", "-Q", "boot-hello"], cwd=samples, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-object igvm-cfg,id=igvm0,file=build/hello.igvm" in proc.stdout, proc.stdout
    assert GREETING in proc.stdout, proc.stdout
