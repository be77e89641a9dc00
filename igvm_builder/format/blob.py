"""Zero-copy data windows for page and blob contents.

Parsed files keep page data as :class:`FileSlice` objects: a small window into the
buffer the file was read from (often an ``mmap``), so a 1 GiB file costs no copy.
Built files use plain ``bytes``.  Code that needs the contents calls :func:`as_view`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
from collections.abc import Callable

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
            return same_bytes(self.view(), other.view())
        if isinstance(other, bytes | bytearray | memoryview):
            return same_bytes(self.view(), memoryview(other))
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


#: Bytes compared per step by :func:`same_bytes`.
_COMPARE_WINDOW = 1 << 20


def same_bytes(a: memoryview, b: memoryview) -> bool:
    """``a == b`` for byte views, at memcmp speed.

    ``memoryview.__eq__`` compares element by element (15 us for a 4 KiB page, 50 times
    slower than comparing two ``bytes``); this compares copies of windows of at most 1 MiB.
    """
    n = a.nbytes
    if n != b.nbytes:
        return False
    if n <= _COMPARE_WINDOW:
        return a.tobytes() == b.tobytes()
    if a.format != "B" or a.ndim != 1:
        a = a.cast("B")
    if b.format != "B" or b.ndim != 1:
        b = b.cast("B")
    return all(a[i : i + _COMPARE_WINDOW].tobytes() == b[i : i + _COMPARE_WINDOW].tobytes()
               for i in range(0, n, _COMPARE_WINDOW))


def is_all_zero(data: bytes | memoryview | FileSlice) -> bool:
    view = as_view(data)
    return not view.tobytes().strip(b"\x00") if len(view) <= 4096 else bytes(view).count(0) == len(view)


#: :func:`dontneed` releases whole aligned blocks of this size (2 MiB, the largest folio the
#: kernel maps at once): a page fault maps the page-cache folio around the page touched
#: (fault-around, large folios), pages before and after it, which a range ending at that page
#: would leave mapped.
RELEASE_ALIGN = 2 << 20


def dontneed(buf: mmap.mmap, offset: int, length: int) -> None:
    """Drop ``buf[offset : offset + length]``, widened to :data:`RELEASE_ALIGN` blocks, from the
    resident set (``madvise(MADV_DONTNEED)``).

    On a read-only shared file mapping this only removes page-table entries: a later read
    faults the same bytes back in from the page cache, so it never changes a result.
    """
    start = offset - offset % RELEASE_ALIGN
    end = min(len(buf), offset + length - (offset + length) % -RELEASE_ALIGN)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        buf.madvise(mmap.MADV_DONTNEED, start, end - start)


def sha256_released(view: memoryview, *, window: int = 8 << 20,
                    stop: Callable[[], bool] | None = None) -> str | None:
    """SHA-256 (hex) of ``view``, hashed ``window`` bytes at a time.  When ``view`` is a whole
    read-only mmap, each window leaves the resident set once hashed (:func:`dontneed`), so a
    large file is never resident as a whole.  ``stop()`` is asked before each window: None once
    it says so (a cancelled build)."""
    buf = view.obj if isinstance(view.obj, mmap.mmap) and view.nbytes == len(view.obj) else None
    if buf is not None:
        with memoryview(buf) as whole:
            if not whole.readonly:
                buf = None
    h = hashlib.sha256()
    n = view.nbytes
    for off in range(0, n, window):
        if stop is not None and stop():
            return None
        h.update(view[off : off + window])
        if buf is not None:
            dontneed(buf, off, min(window, n - off))
    return h.hexdigest()


class PageReleaser:
    """Drops already-hashed pages of an mmap'd file from the process's resident set.

    Pages of a file loaded with :meth:`IgvmFile.load` are read through a read-only shared
    mmap; every page touched stays mapped (and counts in RSS) until unmapped.  Every
    ``every`` data pages, the file range from the lowest page noted since the last release
    to the furthest one is released (:func:`dontneed`).  That only drops page-table entries: a page read again
    (another platform's thread, a non-monotonic file layout) is faulted back in from the page
    cache with the same contents, so this never changes a result.  Only read-only mmaps
    (``ACCESS_READ``) are touched: on a private ``ACCESS_COPY`` mapping DONTNEED would
    discard the caller's modifications.

    A batch is released when the next page is noted, before the caller reads that page: a
    caller may note a page before or after reading it.
    """

    __slots__ = ("every", "first", "furthest", "n")

    def __init__(self, every: int = 256) -> None:
        self.every = every
        self.first = -1
        self.furthest: FileSlice | None = None  # the page that ends furthest into the file
        self.n = 0

    def note(self, data: FileSlice) -> None:
        if self.n >= self.every:
            self.release(None)
        if self.first < 0 or data.start < self.first:  # (pages compared with come in any order)
            self.first = data.start
        furthest = self.furthest
        if furthest is None or data.start > furthest.start:
            self.furthest = data
        self.n += 1

    def release(self, last: FileSlice | None) -> None:
        """Release the pages noted since the last release (and ``last``).

        The range ends at the furthest page noted, not the last: in a deduplicated file the
        last page noted may be one stored much earlier (a zero page every so often), and the
        range would end before it starts."""
        first, self.first, self.n = self.first, -1, 0
        furthest, self.furthest = self.furthest, None
        if furthest is not None and (last is None or furthest.start > last.start):
            last = furthest
        if last is None or first < 0:
            return
        buf = last.view().obj
        end = last.start + last.length
        if not isinstance(buf, mmap.mmap) or end <= first or not hasattr(mmap, "MADV_DONTNEED"):
            return
        with contextlib.suppress(OSError, ValueError, BufferError), memoryview(buf) as whole:
            if not whole.readonly:
                return
            dontneed(buf, first, end - first)
