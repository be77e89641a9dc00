"""Issue #4: ELF kernels booted through the PVH entry point.

Inputs: the real PVH ELF ``grub-i386-xen_pvh.bin`` (ELF32, two PT_LOADs sharing a page, BSS) and
a kernel compiled here with gcc (freestanding, PVH note, a .data starting mid-page and a .bss,
linked at 1 MiB) as ELF64 and ELF32.  The expected guest memory is computed independently:
``readelf -lW`` gives p_offset/p_paddr/p_filesz/p_memsz, the file is sliced here, BSS is zeros.
The PVH entry comes from ``readelf -nW``; start_info is decoded with the Xen ABI layout
(``xen/include/public/arch-x86/hvm/start_info.h``) written out below.
"""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels import compile_freestanding
from test_build_helpers import (
    GRUB,
    MEMTEST,
    PAGE,
    UBOOT,
    build_igvm,
    config,
    elf_memory_image,
    native_context,
    page_bytes,
    page_map,
    q,
    read_cstring,
    read_guest,
    readelf_loads,
    readelf_pvh_entry,
    vmsa_fields,
)

from igvm_builder.format import headers as H
from igvm_builder.format.defs import PageDataFlags

PVH_MAGIC = 0x336EC578
START_INFO = struct.Struct("<IIIIQQQQII")  # hvm_start_info, version 1
MODLIST_ENTRY = struct.Struct("<QQQQ")  # hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # hvm_memmap_table_entry: addr, size, type, reserved
CMDLINE = "console=hvc0 earlyprintk=xen loglevel=7"
MEMORY = 256 << 20

_rng = random.Random(4)
DATA_BYTES = bytes(_rng.randrange(1, 256) for _ in range(0x1234))

KERNEL_C = """
__asm__(".pushsection .note.Xen, \\"a\\", @note\\n"
        ".p2align 2\\n"
        ".long 4, 4, 0x12\\n"           /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        ".asciz \\"Xen\\"\\n"
        ".p2align 2\\n"
        ".long pvh_entry\\n"
        ".popsection\\n");

unsigned int scratch[0x1800];          /* .bss, 24 KiB */
unsigned char table[0x1234] = { @DATA@ };  /* .data */

__attribute__((section(".text.entry"), used, noreturn)) void pvh_entry(void)
{
    for (;;)
        scratch[table[scratch[0] % sizeof(table)]]++;
}
""".replace("@DATA@", ", ".join(str(b) for b in DATA_BYTES))

LINKER_SCRIPT = """
ENTRY(pvh_entry)
PHDRS { text PT_LOAD FLAGS(5); data PT_LOAD FLAGS(6); note PT_NOTE FLAGS(4); }
SECTIONS {
  . = 0x100000;
  .text : { *(.text.entry) *(.text .text.*) } :text
  .rodata : { *(.rodata .rodata.*) } :text
  .note.Xen : { *(.note.Xen) } :text :note
  . = ALIGN(0x1000) + 0x240;
  .data : { *(.data .data.*) } :data
  .bss : { *(.bss .bss.*) *(COMMON) } :data
  /DISCARD/ : { *(.comment) *(.eh_frame*) *(.note.gnu.*) }
}
"""


