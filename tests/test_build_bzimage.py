"""Issue #4: Linux boot-protocol kernels (bzImage) and UKIs booted without firmware.

Inputs: the real Debian kernel (``vmlinuz-6.1.0-56-cloud-amd64``, protocol 2.15), ``memtest86+x64.bin``
(2.12) and ``ipxe.lkrn`` (2.07: no pref_address, no 64-bit entry).  The setup header is parsed
here by hand (Documentation/arch/x86/boot.rst offsets), independently of
``igvm_builder.inputs.bzimage``; boot_params is decoded with the zero-page offsets of the same
document; page tables are walked from CR3.
"""

from __future__ import annotations

import itertools
import random
import struct
from pathlib import Path

import pytest
from kernels import compile_efi_stub, objcopy_uki
from test_build_elf import decode_tdx_trampoline
from test_build_helpers import (
    IPXE,
    MEMTEST,
    PAGE,
    VMLINUZ,
    build_bytes,
    build_igvm,
    config,
    native_context,
    page_bytes,
    page_map,
    q,
    read_cstring,
    read_guest,
    vmsa_fields,
    walk_page_tables,
    write_config,
)

CMDLINE = "console=ttyS0 root=/dev/vda1 ro quiet"
E820_RAM = 1

# zero-page (struct boot_params) offsets, boot.rst / zero-page.rst
BP_EXT_RAMDISK_IMAGE, BP_EXT_RAMDISK_SIZE, BP_EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
BP_E820_ENTRIES, BP_E820_TABLE = 0x1E8, 0x2D0
HDR_START = 0x1F1
HDR_TYPE_OF_LOADER, HDR_RAMDISK_IMAGE, HDR_RAMDISK_SIZE, HDR_CMD_LINE_PTR = 0x210, 0x218, 0x21C, 0x228
# fields a boot loader writes (or may write) in the copied header
LOADER_WRITTEN = [(0x1FA, 2), (0x210, 2), (0x214, 4), (0x218, 8), (0x224, 8), (0x250, 8)]


