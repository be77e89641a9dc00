"""Small helpers for raw inputs: kernel format sniffing by magic numbers, the PE section table.

No third-party imports: the PE/COFF section table (all a UKI needs of the PE format) is read
here, by :func:`pe_sections`, for both ``detect_kernel_format`` and ``uki.py``; the full
parsers live in ``elf.py``, ``bzimage.py`` and ``uki.py``.
"""

from __future__ import annotations

import struct
from typing import Literal

from igvm_builder.errors import InputError
from igvm_builder.recordclass import record

__all__ = ["KernelFormat", "PeSection", "detect_kernel_format", "pe_section_names", "pe_sections"]

KernelFormat = Literal["elf", "bzimage", "uki"]

#: IMAGE_FILE_HEADER (COFF), after "PE\0\0": Machine .. Characteristics.
_COFF_HEADER = struct.Struct("<HHIIIHH")
#: IMAGE_SECTION_HEADER: Name[8], VirtualSize, VirtualAddress, SizeOfRawData, PointerToRawData,
#: PointerToRelocations, PointerToLinenumbers, NumberOfRelocations, NumberOfLinenumbers, Characteristics.
_SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")
#: Optional-header magic of PE32 and PE32+ images.
_PE_MAGICS = (0x10B, 0x20B)


@record
class PeSection:
    """One IMAGE_SECTION_HEADER: where a section's data is in the file, and how long it is."""

    name: str
    virtual_size: int
    raw_size: int
    raw_offset: int


@record
class PeTable:
    """A PE/COFF image's section table: the sections complete in the data, and what is wrong
    with the headers (``None`` if nothing)."""

    sections: tuple[PeSection, ...]
    problem: str | None


def pe_sections(data: bytes | bytearray | memoryview) -> PeTable | None:
    """The section table of a PE/COFF image (``MZ``, ``PE\\0\\0`` at ``e_lfanew``), or ``None``
    if ``data`` is not one.

    Short (8-byte) section names are decoded; long ones (``/<offset>`` into the COFF string
    table, which images do not use) are returned as written.  A section table that runs past
    the end of the data yields the sections that are complete, and says so in ``problem``, as
    does an optional header that is not PE32 or PE32+.
    """
    view = memoryview(data).cast("B")
    if len(view) < 0x40 or bytes(view[:2]) != b"MZ":
        return None
    (pe_off,) = struct.unpack_from("<I", view, 0x3C)
    if pe_off + 4 + _COFF_HEADER.size > len(view) or bytes(view[pe_off : pe_off + 4]) != b"PE\0\0":
        return None
    _machine, nsections, _ts, _symptr, _nsyms, opt_size, _chars = _COFF_HEADER.unpack_from(view, pe_off + 4)
    opt = pe_off + 4 + _COFF_HEADER.size
    problem = None
    magic = struct.unpack_from("<H", view, opt)[0] if opt_size >= 2 and opt + 2 <= len(view) else None
    if magic not in _PE_MAGICS:
        shown = f"magic {magic:#x}" if magic is not None else f"{opt_size} bytes"
        problem = f"not a PE32/PE32+ image: its optional header ({shown}) is not one"
    table = opt + opt_size
    sections = []
    for i in range(nsections):
        off = table + i * _SECTION_HEADER.size
        if off + _SECTION_HEADER.size > len(view):
            problem = problem or (f"the section table ({nsections} sections at {table:#x}) runs past the end of "
                                  f"the file ({len(view):#x} bytes)")
            break
        raw_name, vsize, _vaddr, raw_size, raw_offset, *_rest = _SECTION_HEADER.unpack_from(view, off)
        sections.append(PeSection(raw_name.rstrip(b"\x00").decode("latin-1"), vsize, raw_size, raw_offset))
    return PeTable(tuple(sections), problem)


def pe_section_names(data: bytes | bytearray | memoryview) -> tuple[str, ...] | None:
    """The names of :func:`pe_sections` (complete sections), or ``None`` if not a PE/COFF image."""
    table = pe_sections(data)
    return None if table is None else tuple(s.name for s in table.sections)


def _is_bzimage(view: memoryview) -> bool:
    return (len(view) >= 0x206 and bytes(view[0x202:0x206]) == b"HdrS"
            and struct.unpack_from("<H", view, 0x1FE)[0] == 0xAA55)


def detect_kernel_format(data: bytes | bytearray | memoryview, name: str | None = None) -> KernelFormat:
    """Tell an ELF kernel, a Linux bzImage and a UKI apart by their magic numbers.

    * ``"elf"``: ``\\x7fELF`` at 0.
    * ``"uki"``: a PE/COFF image (``MZ``, ``PE\\0\\0`` at ``e_lfanew``) with a ``.linux``
      section.  Checked before bzImage: a UKI's stub could in principle carry a boot header.
    * ``"bzimage"``: boot flag 0xaa55 at 0x1fe and ``HdrS`` at 0x202.  A bzImage with an EFI
      stub also starts with ``MZ``; having no ``.linux`` section it is still a bzImage.

    Raises:
        InputError: none of the above (naming ``name``).
    """
    view = memoryview(data).cast("B")
    if bytes(view[:4]) == b"\x7fELF":
        return "elf"
    sections = pe_section_names(view)
    if sections is not None and ".linux" in sections:
        return "uki"
    if _is_bzimage(view):
        return "bzimage"
    what = "a PE/COFF file without a .linux section" if sections is not None else "unrecognised data"
    raise InputError(f"not a kernel image: {what} (expected ELF, Linux bzImage or UKI)", source=name)
