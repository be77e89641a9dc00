"""Zero-copy data windows for page and blob contents.

Parsed files keep page data as :class:`FileSlice` objects: a small window into the
buffer the file was read from (often an ``mmap``), so a 1 GiB file costs no copy.
Built files use plain ``bytes``.  Code that needs the contents calls :func:`as_view`.
"""

from __future__ import annotations

Blob = "bytes | FileSlice"


class FileSlice:
    """``length`` bytes at ``start`` of a buffer, materialized only on demand."""

    __slots__ = ("_buf", "length", "start")

    def __init__(self, buf: memoryview, start: int, length: int) -> None:
        self._buf = buf
        self.start = start
        self.length = length

    def view(self) -> memoryview:
        return self._buf[self.start : self.start + self.length]

    def __len__(self) -> int:
        return self.length

    def __bytes__(self) -> bytes:
        return bytes(self.view())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FileSlice):
            return self.length == other.length and self.view() == other.view()
        if isinstance(other, bytes | bytearray | memoryview):
            return self.view() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(bytes(self.view()))

    def __repr__(self) -> str:
        return f"FileSlice(start={self.start:#x}, length={self.length:#x})"


def as_view(data: bytes | bytearray | memoryview | FileSlice) -> memoryview:
    """A read-only memoryview of ``data`` without copying."""
    if isinstance(data, FileSlice):
        return data.view()
    return memoryview(data)


def is_all_zero(data: bytes | memoryview | FileSlice) -> bool:
    view = as_view(data)
    return not view.tobytes().strip(b"\x00") if len(view) <= 4096 else bytes(view).count(0) == len(view)