def compile_pvh_kernel(tmp: Path, bits: int) -> Path:
    return compile_freestanding(tmp / f"kernel{bits}.elf", KERNEL_C, LINKER_SCRIPT, m32=bits == 32)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real PVH ELF and the kernel compiled here as ELF64 and ELF32."""
    tmp = tmp_path_factory.mktemp("pvh")
    return {"grub": GRUB, "elf64": compile_pvh_kernel(tmp, 64), "elf32": compile_pvh_kernel(tmp, 32)}


def _sections(path: Path) -> dict[str, tuple[int, int, str]]:
    out = subprocess.run(["readelf", "-SW", str(path)], check=True, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.replace("[ ", "[").split()
        if len(parts) > 6 and parts[1].startswith("."):
            found[parts[1]] = (int(parts[3], 16), int(parts[5], 16), parts[2])
    return found


@pytest.mark.parametrize("bits", [64, 32])
def test_compiled_kernel_shape(kernels: dict[str, Path], bits: int) -> None:
    """The fixture is what the test claims: linked at 1 MiB, .data mid-page with our bytes, a .bss."""
    compiled = kernels[f"elf{bits}"]
    assert subprocess.run(["readelf", "-hW", str(compiled)], check=True, capture_output=True,
                          text=True).stdout.count(f"ELF{bits}") == 1
    secs = _sections(compiled)
    assert secs[".text"][0] == 0x100000
    data_addr, data_size, _ = secs[".data"]
    assert data_addr % PAGE == 0x240 and data_size == len(DATA_BYTES)
    bss_addr, bss_size, bss_type = secs[".bss"]
    assert bss_type == "NOBITS" and bss_size == 0x6000 and bss_addr >= data_addr + data_size
    loads = readelf_loads(compiled)
    assert len(loads) == 2 and any(memsz > filesz for _off, _pa, filesz, memsz in loads)


def build_elf(tmp: Path, kernel: Path, platforms: str = '"native", "snp", "tdx"', initrd: Path | None = MEMTEST):
    body = f"""
[image]
platforms = [{platforms}]

