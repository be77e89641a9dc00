"""The arm64 Linux ``Image`` (Documentation/arch/arm64/booting.rst): its 64-byte header.

::

    0x00 u32 code0       0x04 u32 code1       0x08 u64 text_offset   0x10 u64 image_size
    0x18 u64 flags       0x20 u64 res2        0x28 u64 res3          0x30 u64 res4
    0x38 u32 magic = "ARM\\x64"                0x3c u32 res5 (PE header offset with an EFI stub)

flags: bit 0 big-endian kernel, bits 1-2 page size (0 unspecified, 1 4K, 2 16K, 3 64K), bit 3
placement (0: 2 MiB-aligned base as low as possible in RAM, 1: anywhere).  ``image_size`` is the
memory the kernel occupies from its load address, BSS included (0 for kernels before 3.17, whose
size is unknown).  A gzip file (``Image.gz``, which QEMU and the realm-measurements oracle accept)
is decompressed first, first member only, as the oracle does.
"""

from __future__ import annotations

import struct
import zlib

from igvm_builder.errors import InputError
from igvm_builder.recordclass import record

ARM64_MAGIC = 0x644D5241  # "ARM\x64" little-endian
HEADER = struct.Struct("<IIQQQQQQII")
#: Largest decompressed kernel accepted (a guard against a gzip bomb; Linux Images are < 100 MiB).
MAX_IMAGE = 1 << 30

_PAGE_SIZES = {0: None, 1: 4096, 2: 16384, 3: 65536}


@record
class Arm64Image:
    """A parsed arm64 Image; ``data`` is the Image itself (decompressed when ``gzip``)."""

    data: bytes | memoryview
    text_offset: int
    image_size: int
    flags: int
    gzip: bool = False

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & 1)

    @property
    def page_size(self) -> int | None:
        return _PAGE_SIZES[(self.flags >> 1) & 3]

    @property
    def place_anywhere(self) -> bool:
        return bool(self.flags & 8)

    @property
    def load_size(self) -> int:
        """Bytes the kernel occupies from its load address: ``image_size``, or the file when 0."""
        return self.image_size or len(self.data)


def _what(view: memoryview) -> str:
    """A name for a kernel that is not an arm64 Image."""
    head = bytes(view[:8])
    if head[:4] == b"\x7fELF" and len(view) > 19:
        machine = struct.unpack_from("<H", view, 18)[0]
        names = {0x3E: "an x86-64 ELF", 0x03: "an i386 ELF", 0xB7: "an arm64 ELF (vmlinux): give the Image "
                 "(arch/arm64/boot/Image), not vmlinux"}
        return names.get(machine, f"an ELF file for machine {machine:#x}")
    if len(view) >= 0x206 and bytes(view[0x202:0x206]) == b"HdrS":
        return "an x86 Linux bzImage"
    if head[:2] == b"MZ":
        return "a PE/COFF file without the arm64 Image header"
    return "not an arm64 Linux Image"


def parse_arm64_image(data: bytes | bytearray | memoryview, name: str | None = None) -> Arm64Image:
    """Parse an arm64 Linux Image (or a gzip-compressed one).

    Raises:
        InputError: not an arm64 Image (naming what it looks like), truncated, a bad gzip stream.
    """
    view = memoryview(data).cast("B")
    compressed = bytes(view[:2]) == b"\x1f\x8b"
    if compressed:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the first gzip member, as the oracle reads it
        try:
            out = d.decompress(view, MAX_IMAGE + 1)
        except zlib.error as exc:
            raise InputError(f"bad gzip stream: {exc}", source=name) from None
        if len(out) > MAX_IMAGE:
            raise InputError(f"decompresses to more than {MAX_IMAGE >> 20} MiB; not a kernel Image", source=name)
        if not d.eof:
            raise InputError("truncated gzip stream", source=name)
        view = memoryview(out)
    if len(view) < HEADER.size:
        raise InputError(f"{len(view)} bytes: too short for an arm64 Image header (64 bytes)", source=name)
    _c0, _c1, text_offset, image_size, flags, *_res, magic, _res5 = HEADER.unpack_from(view)
    if magic != ARM64_MAGIC:
        raise InputError(f"not an arm64 Linux kernel: no 'ARM\\x64' magic at offset 0x38 ({_what(view)})"
                         f"{' after gunzip' if compressed else ''}", source=name)
    if text_offset % 4096:
        raise InputError(f"Image text_offset {text_offset:#x} is not 4 KiB aligned", source=name)
    if image_size and image_size < len(view):
        raise InputError(f"Image header image_size {image_size:#x} is smaller than the Image "
                         f"({len(view):#x} bytes)", source=name)
    return Arm64Image(data=bytes(view) if compressed else view, text_offset=text_offset, image_size=image_size,
                      flags=flags, gzip=compressed)
