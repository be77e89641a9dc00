"""ELF kernels and payloads: loadable segments by physical address, entry point, PVH note.

The headers are read with :mod:`struct` in :func:`_read_elf` (ELF specification names:
``e_entry``, ``p_paddr``, ``PT_LOAD``), the one place where a short or malformed header table
becomes an :class:`~igvm_builder.errors.InputError`; everything after that works on plain
integers and is validated here.  It reads what pyelftools' ``ELFFile`` reads for the same fields
(the test suite checks the two agree, on real and mutated files) without importing it: pyelftools
and what it pulls in (its DWARF and ``construct`` modules, ``pdb``) cost ~40 ms a build.

A segment is placed at its *physical* address ``p_paddr`` (what a firmware-less loader such
as QEMU's PVH loader or Cloud Hypervisor uses), not at ``p_vaddr``.  ``Segment.data`` is a
read-only ``memoryview`` into the caller's buffer (no copy); ``mem_size - len(data)`` bytes
after it are BSS and must be zero-filled by the image builder.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator

from igvm_builder.errors import InputError
from igvm_builder.recordclass import record

__all__ = [
    "PF_R",
    "PF_W",
    "PF_X",
    "XEN_ELFNOTE_PHYS32_ENTRY",
    "ElfImage",
    "Segment",
    "load_elf",
]

PF_X = 0x1
PF_W = 0x2
PF_R = 0x4

#: Xen public/elfnote.h: the 32-bit physical PVH entry point (owner "Xen").
XEN_ELFNOTE_PHYS32_ENTRY = 18

_PT_LOAD = 1
_PT_NOTE = 4
_SHT_NOTE = 7
#: ``e_phnum`` of a file whose program-header count is in section 0's ``sh_info``.
_PN_XNUM = 0xFFFF

#: ``e_type`` names (the ELF specification's); another value is shown as its number.
_E_TYPES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE", 0xFF00: "ET_LOPROC",
            0xFFFF: "ET_HIPROC"}
#: ``e_machine`` names (``<elf.h>``'s) of the machines a message may name; another is shown as its number.
_E_MACHINES = {0: "EM_NONE", 2: "EM_SPARC", 3: "EM_386", 4: "EM_68K", 8: "EM_MIPS", 15: "EM_PARISC",
               20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390", 40: "EM_ARM", 42: "EM_SH", 43: "EM_SPARCV9",
               50: "EM_IA_64", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV", 247: "EM_BPF",
               258: "EM_LOONGARCH"}

#: ``e_machine`` names -> the short names used by igvm-builder.
_MACHINES = {
    "EM_X86_64": "x86_64",
    "EM_386": "i386",
    "EM_AARCH64": "aarch64",
    "EM_ARM": "arm",
    "EM_RISCV": "riscv",
}

#: The ELF header after ``e_ident`` (16 bytes): e_type, e_machine, e_version, e_entry, e_phoff,
#: e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR = {32: "HHIIIIIHHHHHH", 64: "HHIQQQIHHHHHH"}
#: A program header's fields by name, in the order of each class's layout.
_PHDR = {32: ("IIIIIIII", ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_flags",
                           "p_align")),
         64: ("IIQQQQQQ", ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz",
                           "p_align"))}
#: A section header: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
#: sh_addralign, sh_entsize.
_SHDR = {32: "IIIIIIIIII", 64: "IIQQQQIIQQ"}

_NOTE_HEADER = struct.Struct("<3I")  # namesz, descsz, type (little-endian only, see load_elf)


@record(kw_only=True)
class Segment:
    """One ``PT_LOAD`` program header with its file bytes.

    Attributes:
        index: Program-header index in the file (as ``readelf -l`` numbers them).
        gpa: Guest physical address, ``p_paddr``.
        vaddr: ``p_vaddr`` (informational; the image is laid out by ``gpa``).
        offset: ``p_offset``, where ``data`` starts in the file.
        data: The ``p_filesz`` file bytes (a read-only view of the input, not a copy).
        mem_size: ``p_memsz``; bytes past ``len(data)`` are zero-filled (BSS).
        flags: ``p_flags`` (:data:`PF_R` | :data:`PF_W` | :data:`PF_X`).
        align: ``p_align``.
    """

    index: int
    gpa: int
    vaddr: int
    offset: int
    data: memoryview
    mem_size: int
    flags: int
    align: int

    @property
    def file_size(self) -> int:
        """``p_filesz``."""
        return len(self.data)

    @property
    def bss_size(self) -> int:
        """Bytes to zero-fill after the file bytes (``p_memsz - p_filesz``)."""
        return self.mem_size - len(self.data)

    @property
    def end(self) -> int:
        """First GPA after the segment's memory image (``gpa + mem_size``)."""
        return self.gpa + self.mem_size


