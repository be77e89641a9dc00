"""Helpers shared by the ``tests/test_build_*.py`` modules (this module holds no tests).

Everything here reads the built file the way a loader would: the IGVM bytes are serialized and
parsed back, each platform's view is the headers whose compatibility mask has its bit, and the
register files are decoded with offsets written out below from ``IGVM_FORMAT.md`` Appendix A
(not with the builder's own encoders).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from igvm_builder.assemble import build_file
from igvm_builder.config import BuildConfig, load_config
from igvm_builder.format import headers as H
from igvm_builder.format.blob import as_view
from igvm_builder.format.defs import PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.measure import measure_platform

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIRMWARE = SHARED / "firmware"
INPUTS = SHARED / "inputs"
VECTORS = SHARED / "vectors"

OVMF_BOOKWORM = FIRMWARE / "bookworm-OVMF.fd"
OVMF_CODE_4M = FIRMWARE / "bookworm-OVMF_CODE_4M.fd"  # no SEV, no TDX metadata
OVMF_TRIXIE = FIRMWARE / "trixie-OVMF.fd"
OVMF_SID = FIRMWARE / "sid-OVMF.amdsev.fd"  # the only one with a kernel-hashes section
VMLINUZ = INPUTS / "vmlinuz-6.1.0-56-cloud-amd64"
MEMTEST = INPUTS / "memtest86+x64.bin"
IPXE = INPUTS / "ipxe.lkrn"
GRUB = INPUTS / "grub-i386-xen_pvh.bin"
UBOOT = INPUTS / "u-boot-qemu-x86_64.elf"

PAGE = 0x1000

for _tool in ("gcc", "ld", "readelf", "objcopy", "nm", "sev-snp-measure"):
    if shutil.which(_tool) is None:  # a hard requirement of the build tests, never a skip
        raise RuntimeError(f"{_tool} is required by the build tests")

PLATFORM = {
    "native": PlatformType.NATIVE,
    "snp": PlatformType.SEV_SNP,
    "tdx": PlatformType.TDX,
    "vbs": PlatformType.VSM_ISOLATION,
    "sev": PlatformType.SEV,
    "sev-es": PlatformType.SEV_ES,
}


# --------------------------------------------------------------------------- configs and builds


def q(path: os.PathLike[str] | str) -> str:
    """A TOML literal string for a path (no escapes)."""
    text = os.fspath(path)
    if "'" in text:
        raise ValueError(f"test path contains a quote: {text}")
    return f"'{text}'"


def write_config(directory: Path, body: str, name: str = "build.toml") -> Path:
    path = directory / name
    path.write_text(body)
    return path


def config(directory: Path, body: str, name: str = "build.toml") -> BuildConfig:
    return load_config(write_config(directory, body, name))


def build_igvm(cfg: BuildConfig) -> IgvmFile:
    """Build ``cfg`` and return the file as a loader sees it (serialized, then parsed back)."""
    f, _hashes, _notes = build_file(cfg)
    return IgvmFile.from_bytes(f.to_bytes())


def build_bytes(cfg: BuildConfig) -> bytes:
    f, _hashes, _notes = build_file(cfg)
    return f.to_bytes()


def cli(*args: str, cwd: Path | str | None = None, env: Mapping[str, str] | None = None,
        umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m igvm_builder ARGS`` in a fresh interpreter (the package found through PYTHONPATH)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    full_env.pop("IGVM_BUILDER_DEBUG", None)
    full_env.update(env or {})

    def preexec() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run([sys.executable, "-m", "igvm_builder", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def assert_cli_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2 (unusable input), exactly one line on stderr (no traceback) naming every ``needle``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("igvm-builder build: error: "), line
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def assert_no_output(directory: Path, output: Path) -> None:
    """Neither the output nor a left-over temporary file of the atomic writer exists."""
    assert not output.exists()
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".igvm-")]
    assert not leftovers, leftovers


# --------------------------------------------------------------------------- reading a built file


def mask_of(f: IgvmFile, platform: str | PlatformType) -> int:
    ptype = PLATFORM[platform] if isinstance(platform, str) else platform
    p = f.platform(ptype)
    assert p is not None, f"file has no {ptype.name} platform"
    return p.compatibility_mask


def projection(f: IgvmFile, platform: str | PlatformType) -> list[H.Header]:
    """The directive headers one platform's loader processes, in file order."""
    mask = mask_of(f, platform)
    return [h for h in f.directives if h.mask is None or h.mask & mask]