class SetupHeader:
    """The few setup-header fields the test needs, read straight from the file."""

    def __init__(self, data: bytes) -> None:
        assert data[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", data, 0x1FE)[0] == 0xAA55
        self.setup_sects = data[0x1F1] or 4
        self.version = struct.unpack_from("<H", data, 0x206)[0]
        self.pm_offset = (self.setup_sects + 1) * 512
        self.kernel = data[self.pm_offset :]
        self.hdr_end = 0x202 + data[0x201]
        self.pref_address = struct.unpack_from("<Q", data, 0x258)[0] if self.version >= 0x20A else 0
        self.init_size = struct.unpack_from("<I", data, 0x260)[0] if self.version >= 0x20A else 0
        self.xloadflags = struct.unpack_from("<H", data, 0x236)[0] if self.version >= 0x20C else 0
        self.initrd_addr_max = struct.unpack_from("<I", data, 0x22C)[0]
        self.load = self.pref_address or 0x100000
        self.entry64 = bool(self.xloadflags & 1)


# PROVENANCE.md: (setup_sects, protected-mode offset, protocol, 64-bit entry)
KERNELS = {
    "vmlinuz": (VMLINUZ, 39, 0x5000, 0x020F, True, "6G"),
    "memtest": (MEMTEST, 2, 0x600, 0x020C, True, "1G"),
    "ipxe": (IPXE, 5, 0xC00, 0x0207, False, None),  # memory.size left at its 512M default
}


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(random.Random(7).randbytes(3 * 1024 * 1024 + 0x123))  # not a page multiple
    return path


def kernel_config(kernel: Path, initrd: Path | None, memory: str | None,
                  platforms: str = '"native", "snp", "tdx"') -> str:
    body = f'[image]\nplatforms = [{platforms}]\n\n[kernel]\npath = {q(kernel)}\ncmdline = "{CMDLINE}"\n'
    if initrd is not None:
        body += f"initrd = {q(initrd)}\n"
    if memory is not None:
        body += f'\n[memory]\nsize = "{memory}"\n'
    return body


def _size(text: str | None) -> int:
    if text is None:
        return 512 << 20
    return int(text[:-1]) << {"M": 20, "G": 30}[text[-1]]


# SEV-SNP: the pages Linux finds through the CC blob, reserved in the e820 map (GPAs chosen by
# the builder, docs/CONFIG.md); struct layouts from Linux arch/x86/include/asm/sev.h, setup_data.h
SNP_RESERVED = {0xA000: "secrets", 0xB000: "cpuid", 0xC000: "cc blob"}
E820_RESERVED = 2
BP_CC_BLOB_ADDRESS, HDR_SETUP_DATA = 0x13C, 0x250


def check_boot_params(pages: dict, bp_gpa: int, hdr: SetupHeader, data: bytes, initrd: Path,
                      memory: int, *, snp: bool = False) -> dict[str, int]:
    bp = read_guest(pages, bp_gpa, PAGE)
    # the setup header is copied from the file (apart from the fields a loader fills in)
    copied, original = bytearray(bp[HDR_START : hdr.hdr_end]), bytearray(data[HDR_START : hdr.hdr_end])
    for off, n in LOADER_WRITTEN:
        if off < hdr.hdr_end:
            copied[off - HDR_START : off - HDR_START + n] = bytes(n)
            original[off - HDR_START : off - HDR_START + n] = bytes(n)
    assert copied == original
    assert bp[HDR_TYPE_OF_LOADER] != 0  # a boot loader identified itself (0xff: undefined)
    # command line
    cmd_ptr = struct.unpack_from("<I", bp, HDR_CMD_LINE_PTR)[0]
    assert struct.unpack_from("<I", bp, BP_EXT_CMD_LINE_PTR)[0] == 0
    assert read_cstring(pages, cmd_ptr) == CMDLINE.encode()
    # initrd
    rd_addr = struct.unpack_from("<I", bp, HDR_RAMDISK_IMAGE)[0]
    rd_size = struct.unpack_from("<I", bp, HDR_RAMDISK_SIZE)[0]
    assert struct.unpack_from("<II", bp, BP_EXT_RAMDISK_IMAGE) == (0, 0)
    rd = initrd.read_bytes()
    assert rd_size == len(rd) and rd_addr % PAGE == 0
    assert read_guest(pages, rd_addr, rd_size) == rd
    assert rd_addr + rd_size - 1 <= hdr.initrd_addr_max
    assert rd_addr >= hdr.load + max(hdr.init_size, len(hdr.kernel))  # clear of the decompression area
    # e820 table: RAM = memory.size (minus the legacy hole), none in the 3-4 GiB MMIO hole
    n = bp[BP_E820_ENTRIES]
    ram, reserved = [], []
    for i in range(n):
        addr, size, typ = struct.unpack_from("<QQI", bp, BP_E820_TABLE + 20 * i)
        if typ == E820_RAM:
            ram.append((addr, addr + size))
        elif typ == E820_RESERVED:
            reserved.append((addr, addr + size))
    ram.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ram))
    snp_pages = len(SNP_RESERVED) * PAGE if snp else 0
    assert sum(e - s for s, e in ram) == memory - (0x100000 - 0xA0000) - snp_pages
    assert not any(s < 1 << 32 and e > 0xC000_0000 for s, e in ram)
    for gpa in pages:  # everything the image puts in memory is RAM (except the TDX reset page)
        if gpa == 0xFFFF_F000 or (snp and gpa in SNP_RESERVED):
            continue
        assert any(s <= gpa and gpa + PAGE <= e for s, e in ram), f"page {gpa:#x} outside RAM"
    assert rd_addr + rd_size <= max(e for s, e in ram if s < 1 << 32)
    if snp:
        check_snp_cc_blob(pages, bp, hdr)
        for gpa in SNP_RESERVED:  # reserved, never RAM: the kernel must not reuse the secrets page
            assert any(s <= gpa and gpa + PAGE <= e for s, e in reserved), f"{gpa:#x} not reserved"
            assert not any(s < gpa + PAGE and gpa < e for s, e in ram)
    else:
        assert reserved == [] and struct.unpack_from("<I", bp, BP_CC_BLOB_ADDRESS)[0] == 0
        assert hdr.version < 0x209 or struct.unpack_from("<Q", bp, HDR_SETUP_DATA)[0] == 0
    return {"cmdline": cmd_ptr, "initrd": rd_addr, "initrd_end": rd_addr + rd_size}


def check_snp_cc_blob(pages: dict, bp: bytes, hdr: SetupHeader) -> None:
    """Linux finds struct cc_blob_sev_info through a SETUP_CC_BLOB (7) setup_data node (boot
    protocol 2.09+), and the decompressor hands its address on in boot_params.cc_blob_address."""
    blob_gpa = struct.unpack_from("<I", bp, BP_CC_BLOB_ADDRESS)[0]
    if hdr.version >= 0x209:
        node = struct.unpack_from("<Q", bp, HDR_SETUP_DATA)[0]
        nxt, typ, length = struct.unpack_from("<QII", read_guest(pages, node, 16))
        assert (nxt, typ, length) == (0, 7, 4)
        assert struct.unpack_from("<I", read_guest(pages, node + 16, 4))[0] == blob_gpa
    magic, version, res, secrets, secrets_len, r1, cpuid, cpuid_len, r2 = struct.unpack(
        "<IHHQIIQII", read_guest(pages, blob_gpa, 40))
    assert magic == 0x45444D41 and version == 1 and (res, r1, r2) == (0, 0, 0)  # version: as OVMF writes it
    assert (secrets_len, cpuid_len) == (PAGE, PAGE)
    assert pages[secrets].data_type == 1 and pages[cpuid].data_type == 2  # IGVM_PAGE_DATA_TYPE SECRETS, CPUID_DATA