@record(kw_only=True)
class ElfImage:
    """A loadable ELF executable.

    Attributes:
        name: The file name used in error messages.
        elf_class: 32 or 64.
        machine: ``"x86_64"``, ``"i386"``, ``"aarch64"``, ... (else the ``EM_*`` name, or the number of a machine without one here).
        e_type: ``"ET_EXEC"`` or ``"ET_DYN"``.
        entry: ``e_entry`` as written in the file (a virtual address).
        entry_gpa: ``e_entry`` translated to a physical address through the PT_LOAD
            containing it (``p_paddr + e_entry - p_vaddr``); ``e_entry`` itself if it lies
            in a segment's physical range (Linux vmlinux); ``None`` if it is in no segment.
        pvh_entry: The Xen PVH 32-bit entry point (``XEN_ELFNOTE_PHYS32_ENTRY``), or None.
        segments: ``PT_LOAD`` segments with ``p_memsz > 0``, sorted by ``gpa``.
    """

    name: str
    elf_class: int
    machine: str
    e_type: str
    entry: int
    entry_gpa: int | None
    pvh_entry: int | None
    segments: tuple[Segment, ...]

    @property
    def lowest_gpa(self) -> int:
        """Start of the lowest segment."""
        return self.segments[0].gpa

    @property
    def highest_gpa(self) -> int:
        """First GPA after the highest segment's memory image."""
        return max(seg.end for seg in self.segments)


@record
class _RawElf:
    """What :func:`_read_elf` extracts: plain integers and strings (``e_type`` and ``e_machine``
    as their specification names when known, else as numbers)."""

    elf_class: int
    little_endian: bool
    e_type: str
    e_machine: str
    e_entry: int
    phdrs: tuple[dict[str, int], ...]
    note_sections: tuple[tuple[int, int, int], ...]  # (sh_offset, sh_size, sh_addralign)


def _read_elf(view: memoryview, name: str) -> _RawElf:
    """The ELF header, the program headers and (for a file without a PT_NOTE segment) the
    SHT_NOTE sections' places; a header or table the file does not hold is an InputError."""
    try:
        elf_class = {1: 32, 2: 64}.get(view[4])
        if elf_class is None:
            raise ValueError(f"invalid EI_CLASS {bytes(view[4:5])!r}")
        if view[5] not in (1, 2):
            raise ValueError(f"invalid EI_DATA {bytes(view[5:6])!r}")
        order = "<" if view[5] == 1 else ">"
        (e_type, e_machine, _version, e_entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
         _shstrndx) = struct.unpack_from(order + _EHDR[elf_class], view, 16)
        shdr = struct.Struct(order + _SHDR[elf_class])

        def section0() -> tuple[int, ...]:  # holds the counts that do not fit the ELF header
            if shoff > 0 and shentsize < shdr.size:
                raise ValueError(f"e_shentsize {shentsize} is below a section header's {shdr.size} bytes")
            if shoff > len(view):
                raise ValueError(f"section headers at {shoff:#x} are past the end of the file ({len(view):#x})")
            return shdr.unpack_from(view, shoff)

        fmt, names = _PHDR[elf_class]
        phdr = struct.Struct(order + fmt)
        count = phnum
        if phnum == _PN_XNUM:
            count = section0()[7]  # sh_info: up to 2**32, more than a file can hold
            if count * max(phentsize, 1) > len(view):
                raise ValueError(f"{count} program headers (section 0's sh_info) do not fit in the file")
        phdrs = tuple(dict(zip(names, phdr.unpack_from(view, phoff + i * phentsize), strict=True))
                      for i in range(count))
        notes: tuple[tuple[int, int, int], ...] = ()
        # SHT_NOTE sections are only a fallback for files without a PT_NOTE segment
        if shoff and not any(ph["p_type"] == _PT_NOTE for ph in phdrs):
            found = []
            for i in range(shnum or section0()[5]):  # more than 0xfeff sections: their count is sh_size
                _n, sh_type, _f, _a, sh_offset, sh_size, _l, _i, sh_addralign, _e = shdr.unpack_from(
                    view, shoff + i * shentsize)
                if sh_type == _SHT_NOTE:
                    found.append((sh_offset, sh_size, sh_addralign))
            notes = tuple(found)
    except (struct.error, ValueError, OverflowError) as exc:
        raise InputError(f"malformed or truncated ELF file: {exc}", source=name) from exc
    return _RawElf(
        elf_class=elf_class,
        little_endian=order == "<",
        e_type=_E_TYPES.get(e_type, str(e_type)),
        e_machine=_E_MACHINES.get(e_machine, str(e_machine)),
        e_entry=e_entry,
        phdrs=phdrs,
        note_sections=notes,
    )


