"""Small helpers for raw inputs: kernel format sniffing by magic numbers.

No third-party imports: sniffing a PE section table by hand keeps ``detect_kernel_format``
fast (no ``import lief``); the full parsers live in ``elf.py``, ``bzimage.py`` and ``uki.py``.
"""

from __future__ import annotations

import struct
from typing import Literal

from igvm_builder.errors import InputError

__all__ = ["KernelFormat", "detect_kernel_format", "pe_section_names"]

KernelFormat = Literal["elf", "bzimage", "uki"]

_COFF_HEADER = struct.Struct("<HHIIIHH")  # Machine .. Characteristics, after "PE\0\0"
_SECTION_HEADER_SIZE = 40


def pe_section_names(data: bytes | bytearray | memoryview) -> tuple[str, ...] | None:
    """Short (8-byte) section names of a PE/COFF image, or ``None`` if it is not one.

    Long names (``/<offset>`` into the COFF string table) are returned as written.  A section
    table that runs past the end of the data yields the sections that are complete.
    """
    view = memoryview(data).cast("B")
    if len(view) < 0x40 or bytes(view[:2]) != b"MZ":
        return None
    (pe_off,) = struct.unpack_from("<I", view, 0x3C)
    if pe_off + 4 + _COFF_HEADER.size > len(view) or bytes(view[pe_off : pe_off + 4]) != b"PE\0\0":
        return None
    _machine, nsections, _ts, _symptr, _nsyms, opt_size, _chars = _COFF_HEADER.unpack_from(
        view, pe_off + 4)
    table = pe_off + 4 + _COFF_HEADER.size + opt_size
    names = []
    for i in range(nsections):
        off = table + i * _SECTION_HEADER_SIZE
        if off + _SECTION_HEADER_SIZE > len(view):
            break
        names.append(bytes(view[off : off + 8]).rstrip(b"\x00").decode("latin-1"))
    return tuple(names)


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