def _descriptor(pages: dict, gdt_base: int, selector: int) -> tuple[int, int, int, int]:
    """(base, limit in bytes, access byte, flags nibble) of a GDT entry."""
    (d,) = struct.unpack("<Q", read_guest(pages, gdt_base + (selector & ~7), 8))
    limit = (d & 0xFFFF) | ((d >> 32) & 0xF0000)
    flags = (d >> 52) & 0xF
    if flags & 0x8:  # granularity: 4 KiB units
        limit = (limit << 12) | 0xFFF
    base = ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24)
    return base, limit, (d >> 40) & 0xFF, flags


def check_segments(pages: dict, regs: dict[str, int], *, long_mode: bool) -> None:
    """boot.rst: flat segments; the 64-bit entry with __BOOT_CS 0x10 (64-bit code) / __BOOT_DS 0x18."""
    gdt = regs["gdtr_base"]
    base, limit, access, flags = _descriptor(pages, gdt, regs["code_selector"])
    assert base == 0 and access & 0x9A == 0x9A
    if long_mode:
        assert (regs["code_selector"], regs["data_selector"]) == (0x10, 0x18)
        assert flags & 0x2 and not flags & 0x4  # L=1, D=0
    else:
        assert limit == 0xFFFF_FFFF and flags & 0x4 and not flags & 0x2  # 32-bit (D=1, L=0), 4 GiB
    base, limit, access, flags = _descriptor(pages, gdt, regs["data_selector"])
    assert base == 0 and limit == 0xFFFF_FFFF and access & 0x92 == 0x92


def check_kernel_pages(pages: dict, hdr: SetupHeader) -> None:
    k = hdr.kernel
    for off in range(0, len(k), PAGE):
        chunk = k[off : off + PAGE]
        assert page_bytes(pages[hdr.load + off]) == chunk + bytes(PAGE - len(chunk)), f"page {off:#x}"


@pytest.mark.parametrize("name", list(KERNELS))
def test_bzimage_build(tmp_path: Path, initrd: Path, name: str) -> None:
    path, setup_sects, pm_offset, version, entry64, memory = KERNELS[name]
    data = path.read_bytes()
    hdr = SetupHeader(data)
    assert (hdr.setup_sects, hdr.pm_offset, hdr.version, hdr.entry64) == (setup_sects, pm_offset, version, entry64)
    f = build_igvm(config(tmp_path, kernel_config(path, initrd, memory)))
    mem = _size(memory)

    for platform in ("native", "snp"):
        pages = page_map(f, platform)
        check_kernel_pages(pages, hdr)
        regs = native_context(f) if platform == "native" else vmsa_fields(f)
        rsi = regs["rsi"]
        where = check_boot_params(pages, rsi, hdr, data, initrd, mem, snp=platform == "snp")
        cr0, cr3 = regs["cr0"], regs["cr3"]
        if hdr.entry64:
            assert regs["rip"] == hdr.load + 0x200
            assert cr0 & 0x8000_0001 == 0x8000_0001 and regs["cr4"] & 0x20 and regs["efer"] & 0x500 == 0x500
            c_bit = 51 if platform == "snp" else None
            rsp = regs["rsp"]
            gdt = regs["gdtr_base"] if platform == "native" else regs["gdtr.base"]
            # boot.rst (64-bit protocol): the kernel and its init_size, the zero page and the command
            # line must be identity mapped; we also need the stack, the GDT and the initrd
            for va in (regs["rip"], rsi, rsp - 8, gdt, where["cmdline"], where["initrd"], where["initrd_end"] - 1,
                       hdr.load + max(hdr.init_size, len(hdr.kernel)) - 1, min(mem, 0xC000_0000) - 1):
                assert walk_page_tables(pages, cr3, va, c_bit=c_bit) == va, f"{platform}: {va:#x}"
        else:  # 32-bit boot protocol: protected mode, paging off, entry at the load address
            assert regs["rip"] == hdr.load
            assert cr0 & 1 and not cr0 & 0x8000_0000
        if platform == "native":
            check_segments(pages, regs, long_mode=hdr.entry64)

    # TDX: the 32-bit entry through the reset-vector trampoline, esi = boot_params
    pages = page_map(f, "tdx")
    check_kernel_pages(pages, hdr)
    tramp = decode_tdx_trampoline(page_bytes(pages[0xFFFF_F000]))
    assert tramp["jump"] == hdr.load
    check_boot_params(pages, tramp["esi"], hdr, data, initrd, mem)