def _iter_notes(buf: memoryview, align: int) -> Iterator[tuple[bytes, int, memoryview]]:
    """Yield ``(owner, type, descriptor)`` for each note in ``buf``; stops at a malformed tail."""
    pos = 0
    while pos + _NOTE_HEADER.size <= len(buf):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(buf, pos)
        pos += _NOTE_HEADER.size
        name_end = pos + namesz
        desc_pos = (name_end + align - 1) & ~(align - 1)
        desc_end = desc_pos + descsz
        if desc_end > len(buf):
            return
        owner = bytes(buf[pos:name_end]).rstrip(b"\x00")
        yield owner, ntype, buf[desc_pos:desc_end]
        pos = (desc_end + align - 1) & ~(align - 1)


def _note_areas(view: memoryview, raw: _RawElf, name: str) -> Iterator[tuple[memoryview, int]]:
    """Note areas from PT_NOTE segments, else from SHT_NOTE sections: ``(bytes, alignment)``."""
    seg_notes = [ph for ph in raw.phdrs if ph["p_type"] == _PT_NOTE]
    if seg_notes:
        areas = [(ph["p_offset"], ph["p_filesz"], ph["p_align"]) for ph in seg_notes]
    else:
        areas = list(raw.note_sections)
    for offset, size, align in areas:
        if offset + size > len(view):
            raise InputError(
                f"note area ({size:#x} bytes at file offset {offset:#x}) extends beyond the end of "
                f"the file ({len(view):#x} bytes)", source=name, offset=offset)
        yield view[offset : offset + size], 8 if align == 8 else 4


def _find_pvh_entry(view: memoryview, raw: _RawElf, name: str) -> int | None:
    for area, align in _note_areas(view, raw, name):
        for owner, ntype, desc in _iter_notes(area, align):
            if owner != b"Xen" or ntype != XEN_ELFNOTE_PHYS32_ENTRY:
                continue
            value: int
            if len(desc) == 4:
                (value,) = struct.unpack("<I", desc)
            elif len(desc) == 8:  # Linux emits it with _ASM_PTR, i.e. .quad on x86-64
                (value,) = struct.unpack("<Q", desc)
            else:
                raise InputError(
                    f"Xen PHYS32_ENTRY note has a {len(desc)}-byte descriptor (expected 4 or 8)",
                    source=name)
            if value > 0xFFFF_FFFF:
                raise InputError(
                    f"Xen PHYS32_ENTRY note gives {value:#x}, above 4 GiB (PVH starts in 32-bit mode)",
                    source=name)
            return value
    return None


def _entry_gpa(entry: int, segments: tuple[Segment, ...]) -> int | None:
    for seg in segments:
        if seg.vaddr <= entry < seg.vaddr + seg.mem_size:
            return seg.gpa + (entry - seg.vaddr)
    for seg in segments:
        if seg.gpa <= entry < seg.end:
            return entry
    return None