[kernel]
path = {q(kernel)}
cmdline = "{CMDLINE}"
"""
    if initrd is not None:
        body += f"initrd = {q(initrd)}\n"
    body += f"\n[memory]\nsize = \"{MEMORY >> 20}M\"\n"
    return build_igvm(config(tmp, body))


def check_elf_pages(f, kernel: Path, platform: str) -> dict:
    pages = page_map(f, platform)
    expected = elf_memory_image(kernel)
    for gpa, want in expected.items():
        assert gpa in pages, f"{platform}: ELF page {gpa:#x} not imported"
        h = pages[gpa]
        assert page_bytes(h) == want, f"{platform}: page {gpa:#x} differs from the file"
        assert h.flags & PageDataFlags.UNMEASURED == 0
    return pages


def check_start_info(pages: dict, info_gpa: int, initrd: Path | None, *, snp: bool = False) -> None:
    """hvm_start_info v1 (Xen's arch-x86/hvm/start_info.h); on SNP the secrets and CPUID pages
    (0xA000, 0xB000) are reserved (type 2) in the memory map, never RAM."""
    raw = read_guest(pages, info_gpa, START_INFO.size)
    magic, version, _flags, nr_modules, modlist, cmdline_paddr, _rsdp, memmap, memmap_n, _res = \
        START_INFO.unpack(raw)
    assert magic == PVH_MAGIC
    assert version >= 1  # memmap fields are valid from version 1
    assert read_cstring(pages, cmdline_paddr) == CMDLINE.encode()
    # memory map: RAM adds up to memory.size minus the legacy hole
    ram, reserved = [], []
    for i in range(memmap_n):
        addr, size, typ, _ = MEMMAP_ENTRY.unpack(read_guest(pages, memmap + i * MEMMAP_ENTRY.size,
                                                            MEMMAP_ENTRY.size))
        if typ == 1:
            ram.append((addr, addr + size))
        elif typ == 2:
            reserved.append((addr, addr + size))
    snp_pages = (0xA000, 0xB000) if snp else ()
    assert ram and ram[0][0] == 0
    assert max(end for _s, end in ram) == MEMORY
    assert sum(end - start for start, end in ram) == MEMORY - (0x100000 - 0xA0000) - PAGE * len(snp_pages)
    assert sorted(reserved) == ([(0xA000, 0xC000)] if snp else [])
    # every imported page is RAM (on SNP: but the secrets and CPUID pages)
    for gpa in pages:
        if gpa < 1 << 32 and gpa < 0xFFFF_F000 and gpa not in snp_pages:
            assert any(s <= gpa and gpa + PAGE <= e for s, e in ram), f"page {gpa:#x} outside RAM"
    if initrd is None:
        assert nr_modules == 0
        return
    assert nr_modules == 1
    paddr, size, _mod_cmdline, _ = MODLIST_ENTRY.unpack(read_guest(pages, modlist, MODLIST_ENTRY.size))
    data = initrd.read_bytes()
    assert size == len(data)
    assert paddr % PAGE == 0
    assert read_guest(pages, paddr, size) == data
    assert paddr + size <= MEMORY


def decode_tdx_trampoline(page: bytes) -> dict[str, int]:
    """Follow the reset vector (0xFFFFFFF0): a near jmp, then mov ebx/esi/eax imm32 and jmp eax."""
    assert page[0xFF0] == 0xE9, page[0xFF0:0x1000].hex()
    (rel,) = struct.unpack_from("<i", page, 0xFF1)
    pc = 0xFF5 + rel
    regs: dict[str, int] = {}
    names = {0xBB: "ebx", 0xBE: "esi", 0xB8: "eax", 0xB9: "ecx", 0xBA: "edx", 0xBF: "edi", 0xBD: "ebp"}
    while True:
        op = page[pc]
        if op in names:
            regs[names[op]] = struct.unpack_from("<I", page, pc + 1)[0]
            pc += 5
        elif page[pc : pc + 2] == b"\xff\xe0":  # jmp eax
            regs["jump"] = regs["eax"]
            return regs
        else:
            raise AssertionError(f"unexpected opcode {op:#x} at {pc:#x}")


@pytest.mark.parametrize("which", ["grub", "elf64", "elf32"])
def test_pvh_elf_build(tmp_path: Path, kernels: dict[str, Path], which: str) -> None:
    kernel = kernels[which]
    entry = readelf_pvh_entry(kernel)
    if which == "grub":
        assert entry == 0x100000  # PROVENANCE.md
    f = build_elf(tmp_path, kernel)

    # native: 32-bit protected mode at the PVH entry, rbx = start_info
    pages = check_elf_pages(f, kernel, "native")
    ctx = native_context(f)
    assert ctx["rip"] == entry
    assert ctx["cr0"] & 1 and not ctx["cr0"] & 0x8000_0000  # PE, paging off
    assert ctx["efer"] & 0x400 == 0  # not long mode
    assert ctx["code_attributes"] & 0x4000 and not ctx["code_attributes"] & 0x2000  # D=1, L=0
    assert ctx["code_base"] == 0 and ctx["code_limit"] == 0xFFFFFFFF
    check_start_info(pages, ctx["rbx"], MEMTEST)
    gdt = read_guest(pages, ctx["gdtr_base"], ctx["gdtr_limit"] + 1)
    (cs_desc,) = struct.unpack_from("<Q", gdt, ctx["code_selector"] & ~7)
    assert (cs_desc >> 40) & 0x9A == 0x9A  # present code segment

    # SNP: the VMSA says the same
    pages = check_elf_pages(f, kernel, "snp")
    v = vmsa_fields(f)
    assert v["rip"] == entry
    assert v["cr0"] & 1 and not v["cr0"] & 0x8000_0000
    check_start_info(pages, v["rbx"], MEMTEST, snp=True)

    # TDX: no VP context; the reset vector jumps to the PVH entry with ebx = start_info
    pages = check_elf_pages(f, kernel, "tdx")
    tramp = decode_tdx_trampoline(page_bytes(pages[0xFFFF_F000]))
    assert tramp["jump"] == entry
    check_start_info(pages, tramp["ebx"], MEMTEST)

    if which != "grub":  # our .data bytes at their link address, .bss zero
        secs = _sections(kernel)
        for platform in ("native", "snp", "tdx"):
            pages = page_map(f, platform)
            assert read_guest(pages, secs[".data"][0], secs[".data"][1]) == DATA_BYTES
            assert read_guest(pages, secs[".bss"][0], secs[".bss"][1]) == bytes(secs[".bss"][1])


def test_pvh_without_initrd(tmp_path: Path) -> None:
    f = build_elf(tmp_path, GRUB, platforms='"native"', initrd=None)
    pages = check_elf_pages(f, GRUB, "native")
    check_start_info(pages, native_context(f)["rbx"], None)


def test_grub_shared_page_is_composed(tmp_path: Path) -> None:
    """Page 0x125000 holds segment 0's BSS tail (zeros) then segment 2's first bytes (PROVENANCE.md)."""
    f = build_elf(tmp_path, GRUB, platforms='"native"', initrd=None)
    page = page_bytes(page_map(f, "native")[0x125000])
    data = GRUB.read_bytes()
    assert page[:0x858] == bytes(0x858)
    assert page[0x858:] == data[0xCCCB : 0xCCCB + PAGE - 0x858]


def test_elf64_without_pvh_note_starts_in_long_mode(tmp_path: Path) -> None:
    """u-boot (no PVH note): e_entry in 64-bit mode on identity page tables; TDX refuses it."""
    f = build_elf(tmp_path, UBOOT, platforms='"native", "snp"', initrd=None)
    pages = check_elf_pages(f, UBOOT, "native")
    ctx = native_context(f)
    assert ctx["rip"] == 0x1110000
    assert ctx["cr0"] & 0x8000_0000 and ctx["efer"] & 0x500 == 0x500
    from test_build_helpers import walk_page_tables

    assert walk_page_tables(pages, ctx["cr3"], ctx["rip"]) == ctx["rip"]
    assert not [h for h in f.directives if isinstance(h, H.VbsVpContext)]


# --------------------------------------------------------------------------- pages as runs


class _Seg:
    def __init__(self, gpa: int, offset: int, data: memoryview, mem_size: int) -> None:
        self.gpa, self.offset, self.data, self.end = gpa, offset, data, gpa + mem_size


class _Elf:
    def __init__(self, segments: list[_Seg]) -> None:
        self.segments = segments


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 4095), st.integers(0, 3 * 4096),
                          st.integers(0, 9 * 4096), st.integers(0, 8191)), min_size=1, max_size=4))
def test_elf_runs_are_the_composed_pages(segs: list[tuple[int, int, int, int, int]]) -> None:
    """``_elf_runs`` (runs of file windows, zero runs, composed pages) against a page-by-page
    reference: every page any segment touches, composed from the segments' bytes in order."""
    from igvm_builder.assemble.launch import _elf_runs

    file = memoryview(bytes(random.Random(len(segs)).randbytes(8 * 4096)))
    segments = []
    for page, sub, filesz, extra, offset in segs:
        gpa = page * 4096 + sub
        filesz = min(filesz, len(file) - offset)
        segments.append(_Seg(gpa, offset, file[offset : offset + filesz], filesz + extra))
    expected: dict[int, bytearray] = {}
    for seg in segments:  # the pages of range(floor(gpa), end)
        for page in range(seg.gpa & ~0xFFF, seg.end, 4096):
            expected.setdefault(page, bytearray(4096))
    for seg in segments:
        for i, byte in enumerate(bytes(seg.data)):
            expected[seg.gpa + i & ~0xFFF][(seg.gpa + i) & 0xFFF] = byte
    runs = _elf_runs(_Elf(segments), file)
    got = [(p.gpa, bytes(p.data)) for r in runs for p in r.pages()]
    assert got == [(page, bytes(expected[page])) for page in sorted(expected)]
    assert len(runs) <= 6 * len(segments) + 2  # runs, not pages


def test_elf_bss_is_one_run() -> None:
    from igvm_builder.assemble.launch import _elf_runs

    file = memoryview(bytes(range(256)) * 64)
    runs = _elf_runs(_Elf([_Seg(0x100000, 0, file[:0x2800], 1 << 32)]), file)
    assert [(r.gpa, r.count, r.source is not None) for r in runs] == [
        (0x100000, 2, True), (0x102000, 1, False), (0x103000, (1 << 32) // 4096 - 3, False)]
    assert runs[-1].fill == bytes(4096)