# --------------------------------------------------------------------------- UKI

@pytest.fixture(scope="module")
def efi_stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_efi_stub(tmp_path_factory.mktemp("stub"))


def make_uki(stub: Path, tmp: Path, sections: dict[str, bytes]) -> Path:
    """An EFI stub with payload sections added by objcopy (as older ukify/dracut did)."""
    out = objcopy_uki(stub, tmp, sections, name="linux.efi")
    assert out.read_bytes()[:2] == b"MZ"
    return out


@pytest.mark.parametrize("kernel", [MEMTEST, VMLINUZ], ids=["memtest", "vmlinuz"])
def test_uki_builds_the_same_image(tmp_path: Path, efi_stub: Path, initrd: Path, kernel: Path) -> None:
    uki = make_uki(efi_stub, tmp_path, {".osrel": b"ID=test\n", ".cmdline": CMDLINE.encode(),
                                        ".linux": kernel.read_bytes(), ".initrd": initrd.read_bytes()})
    plats = '"native", "snp", "tdx"'
    separate = build_bytes(config(tmp_path, kernel_config(kernel, initrd, "1G", plats), "separate.toml"))
    body = f'[image]\nplatforms = [{plats}]\n[kernel]\npath = {q(uki)}\n[memory]\nsize = "1G"\n'
    from_uki = build_bytes(config(tmp_path, body, "uki.toml"))
    assert from_uki == separate
    # format = "uki" explicitly gives the same; config cmdline/initrd override the UKI's sections
    explicit = body.replace(f"path = {q(uki)}\n", f'path = {q(uki)}\nformat = "uki"\n')
    assert build_bytes(config(tmp_path, explicit, "uki2.toml")) == separate
    override = body.replace(f"path = {q(uki)}\n", f'path = {q(uki)}\ncmdline = "console=hvc0"\n')
    f = build_igvm(config(tmp_path, override, "uki3.toml"))
    pages = page_map(f, "native")
    bp = read_guest(pages, native_context(f)["rsi"], PAGE)
    assert read_cstring(pages, struct.unpack_from("<I", bp, HDR_CMD_LINE_PTR)[0]) == b"console=hvc0"


