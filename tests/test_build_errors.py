"""Issue #4: what a user sees when a build cannot be done.

Every case runs twice: through the CLI (``python -m igvm_builder build cfg.toml -o out.igvm``:
exit status 1, one line on stderr naming the problem, no traceback, no output file and no
temporary file left) and through the API (the specific :class:`IgvmError` subclass, whose text
names the same things).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_build_helpers import (
    GRUB,
    MEMTEST,
    OVMF_BOOKWORM,
    OVMF_CODE_4M,
    assert_cli_error,
    assert_no_output,
    cli,
    q,
)

from igvm_builder.assemble import build_file
from igvm_builder.config import load_config
from igvm_builder.errors import ConfigError, IgvmError, InputError, LayoutError


@dataclass
class Case:
    name: str
    make: Callable[[Path], str]  # writes inputs into the directory, returns the config text
    error: type[IgvmError]
    needles: Callable[[Path], list[str]]  # what the message must name


def _blob(tmp: Path, name: str, size: int) -> Path:
    path = tmp / name
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    return path


def _overlap(tmp: Path) -> str:
    a, b = _blob(tmp, "first.bin", 0x2000), _blob(tmp, "second.bin", 0x1000)
    return f"""[image]
platforms = ["native"]

[[blob]]
path = {q(a)}
gpa = 0x200000

[[blob]]
path = {q(b)}
gpa = 0x201000
"""


def _beyond_limit(tmp: Path) -> str:
    blob = _blob(tmp, "high.bin", 0x1000)
    return f'[image]\nplatforms = ["tdx"]\n\n[[blob]]\npath = {q(blob)}\ngpa = {1 << 48:#x}\n'


def _patched_grub(tmp: Path, name: str, edit: Callable[[bytearray], None]) -> Path:
    data = bytearray(GRUB.read_bytes())
    edit(data)
    path = tmp / name
    path.write_bytes(bytes(data))
    return path


def _kernel_config(path: Path) -> str:
    return f'[image]\nplatforms = ["native"]\n\n[kernel]\npath = {q(path)}\n'


def _aarch64(tmp: Path) -> str:
    def edit(d: bytearray) -> None:
        struct.pack_into("<H", d, 18, 183)  # e_machine = EM_AARCH64

    return _kernel_config(_patched_grub(tmp, "arm.elf", edit))


def _no_load(tmp: Path) -> str:
    def edit(d: bytearray) -> None:
        phoff, = struct.unpack_from("<I", d, 28)  # ELF32 e_phoff
        phentsize, phnum = struct.unpack_from("<HH", d, 42)
        for i in range(phnum):
            off = phoff + i * phentsize
            if struct.unpack_from("<I", d, off)[0] == 1:  # PT_LOAD -> PT_NULL
                struct.pack_into("<I", d, off, 0)

    return _kernel_config(_patched_grub(tmp, "noload.elf", edit))


CASES = [
    Case("missing firmware",
         lambda t: f'[image]\nplatforms = ["snp"]\n[firmware]\npath = {q(t / "missing-OVMF.fd")}\n',
         InputError, lambda t: [str(t / "missing-OVMF.fd"), "firmware", "No such file"]),
    Case("missing initrd",
         lambda t: f'[image]\nplatforms = ["native"]\n[kernel]\npath = {q(MEMTEST)}\ninitrd = {q(t / "no-initrd")}\n',
         InputError, lambda t: [str(t / "no-initrd"), "initrd", "No such file"]),
    Case("missing blob",
         lambda t: '[image]\nplatforms = ["native"]\n[[blob]]\npath = "data/none.bin"\ngpa = 0x1000\n',
         InputError, lambda t: [str(t / "data" / "none.bin"), "blob"]),
    Case("overlapping blobs", _overlap, LayoutError,
         lambda t: [str(t / "first.bin"), str(t / "second.bin"), "overlaps", "0x201000"]),
    Case("GPA beyond the TDX limit", _beyond_limit, LayoutError,
         lambda t: [str(t / "high.bin"), "TDX", hex(1 << 48)]),
    Case("wrong ELF machine", _aarch64, InputError,
         lambda t: [str(t / "arm.elf"), "aarch64", "x86_64"]),
    Case("ELF without loadable segments", _no_load, InputError,
         lambda t: [str(t / "noload.elf"), "no loadable segments"]),
    Case("OVMF without SEV metadata for SNP",
         lambda t: f'[image]\nplatforms = ["native", "snp"]\n[firmware]\npath = {q(OVMF_CODE_4M)}\n',
         InputError, lambda t: [str(OVMF_CODE_4M), "SEV metadata", "SEV-SNP"]),
    Case("unknown key",
         lambda t: f'[image]\nplatforms = ["snp"]\n\n[firmware]\npath = {q(OVMF_BOOKWORM)}\n\n[snp]\nvcpu = 2\n',
         ConfigError, lambda t: [str(t / "cfg.toml") + ":8", "snp.vcpu", "did you mean 'vcpus'"]),
    Case("unknown table",
         lambda t: f'[image]\nplatforms = ["snp"]\n\n[firmwre]\npath = {q(OVMF_BOOKWORM)}\n',
         ConfigError, lambda t: [str(t / "cfg.toml") + ":4", "firmwre", "did you mean 'firmware'"]),
    Case("unknown blob key",
         lambda t: '[image]\nplatforms = ["native"]\n[[blob]]\npath = "x"\ngap = 0x1000\n',
         ConfigError, lambda t: [str(t / "cfg.toml") + ":5", "gap", "did you mean 'gpa'"]),
    Case("TOML syntax error",
         lambda t: '[image]\nplatforms = ["snp"]\nloader = qemu\n',
         ConfigError, lambda t: [str(t / "cfg.toml") + ":3", "invalid TOML"]),
    Case("TOML unclosed array",
         lambda t: '[image]\nplatforms = ["snp",\n',
         ConfigError, lambda t: [str(t / "cfg.toml") + ":2", "invalid TOML"]),
    Case("unknown vCPU type",
         lambda t: f'[image]\nplatforms = ["snp"]\n[firmware]\npath = {q(OVMF_BOOKWORM)}\n[snp]\nvcpu_type = "EPYC-v9"\n',
         ConfigError, lambda t: [str(t / "cfg.toml") + ":6", "snp.vcpu_type", "EPYC-v9", "EPYC-Genoa"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_via_cli(tmp_path: Path, case: Case) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(case.make(tmp_path))
    out = tmp_path / "out.igvm"
    proc = cli("build", str(cfg), "-o", str(out), cwd=tmp_path)
    assert_cli_error(proc, *case.needles(tmp_path))
    assert proc.stdout == ""
    assert_no_output(tmp_path, out)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_via_api(tmp_path: Path, case: Case) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(case.make(tmp_path))
    with pytest.raises(case.error) as info:
        build_file(load_config(cfg))
    text = str(info.value)
    for needle in case.needles(tmp_path):
        assert needle in text, (needle, text)
    assert "\n" not in text


def test_existing_output_untouched_on_error(tmp_path: Path) -> None:
    """A failed build leaves a previous output as it was (the writer is atomic)."""
    out = tmp_path / "out.igvm"
    out.write_bytes(b"previous build")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[image]\nplatforms = ["tdx"]\n[firmware]\npath = {q(OVMF_CODE_4M)}\n')
    proc = cli("build", str(cfg), "-o", str(out))
    assert_cli_error(proc, str(OVMF_CODE_4M), "TDX")
    assert out.read_bytes() == b"previous build"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".igvm-")]


def test_layout_error_carries_the_gpa(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(_overlap(tmp_path))
    with pytest.raises(LayoutError) as info:
        build_file(load_config(cfg))
    assert info.value.gpa == 0x201000


def test_missing_config_file(tmp_path: Path) -> None:
    out = tmp_path / "out.igvm"
    proc = cli("build", str(tmp_path / "nope.toml"), "-o", str(out))
    assert_cli_error(proc, str(tmp_path / "nope.toml"), "cannot read config")
    assert_no_output(tmp_path, out)


# --------------------------------------------------------------------------- outputs that cannot be written


def _good_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[image]\nplatforms = ["native"]\n[kernel]\npath = {q(MEMTEST)}\n[memory]\nsize = "1G"\n')
    return cfg


def test_output_in_a_missing_directory(tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "out.igvm"
    proc = cli("build", str(_good_config(tmp_path)), "-o", str(out))
    assert_cli_error(proc, str(out), "no such directory")
    assert not (tmp_path / "no").exists()


def test_output_that_is_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "outdir"
    out.mkdir()
    proc = cli("build", str(_good_config(tmp_path)), "-o", str(out))
    assert_cli_error(proc, str(out), "is a directory")
    assert list(out.iterdir()) == []
    assert_no_output(tmp_path, tmp_path / "out.igvm")


def test_reference_values_in_a_missing_directory_leave_nothing(tmp_path: Path) -> None:
    """The image's temporary file, already created, goes when its companion cannot be."""
    out, refs = tmp_path / "out.igvm", tmp_path / "missing" / "out.json"
    proc = cli("build", str(_good_config(tmp_path)), "-o", str(out), "--reference-values", str(refs))
    assert_cli_error(proc, str(refs), "no such directory")
    assert_no_output(tmp_path, out)


