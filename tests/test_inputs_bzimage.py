"""Tests for igvm_builder.inputs.bzimage against the real bzImages in ../shared/inputs.

Header expectations are the table in ../shared/inputs/PROVENANCE.md; zero-page offsets are
written out here as literals from the kernel's Documentation/arch/x86/zero-page.rst and
boot.rst, independently of the module's constants.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from igvm_builder.errors import InputError, LayoutError
from igvm_builder.inputs.bzimage import (
    E820_ACPI,
    E820_RAM,
    E820_RESERVED,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    BzImage,
    E820Entry,
    build_boot_params,
    parse_bzimage,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INPUTS = SHARED / "inputs"
VMLINUZ = INPUTS / "vmlinuz-6.1.0-56-cloud-amd64"  # 14 MB: the only large input used here
MEMTEST = INPUTS / "memtest86+x64.bin"
IPXE = INPUTS / "ipxe.lkrn"

# PROVENANCE.md, "bzImages (Linux x86 boot protocol)"
EXPECTED = {
    VMLINUZ.name: dict(
        version=0x020F, setup_sects=39, setup_size=0x5000, kernel_len=14_164_480, loadflags=0x01,
        code32_start=0x100000, kernel_alignment=0x200000, relocatable_kernel=1, min_alignment=21,
        xloadflags=0x7F, cmdline_size=0x7FF, payload_offset=0x2CC, payload_length=0xD696CC,
        pref_address=0x1000000, init_size=0x3378000, handover_offset=0xD72F10,
        kernel_info_offset=0xD7F91C, efi_stub=True),
    MEMTEST.name: dict(
        version=0x020C, setup_sects=2, setup_size=0x600, kernel_len=142_776, loadflags=0x01,
        code32_start=0x100000, kernel_alignment=0x1000, relocatable_kernel=0, min_alignment=12,
        xloadflags=0x09, cmdline_size=0xFF, payload_offset=0, payload_length=0,
        pref_address=0x100000, init_size=0x6ACF8, handover_offset=0x10, kernel_info_offset=0,
        efi_stub=False),
    IPXE.name: dict(
        version=0x0207, setup_sects=5, setup_size=0xC00, kernel_len=303_449, loadflags=0x01,
        code32_start=0, kernel_alignment=0, relocatable_kernel=0, min_alignment=0,
        xloadflags=0, cmdline_size=0x7FF, payload_offset=0, payload_length=0,
        pref_address=0, init_size=0, handover_offset=0, kernel_info_offset=0, efi_stub=False),
}

E820 = (
    E820Entry(0, 0x9FC00, E820_RAM),
    E820Entry(0x9FC00, 0x400, E820_RESERVED),
    E820Entry(0xF0000, 0x10000, E820_RESERVED),
    E820Entry(0x100000, 0x7FE00000, E820_RAM),
    E820Entry(0x7FF00000, 0x100000, E820_ACPI),
    E820Entry(0x1_0000_0000, 0x1_8000_0000, E820_RAM),
)


@pytest.fixture(scope="module")
def vmlinuz() -> bytes:
    return VMLINUZ.read_bytes()


def load(path: Path) -> bytes:
    return VMLINUZ.read_bytes() if path == VMLINUZ else path.read_bytes()


@pytest.mark.parametrize("path", [VMLINUZ, MEMTEST, IPXE], ids=lambda p: p.name)
def test_setup_header_matches_provenance(path: Path) -> None:
    data = load(path)
    bz = parse_bzimage(data, path.name)
    exp = EXPECTED[path.name]
    assert bz.boot_flag == 0xAA55
    for field in ("version", "setup_sects", "setup_size", "loadflags", "code32_start",
                  "kernel_alignment", "relocatable_kernel", "min_alignment", "xloadflags",
                  "cmdline_size", "payload_offset", "payload_length", "pref_address", "init_size",
                  "handover_offset", "kernel_info_offset", "efi_stub"):
        assert getattr(bz, field) == exp[field], field
    assert len(bz.kernel) == exp["kernel_len"]
    assert bz.setup_size + len(bz.kernel) == len(data)
    # the protected-mode kernel is a view of the input, not a copy
    assert isinstance(bz.kernel, memoryview) and bz.kernel.obj is data
    assert bz.kernel == data[(exp["setup_sects"] + 1) * 512 :]
    assert bz.setup == data[: bz.setup_size]
    # the header the protocol says to copy: 0x1f1 .. 0x202 + data[0x201]
    assert bz.header == data[0x1F1 : 0x202 + data[0x201]]


def test_vmlinuz_details(vmlinuz: bytes) -> None:
    bz = parse_bzimage(vmlinuz, VMLINUZ.name, require_64bit=True, require_relocatable=True)
    assert bz.protocol == (2, 15)
    assert bz.relocatable and bz.supports_64bit_entry and bz.can_be_loaded_above_4g
    assert bz.load_alignment == 1 << 21
    assert bz.default_load_address == 0x1000000
    assert bz.entry_point(0x1000000) == 0x1000200
    assert bz.entry_point(0x1000000, mode64=False) == 0x1000000
    assert bz.memory_footprint == 0x3378000
    # LZ4 legacy frame at payload_offset, relative to the protected-mode kernel
    assert bytes(bz.kernel[bz.payload_offset : bz.payload_offset + 4]) == bytes.fromhex("02214c18")
    bz.check_load_address(0x1000000)
    bz.check_load_address(0x2200000)
    with pytest.raises(LayoutError, match="not aligned"):
        bz.check_load_address(0x1001000)


def test_memtest_is_64bit_but_fixed() -> None:
    bz = parse_bzimage(MEMTEST.read_bytes(), MEMTEST.name, require_64bit=True)
    assert bz.supports_64bit_entry and not bz.relocatable and not bz.can_be_loaded_above_4g
    assert bz.default_load_address == 0x100000
    bz.check_load_address(0x100000)
    with pytest.raises(LayoutError, match=r"memtest86\+x64\.bin.*not relocatable.*0x100000"):
        bz.check_load_address(0x200000)
    with pytest.raises(InputError, match=r"memtest86\+x64\.bin\b.*kernel is not relocatable"):
        parse_bzimage(MEMTEST.read_bytes(), MEMTEST.name, require_relocatable=True)


def test_ipxe_old_protocol() -> None:
    bz = parse_bzimage(IPXE.read_bytes(), IPXE.name)
    assert bz.protocol == (2, 7)
    assert bz.default_load_address == 0x100000  # no pref_address before 2.10
    assert bz.memory_footprint == 303_449
    with pytest.raises(InputError, match=r"ipxe\.lkrn\b.*kernel has no 64-bit entry point \(protocol 2\.07"):
        parse_bzimage(IPXE.read_bytes(), IPXE.name, require_64bit=True)
    with pytest.raises(InputError, match="XLF_KERNEL_64"):
        bz.entry_point(0x100000)
    assert bz.entry_point(0x100000, mode64=False) == 0x100000


def test_setup_sects_zero_means_four() -> None:
    data = bytearray(MEMTEST.read_bytes())
    data[0x1F1] = 0
    struct.pack_into("<I", data, 0x1F4, (len(data) - 5 * 512 + 15) // 16)  # syssize to match
    bz = parse_bzimage(bytes(data), "m.bin")
    assert bz.setup_sects == 0 and bz.setup_size == 5 * 512
    assert len(bz.kernel) == len(data) - 5 * 512


# --------------------------------------------------------------------------------------
# rejected inputs


def test_elf_is_not_a_bzimage() -> None:
    with pytest.raises(InputError, match=r"grub\.bin: not a Linux bzImage"):
        parse_bzimage((INPUTS / "grub-i386-xen_pvh.bin").read_bytes(), "grub.bin")


@pytest.mark.parametrize("data", [b"", b"MZ", bytes(0x1000), bytes(range(256)) * 16])
def test_garbage(data: bytes) -> None:
    with pytest.raises(InputError, match=r"^junk: "):
        parse_bzimage(data, "junk")


def test_old_protocol_rejected() -> None:
    data = bytearray(MEMTEST.read_bytes())
    struct.pack_into("<H", data, 0x206, 0x0205)
    with pytest.raises(InputError, match=r"m\.bin.*boot protocol 2\.05 is too old"):
        parse_bzimage(bytes(data), "m.bin")


def test_zimage_rejected() -> None:
    data = bytearray(MEMTEST.read_bytes())
    data[0x211] &= ~0x01
    with pytest.raises(InputError, match=r"m\.bin.*zImage"):
        parse_bzimage(bytes(data), "m.bin")


@pytest.mark.parametrize(("cut", "pattern"), [
    (0x100, "too short"),
    (0x250, "truncated setup header"),
    (0x5000, "real-mode setup alone is 0x5000"),
    (0x5000 + 4096, "syssize says"),
    (14_184_960 - 64, "syssize says"),
])
def test_truncated_vmlinuz(vmlinuz: bytes, cut: int, pattern: str) -> None:
    with pytest.raises(InputError, match=r"^vmlinuz\b.*" + pattern):
        parse_bzimage(vmlinuz[:cut], "vmlinuz")


# --------------------------------------------------------------------------------------
# the zero page


def u32(buf: bytes, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def test_boot_params_vmlinuz(vmlinuz: bytes) -> None:
    bz = parse_bzimage(vmlinuz, VMLINUZ.name)
    cmdline = b"console=ttyS0 root=/dev/vda1"
    zp = build_boot_params(bz, cmdline_ptr=0x20000, cmdline_size=len(cmdline),
                           initrd_addr=0x7000000, initrd_size=0x123456, e820=E820)
    assert len(zp) == 4096
    # type_of_loader 0x210, loadflags 0x211, cmd_line_ptr 0x228, ramdisk_image/size 0x218/0x21c
    assert zp[0x210] == 0xFF
    assert zp[0x211] == 0x01  # LOADED_HIGH as in the image; no heap, no KEEP_SEGMENTS
    assert u32(zp, 0x228) == 0x20000
    assert (u32(zp, 0x218), u32(zp, 0x21C)) == (0x7000000, 0x123456)
    # ext_ramdisk_image 0x0c0, ext_ramdisk_size 0x0c4, ext_cmd_line_ptr 0x0c8
    assert (u32(zp, 0xC0), u32(zp, 0xC4), u32(zp, 0xC8)) == (0, 0, 0)
    # the setup header is the image's, except the fields the loader writes
    changed = {0x210} | set(range(0x218, 0x220)) | set(range(0x228, 0x22C))
    for off in range(0x1F1, 0x202 + vmlinuz[0x201]):
        if off not in changed:
            assert zp[off] == vmlinuz[off], hex(off)
    # the 64-bit entry reads these from boot_params: kernel_alignment 0x230, init_size 0x260
    assert u32(zp, 0x230) == 0x200000 and u32(zp, 0x260) == 0x3378000
    assert zp[0x202:0x206] == b"HdrS"
    # e820_entries 0x1e8, e820_table 0x2d0: 20-byte packed {u64 addr, u64 size, u32 type}
    assert zp[0x1E8] == len(E820)
    for i, entry in enumerate(E820):
        assert struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) == (entry.addr, entry.size, entry.type)
    assert not zp[0x2D0 + 20 * len(E820) :].strip(b"\x00")
    # everything before the header is zero except e820_entries (incl. sentinel 0x1ef)
    before = bytearray(zp[:0x1F1])
    before[0x1E8] = 0
    assert not before.strip(b"\x00")
    # deterministic
    assert zp == build_boot_params(bz, cmdline_ptr=0x20000, cmdline_size=len(cmdline),
                                   initrd_addr=0x7000000, initrd_size=0x123456, e820=E820)


def test_boot_params_above_4g(vmlinuz: bytes) -> None:
    bz = parse_bzimage(vmlinuz, VMLINUZ.name)
    assert bz.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G
    zp = build_boot_params(bz, cmdline_ptr=0x1_2345_6000, cmdline_size=10,
                           initrd_addr=0x2_0000_1000, initrd_size=0x1_0000_0010, e820=E820,
                           loader_type=0x0E, acpi_rsdp_addr=0xF0000, setup_data=0x30000,
                           cc_blob_address=0x80000)
    assert (u32(zp, 0x228), u32(zp, 0xC8)) == (0x2345_6000, 0x1)
    assert (u32(zp, 0x218), u32(zp, 0xC0)) == (0x0000_1000, 0x2)
    assert (u32(zp, 0x21C), u32(zp, 0xC4)) == (0x10, 0x1)
    assert zp[0x210] == 0x0E
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xF0000  # acpi_rsdp_addr
    assert struct.unpack_from("<Q", zp, 0x250)[0] == 0x30000  # hdr.setup_data
    assert u32(zp, 0x13C) == 0x80000  # cc_blob_address


def test_boot_params_no_cmdline_no_initrd() -> None:
    bz = parse_bzimage(MEMTEST.read_bytes(), MEMTEST.name)
    assert bz.xloadflags & XLF_KERNEL_64
    zp = build_boot_params(bz, cmdline_ptr=0, cmdline_size=0, initrd_addr=0, initrd_size=0, e820=())
    assert u32(zp, 0x228) == u32(zp, 0x218) == u32(zp, 0x21C) == 0
    assert zp[0x1E8] == 0


def test_boot_params_old_protocol_keeps_image_bytes() -> None:
    data = IPXE.read_bytes()
    bz = parse_bzimage(data, IPXE.name)
    zp = build_boot_params(bz, cmdline_ptr=0x20000, cmdline_size=5, initrd_addr=0, initrd_size=0,
                           e820=E820[:1])
    assert zp[0x1F1:0x210] == data[0x1F1:0x210]
    assert zp[0x250:0x267] == data[0x250:0x267]  # protocol 2.07: no setup_data field to write
    with pytest.raises(LayoutError, match=r"2\.09"):
        build_boot_params(bz, cmdline_ptr=0, cmdline_size=0, initrd_addr=0, initrd_size=0, e820=(),
                          setup_data=0x1000)


def memtest() -> BzImage:
    return parse_bzimage(MEMTEST.read_bytes(), MEMTEST.name)


def test_too_many_e820_entries() -> None:
    e820 = [E820Entry(i * 0x1000, 0x1000, E820_RAM) for i in range(129)]
    with pytest.raises(LayoutError, match=r"memtest86\+x64\.bin: 129 e820 entries"):
        build_boot_params(memtest(), cmdline_ptr=0, cmdline_size=0, initrd_addr=0, initrd_size=0,
                          e820=e820)
    zp = build_boot_params(memtest(), cmdline_ptr=0, cmdline_size=0, initrd_addr=0, initrd_size=0,
                           e820=e820[:128])
    assert zp[0x1E8] == 128
    assert struct.unpack_from("<QQI", zp, 0x2D0 + 127 * 20) == (127 * 0x1000, 0x1000, 1)


def test_cmdline_too_long() -> None:
    with pytest.raises(LayoutError, match="256 bytes; this kernel accepts at most 255"):
        build_boot_params(memtest(), cmdline_ptr=0x20000, cmdline_size=256, initrd_addr=0,
                          initrd_size=0, e820=())


def test_above_4g_needs_xloadflag() -> None:
    with pytest.raises(LayoutError, match="below 4 GiB"):
        build_boot_params(memtest(), cmdline_ptr=0x1_0000_0000, cmdline_size=1, initrd_addr=0,
                          initrd_size=0, e820=())
    with pytest.raises(LayoutError, match="initrd_addr_max"):
        build_boot_params(memtest(), cmdline_ptr=0, cmdline_size=0, initrd_addr=0xFFFF_F000,
                          initrd_size=0x2000, e820=())


def test_initrd_addr_max() -> None:
    data = bytearray(MEMTEST.read_bytes())
    struct.pack_into("<I", data, 0x22C, 0x7FFF_FFFF)
    bz = parse_bzimage(bytes(data), "m.bin")
    build_boot_params(bz, cmdline_ptr=0, cmdline_size=0, initrd_addr=0x7FFF_0000, initrd_size=0x10000,
                      e820=())
    with pytest.raises(LayoutError, match=r"initrd ends at 0x80000000, above initrd_addr_max 0x7fffffff"):
        build_boot_params(bz, cmdline_ptr=0, cmdline_size=0, initrd_addr=0x7FFF_0000,
                          initrd_size=0x10001, e820=())


def test_inconsistent_arguments() -> None:
    with pytest.raises(LayoutError):
        build_boot_params(memtest(), cmdline_ptr=0, cmdline_size=3, initrd_addr=0, initrd_size=0, e820=())
    with pytest.raises(LayoutError):
        build_boot_params(memtest(), cmdline_ptr=0, cmdline_size=0, initrd_addr=0x1000, initrd_size=0,
                          e820=())
    with pytest.raises(LayoutError):
        build_boot_params(memtest(), cmdline_ptr=0, cmdline_size=0, initrd_addr=0, initrd_size=0,
                          e820=(), loader_type=0x100)


def test_e820_entry() -> None:
    entry = E820Entry(0x100000, 0x1000, E820_RAM)
    assert entry.pack() == struct.pack("<QQI", 0x100000, 0x1000, 1)
    assert E820Entry.unpack(entry.pack()) == entry
    assert E820Entry.SIZE == 20
    with pytest.raises(LayoutError):
        E820Entry(0, 0, E820_RAM)
    with pytest.raises(LayoutError):
        E820Entry(0xFFFF_FFFF_FFFF_F000, 0x2000, E820_RAM)


def test_snp_cc_blob_page() -> None:
    """struct setup_data (next u64, type u32, len u32) + u32 blob GPA, then struct cc_blob_sev_info
    (Linux arch/x86/include/asm/sev.h: magic, version, reserved, secrets phys/len/rsvd, cpuid ...)."""
    from igvm_builder.inputs.bzimage import snp_cc_blob_page

    page = snp_cc_blob_page(0x7000, secrets_gpa=0x5000, cpuid_gpa=0x6000)
    assert len(page) == 4096
    assert struct.unpack_from("<QIII", page, 0) == (0, 7, 4, 0x7020)
    assert struct.unpack_from("<IHHQIIQII", page, 0x20) == (0x45444D41, 1, 0, 0x5000, 4096, 0, 0x6000, 4096, 0)
    assert page[0x48:] == bytes(4096 - 0x48)
    bare = snp_cc_blob_page(0x7000, secrets_gpa=0x5000, cpuid_gpa=0x6000, with_setup_data=False)
    assert bare[:0x20] == bytes(0x20) and bare[0x20:] == page[0x20:]
    with pytest.raises(LayoutError, match="below 4 GiB"):
        snp_cc_blob_page(1 << 32, secrets_gpa=0x5000, cpuid_gpa=0x6000)