def test_uki_ucode_goes_in_front_of_the_initrd(tmp_path: Path, efi_stub: Path, initrd: Path) -> None:
    """systemd-stub hands a UKI's .ucode (an early-microcode cpio) to the kernel in front of every
    other initrd.  Here it is padded with NUL bytes to a whole page, which the kernel's initramfs
    unpacker skips between archives (init/initramfs.c), so the initrd after it stays page-aligned
    (zero-copy); boot_params covers both.  A config initrd replaces .initrd, not .ucode."""
    ucode = b"070701" + bytes(range(256)) * 5 + b"TRAILER!!!"  # any bytes: placement is what is checked
    uki_initrd = random.Random(3).randbytes(3 * PAGE + 17)
    uki = make_uki(efi_stub, tmp_path, {".cmdline": CMDLINE.encode(), ".linux": VMLINUZ.read_bytes(),
                                        ".initrd": uki_initrd, ".ucode": ucode})
    padded = -(-len(ucode) // PAGE) * PAGE
    for body, expected in (
            (f'[image]\nplatforms = ["native", "snp"]\n[kernel]\npath = {q(uki)}\n[memory]\nsize = "1G"\n',
             uki_initrd),
            (f'[image]\nplatforms = ["native", "snp"]\n[kernel]\npath = {q(uki)}\ninitrd = {q(initrd)}\n'
             '[memory]\nsize = "1G"\n', initrd.read_bytes())):
        f = build_igvm(config(tmp_path, body, "uki.toml"))
        for platform in ("native", "snp"):
            pages = page_map(f, platform)
            rsi = native_context(f)["rsi"] if platform == "native" else vmsa_fields(f)["rsi"]
            bp = read_guest(pages, rsi, PAGE)
            addr, size = struct.unpack_from("<II", bp, HDR_RAMDISK_IMAGE)
            assert addr % PAGE == 0 and size == padded + len(expected)
            ramdisk = read_guest(pages, addr, size)
            assert ramdisk == ucode + bytes(padded - len(ucode)) + expected


# --------------------------------------------------------------------------- what the image leaves undone


def test_confidential_direct_boot_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kernel booted without firmware on SNP or TDX is told what its memory still needs, in the
    reference values and on stderr; native alone gets no such note."""
    import json

    from igvm_builder import cli

    path = write_config(tmp_path, kernel_config(VMLINUZ, None, "1G"))
    out = tmp_path / "k.igvm"
    assert cli.main(["build", str(path), "-o", str(out), "--reference-values", str(tmp_path / "k.json")]) == 0
    err = capsys.readouterr().err
    notes = json.loads((tmp_path / "k.json").read_text())["build"]["notes"]
    assert [n.split(":")[0] for n in notes] == ["snp", "tdx"]
    assert "not validated (PVALIDATE)" in notes[0] and "CC blob" not in notes[0]  # a bzImage gets the blob
    assert "not accepted" in notes[1]
    assert all(f"igvm-builder build: note: {n}" in err for n in notes)
    native = write_config(tmp_path, kernel_config(VMLINUZ, None, "1G", platforms='"native"'), "native.toml")
    assert cli.main(["build", str(native), "-o", str(tmp_path / "n.igvm"), "-q"]) == 0
    assert "note:" not in capsys.readouterr().err


# --------------------------------------------------------------------------- memory.prevalidate


def _ram_pages(pages: dict, bp_gpa: int) -> set[int]:
    """Every 4 KiB page of an E820_RAM entry of the zero page at ``bp_gpa``."""
    bp = read_guest(pages, bp_gpa, PAGE)
    out: set[int] = set()
    for i in range(bp[BP_E820_ENTRIES]):
        addr, size, typ = struct.unpack_from("<QQI", bp, BP_E820_TABLE + 20 * i)
        if typ == E820_RAM:
            out.update(range(addr, addr + size, PAGE))
    return out


def test_prevalidate_imports_all_ram_unmeasured(tmp_path: Path, initrd: Path) -> None:
    """memory.prevalidate: on SNP and TDX every RAM page of the kernel's own memory map is in the
    image; the pages the image adds for it carry no data and are unmeasured; native is as without
    the option; each platform's digest is that of its single-platform build."""
    from test_build_multi import check_multi_equals_singles

    body = kernel_config(VMLINUZ, initrd, "256M") + "prevalidate = true\n"
    plain = build_igvm(config(tmp_path, kernel_config(VMLINUZ, initrd, "256M"), "plain.toml"))
    f = build_igvm(config(tmp_path, body))
    assert page_map(f, "native") == page_map(plain, "native")
    for platform in ("snp", "tdx"):
        pages, before = page_map(f, platform), page_map(plain, platform)
        bp_gpa = vmsa_fields(f)["rsi"] if platform == "snp" else \
            decode_tdx_trampoline(page_bytes(pages[0xFFFF_F000]))["esi"]
        ram = _ram_pages(pages, bp_gpa)
        assert len(ram) == (256 << 20) // PAGE - (0x100000 - 0xA0000) // PAGE - (3 if platform == "snp" else 0)
        assert ram <= set(pages), f"{platform}: RAM pages missing"
        added = set(pages) - set(before)
        assert added == ram - set(before)
        for gpa in added:
            h = pages[gpa]
            assert len(h.data) == 0 and h.flags == 2 and h.data_type == 0, (platform, hex(gpa))
        for gpa, h in before.items():  # the image's own pages are unchanged
            assert (pages[gpa].flags, bytes(pages[gpa].data)) == (h.flags, bytes(h.data))
    # SNP and TDX share the added runs where they coincide: the file holds them once
    from igvm_builder.format import headers as H

    snp_tdx = [h for h in f.directives if isinstance(h, H.PageData) and not len(h.data) and h.flags == 2]
    shared = sum(1 for h in snp_tdx if h.compatibility_mask == 6)
    assert shared > 0.9 * sum(1 for h in snp_tdx), (shared, len(snp_tdx))
    check_multi_equals_singles(tmp_path, {"all": body.replace('"native", "snp", "tdx"', "@PLATFORMS@")},
                               ["native", "snp", "tdx"])


def test_prevalidate_is_for_kernel_launches(tmp_path: Path) -> None:
    from igvm_builder.errors import ConfigError

    with pytest.raises(ConfigError, match=r"memory\.prevalidate.*OVMF validates"):
        config(tmp_path, '[image]\nplatforms = ["snp"]\n[firmware]\npath = "OVMF.fd"\n[memory]\nprevalidate = true\n')