def page_map(f: IgvmFile, platform: str | PlatformType) -> dict[int, H.PageData]:
    """GPA -> PAGE_DATA header of one platform; a GPA imported twice is a test failure."""
    out: dict[int, H.PageData] = {}
    for h in projection(f, platform):
        if isinstance(h, H.PageData):
            assert h.gpa not in out, f"GPA {h.gpa:#x} imported twice"
            out[h.gpa] = h
    return out


def page_bytes(h: H.PageData) -> bytes:
    """The 4 KiB a page holds after import: its data zero-padded (zeros for a page without data)."""
    data = bytes(as_view(h.data)) if len(h.data) else b""
    assert len(data) <= PAGE
    return data + bytes(PAGE - len(data))


def read_guest(pages: Mapping[int, H.PageData], gpa: int, size: int) -> bytes:
    """``size`` bytes of guest memory at ``gpa`` (every page touched must be imported)."""
    out = bytearray()
    addr = gpa
    while len(out) < size:
        page = addr & ~(PAGE - 1)
        assert page in pages, f"GPA {page:#x} is not imported"
        chunk = page_bytes(pages[page])[addr - page :]
        out += chunk[: size - len(out)]
        addr = page + PAGE
    return bytes(out)


def read_cstring(pages: Mapping[int, H.PageData], gpa: int, limit: int = PAGE) -> bytes:
    raw = read_guest(pages, gpa, min(limit, PAGE - (gpa & (PAGE - 1))))
    assert b"\0" in raw, f"string at {gpa:#x} is not NUL-terminated within its page"
    return raw[: raw.index(b"\0")]


# IgvmNativeVpContextX64 (IGVM_FORMAT.md Appendix A): name -> (offset, struct format)
NATIVE_FIELDS = {
    "rax": (0, "Q"), "rcx": (8, "Q"), "rdx": (16, "Q"), "rbx": (24, "Q"), "rsp": (32, "Q"),
    "rbp": (40, "Q"), "rsi": (48, "Q"), "rdi": (56, "Q"), "rip": (128, "Q"), "rflags": (136, "Q"),
    "gdtr_limit": (158, "H"), "gdtr_base": (160, "Q"), "code_selector": (168, "H"),
    "code_attributes": (170, "H"), "code_base": (172, "I"), "code_limit": (176, "I"),
    "data_selector": (180, "H"), "data_attributes": (182, "H"), "cr0": (200, "Q"), "cr3": (208, "Q"),
    "cr4": (216, "Q"), "efer": (224, "Q"),
}

# SevVmsa (IGVM_FORMAT.md Appendix A.2)
VMSA_FIELDS = {
    "cs.selector": (0x10, "H"), "cs.attrib": (0x12, "H"), "gdtr.limit": (0x64, "I"), "gdtr.base": (0x68, "Q"),
    "efer": (0xD0, "Q"), "cr4": (0x148, "Q"), "cr3": (0x150, "Q"), "cr0": (0x158, "Q"),
    "rflags": (0x170, "Q"), "rip": (0x178, "Q"), "rsp": (0x1D8, "Q"), "rax": (0x1F8, "Q"),
    "rdx": (0x310, "Q"), "rbx": (0x318, "Q"), "rsi": (0x330, "Q"), "sev_features": (0x3B0, "Q"),
}


