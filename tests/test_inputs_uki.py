"""Tests for igvm_builder.inputs.uki and igvm_builder.inputs.blob.

UKIs are assembled in the test two independent ways: (1) a PE32+ EFI stub linked by GNU ld
(``-m i386pep``) with the payload sections added by ``objcopy --add-section``, as older ukify
and dracut did; (2) a PE32+ written byte by byte below (for multi-profile UKIs, which objcopy
cannot make, and for malformed section tables).  ``parse_uki`` must return exactly the bytes
put in.
"""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest
from kernels import IMAGE_BASE, compile_efi_stub, objcopy_uki

from igvm_builder.errors import InputError
from igvm_builder.inputs.blob import detect_kernel_format, pe_section_names
from igvm_builder.inputs.bzimage import parse_bzimage
from igvm_builder.inputs.uki import parse_uki

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INPUTS = SHARED / "inputs"
VMLINUZ = INPUTS / "vmlinuz-6.1.0-56-cloud-amd64"
MEMTEST = INPUTS / "memtest86+x64.bin"
IPXE = INPUTS / "ipxe.lkrn"
GRUB = INPUTS / "grub-i386-xen_pvh.bin"
UBOOT = INPUTS / "u-boot-qemu-x86_64.elf"

for _tool in ("gcc", "ld", "objcopy"):
    if shutil.which(_tool) is None:  # a hard requirement, not a skip
        raise RuntimeError(f"{_tool} is required by these tests (GNU binutils / gcc)")