def test_disk_full_names_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import errno
    import os

    import igvm_builder.cli
    import igvm_builder.io

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(igvm_builder.io.os, "fsync", full)
    out = tmp_path / "out.igvm"
    rc = igvm_builder.cli.main(["build", str(_good_config(tmp_path)), "-o", str(out),
                                "--reference-values", str(tmp_path / "out.json")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{out}: cannot write: No space left on device" in err[0]
    assert_no_output(tmp_path, out)
    assert not (tmp_path / "out.json").exists()


def test_disk_full_while_streaming_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The data section is written by the build's writer thread: a failure there is the build's
    one-line error too, and nothing is left behind."""
    import errno
    import os

    import igvm_builder.cli
    import igvm_builder.io

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh: object) -> None:
            self.fh, self.written = fh, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 1 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.fh.write(data)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self.fh, name)

    monkeypatch.setattr(igvm_builder.io.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(os.urandom(3 << 20))  # several MiB of data: more than the disk takes
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[image]\nplatforms = ["native", "snp"]\n[kernel]\npath = {q(MEMTEST)}\n'
                   f'initrd = {q(initrd)}\n[memory]\nsize = "1G"\n')
    out = tmp_path / "out.igvm"
    rc = igvm_builder.cli.main(["build", str(cfg), "-o", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err == [f"igvm-builder build: error: {out}: cannot write: No space left on device"], err
    assert_no_output(tmp_path, out)