def _decode(raw: bytes, fields: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    return {name: struct.unpack_from("<" + fmt, raw, off)[0] for name, (off, fmt) in fields.items()}


def native_context(f: IgvmFile, platform: str | PlatformType = "native") -> dict[str, int]:
    ctxs = [h for h in projection(f, platform) if isinstance(h, H.NativeVpContext)]
    assert len(ctxs) == 1, ctxs
    return _decode(bytes(ctxs[0].context), NATIVE_FIELDS)


def vmsas(f: IgvmFile) -> list[H.SnpVpContext]:
    return [h for h in projection(f, "snp") if isinstance(h, H.SnpVpContext)]


def vmsa_fields(f: IgvmFile, vp_index: int = 0) -> dict[str, int]:
    ctx = [h for h in vmsas(f) if h.vp_index == vp_index]
    assert len(ctx) == 1
    return _decode(bytes(as_view(ctx[0].blob())), VMSA_FIELDS)


def snp_digest(f: IgvmFile, loader: str) -> str:
    m = measure_platform(f, PlatformType.SEV_SNP, loader=loader)
    assert m.hex is not None
    return m.hex


def tdx_mrtd(f: IgvmFile, two_pass: bool = False) -> str:
    m = measure_platform(f, PlatformType.TDX, tdx_two_pass=two_pass)
    assert m.hex is not None
    return m.hex


def without_masks(hs: list[H.Header]) -> list[tuple[Any, ...]]:
    """Headers compared apart from their compatibility masks: (type, packed body, data)."""
    out = []
    for h in hs:
        if h.mask is not None:
            h = replace(h, compatibility_mask=1)
        blob = h.blob()
        out.append((type(h).__name__, h.pack_body(0), bytes(as_view(blob)) if blob is not None else None))
    return out


# --------------------------------------------------------------------------- page tables


def walk_page_tables(pages: Mapping[int, H.PageData], cr3: int, va: int, *, c_bit: int | None = None
                     ) -> int:
    """Translate ``va`` through 4-level x86-64 tables at ``cr3`` (present bits and C-bit checked)."""
    addr_mask = ((1 << 52) - 1) & ~0xFFF
    if c_bit is not None:
        addr_mask &= ~(1 << c_bit)
    table = cr3 & addr_mask
    for level, shift in enumerate((39, 30, 21, 12)):
        index = (va >> shift) & 0x1FF
        (entry,) = struct.unpack("<Q", read_guest(pages, table + index * 8, 8))
        assert entry & 1, f"not present: level {level} entry {index} for {va:#x}"
        if c_bit is not None:
            assert entry & (1 << c_bit), f"C-bit clear in level {level} entry for {va:#x}"
        if shift in (30, 21) and entry & 0x80:  # 1 GiB / 2 MiB page
            base = entry & addr_mask & ~((1 << shift) - 1)
            return base | (va & ((1 << shift) - 1))
        table = entry & addr_mask
    return table | (va & 0xFFF)


# --------------------------------------------------------------------------- binutils


_LOAD_RE = re.compile(
    r"^\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s")


def readelf_loads(path: Path) -> list[tuple[int, int, int, int]]:
    """(p_offset, p_paddr, p_filesz, p_memsz) of every PT_LOAD, from ``readelf -lW``."""
    out = subprocess.run(["readelf", "-lW", str(path)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = _LOAD_RE.match(line)
        if m:
            off, _vaddr, paddr, filesz, memsz = (int(x, 16) for x in m.groups())
            rows.append((off, paddr, filesz, memsz))
    assert rows, out
    return rows


def readelf_pvh_entry(path: Path) -> int:
    """The XEN_ELFNOTE_PHYS32_ENTRY descriptor (type 0x12) as ``readelf -nW`` prints it."""
    out = subprocess.run(["readelf", "-nW", str(path)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "Xen" in line and "0x00000012" in line:
            data = bytes(int(b, 16) for b in line.split("description data:")[1].split())
            return int.from_bytes(data[:4], "little")
    raise AssertionError(f"no PVH note in {path}:\n{out}")


def elf_memory_image(path: Path) -> dict[int, bytes]:
    """Expected 4 KiB pages of the PT_LOAD segments: file bytes at p_paddr, zeros up to p_memsz."""
    data = path.read_bytes()
    image: dict[int, bytearray] = {}
    for off, paddr, filesz, memsz in readelf_loads(path):
        if memsz == 0:
            continue
        for page in range(paddr & ~(PAGE - 1), paddr + memsz, PAGE):
            image.setdefault(page, bytearray(PAGE))
        content = data[off : off + filesz]
        pos = 0
        while pos < filesz:
            gpa = paddr + pos
            page = gpa & ~(PAGE - 1)
            n = min(PAGE - (gpa - page), filesz - pos)
            image[page][gpa - page : gpa - page + n] = content[pos : pos + n]
            pos += n
    return {k: bytes(v) for k, v in image.items()}