@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal x86-64 EFI application (PE32+) linked by GNU ld."""
    return compile_efi_stub(tmp_path_factory.mktemp("stub"))


def hand_pe(sections: list[tuple[str, bytes, int | None]], *, file_align: int = 0x200) -> bytes:
    """A PE32+ image written field by field (PE/COFF spec): DOS stub header, COFF header,
    optional header with 16 data directories, section table, raw data padded to file_align.

    ``sections``: (name, payload, VirtualSize or None for len(payload)).
    """
    sect_align = 0x1000
    n = len(sections)
    headers_len = 0x40 + 4 + 20 + 0xF0 + 40 * n
    size_of_headers = -(-headers_len // file_align) * file_align
    table, raw = [], bytearray()
    ptr, rva = size_of_headers, sect_align
    for name, payload, vsize in sections:
        raw_size = -(-len(payload) // file_align) * file_align
        table.append(struct.pack("<8sIIIIIIHHI", name.encode(), len(payload) if vsize is None else vsize,
                                 rva, raw_size, ptr if raw_size else 0, 0, 0, 0, 0, 0x40000040))
        raw += payload + bytes(raw_size - len(payload))
        ptr += raw_size
        rva += -(-max(len(payload), 1) // sect_align) * sect_align
    dos = bytearray(0x40)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, n, 0, 0, 0, 0xF0, 0x0022)
    opt = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", 0x20B, 2, 40, 0, 0, 0, 0, 0, IMAGE_BASE,
                      sect_align, file_align, 0, 0, 0, 0, 0, 0, 0, rva, size_of_headers, 0, 10, 0,
                      0x100000, 0x1000, 0x100000, 0x1000, 0, 16) + bytes(16 * 8)
    head = bytes(dos) + b"PE\0\0" + coff + opt + b"".join(table)
    assert len(opt) == 0xF0
    return head + bytes(size_of_headers - len(head)) + bytes(raw)


def odd_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------------------


def test_objcopy_uki_returns_exact_bytes(stub: Path, tmp_path: Path) -> None:
    linux = MEMTEST.read_bytes()
    initrd = odd_bytes(12_345, 1)  # not a multiple of the 0x200 file alignment
    cmdline = b"console=ttyS0 root=/dev/vda1 quiet"
    osrel = b'ID=test\nVERSION_ID="1"\n'
    uname = b"6.1.0-test"
    path = objcopy_uki(stub, tmp_path, {".osrel": osrel, ".cmdline": cmdline, ".uname": uname,
                                        ".linux": linux, ".initrd": initrd})
    data = path.read_bytes()
    uki = parse_uki(data, path.name)
    assert uki.linux == linux
    assert uki.initrd == initrd
    assert uki.cmdline == cmdline.decode()
    assert uki.osrel == osrel.decode()
    assert uki.uname == uname.decode()
    assert uki.ucode is None and uki.sbat is None
    assert uki.profiles == 0
    assert {".linux", ".initrd", ".cmdline", ".osrel", ".uname", ".text"} <= set(uki.section_names)
    assert isinstance(uki.linux, bytes)
    # the same section table through the format sniffer
    assert pe_section_names(data) == uki.section_names
    assert detect_kernel_format(data, path.name) == "uki"
    # the kernel inside is the bzImage put in
    assert parse_bzimage(uki.linux, "uki.linux").init_size == 0x6ACF8


def test_uki_with_real_linux(stub: Path, tmp_path: Path) -> None:
    linux = VMLINUZ.read_bytes()
    path = objcopy_uki(stub, tmp_path, {".linux": linux, ".cmdline": b"console=hvc0\n\x00"})
    uki = parse_uki(path.read_bytes(), path.name)
    assert uki.linux == linux
    assert uki.cmdline == "console=hvc0\n"  # trailing NULs dropped, nothing else
    assert uki.initrd is None
    bz = parse_bzimage(uki.linux, "uki.linux", require_64bit=True)
    assert bz.protocol == (2, 15)


def test_only_linux(stub: Path, tmp_path: Path) -> None:
    path = objcopy_uki(stub, tmp_path, {".linux": b"\x01"})
    uki = parse_uki(path.read_bytes(), path.name)
    assert (uki.linux, uki.initrd, uki.cmdline, uki.osrel) == (b"\x01", None, None, None)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_input(wrap: type) -> None:
    data = hand_pe([(".linux", b"KERNEL", None), (".initrd", b"INITRD", None)])
    uki = parse_uki(wrap(data), "hand.efi")
    assert (uki.linux, uki.initrd) == (b"KERNEL", b"INITRD")


def test_multi_profile() -> None:
    data = hand_pe([
        (".linux", b"K" * 1000, None),
        (".cmdline", b"base", None),
        (".osrel", b"ID=base", None),
        (".profile", b"ID=a", None),
        (".cmdline", b"profile-a", None),
        (".profile", b"ID=b", None),
        (".cmdline", b"profile-b", None),
        (".initrd", b"INITRD-B", None),
    ])
    p0 = parse_uki(data, "multi.efi")
    assert (p0.cmdline, p0.osrel, p0.initrd, p0.profiles) == ("profile-a", "ID=base", None, 2)
    p1 = parse_uki(data, "multi.efi", profile=1)
    assert (p1.cmdline, p1.initrd) == ("profile-b", b"INITRD-B")
    assert p1.linux == b"K" * 1000
    with pytest.raises(InputError, match=r"multi\.efi: UKI has 2 profiles, no profile 2"):
        parse_uki(data, "multi.efi", profile=2)
    with pytest.raises(InputError, match="no profiles"):
        parse_uki(hand_pe([(".linux", b"K", None)]), "single.efi", profile=1)


# --------------------------------------------------------------------------------------
# rejected inputs: each a clear InputError naming the file


def test_pe_without_linux_section(stub: Path) -> None:
    with pytest.raises(InputError, match=r"^stub\.efi: not a UKI: PE file has no \.linux section"):
        parse_uki(stub.read_bytes(), "stub.efi")


def test_bzimage_with_efi_stub_is_not_a_uki() -> None:
    with pytest.raises(InputError, match=r"^vmlinuz: not a UKI: PE file has no \.linux section"):
        parse_uki(VMLINUZ.read_bytes(), "vmlinuz")


@pytest.mark.parametrize("path", [GRUB, MEMTEST, IPXE], ids=lambda p: p.name)
def test_non_pe_files(path: Path) -> None:
    with pytest.raises(InputError, match=rf"^{path.name.replace('+', '.')}: not a UKI: no PE/COFF header"):
        parse_uki(path.read_bytes(), path.name)


@pytest.mark.parametrize("data", [b"", b"MZ", b"MZ" + bytes(200), bytes(range(256)) * 8,
                                  b"garbage that is also a plausible file path"])
def test_garbage(data: bytes) -> None:
    with pytest.raises(InputError, match=r"^junk: "):
        parse_uki(data, "junk")


def test_broken_optional_header() -> None:
    """MZ and PE signatures intact, optional header nonsense: not a PE32/PE32+ image."""
    data = bytearray(hand_pe([(".linux", b"K", None)]))
    struct.pack_into("<H", data, 0x40 + 4 + 16, 0xA0)  # SizeOfOptionalHeader
    struct.pack_into("<H", data, 0x40 + 4 + 20, 0x1234)  # optional-header magic
    with pytest.raises(InputError, match=r"^bad\.efi: .*optional header \(magic 0x1234\)"):
        parse_uki(bytes(data), "bad.efi")


def test_truncated_uki(stub: Path, tmp_path: Path) -> None:
    path = objcopy_uki(stub, tmp_path, {".linux": MEMTEST.read_bytes(), ".initrd": odd_bytes(5000, 2)})
    data = path.read_bytes()
    for cut in (len(data) - 0x1000, len(data) // 2, 0x300, 0x80, 0x41, 0x3f):
        with pytest.raises(InputError, match=r"^uki\.efi\b"):
            parse_uki(data[:cut], "uki.efi")


def test_virtual_size_beyond_raw_data() -> None:
    data = hand_pe([(".linux", b"K" * 100, 0x10000)])
    with pytest.raises(InputError, match=r"h\.efi.*\.linux: VirtualSize 0x10000 exceeds"):
        parse_uki(data, "h.efi")


def test_empty_linux_section() -> None:
    with pytest.raises(InputError, match=r"h\.efi: UKI \.linux section is empty"):
        parse_uki(hand_pe([(".linux", b"", None), (".cmdline", b"x", None)]), "h.efi")


def test_cmdline_not_utf8() -> None:
    with pytest.raises(InputError, match=r"h\.efi: UKI section \.cmdline is not UTF-8"):
        parse_uki(hand_pe([(".linux", b"K", None), (".cmdline", b"\xff\xfe", None)]), "h.efi")


# --------------------------------------------------------------------------------------
# detect_kernel_format


@pytest.mark.parametrize(("path", "fmt"), [
    (GRUB, "elf"), (UBOOT, "elf"), (VMLINUZ, "bzimage"), (MEMTEST, "bzimage"), (IPXE, "bzimage"),
], ids=lambda x: x.name if isinstance(x, Path) else x)
def test_detect_real_inputs(path: Path, fmt: str) -> None:
    assert detect_kernel_format(path.read_bytes(), path.name) == fmt


def test_detect_uki_containing_bzimage(stub: Path, tmp_path: Path) -> None:
    path = objcopy_uki(stub, tmp_path, {".linux": MEMTEST.read_bytes()})
    assert detect_kernel_format(path.read_bytes()) == "uki"
    assert detect_kernel_format(hand_pe([(".linux", b"K", None)])) == "uki"


def test_detect_vmlinuz_pe_sections() -> None:
    """The EFI-stub bzImage is a PE too; objdump-style section names, no .linux."""
    names = pe_section_names(VMLINUZ.read_bytes())
    assert names == (".setup", ".compat", ".text", ".data")


@pytest.mark.parametrize("data", [b"", b"MZ", bytes(4096), b"\x7fEL", b"HdrS" * 200])
def test_detect_unknown(data: bytes) -> None:
    with pytest.raises(InputError, match=r"^blob\.bin: not a kernel image"):
        detect_kernel_format(data, "blob.bin")


def test_detect_efi_app_without_linux(stub: Path) -> None:
    with pytest.raises(InputError, match=r"stub\.efi: not a kernel image: a PE/COFF file without a \.linux"):
        detect_kernel_format(stub.read_bytes(), "stub.efi")
