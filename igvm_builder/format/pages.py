"""Runs of pages in the directive list: :class:`PageRun` and :class:`Directives`.

A large IGVM file is almost entirely PAGE_DATA directives, one per 4 KiB page: a 1 GiB
guest image has 262,144 of them.  As objects (a ``PageData`` and a ``FileSlice`` each) they
cost hundreds of bytes a page.  A :class:`PageRun` stands for ``count`` consecutive
PAGE_DATA directives at consecutive GPAs with one mask, flags and data type, whose data is

* a contiguous buffer: page ``i`` is bytes ``[start + i * 4096, start + (i + 1) * 4096)`` of
  ``source`` (a kernel or initrd mapped from its file, or the data section of a parsed file:
  no copy);
* one 4 KiB page repeated (``fill``: explicit zero pages, or a parsed run whose pages all
  point at one file offset);
* nothing (``fill`` empty: data-less pages).

:class:`Directives` is what :attr:`IgvmFile.directives` holds: an immutable sequence of
headers that stores headers and page runs.  Its length, indexing and iteration are those of
the flat list of headers (a run's ``PageData`` objects are made on the fly, so code written
for a tuple of headers works unchanged), and :meth:`Directives.items` gives the compact form
for the loops that must not make an object per page (validation, serialization,
measurement).  Header indices stay the flat list's.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar, overload

from igvm_builder.errors import IgvmError, IgvmFormatError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, same_bytes
from igvm_builder.format.defs import PAGE_SIZE_4K, HeaderType, PageDataType, Section
from igvm_builder.recordclass import fields

PAGE = PAGE_SIZE_4K


class PageRun:
    """``count`` consecutive PAGE_DATA directives (GPAs ``gpa``, ``gpa + 4 KiB``, ...).

    Data: ``source`` (a buffer; page ``i`` is the 4 KiB at ``start + i * 4096``) or, without a
    source, ``fill``: the data of every page (4 KiB repeated, or empty for data-less pages).
    """

    __slots__ = ("compatibility_mask", "count", "data_type", "fill", "flags", "gpa", "source", "start")

    TYPE: ClassVar[HeaderType] = HeaderType.PAGE_DATA
    SECTION: ClassVar[Section] = Section.DIRECTIVE

    gpa: int
    count: int
    compatibility_mask: int
    flags: int
    data_type: int
    source: memoryview | None
    start: int
    fill: H.BlobLike

    def __init__(self, gpa: int, count: int, compatibility_mask: int, *, flags: int = 0,
                 data_type: int = PageDataType.NORMAL, source: memoryview | bytes | None = None, start: int = 0,
                 fill: H.BlobLike = b"") -> None:
        if count < 1:
            raise IgvmFormatError(f"a page run at GPA {gpa:#x} must hold at least one page (count {count})")
        if source is not None:
            view = source if isinstance(source, memoryview) else memoryview(source)
            if start < 0 or start + count * PAGE > view.nbytes:
                raise IgvmFormatError(f"page run at GPA {gpa:#x}: {count} pages from offset {start:#x} run past the "
                                      f"end of its {view.nbytes:#x}-byte buffer")
            if len(fill):
                raise IgvmFormatError(f"page run at GPA {gpa:#x} has both a source buffer and fill data")
            source = view
        elif len(fill) not in (0, PAGE):
            raise IgvmFormatError(f"page run at GPA {gpa:#x}: fill data is {len(fill)} bytes (0 or 4096)")
        self.gpa, self.count, self.compatibility_mask = gpa, count, compatibility_mask
        self.flags, self.data_type = flags, int(data_type)
        self.source, self.start, self.fill = source, start, fill

    @classmethod
    def of_slice(cls, gpa: int, data: FileSlice, compatibility_mask: int, *, flags: int = 0,
                 data_type: int = PageDataType.NORMAL) -> PageRun:
        """The whole pages of a file window (its length a multiple of 4 KiB) at ``gpa``."""
        return cls(gpa, data.length // PAGE, compatibility_mask, flags=flags, data_type=data_type,
                   source=data._buf, start=data.start)

    # ------------------------------------------------------------------ the pages

    @property
    def mask(self) -> int:
        """The compatibility mask (as :attr:`Header.mask`)."""
        return self.compatibility_mask

    @property
    def end_gpa(self) -> int:
        """The GPA just past the last page."""
        return self.gpa + self.count * PAGE

    @property
    def dataless(self) -> bool:
        return self.source is None and not len(self.fill)

    def data_at(self, i: int) -> H.BlobLike:
        """The data of page ``i`` (0 <= i < count), as its PageData would hold it."""
        if self.source is not None:
            return FileSlice(self.source, self.start + i * PAGE, PAGE)
        return self.fill

    def page(self, i: int) -> H.PageData:
        """Page ``i`` as a header (made on demand)."""
        if not 0 <= i < self.count:
            raise IndexError(f"page {i} of a run of {self.count}")
        return new_page_unchecked(self.gpa + i * PAGE, self.compatibility_mask, self.flags, self.data_type, self.data_at(i))

    def pages(self) -> Iterator[H.PageData]:
        """Every page as a header, made one at a time."""
        gpa, mask, flags, dtype = self.gpa, self.compatibility_mask, self.flags, self.data_type
        new = new_page_unchecked
        if self.source is None:
            fill = self.fill
            for i in range(self.count):
                yield new(gpa + i * PAGE, mask, flags, dtype, fill)
            return
        buf, start = self.source, self.start
        for i in range(self.count):
            yield new(gpa + i * PAGE, mask, flags, dtype, FileSlice(buf, start + i * PAGE, PAGE))

    def sub(self, first: int, stop: int) -> PageRun:
        """Pages ``first`` to ``stop - 1`` as a run of their own."""
        if not 0 <= first < stop <= self.count:
            raise IndexError(f"pages {first}..{stop} of a run of {self.count}")
        return PageRun(self.gpa + first * PAGE, stop - first, self.compatibility_mask, flags=self.flags,
                       data_type=self.data_type, source=self.source,
                       start=self.start + first * PAGE if self.source is not None else 0, fill=self.fill)

    def with_mask(self, mask: int) -> PageRun:
        return PageRun(self.gpa, self.count, mask, flags=self.flags, data_type=self.data_type, source=self.source,
                       start=self.start, fill=self.fill)

    def problems(self) -> Iterator[str]:
        """Why a writer cannot store these pages (the first and the last page's problems: the
        other pages differ from them only by a GPA in between)."""
        yield from self.page(0).problems()
        if self.count > 1:
            yield from self.page(self.count - 1).problems()

    def first_bad_page(self) -> int | None:
        """The index in the run of the first page a writer cannot store (None if all can)."""
        for i in (0, self.count - 1):
            if any(True for _ in self.page(i).problems()):
                return i
        return None

    # ------------------------------------------------------------------ value semantics

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageRun):
            return NotImplemented
        if (self.gpa, self.count, self.compatibility_mask, self.flags, self.data_type) != (
                other.gpa, other.count, other.compatibility_mask, other.flags, other.data_type):
            return False
        if self.source is not None and other.source is not None:
            n = self.count * PAGE
            return same_bytes(self.source[self.start : self.start + n], other.source[other.start : other.start + n])
        return all(map(_same_data, map(self.data_at, range(self.count)), map(other.data_at, range(other.count))))

    def __hash__(self) -> int:
        return hash((self.gpa, self.count, self.compatibility_mask, self.flags, self.data_type))

    def __repr__(self) -> str:
        if self.source is not None:
            data = f"source=<{self.source.nbytes:#x} bytes>, start={self.start:#x}"
        else:
            data = f"fill=<{len(self.fill)} bytes>"
        return (f"PageRun(gpa={self.gpa:#x}, count={self.count}, compatibility_mask={self.compatibility_mask:#x}, "
                f"flags={self.flags:#x}, data_type={self.data_type}, {data})")


def _same_data(a: H.BlobLike, b: H.BlobLike) -> bool:
    return bool(a == b)


#: An item of :meth:`Directives.items`: a directive header or a run of PAGE_DATA directives.
Item = H.Header | PageRun


class Directives(Sequence[H.Header]):
    """The directive headers of a file, stored as headers and :class:`PageRun` items.

    As a sequence it is the flat list of headers (a run's pages made on demand); it compares
    equal to any sequence holding equal headers in the same order.  Immutable; ``+`` makes a
    new one.
    """

    __slots__ = ("_items", "_len", "_starts")

    _items: tuple[Item, ...]
    _len: int
    _starts: list[int] | None

    def __init__(self, items: Iterable[Item] = ()) -> None:
        if isinstance(items, Directives):
            self._items, self._len, self._starts = items._items, items._len, items._starts
            return
        self._items = tuple(items)
        n = 0
        runs = False
        for item in self._items:
            if type(item) is PageRun:
                n += item.count
                runs = True
            else:
                n += 1
        self._len = n
        self._starts = None if runs else []  # [] marks "no runs": index i is item i

    def items(self) -> tuple[Item, ...]:
        """The compact form: headers and page runs, in order."""
        return self._items

    def items_at(self) -> Iterator[tuple[int, Item]]:
        """(flat index of its first header, item) for each item."""
        pos = 0
        for item in self._items:
            yield pos, item
            pos += item.count if type(item) is PageRun else 1

    @property
    def runs(self) -> int:
        """How many page runs the items hold."""
        return sum(1 for item in self._items if type(item) is PageRun)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[H.Header]:
        for item in self._items:
            if isinstance(item, PageRun):
                yield from item.pages()
            else:
                yield item

    def _index(self) -> list[int]:
        starts = self._starts
        if not starts:
            starts = []
            pos = 0
            for item in self._items:
                starts.append(pos)
                pos += item.count if type(item) is PageRun else 1
            self._starts = starts
        return starts

    def _locate(self, i: int) -> tuple[int, int]:
        """(item index, page within the item) of flat index ``i`` (0 <= i < len)."""
        if self._starts == []:  # no runs: the items are the headers
            return i, 0
        starts = self._index()
        k = bisect.bisect_right(starts, i) - 1
        return k, i - starts[k]

    @overload
    def __getitem__(self, i: int) -> H.Header: ...

    @overload
    def __getitem__(self, i: slice) -> Directives: ...

    def __getitem__(self, i: int | slice) -> H.Header | Directives:
        n = self._len
        if isinstance(i, slice):
            first, stop, step = i.indices(n)
            if step != 1:
                return Directives(self[j] for j in range(first, stop, step))
            return self._slice(first, stop)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("directive index out of range")
        k, j = self._locate(i)
        item = self._items[k]
        return item.page(j) if isinstance(item, PageRun) else item

    def _slice(self, first: int, stop: int) -> Directives:
        if stop <= first:
            return Directives()
        if first == 0 and stop == self._len:
            return self
        k0, j0 = self._locate(first)
        k1, j1 = self._locate(stop - 1)
        out: list[Item] = []
        for k in range(k0, k1 + 1):
            item = self._items[k]
            if type(item) is PageRun:
                a = j0 if k == k0 else 0
                b = j1 + 1 if k == k1 else item.count
                out.append(item if (a, b) == (0, item.count) else item.sub(a, b))
            else:
                out.append(item)
        return Directives(out)

    def __add__(self, other: Iterable[Item]) -> Directives:
        more = other.items() if isinstance(other, Directives) else tuple(other)
        return Directives((*self._items, *more))

    def __radd__(self, other: Iterable[Item]) -> Directives:
        return Directives((*other, *self._items))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if isinstance(other, Directives):
            if self._len != other._len:
                return False
            if len(self._items) == len(other._items) and all(map(_item_eq, self._items, other._items)):
                return True  # (else the same pages may be split into runs differently: compare them)
        elif not isinstance(other, Sequence) or isinstance(other, str | bytes | bytearray):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(itertools.starmap(_header_eq, zip(self, other, strict=True)))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Directives({list(self._items)!r})"


def _item_eq(a: Item, b: Item) -> bool:
    return bool(a == b)


def _header_eq(a: object, b: object) -> bool:
    return bool(a == b)


def as_directives(directives: Iterable[Item]) -> Directives:
    """``directives`` as a :class:`Directives` (itself if it is one)."""
    return directives if isinstance(directives, Directives) else Directives(directives)


#: PAGE_DATA fields, in order; checked at import so that the fast constructor cannot miss one.
_PAGE_FIELDS = ("gpa", "compatibility_mask", "flags", "data_type", "data")
if tuple(f.name for f in fields(H.PageData)) != _PAGE_FIELDS:
    raise ImportError("H.PageData fields changed: update new_page_unchecked in igvm_builder/format/pages.py")
_object_new = object.__new__
_set_gpa, _set_mask, _set_flags, _set_type, _set_data = (getattr(H.PageData, f).__set__ for f in _PAGE_FIELDS)


def new_page_unchecked(gpa: int, mask: int, flags: int, data_type: int, data: H.BlobLike) -> H.PageData:
    """A PageData made without re-running its checks, for values known to pass them (a page of a
    run, or one like a page already validated): the constructor costs several times more, once
    per page of a file."""
    page = _object_new(H.PageData)
    _set_gpa(page, gpa)
    _set_mask(page, mask)
    _set_flags(page, flags)
    _set_type(page, data_type)
    _set_data(page, data)
    return page


class PageDigests(Sequence[bytes | None]):
    """For each directive, the SHA-384 of its 4 KiB page, or None: what
    ``IgvmFile.layout(page_digests=True)`` records for the SEV-SNP measurement.

    Stored as segments (a first directive index and a buffer of 48 bytes per directive from it),
    written in directive order: 48 bytes per page with a digest, nothing for the directives
    without one (data-less and zero-filled runs, other headers), no object per page."""

    __slots__ = ("_bufs", "_n", "_starts")

    _n: int
    _starts: list[int]
    _bufs: list[bytearray]

    def __init__(self, n: int) -> None:
        self._n = n
        self._starts = []
        self._bufs = []

    def _room(self, i: int, count: int) -> tuple[bytearray, int]:
        """The buffer and byte offset where directives ``i``..``i + count - 1`` go, made if needed:
        segments that overlap or touch the range are joined with it into one."""
        if not 0 <= i <= i + count <= self._n:
            raise IndexError(f"page digests {i}..{i + count} of {self._n}")
        starts, bufs = self._starts, self._bufs
        k = bisect.bisect_right(starts, i) - 1
        if k >= 0 and i + count <= starts[k] + len(bufs[k]) // 48:  # inside a segment
            return bufs[k], 48 * (i - starts[k])
        hi = i + count
        first = k if k >= 0 and starts[k] + len(bufs[k]) // 48 >= i else k + 1
        last = first
        while last < len(starts) and starts[last] <= hi:
            last += 1
        if last == first + 1 and starts[first] <= i and first == k:  # extends segment k (in order: usual)
            end = starts[k] + len(bufs[k]) // 48
            if hi > end:
                bufs[k] += bytes(48 * (hi - end))
            return bufs[k], 48 * (i - starts[k])
        lo = min(i, starts[first]) if first < last else i
        if first < last:
            hi = max(hi, starts[last - 1] + len(bufs[last - 1]) // 48)
        merged = bytearray(48 * (hi - lo))
        for j in range(first, last):
            at = 48 * (starts[j] - lo)
            merged[at : at + len(bufs[j])] = bufs[j]
        del starts[first:last], bufs[first:last]
        starts.insert(first, lo)
        bufs.insert(first, merged)
        return merged, 48 * (i - lo)

    def put(self, i: int, digest: bytes) -> None:
        buf, at = self._room(i, 1)
        buf[at : at + 48] = digest

    def fill(self, i: int, n: int, digest: bytes) -> None:
        """Directives ``i`` to ``i + n - 1`` have the page of ``digest``."""
        buf, at = self._room(i, n)
        buf[at : at + 48 * n] = digest * n

    def reserve(self, i: int, n: int) -> tuple[bytearray, int]:
        """The buffer and byte offset where the digests of directives ``i``..``i + n - 1`` are to
        be written (they count as present from now on)."""
        return self._room(i, n)

    def run(self, i: int, n: int) -> memoryview | None:
        """The digests of directives ``i``..``i + n - 1`` as one 48 * n-byte view, when all are
        present in one segment (else None)."""
        k = bisect.bisect_right(self._starts, i) - 1
        if k < 0 or i + n > self._starts[k] + len(self._bufs[k]) // 48:
            return None
        at = 48 * (i - self._starts[k])
        return memoryview(self._bufs[k])[at : at + 48 * n]

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> bytes | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes | None]: ...

    def __getitem__(self, i: int | slice) -> bytes | list[bytes | None] | None:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("page digest index out of range")
        k = bisect.bisect_right(self._starts, i) - 1
        if k < 0 or i >= self._starts[k] + len(self._bufs[k]) // 48:
            return None
        at = 48 * (i - self._starts[k])
        return bytes(self._bufs[k][at : at + 48])

    def __setitem__(self, i: int, digest: bytes | None) -> None:
        if i < 0:
            i += self._n
        if digest is not None:
            if len(digest) != 48:
                raise ValueError(f"a page digest is 48 bytes, not {len(digest)}")
            self.put(i, digest)
            return
        if not 0 <= i < self._n:
            raise IndexError("page digest index out of range")
        k = bisect.bisect_right(self._starts, i) - 1
        if k < 0 or i >= self._starts[k] + len(self._bufs[k]) // 48:
            return
        start, buf = self._starts[k], self._bufs[k]  # split the segment around i
        head, tail = buf[: 48 * (i - start)], buf[48 * (i - start + 1) :]
        del self._starts[k], self._bufs[k]
        for at, part in ((i + 1, tail), (start, head)):
            if part:
                self._starts.insert(k, at)
                self._bufs.insert(k, part)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes | bytearray):
            return NotImplemented
        return len(self) == len(other) and all(map(_header_eq, self, other))

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        have = sum(len(b) for b in self._bufs) // 48
        return f"PageDigests({self._n} directives, {have} with a digest)"


class PageDigestStream:
    """Page digests handed from a layout to a measurement running beside it, as they are made.

    ``IgvmFile.layout(page_digests=stream)`` writes the digests the way it writes a
    :class:`PageDigests` (:meth:`put`, :meth:`fill`, :meth:`reserve`, in directive order) and
    :meth:`publish`\\ es its progress; a consumer in another thread reads them once, in directive
    order (``measure_platform(..., page_digests=stream)``: :meth:`__getitem__` and
    :meth:`iter_run` wait for the layout to get there).  What the consumer has read is dropped,
    and the layout waits when it is more than :attr:`limit` directives ahead, so the digests of
    a 4 GiB image never sit in memory at once (:class:`PageDigests` keeps 48 bytes a page).

    Either side ends it: the layout with :meth:`finish` (or :meth:`abandon` when it fails: the
    consumer then stops with :class:`IgvmError`), the consumer with :meth:`detach` (the layout
    then no longer waits for it)."""

    #: Directives the layout may be ahead of the consumer before it waits for it.
    LIMIT = 1 << 15

    def __init__(self, n: int, *, limit: int | None = None) -> None:
        import threading  # (only a build makes one: reading commands do not import threading)
        from collections import deque

        self._n = n
        self.limit = self.LIMIT if limit is None else limit
        #: [first directive, count, 48 * count digest bytes, or one 48-byte digest for all]
        self._segs: deque[tuple[int, int, bytes | bytearray, bool]] = deque()
        self._end = 0  # the directive after the last segment
        self._published = 0  # directives before this are final
        self._taken = 0  # the consumer has read every directive before this
        self._cond = threading.Condition()
        self._failed = False  # abandoned by the layout
        self._detached = False  # left by the consumer

    def __len__(self) -> int:
        return self._n

    # ---- the layout's side

    def _append(self, i: int, n: int, data: bytes | bytearray, repeat: bool) -> None:
        if i < self._end or i + n > self._n:
            raise IndexError(f"page digests {i}..{i + n} after {self._end} of {self._n}: not in directive order")
        self._end = i + n
        if not self._detached:  # (else nobody reads them any more)
            self._segs.append((i, n, data, repeat))

    def put(self, i: int, digest: bytes) -> None:
        self._append(i, 1, digest, True)

    def fill(self, i: int, n: int, digest: bytes) -> None:
        """Directives ``i`` to ``i + n - 1`` have the page of ``digest`` (stored once)."""
        self._append(i, n, digest, True)

    def reserve(self, i: int, n: int) -> tuple[bytearray, int]:
        """A buffer (and the offset in it) for the digests of directives ``i``..``i + n - 1``, to be
        written before they are published."""
        buf = bytearray(48 * n)
        self._append(i, n, buf, False)
        return buf, 0

    def publish(self, upto: int) -> None:
        """Directives before ``upto`` are final; wait while the consumer is more than
        :attr:`limit` directives behind."""
        with self._cond:
            if upto > self._published:
                self._published = upto
                self._cond.notify_all()
            while not self._detached and self._published - self._taken > self.limit:
                self._cond.wait()

    def finish(self) -> None:
        """Every directive is final (the layout is done)."""
        with self._cond:
            self._published = self._n
            self._cond.notify_all()

    def abandon(self) -> None:
        """The layout failed: a waiting consumer stops with :class:`IgvmError`."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    # ---- the consumer's side

    def detach(self) -> None:
        """The consumer reads no more (it finished or failed): the layout stops waiting for it."""
        with self._cond:
            self._detached = True
            self._segs.clear()
            self._cond.notify_all()

    def _wait(self, i: int) -> int:
        """Wait until directive ``i`` is final; note that everything before it was read; return
        how far the layout has published."""
        cond = self._cond
        with cond:
            self._taken = i
            if self._published - i <= self.limit:
                cond.notify_all()  # (the layout may be waiting for this)
            while self._published <= i:
                if self._failed:
                    raise IgvmError("the layout that was to give these page digests failed")
                cond.wait()
            return self._published

    def _first(self, i: int) -> tuple[int, int, bytes | bytearray, bool] | None:
        """The first segment that ends after directive ``i`` (those before it are dropped)."""
        segs = self._segs
        while segs and segs[0][0] + segs[0][1] <= i:
            segs.popleft()
        return segs[0] if segs else None

    def __getitem__(self, i: int) -> bytes | None:
        """The digest of directive ``i`` (or None), once the layout has made it: directives are
        read in order, each once (those before ``i`` are gone)."""
        if not 0 <= i < self._n:
            raise IndexError("page digest index out of range")
        self._wait(i)
        seg = self._first(i)
        if seg is None or seg[0] > i:
            return None
        start, _, data, repeat = seg
        return bytes(data) if repeat else bytes(data[48 * (i - start) : 48 * (i - start + 1)])

    def iter_run(self, i: int, n: int) -> Iterator[bytes | memoryview | None]:
        """The digests of directives ``i``..``i + n - 1`` (None for one without), in order, as
        the layout makes them."""
        pos, end = i, i + n
        while pos < end:
            stop = min(self._wait(pos), end)
            while pos < stop:
                seg = self._first(pos)
                if seg is None or seg[0] > pos:  # no digest up to the next segment
                    upto = stop if seg is None else min(stop, seg[0])
                    yield from itertools.repeat(None, upto - pos)
                    pos = upto
                    continue
                start, count, data, repeat = seg
                upto = min(stop, start + count)
                if repeat:
                    yield from itertools.repeat(data, upto - pos)
                else:
                    view = memoryview(data)
                    for k in range(48 * (pos - start), 48 * (upto - start), 48):
                        yield view[k : k + 48]
                pos = upto

    def __repr__(self) -> str:
        return f"PageDigestStream({self._n} directives, {self._published} published, {self._taken} read)"


class PageOffsets:
    """The layout's table of distinct pages: a 64-bit key of a page's contents -> the file
    offset of the first page laid out with that key (what ``IgvmFile.layout`` confirms byte
    for byte before it reuses a page).

    A dict costs about 110 bytes an entry (two int objects and the slot), 96 MiB for the
    917,504 distinct pages of a 4 GiB guest.  Here an entry is one 8-byte slot of an open
    addressing table (linear probing) in an anonymous mapping, touched only where entries are
    written: the key's high bits choose the slot, its low 32 bits (its tag) are stored beside
    the 32-bit offset.  Sized for the ``capacity`` the layout expects (its pages with data) at
    most two thirds full, it costs 12 to 24 bytes a page (a power of two of slots).

    Two keys answer for each other only when they share their tag and their probe paths meet
    (about one key in 2**32 * slots / entries): the layout compares the bytes at the offset it
    is given, and keeps a page whose key :meth:`setdefault` answered with another page's
    offset as a clash of that key (in a dict of its own), so every later page with that key
    gets the same answer and then looks among the clashes.  Which pages clash depends on the
    keys (Python's hash, seeded per process); where each page is stored does not.

    A table that fills beyond three quarters gets a new one twice its size for the entries
    that follow (the old one cannot be re-spread: a slot keeps only the tag); lookups go
    through the tables oldest first, so every answer stays what it was.

    Offsets are above 0 and below 2**32 (IGVM file offsets are 32-bit; data follows the fixed
    header)."""

    __slots__ = ("_count", "_levels", "_limit")

    #: Slots of the smallest table.
    MIN_SLOTS: ClassVar[int] = 1 << 10

    #: (slots, mask, mapping) of each table, the oldest first; entries go into the last.
    _levels: list[tuple[memoryview, int, object]]

    def __init__(self, capacity: int = 0) -> None:
        size = self.MIN_SLOTS
        while 2 * size < 3 * capacity:  # at most two thirds full
            size *= 2
        self._count = 0
        self._levels = []
        self._add_level(size)

    def _add_level(self, size: int) -> None:
        import mmap

        size = max(size, 2)
        private = getattr(mmap, "MAP_PRIVATE", None)  # (not on Windows, whose anonymous maps are private)
        # zero pages: resident only once written
        table = mmap.mmap(-1, 8 * size) if private is None else mmap.mmap(-1, 8 * size, flags=private)
        self._levels.append((memoryview(table).cast("Q"), size - 1, table))
        # never full (a probe path must end at a free slot): three quarters, at most size - 1
        self._limit = self._count + min(size * 3 // 4, size - 1)

    @property
    def nbytes(self) -> int:
        """The size of the tables (resident where entries were written)."""
        return sum(8 * (mask + 1) for _, mask, _ in self._levels)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def _probe(self, key: int) -> tuple[int | None, memoryview, int]:
        """The offset recorded for ``key`` (or None), the newest table and its free slot on
        ``key``'s path there (where ``key`` goes if it is new)."""
        tag = key & 0xFFFF_FFFF
        for slots, mask, _ in self._levels:  # the oldest first: an answer never changes
            slot = (key >> 32) & mask
            entry = slots[slot]
            while entry:
                if entry >> 32 == tag:
                    return int(entry & 0xFFFF_FFFF), slots, slot
                slot = (slot + 1) & mask
                entry = slots[slot]
        return None, slots, slot

    def get(self, key: int) -> int | None:
        """The offset recorded for ``key`` (or a key that answers for it, see above), or None."""
        return self._probe(key)[0]

    def setdefault(self, key: int, offset: int) -> int | None:
        """:meth:`get`; where that is None, record ``offset`` for ``key`` (and return None)."""
        found, slots, slot = self._probe(key)
        if found is not None:
            return found
        if not 0 < offset <= 0xFFFF_FFFF:
            raise ValueError(f"page offset {offset:#x} is not a file offset after the fixed header")
        slots[slot] = (key & 0xFFFF_FFFF) << 32 | offset
        self._count += 1
        if self._count >= self._limit:
            self._add_level(2 * len(slots))
        return None

    def add(self, key: int, offset: int) -> None:
        """Record ``offset`` for ``key``, for which :meth:`get` gives None."""
        if self.setdefault(key, offset) is not None:
            raise ValueError(f"key {key:#x} has an offset already")