def load_elf(
    data: bytes | bytearray | memoryview,
    name: str,
    *,
    machines: Collection[str] | None = None,
) -> ElfImage:
    """Parse an ELF executable into its loadable segments.

    Args:
        data: The whole file.  Segment data are views into it, so keep it alive (and
            unmodified) while the result is in use.
        name: File name for error messages.
        machines: Accepted machines (e.g. ``("x86_64", "i386")``); ``None`` accepts any.

    Returns:
        The parsed image.

    Raises:
        InputError: not an ELF file, truncated or malformed, big-endian, not ``ET_EXEC`` /
            ``ET_DYN``, an unexpected machine, no loadable segment, a segment beyond the end of
            the file or with ``p_filesz > p_memsz`` or past the top of the address space,
            overlapping ``PT_LOAD`` segments, or a malformed PVH note.
    """
    view = memoryview(data).cast("B").toreadonly()
    if len(view) < 4 or bytes(view[:4]) != b"\x7fELF":
        raise InputError("not an ELF file (no \\x7fELF magic)", source=name)
    if len(view) < 6 or view[4] not in (1, 2):
        raise InputError("truncated ELF identification or invalid EI_CLASS", source=name)
    header_size = 52 if view[4] == 1 else 64
    if len(view) < header_size:
        raise InputError(
            f"truncated ELF header: file has {len(view)} bytes, ELF{32 * view[4]} header needs "
            f"{header_size}", source=name)

    raw = _read_elf(view, name)

    if not raw.little_endian:
        raise InputError("big-endian ELF files are not supported", source=name)
    machine = _MACHINES.get(raw.e_machine, raw.e_machine)
    if machines is not None and machine not in machines:
        raise InputError(
            f"ELF machine is {machine} ({raw.e_machine}), expected {' or '.join(machines)}",
            source=name)
    if raw.e_type not in ("ET_EXEC", "ET_DYN"):
        raise InputError(f"ELF type {raw.e_type} is not an executable (ET_EXEC or ET_DYN)",
                         source=name)

    addr_limit = 1 << raw.elf_class
    segments: list[Segment] = []
    for index, ph in enumerate(raw.phdrs):
        if ph["p_type"] != _PT_LOAD:
            continue
        offset, filesz, memsz, paddr = ph["p_offset"], ph["p_filesz"], ph["p_memsz"], ph["p_paddr"]
        if memsz == 0:
            continue
        if filesz > memsz:
            raise InputError(
                f"PT_LOAD segment {index}: p_filesz {filesz:#x} > p_memsz {memsz:#x}",
                source=name)
        if offset + filesz > len(view):
            raise InputError(
                f"PT_LOAD segment {index} (file offset {offset:#x}, {filesz:#x} bytes) extends "
                f"beyond the end of the file ({len(view):#x} bytes)",
                source=name, offset=offset)
        if paddr + memsz > addr_limit:
            raise InputError(
                f"PT_LOAD segment {index} at {paddr:#x} ({memsz:#x} bytes) runs past the top of the "
                f"{raw.elf_class}-bit address space", source=name, gpa=paddr)
        segments.append(Segment(
            index=index,
            gpa=paddr,
            vaddr=ph["p_vaddr"],
            offset=offset,
            data=view[offset : offset + filesz],
            mem_size=memsz,
            flags=ph["p_flags"],
            align=ph["p_align"],
        ))
    if not segments:
        raise InputError("no loadable segments (no PT_LOAD with p_memsz > 0)", source=name)

    segments.sort(key=lambda s: (s.gpa, s.index))
    # compare each segment with the one reaching furthest so far: catches a short segment
    # nested inside an earlier, longer one as well as plain neighbours
    reach = segments[0]
    for cur in segments[1:]:
        if cur.gpa < reach.end:
            raise InputError(
                f"PT_LOAD segments {reach.index} ({reach.gpa:#x}-{reach.end - 1:#x}) and {cur.index} "
                f"({cur.gpa:#x}-{cur.end - 1:#x}) overlap at GPA {cur.gpa:#x}",
                source=name, gpa=cur.gpa)
        if cur.end > reach.end:
            reach = cur

    segs = tuple(segments)
    return ElfImage(
        name=name,
        elf_class=raw.elf_class,
        machine=machine,
        e_type=raw.e_type,
        entry=raw.e_entry,
        entry_gpa=_entry_gpa(raw.e_entry, segs),
        pvh_entry=_find_pvh_entry(view, raw, name),
        segments=segs,
    )
