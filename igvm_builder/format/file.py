"""``IgvmFile``: parse + validate with the reference parser's verdicts, canonical serialization.

Parsing follows ``IgvmFile::new_from_binary`` of the reference crate (microsoft/igvm
e6c3ff1, ``shared/spec/IGVM_FORMAT.md`` §2-§14): every file it rejects is rejected here
with an :class:`~igvm_builder.errors.IgvmFormatError` naming the header index and byte
offset; files on which it panics are rejected cleanly; files it accepts although they
bend the spec are accepted with a warning in :attr:`IgvmFile.warnings`.

Serialization reproduces the crate's canonical bytes (§13): headers in model order, file
data appended in header order, blobs padded (pages to 4 KiB, parameter data to the area
size) and identical blobs stored once.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO, NamedTuple

from igvm_builder.errors import IgvmError, IgvmFormatError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, PageReleaser, as_view, dontneed, same_bytes
from igvm_builder.format.defs import (
    FIXED_HEADER_SIZE_V1,
    FIXED_HEADER_SIZE_V2,
    IGVM_MAGIC_VALUE,
    NATIVE_CONTEXT_PLATFORMS,
    PAGE_SIZE_4K,
    SNP_VMSA_SIZE_0_4_0,
    VMSA_PLATFORMS,
    Architecture,
    HeaderType,
    PlatformType,
    Section,
    section_of,
)
from igvm_builder.format.pages import Directives, PageDigests, PageDigestStream, PageOffsets, PageRun
from igvm_builder.format.record import Record, u32
from igvm_builder.recordclass import field, fields, record

#: IGVM_FIXED_HEADER (format version 1, 24 bytes) and IGVM_FIXED_HEADER_V2 (32 bytes).
FIXED_HEADER_V1 = Record(
    "IGVM_FIXED_HEADER",
    u32("magic", hex=True),
    u32("format_version"),
    u32("variable_header_offset"),
    u32("variable_header_size"),
    u32("total_file_size"),
    u32("checksum", hex=True),
    size=FIXED_HEADER_SIZE_V1,
)
FIXED_HEADER_V2 = Record("IGVM_FIXED_HEADER_V2", *FIXED_HEADER_V1.fields, u32("architecture"), u32("page_size"),
                         size=FIXED_HEADER_SIZE_V2)
#: IGVM_VHS_VARIABLE_HEADER: the type and body length before every variable header.
VARIABLE_HEADER = Record("IGVM_VHS_VARIABLE_HEADER", u32("typ", hex=True), u32("length"), size=8)
_FIXED_V1, _FIXED_V2, _TLV = FIXED_HEADER_V1.struct, FIXED_HEADER_V2.struct, VARIABLE_HEADER.struct
_PAGE_TLV = struct.Struct("<IIQIIIHH")  # TLV header + IGVM_VHS_PAGE_DATA, 32 bytes

X64_VBS_REGISTERS = frozenset(
    [0x70001, 0x70000, *range(0x60000, 0x60006), 0x60007, 0x40000, 0x40002, 0x40003, 0x80001, 0x80004,
     0x20004, 0x20005, 0x20006, *range(0x20008, 0x2000D), 0x20010, 0x20011, 0x8000E, *range(0x80010, 0x80015),
     *range(0x80040, 0x80045), 0x80070, 0x80071, 0x80077, 0x80078, 0x80079, 0x8007A]
)
AARCH64_VBS_REGISTERS = frozenset(
    [*range(0x20000, 0x20008), 0x20022, 0x20023, 0x40002, 0x40005, 0x40006, 0x40007, 0x4000B, 0x4000C]
)

_X64_PLATFORMS = frozenset(PlatformType) - {PlatformType.CCA}
_AARCH64_PLATFORMS = frozenset({PlatformType.VSM_ISOLATION, PlatformType.CCA})


# Setters for the PAGE_DATA fast path (member descriptors of the record's slots: they bypass
# the frozen __setattr__, like the generated __init__ does).  Checked at import time so a new
# PageData field cannot be silently left unset.
_PAGE_DATA_FIELDS = ("gpa", "compatibility_mask", "flags", "data_type", "data")
if tuple(x.name for x in fields(H.PageData)) != _PAGE_DATA_FIELDS:
    raise ImportError("H.PageData fields changed: update the PAGE_DATA fast path in file.py")
_PAGE_DATA_SETTERS = tuple(getattr(H.PageData, name).__set__ for name in _PAGE_DATA_FIELDS)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@record
class FixedHeader:
    """The fixed header as stored (nothing checked: :meth:`IgvmFile.from_bytes` does that)."""

    magic: int
    format_version: int
    variable_header_offset: int
    variable_header_size: int
    total_file_size: int
    checksum: int
    #: version 2 only
    architecture: int | None = None
    page_size: int | None = None

    @property
    def size(self) -> int:
        return FIXED_HEADER_SIZE_V2 if self.format_version == 2 else FIXED_HEADER_SIZE_V1

    @classmethod
    def read(cls, buf: bytes | bytearray | memoryview | mmap.mmap) -> FixedHeader | None:
        """The fixed header at the start of ``buf`` (None if ``buf`` is too short to hold one)."""
        if len(buf) < FIXED_HEADER_SIZE_V1:
            return None
        head = cls(*_FIXED_V1.unpack_from(buf))
        if head.format_version == 2 and len(buf) >= FIXED_HEADER_SIZE_V2:
            return cls(*_FIXED_V2.unpack_from(buf))
        return head

    def pack(self) -> bytes:
        record = FIXED_HEADER_V2 if self.format_version == 2 else FIXED_HEADER_V1
        return record.pack(self)

    def records(self, buf: bytes | bytearray | memoryview | mmap.mmap) -> Iterator[tuple[int, int, int]]:
        """(offset, type, body length) of each variable header in ``buf``, in file order, as far
        as they lie inside both the variable header area and ``buf``."""
        end = min(self.variable_header_offset + self.variable_header_size, len(buf))
        pos = self.variable_header_offset
        while pos + 8 <= end:
            typ, length = _TLV.unpack_from(buf, pos)
            yield pos, typ, length
            pos += 8 + _pad8(length)


_NO_DIRECTIVES = Directives()


@record(kw_only=True)
class IgvmFile:
    """A whole IGVM file: platform, initialization and directive headers (with their data)."""

    revision: int = 1
    architecture: Architecture = Architecture.X64
    platforms: tuple[H.SupportedPlatform, ...]
    initializations: tuple[H.Header, ...] = ()
    #: The directive headers in file order: a :class:`~igvm_builder.format.pages.Directives`,
    #: which stores runs of pages compactly (a tuple or list given here is converted).
    directives: Directives = _NO_DIRECTIVES
    warnings: tuple[str, ...] = field(default=(), compare=False)
    #: Parsed with a platform filter: the index in the file of each header kept (None: every
    #: header was kept, header ``i`` is the file's ``i``-th).  Not part of equality.
    header_indices: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.directives) is not Directives:
            object.__setattr__(self, "directives", Directives(self.directives))

    # ------------------------------------------------------------------ access

    @property
    def headers(self) -> tuple[H.Header, ...]:
        return (*self.platforms, *self.initializations, *self.directives)

    def platform(self, ptype: PlatformType) -> H.SupportedPlatform | None:
        for p in self.platforms:
            if p.platform_type == ptype:
                return p
        return None

    def platform_for_mask(self, mask: int) -> H.SupportedPlatform | None:
        for p in self.platforms:
            if p.compatibility_mask == mask:
                return p
        return None

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | mmap.mmap, *,
                   platform: PlatformType | None = None, source: str | None = None) -> IgvmFile:
        """Parse and validate ``data``. Page data stays a zero-copy view into ``data``."""
        # The parser allocates a few acyclic objects per header (262,144 pages for a 1 GiB
        # file); pausing the cyclic GC meanwhile avoids repeated full-heap scans (2-3x faster).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _Parser(memoryview(data).toreadonly(), platform).parse()
        except IgvmError as exc:
            raise (exc.with_source(source) if source else exc) from None
        finally:
            if gc_was_enabled:
                gc.enable()

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, platform: PlatformType | None = None) -> IgvmFile:
        """mmap ``path`` read-only and parse it; page data is not copied."""
        name = os.fspath(path)
        from igvm_builder.io import map_input

        buf = map_input(name, "IGVM file", error=IgvmFormatError)  # regular files only
        f = cls.from_bytes(buf, platform=platform, source=name)
        if isinstance(buf, mmap.mmap):
            # the headers now live as objects: their pages of the mapping (8 MiB for a 1 GiB
            # file) can leave the resident set; a later read faults them back in unchanged
            voff, vsize = struct.unpack_from("<II", buf, 8)
            dontneed(buf, 0, voff + vsize)
        return f

    # ------------------------------------------------------------------ serializing

    def validate(self) -> IgvmFile:
        """Run every whole-file rule; return a copy with :attr:`warnings` filled in."""
        warnings = _validate(self)
        return _replace_warnings(self, warnings)

    def layout(self, *, validate: bool = True, page_digests: bool | PageDigestStream = False,
               on_data: Callable[[int, list[H.BlobLike]], object] | None = None,
               on_head: Callable[[int, bytearray], object] | None = None) -> Layout:
        r"""The canonical serialization: headers and the blobs of the data section (:class:`Layout`).

        Identical blobs are stored once.  They are found by a content hash: Python's ``hash``,
        or, with ``page_digests``, SHA-384 for every 4 KiB page of file data (a :class:`FileSlice`
        window), which the result keeps (:attr:`Layout.page_digests`): a builder that measures
        SEV-SNP needs that digest of every page anyway (``measure_platform(...,
        page_digests=)``), and hashlib lets other threads run while it hashes.  Either way a
        match is confirmed byte for byte.

        ``on_data(file_offset, blobs)``, if given, receives the data section as it is laid
        out, in batches of :data:`STREAM_BLOBS` blobs (the last batch may be shorter): a
        writer can store the data while the headers, which precede it, are still being made.
        ``on_head(file_offset, buffer)``, if given, likewise receives the variable headers as
        they are made, in pieces of about :data:`HEAD_PIECE` bytes (the buffer is the caller's
        from then on); :attr:`Layout.head` is then the fixed header alone.  With both, the
        layout keeps nothing per page but its table of distinct pages (16 bytes a page).
        ``page_digests`` may be a :class:`PageDigestStream` instead of True: the digests go to
        a consumer (a measurement in another thread) as they are made, instead of being kept;
        the caller :meth:`~PageDigestStream.finish`\ es (or abandons) it.
        ``validate=False`` skips :meth:`validate` (for a model that has just been validated).
        """
        if validate:
            _validate(self)
        items = self.directives.items()
        digests: PageDigests | PageDigestStream | None
        if isinstance(page_digests, PageDigestStream):
            if len(page_digests) != len(self.directives):
                raise ValueError(f"a page digest stream of {len(page_digests)} for {len(self.directives)} directives")
            digests = page_digests
        else:
            digests = PageDigests(len(self.directives)) if page_digests else None
        publish = page_digests.publish if isinstance(page_digests, PageDigestStream) else None
        fixed_size = FIXED_HEADER_SIZE_V1 if self.revision == 1 else FIXED_HEADER_SIZE_V2
        page_run = PageRun
        var_size = sum(8 + _pad8(h.SIZE) for h in (*self.platforms, *self.initializations))
        data_pages = len(self.platforms) + len(self.initializations)  # (at most: what the dedup table sizes for)
        for item in items:
            if isinstance(item, PageRun):
                var_size += item.count * 32
                data_pages += item.count if item.source is not None else 1
            else:
                var_size += 8 + _pad8(item.SIZE)
                data_pages += 1
        data_start = fixed_size + var_size
        if data_start > 0xFFFF_FFFF:  # (a data-less run of pages costs no data, but 32 bytes of header a page)
            raise IgvmFormatError(f"the headers take {var_size} bytes, more than the 4 GiB a file may hold "
                                  "(sizes and offsets are 32-bit)")
        cursor = data_start
        # The data section: blobs, each stored once; consecutive new pages of one buffer are one
        # window (a blob of many pages), so the blob list grows per run, not per page.
        blobs: list[H.BlobLike] = []
        offsets: list[int] = []  # file offset of each of blobs
        merging = False  # blobs[-1] is a window made here, not yet streamed: a next page may extend it
        # Identical blobs.  4 KiB blobs (pages) by a 64-bit key of their contents (Python's hash
        # of their SHA-384 with page_digests, else of their bytes) -> file offset of the
        # first page with that key (``table``, 16 bytes a page); pages that the table answers
        # with an earlier, different page -> ``clash`` by key.  Other blobs by (length, content
        # hash) -> indices into blobs.  A match is confirmed byte for byte.
        table = PageOffsets(data_pages)
        setdefault = table.setdefault
        clash: dict[int, list[int]] = {}
        dedup: dict[tuple[int, int], list[int]] = {}
        # The headers are made in ``out``: after the fixed header's room, or, with on_head, from
        # file offset ``head_at`` (what went before was handed over; its CRC is ``var_crc``).
        out = bytearray(fixed_size if on_head is None else 0)
        head_at, var_crc = fixed_size, 0
        head_pages = HEAD_PIECE // 32  # data-less or repeated pages' headers made at a time
        releaser = PageReleaser(every=2048)  # keep RSS flat while hashing mmap'd page data
        note = releaser.note
        compared_pages = PageReleaser(every=256)  # and while comparing with pages stored before
        compared = compared_pages.note
        last_slice: FileSlice | None = None
        page_data, file_slice, page_tlv, sha384 = H.PageData, FileSlice, _PAGE_TLV, hashlib.sha384
        page_type = int(HeaderType.PAGE_DATA)
        digest_key, content_hash = _digest_key, _content_hash  # (module functions: tests replace them)
        stream_bytes = STREAM_BLOBS * PAGE_SIZE_4K

        sent, sent_offset = 0, data_start  # blobs already given to on_data, and where the next one goes

        def stream() -> None:
            nonlocal sent, sent_offset, merging
            if on_data is not None and (len(blobs) - sent >= STREAM_BLOBS or cursor - sent_offset >= stream_bytes):
                on_data(sent_offset, blobs[sent:])
                sent, sent_offset = len(blobs), cursor
                merging = False

        def flush_head(last: bool = False) -> None:
            """With on_head: hand the headers made so far over once there are HEAD_PIECE bytes
            (``last``: whatever is left)."""
            nonlocal out, head_at, var_crc
            if on_head is not None and (len(out) >= HEAD_PIECE or (last and out)):
                piece, out = out, bytearray()
                var_crc = zlib.crc32(piece, var_crc)
                on_head(head_at, piece)
                head_at += len(piece)

        def append(blob: H.BlobLike, size: int) -> int:
            nonlocal cursor, merging
            offset = cursor
            if cursor + size > 0xFFFF_FFFF:
                raise IgvmFormatError("file data exceeds 4 GiB (file offsets are 32-bit)")
            blobs.append(blob)
            offsets.append(offset)
            cursor += size
            merging = False
            stream()
            return offset

        def append_window(buf: memoryview, start: int) -> int:
            """A new page that is 4 KiB at ``start`` of ``buf``: extends the last blob when that is
            the window just before it."""
            nonlocal cursor, merging
            if merging:
                last = blobs[-1]
                assert isinstance(last, FileSlice)
                if last._buf is buf and last.start + last.length == start:
                    if cursor + PAGE_SIZE_4K > 0xFFFF_FFFF:
                        raise IgvmFormatError("file data exceeds 4 GiB (file offsets are 32-bit)")
                    offset = cursor
                    last.length += PAGE_SIZE_4K  # (a window made here, not handed out yet)
                    cursor += PAGE_SIZE_4K
                    stream()
                    return offset
            offset = append(file_slice(buf, start, PAGE_SIZE_4K), PAGE_SIZE_4K)
            merging = on_data is None or len(blobs) > sent  # (not handed out yet: may still grow)
            return offset

        def stored(offset: int, size: int) -> memoryview:
            """The bytes laid out at file ``offset`` (a page of a mapped input that is read here
            leaves the resident set with the next batch of them: a large image whose duplicates
            are pages stored anywhere before would otherwise keep them all resident)."""
            i = bisect.bisect_right(offsets, offset) - 1
            blob, at = blobs[i], offset - offsets[i]
            if type(blob) is file_slice:
                compared(file_slice(blob._buf, blob.start + at, size))
            return as_view(blob)[at : at + size]

        def page_key(view: memoryview, digest: bytes | None) -> int:
            return digest_key(digest) if digest is not None else content_hash(view)

        def find_page(view: memoryview, key: int, first: int | None) -> int | None:
            """The file offset of a page identical to ``view`` laid out earlier, or None
            (``first``: the table's offset for ``key``)."""
            if first is None:
                return None
            if same_bytes(stored(first, PAGE_SIZE_4K), view):
                return first
            for offset in clash.get(key, ()):
                if same_bytes(stored(offset, PAGE_SIZE_4K), view):
                    return offset
            return None

        def remember_page(key: int, offset: int) -> None:
            """A new page whose key the table answered with another page."""
            clash.setdefault(key, []).append(offset)

        def place(blob: H.BlobLike, digest: bytes | None = None) -> int:
            """File offset of ``blob``: an identical earlier blob's, or the next free one."""
            view = as_view(blob)
            size = len(view)
            if size == PAGE_SIZE_4K:
                if digest is None and digests is not None:
                    digest = sha384(view).digest()
                key = page_key(view, digest)
                first = setdefault(key, cursor)  # (a new key: the page goes at the cursor)
                if first is None:
                    return append(blob, size)
                offset = find_page(view, key, first)
                if offset is None:
                    offset = append(blob, size)
                    remember_page(key, offset)
                return offset
            key2 = (size, _content_hash(view))
            same = dedup.setdefault(key2, [])
            for i in same:
                if same_bytes(as_view(blobs[i]), view):
                    return offsets[i]
            same.append(len(blobs))
            return append(blob, size)

        def place_window(buf: memoryview, start: int, key: int) -> int:
            """place() for the 4 KiB at ``start`` of ``buf`` (a page of a run or a FileSlice),
            whose dedup key is ``key``."""
            first = setdefault(key, cursor)
            if first is None:  # a page not seen before (most pages): no comparison; it goes at the cursor
                return append_window(buf, start)
            found = find_page(buf[start : start + PAGE_SIZE_4K], key, first)
            if found is not None:
                return found
            offset = append_window(buf, start)
            remember_page(key, offset)
            return offset

        def page_run_headers(run: PageRun, dpos: int) -> None:
            """The headers of a run of pages (directive ``dpos`` on), its data placed."""
            nonlocal out, last_slice, cursor
            gpa, mask, flags, dtype, count = run.gpa, run.compatibility_mask, run.flags, run.data_type, run.count
            pack = page_tlv.pack
            source = run.source
            if source is None:  # one page repeated, or none: placed once
                fill = run.fill
                offset = 0
                if len(fill):
                    if type(fill) is file_slice:
                        note(fill)
                        last_slice = fill
                        if digests is not None:
                            digest = sha384(fill.view()).digest()
                            digests.fill(dpos, count, digest)
                            offset = place(fill, digest)
                        else:
                            offset = place(fill)
                    else:
                        offset = place(fill)
                pack_into = page_tlv.pack_into
                for first in range(0, count, head_pages):  # the headers, written in place (no object per page)
                    m = min(head_pages, count - first)
                    at = len(out)
                    out += bytes(32 * m)
                    for i in range(first, first + m):
                        pack_into(out, at, page_type, 24, gpa + i * PAGE_SIZE_4K, mask, offset, flags, dtype, 0)
                        at += 32
                    flush_head()
                return
            start = run.start
            # the digests of the run: reserved at once, or, for a stream, a stride at a time
            dbuf, k = digests.reserve(dpos, count) if digests is not None and publish is None else (None, 0)
            done = 0
            while done < count:  # strides of 2048 pages: noted as one window, released once hashed
                n = min(2048, count - done)
                end = start + n * PAGE_SIZE_4K
                if publish is not None:  # every page of the run has one
                    assert digests is not None
                    dbuf, k = digests.reserve(dpos + done, n)
                note(file_slice(source, start, n * PAGE_SIZE_4K))
                keys: list[int] = []  # the stride's dedup keys, looked up in the table at once
                if dbuf is not None:
                    for at in range(start, end, PAGE_SIZE_4K):
                        this = sha384(source[at : at + PAGE_SIZE_4K]).digest()
                        dbuf[k : k + 48] = this
                        k += 48
                        keys.append(digest_key(this))
                else:
                    keys = [content_hash(source[at : at + PAGE_SIZE_4K]) for at in range(start, end, PAGE_SIZE_4K)]
                for key in keys:
                    tail = blobs[-1] if merging else None
                    if type(tail) is file_slice and tail._buf is source and tail.start + tail.length == start \
                            and cursor + PAGE_SIZE_4K <= 0xFFFF_FFFF and setdefault(key, cursor) is None:
                        # a new page right after the window being laid out (most pages): extend it
                        offset = cursor
                        tail.length += PAGE_SIZE_4K
                        cursor += PAGE_SIZE_4K
                        if on_data is not None and cursor - sent_offset >= stream_bytes:
                            stream()
                    else:
                        offset = place_window(source, start, key)
                    out += pack(page_type, 24, gpa, mask, offset, flags, dtype, 0)
                    gpa += PAGE_SIZE_4K
                    start += PAGE_SIZE_4K
                done += n
                releaser.release(None)
                flush_head()
                if publish is not None:
                    publish(dpos + done)
            last_slice = None

        def header(h: H.Header) -> None:
            """Any header but PAGE_DATA: its blob placed, its TLV and body appended."""
            nonlocal last_slice
            blob = h.blob()
            offset = 0
            if blob is not None:
                if isinstance(blob, FileSlice):
                    note(blob)
                    last_slice = blob
                offset = place(blob)
            body = h.pack_body(offset)
            out.extend(_TLV.pack(int(h.TYPE), len(body)))
            out.extend(body)
            out.extend(bytes(_pad8(len(body)) - len(body)))

        for head in (*self.platforms, *self.initializations):
            header(head)
        dpos = -1  # the flat index of the directive h (of a run: its first page)
        published = 0
        for h in items:
            dpos += 1
            if on_head is not None and len(out) >= HEAD_PIECE:
                flush_head()
            if publish is not None and dpos - published >= 1024:
                publish(dpos)
                published = dpos
            if type(h) is page_run:
                assert isinstance(h, PageRun)
                page_run_headers(h, dpos)
                dpos += h.count - 1
                continue
            if type(h) is page_data:
                # Fast path for the common header (same bytes as blob() + pack_body()).
                data = h.data
                if type(data) is file_slice and data.length == PAGE_SIZE_4K:
                    note(data)
                    last_slice = data
                    if digests is not None:
                        digest = sha384(data._buf[data.start : data.start + PAGE_SIZE_4K]).digest()
                        digests.put(dpos, digest)
                        offset = place_window(data._buf, data.start, digest_key(digest))
                    else:
                        offset = place_window(data._buf, data.start,
                                              content_hash(data._buf[data.start : data.start + PAGE_SIZE_4K]))
                else:
                    blob = h.blob()
                    offset = place(blob) if blob is not None else 0
                out += page_tlv.pack(page_type, 24, h.gpa, h.compatibility_mask, offset, h.flags, h.data_type, 0)
                continue
            assert isinstance(h, H.Header)
            header(h)
        releaser.release(last_slice)
        compared_pages.release(None)
        if cursor == data_start:
            # The reference parser needs at least one byte after the variable headers
            # (IGVM_FORMAT.md §2 item 5); the crate's own writer forgets this.
            blobs.append(b"\x00")
            cursor += 1
        if on_data is not None and len(blobs) > sent:
            on_data(sent_offset, blobs[sent:])
        fixed = FixedHeader(
            IGVM_MAGIC_VALUE, self.revision, fixed_size, var_size, cursor, 0,
            *((int(self.architecture), PAGE_SIZE_4K) if self.revision == 2 else ())).pack()
        if on_head is not None:
            flush_head(last=True)
            assert head_at == data_start, (head_at, data_start)
            # the checksum covers the fixed header, then the headers handed over
            out = bytearray(fixed)
            out[20:24] = struct.pack("<I", _crc32_combine(zlib.crc32(fixed), var_crc, var_size))
        else:
            assert len(out) == data_start, (len(out), data_start)
            out[:fixed_size] = fixed
            out[20:24] = struct.pack("<I", zlib.crc32(out))
        # A read-only view of the headers built here, not a bytes copy: the copy would hold a
        # second 32 bytes per page at the peak (see Layout.head).
        return Layout(memoryview(out).toreadonly(), blobs, digests)

    def to_bytes(self) -> bytes:
        head, blobs, _ = self.layout()
        return b"".join((head, *(as_view(b) for b in blobs)))

    def write(self, fileobj: BinaryIO) -> int:
        """Stream the canonical bytes to ``fileobj``; returns the number of bytes written."""
        head, blobs, _ = self.layout()
        fileobj.write(head)
        total = len(head)
        for b in blobs:
            view = as_view(b)
            fileobj.write(view)
            total += len(view)
        return total

    def iter_chunks(self) -> Iterable[bytes | memoryview]:
        head, blobs, _ = self.layout()
        yield head
        for b in blobs:
            yield as_view(b)


#: PAGE_DATA records the parser reads at a time (1 MiB of headers, 32,768 pages); each chunk of
#: a mapped file leaves the resident set once read.
_PARSE_CHUNK = 1 << 20

#: Blobs per batch handed to ``layout``'s ``on_data`` (8 MiB of 4 KiB pages).
STREAM_BLOBS = 2048

#: Bytes of variable headers per piece handed to ``layout``'s ``on_head`` (32,768 pages).
HEAD_PIECE = 1 << 20

def _crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (Python's zlib has no
    ``crc32_combine``).  A CRC-32 that starts from ``v`` instead of 0 differs from the one that
    starts from 0 by a term that depends only on ``v`` and the length (the register's update is
    linear over GF(2)); that term is found by running ``len(b)`` zero bytes from both starts."""
    from_a, from_0 = crc_a, 0
    block = memoryview(bytes(min(length_b, 1 << 20) or 1))
    for at in range(0, length_b, len(block)):
        zeros = block[: min(len(block), length_b - at)]
        from_a, from_0 = zlib.crc32(zeros, from_a), zlib.crc32(zeros, from_0)
    return from_a ^ from_0 ^ crc_b


class Layout(NamedTuple):
    """What :meth:`IgvmFile.layout` returns: the file is ``head`` followed by ``blobs``."""

    #: The fixed header and the variable headers (the fixed header alone when ``on_head`` took
    #: the variable headers): a read-only view (``bytes(head)`` for a
    #: copy) of the buffer the serializer built them in, handed over without a copy (for a
    #: 4 GiB image of distinct pages that copy was a second 32 MiB at the build's peak).
    head: memoryview
    #: The data section, in file order (each blob stored once).
    blobs: list[H.BlobLike]
    #: With ``layout(page_digests=True)``: for each directive (``IgvmFile.directives`` order) the
    #: SHA-384 of its page when it is a PAGE_DATA whose data is a 4 KiB :class:`FileSlice` (or a
    #: page of a run with data), else None (what ``measure_platform(page_digests=)`` takes): a
    #: :class:`~igvm_builder.format.pages.PageDigests`, 48 bytes a page with a digest (or the
    #: :class:`~igvm_builder.format.pages.PageDigestStream` given, which keeps none of them).
    page_digests: PageDigests | PageDigestStream | None


#: The dedup key of a page from its SHA-384: Python's (64-bit) hash of it.
_digest_key: Callable[[bytes], int] = hash


def _content_hash(view: memoryview) -> int:
    try:
        return hash(view)
    except (TypeError, ValueError):
        return hash(view.tobytes())


def _replace_warnings(f: IgvmFile, warnings: tuple[str, ...]) -> IgvmFile:
    object.__setattr__(f, "warnings", warnings)  # warnings are not part of equality
    return f


# =========================================================================== parser


class _Parser:
    def __init__(self, buf: memoryview, platform: PlatformType | None) -> None:
        self.buf = buf
        self.filter = platform
        self.warnings: list[str] = []

    def fail(self, msg: str, index: int | None = None, offset: int | None = None) -> IgvmFormatError:
        return IgvmFormatError(msg, header_index=index, offset=offset)

    def parse(self) -> IgvmFile:
        buf = self.buf
        n = len(buf)
        if n < FIXED_HEADER_SIZE_V1:
            raise self.fail(f"file is {n} bytes, shorter than the 24-byte IGVM fixed header", offset=0)
        head = FixedHeader.read(buf)
        assert head is not None
        magic, version, total, checksum = head.magic, head.format_version, head.total_file_size, head.checksum
        voff, vsize = head.variable_header_offset, head.variable_header_size
        if magic != IGVM_MAGIC_VALUE:
            raise self.fail(f"bad magic {magic:#010x} (not an IGVM file; expected 'IGVM')", offset=0)
        arch = Architecture.X64
        if version == 1:
            fixed_size = FIXED_HEADER_SIZE_V1
        elif version == 2:
            fixed_size = FIXED_HEADER_SIZE_V2
            if n < fixed_size:
                raise self.fail("file too short for the 32-byte v2 fixed header", offset=0)
            arch_raw, page_size = head.architecture, head.page_size
            if arch_raw is None or arch_raw not in (0, 1):
                raise self.fail(f"invalid architecture {arch_raw} in the v2 fixed header", offset=24)
            if page_size != PAGE_SIZE_4K:
                raise self.fail(f"page size of {page_size:#x} unsupported (only 0x1000)", offset=28)
            arch = Architecture(arch_raw)
        else:
            raise self.fail(f"unsupported format_version {version} (expected 1 or 2)", offset=4)
        if total != n:
            raise self.fail(f"total_file_size {total} does not match the file length {n}", offset=16)
        if voff >= n:
            raise self.fail(f"variable_header_offset {voff:#x} is beyond the end of the file", offset=8)
        if voff + vsize >= n:
            raise self.fail(
                f"variable headers end at {voff + vsize:#x}, at or past the end of the file ({n:#x}); "
                "a file needs at least one byte of file data", offset=12)
        fixed = bytearray(buf[:fixed_size])
        fixed[20:24] = bytes(4)
        crc = zlib.crc32(fixed)
        for off in range(voff, voff + vsize, _PARSE_CHUNK):  # (each chunk leaves the resident set once read)
            n = min(_PARSE_CHUNK, voff + vsize - off)
            crc = zlib.crc32(buf[off : off + n], crc)
            self._release(off, n)
        if crc != checksum:
            raise self.fail(f"invalid checksum in fixed header: computed {crc:#010x}, header says "
                            f"{checksum:#010x}", offset=20)
        if voff != fixed_size:
            self.warnings.append(f"variable_header_offset {voff:#x} is not the fixed header size "
                                 f"{fixed_size} (accepted by the reference parser)")
        self.data_start = voff + vsize
        return self._parse_headers(version, arch, voff, vsize)

    def _release(self, start: int, length: int) -> None:
        """Drop ``length`` bytes at ``start`` of a read-only mmap'd file from the resident set
        (:func:`~igvm_builder.format.blob.dontneed`: a later read faults them back in)."""
        obj = self.buf.obj
        if isinstance(obj, mmap.mmap):
            with contextlib.suppress(ValueError, BufferError), memoryview(obj) as whole:
                if whole.readonly:
                    dontneed(obj, max(0, start), length)

    def _data(self, file_offset: int, size: int, what: str, index: int, offset: int) -> FileSlice:
        if file_offset < self.data_start or file_offset + size > len(self.buf):
            raise self.fail(f"{what}: file_offset {file_offset:#x} + {size:#x} bytes is outside the file data "
                            f"({self.data_start:#x}..{len(self.buf):#x})", index, offset)
        return FileSlice(self.buf, file_offset, size)

    def _parse_headers(self, version: int, arch: Architecture, voff: int, vsize: int) -> IgvmFile:
        buf = self.buf
        end = voff + vsize
        pos = voff
        section = Section.PLATFORM
        platforms: list[H.SupportedPlatform] = []
        inits: list[H.Header] = []
        directives: list[H.Header | PageRun] = []
        mask_to_platform: dict[int, H.SupportedPlatform] = {}
        index = 0
        page_tlv = _PAGE_TLV
        page_type = int(HeaderType.PAGE_DATA)
        data_start = self.data_start
        nbuf = len(buf)
        PageData = H.PageData
        new_page = object.__new__
        set_gpa, set_mask, set_flags, set_dtype, set_data = _PAGE_DATA_SETTERS
        directive = Section.DIRECTIVE
        append = directives.append
        iter_pages = page_tlv.iter_unpack
        # The pending run of PAGE_DATA records: its first record's values, its length in
        # pages and the step of its file offsets (4096: consecutive pages of file data; 0: one
        # page repeated, or data-less pages with offset 0; None: not known from one page).
        run_gpa = run_mask = run_flags = run_dtype = run_foff = run_n = 0
        run_step: int | None = None
        #: headers with compatibility_mask 0 were seen (the reference parser drops them)
        mask_zero: list[bool] = []

        def flush() -> None:
            """The pending run as one PageData (a single page) or a PageRun."""
            if not run_mask:
                mask_zero.append(True)
            if run_n == 1:
                page = new_page(PageData)  # fields checked: skip __init__/__post_init__
                set_gpa(page, run_gpa)
                set_mask(page, run_mask)
                set_flags(page, run_flags)
                set_dtype(page, run_dtype)
                set_data(page, FileSlice(buf, run_foff, 4096) if run_foff else b"")
                append(page)
            elif run_step:
                append(PageRun(run_gpa, run_n, run_mask, flags=run_flags, data_type=run_dtype, source=buf,
                               start=run_foff))
            else:
                append(PageRun(run_gpa, run_n, run_mask, flags=run_flags, data_type=run_dtype,
                               fill=FileSlice(buf, run_foff, 4096) if run_foff else b""))

        while pos < end:
            if end - pos >= 32 and (section == directive or _TLV.unpack_from(buf, pos)[0] == page_type):
                section = directive  # (a PAGE_DATA is a directive: it may follow any header)
                # Fast path: a run of PAGE_DATA records, the overwhelmingly common header.
                # Records that continue the pending run (next GPA, same mask, flags and type,
                # file offset by the run's step) only count it: no object per page.
                while True:  # the records a chunk at a time: each chunk read leaves the resident set
                    done = pos + min((end - pos) // 32 * 32, _PARSE_CHUNK)
                    for typ, length, gpa, mask, foff, flags, dtype, reserved in iter_pages(buf[pos:done]):
                        if typ != page_type or length != 24:
                            break
                        if gpa & 0xFFF or dtype > 3 or reserved or (
                                foff and (foff < data_start or foff + 4096 > nbuf)):
                            raise self._page_error(index, pos, gpa, dtype, reserved, foff)
                        if flags & ~6:
                            self._page_flag_warning(index, gpa, flags)
                        pos += 32
                        index += 1
                        if run_n and gpa == run_gpa + run_n * 4096 and mask == run_mask and flags == run_flags \
                                and dtype == run_dtype:
                            step = foff - run_foff - (run_n - 1) * (run_step or 0)
                            if run_step is None:
                                if step == 0 or (step == 4096 and run_foff):
                                    run_step = step
                                    run_n = 2
                                    continue
                            elif step == run_step:
                                run_n += 1
                                continue
                        if run_n:
                            flush()
                        run_gpa, run_mask, run_flags, run_dtype, run_foff = gpa, mask, flags, dtype, foff
                        run_n, run_step = 1, None
                    if pos < done or end - pos < 32:  # a record that is no PAGE_DATA, or the end
                        break
                    self._release(done - _PARSE_CHUNK, _PARSE_CHUNK)
                if run_n:
                    flush()
                    run_n = 0
                if pos >= end:
                    break
            if end - pos < 8:
                raise self.fail("truncated variable header (fewer than 8 bytes left)", index, pos)
            typ, length = _TLV.unpack_from(buf, pos)
            sect = section_of(typ)
            if sect is None:
                raise self.fail(f"header type {typ:#x} is in no known section (platform 0x1-0x100, "
                                "initialization 0x101-0x200, directive 0x301-0x400)", index, pos)
            if sect < section:
                raise self.fail(f"{_type_name(typ)} header after a {section.name.lower()} header: sections must be "
                                "ordered platform, initialization, directive", index, pos)
            section = sect
            body_start = pos + 8
            if body_start + length > end:
                raise self.fail(f"{_type_name(typ)} header body ({length} bytes) runs past the end of the "
                                "variable header area", index, pos)
            expected = H.BODY_SIZES.get(typ)
            if expected is None:
                raise self.fail(f"unknown variable header type {typ:#x}", index, pos)
            if length != expected:
                raise self.fail(f"{_type_name(typ)} header length {length} is invalid (must be {expected})",
                                index, pos)
            body = buf[body_start : body_start + length]
            try:
                hdr = self._decode(typ, body, index, pos, arch, mask_to_platform, buf)
            except IgvmFormatError as exc:
                if exc.header_index is None:
                    exc.header_index, exc.offset = index, pos
                    name = _type_name(typ)
                    if not exc.message.startswith(name.split("_")[0]):
                        exc.message = f"{name}: {exc.message}"
                        exc.args = (exc.message,)
                raise
            if sect != Section.PLATFORM and hdr.mask == 0:
                mask_zero.append(True)
            if sect == Section.PLATFORM:
                assert isinstance(hdr, H.SupportedPlatform)
                for other_index, other in enumerate(platforms):
                    if other.platform_type == hdr.platform_type:
                        raise self.fail(f"multiple platform headers with the same isolation type "
                                        f"{hdr.platform_type.name} (headers {other_index} and {index})", index, pos)
                    if other.compatibility_mask == hdr.compatibility_mask:
                        raise self.fail(f"platform headers {other_index} and {index} both use compatibility_mask "
                                        f"{hdr.compatibility_mask:#x}", index, pos)
                platforms.append(hdr)
                mask_to_platform[hdr.compatibility_mask] = hdr
            elif sect == Section.INITIALIZATION:
                inits.append(hdr)
            else:
                directives.append(hdr)
            pos = body_start + _pad8(length)
            index += 1

        if not platforms:
            raise self.fail("no valid platform headers")
        n_plat = len(platforms)
        n_directives = sum(item.count if type(item) is PageRun else 1 for item in directives)
        indices: Sequence[int] = range(n_plat, n_plat + len(inits) + n_directives)
        # The reference parser keeps the headers whose mask meets its filter mask: the mask of the
        # platform filtered for, else 0xFFFFFFFF, so a header with compatibility_mask 0 is
        # dropped (after it was parsed and checked) whatever the filter.
        fmask = None
        if self.filter is not None:
            for p in platforms:
                if p.platform_type == self.filter:
                    fmask = p.compatibility_mask
        if fmask is None and mask_zero:
            fmask = 0xFFFF_FFFF
        if fmask is not None:
            kept_indices: list[int] = []
            kept_inits: list[H.Header] = []
            kept_directives: list[H.Header | PageRun] = []
            i = n_plat
            for h in inits:
                if h.mask is None or h.mask & fmask:
                    kept_indices.append(i)
                    kept_inits.append(h)
                elif h.mask == 0:
                    self._mask_zero_warning(h, i, 1)
                i += 1
            for item in directives:
                n = item.count if type(item) is PageRun else 1
                if item.mask is None or item.mask & fmask:
                    kept_indices += range(i, i + n)
                    kept_directives.append(item)
                elif item.mask == 0:
                    self._mask_zero_warning(item, i, n)
                i += n
            indices, inits, directives = kept_indices, kept_inits, kept_directives
        f = IgvmFile(revision=version, architecture=arch, platforms=tuple(platforms),
                     initializations=tuple(inits), directives=Directives(directives),
                     header_indices=None if isinstance(indices, range) else (*range(n_plat), *indices))
        warnings = _validate(f, indices, n_plat, fields=False)  # decoding checked every field
        return _replace_warnings(f, (*self.warnings, *warnings))

    def _mask_zero_warning(self, h: H.Header | PageRun, index: int, count: int) -> None:
        where = f"header {index}" if count == 1 else f"headers {index}-{index + count - 1}"
        self.warnings.append(f"{where}: {h.TYPE.name} with compatibility_mask 0 applies to no platform; dropped, as "
                             "the reference parser drops it")

    def _page_error(self, index: int, pos: int, gpa: int, dtype: int, reserved: int, foff: int) -> IgvmFormatError:
        if gpa & 0xFFF:
            return self.fail(f"PAGE_DATA gpa {gpa:#x} is not 4 KiB aligned", index, pos)
        if dtype > 3:
            return self.fail(f"PAGE_DATA data_type {dtype} is invalid", index, pos)
        if reserved:
            return self.fail("PAGE_DATA reserved field must be zero", index, pos)
        return self.fail(f"PAGE_DATA at GPA {gpa:#x}: file_offset {foff:#x} leaves no full 4 KiB page inside the "
                         "file data", index, pos)

    def _page_flag_warning(self, index: int, gpa: int, flags: int) -> None:
        if flags & 1:
            self.warnings.append(f"header {index}: PAGE_DATA at GPA {gpa:#x} sets is_2mb_page, which the reference "
                                 "parser ignores (the page is read as 4 KiB)")
        if flags & ~7:
            self.warnings.append(f"header {index}: PAGE_DATA at GPA {gpa:#x} sets reserved flag bits "
                                 f"{flags & ~7:#x}")

    def _decode(self, typ: int, body: memoryview, index: int, pos: int, arch: Architecture,
                platforms: dict[int, H.SupportedPlatform], buf: memoryview) -> H.Header:
        cls = H.SIMPLE_HEADERS.get(typ)
        if cls is not None:
            kept = _DROPPED_FLAG_BITS.get(cls)
            if kept is not None:  # flag bits the reference model has no place for: read as 0
                fmt, at = ("<I", 16) if cls is H.RequiredMemory else ("<B", 7)  # the flags field
                flags = struct.unpack_from(fmt, body, at)[0]
                if flags & ~kept:
                    self.warnings.append(f"header {index}: {_type_name(typ)} flags {flags:#x} set bits other than "
                                         f"{kept:#x}; read as {flags & kept:#x}, as the reference parser ignores them")
                    fixed = bytearray(body)
                    struct.pack_into(fmt, fixed, at, flags & kept)
                    body = memoryview(bytes(fixed))
            return cls.unpack_body(body)
        if typ == HeaderType.PAGE_DATA:
            v = H.PageData.BODY.unpack(body)
            foff = v.pop("file_offset")
            if v["flags"] & ~7 or v["flags"] & 1:
                self._page_flag_warning(index, v["gpa"], v["flags"])
            return H.PageData(**v, data=self._data(foff, PAGE_SIZE_4K, "PAGE_DATA", index, pos) if foff else b"")
        if typ == HeaderType.PARAMETER_AREA:
            v = H.ParameterArea.BODY.unpack(body)
            foff, size = v.pop("file_offset"), v["number_of_bytes"]
            return H.ParameterArea(**v, initial_data=self._data(foff, size, "PARAMETER_AREA", index, pos)
                                   if foff else b"")
        if typ in (HeaderType.CORIM_DOCUMENT, HeaderType.CORIM_SIGNATURE):
            v = H.CorimDocument.BODY.unpack(body)
            foff, size = v.pop("file_offset"), v.pop("size_bytes")
            if foff == 0 and size:
                raise self.fail(f"file_offset is 0 (no data) but size_bytes is {size}")
            data = self._data(foff, size, "CORIM payload", index, pos) if foff else b""
            ccls = H.CorimDocument if typ == HeaderType.CORIM_DOCUMENT else H.CorimSignature
            return ccls(**v, data=data)
        if typ == HeaderType.VP_CONTEXT:
            return self._decode_vp_context(body, index, pos, arch, platforms, buf)
        raise self.fail(f"unknown variable header type {typ:#x}")

    def _decode_vp_context(self, body: memoryview, index: int, pos: int, arch: Architecture,
                           platforms: dict[int, H.SupportedPlatform], buf: memoryview) -> H.Header:
        v = H.VP_CONTEXT.unpack(body)
        gpa, mask, foff, vp_index = v["gpa"], v["compatibility_mask"], v["file_offset"], v["vp_index"]
        if any(buf[pos + 28 : pos + 32]):
            self.warnings.append(f"header {index}: non-zero padding after the 20-byte VP_CONTEXT "
                                 "(the reference parser does not read it)")
        platform = platforms.get(mask)
        if platform is None or platform.platform_type == PlatformType.TDX:
            what = "a TDX platform (TDX has no VP context)" if platform else "no single platform"
            raise self.fail(f"VP_CONTEXT compatibility_mask {mask:#x} names {what}")
        ptype = platform.platform_type
        if ptype in VMSA_PLATFORMS:
            if gpa & 0xFFF:
                raise self.fail(f"SNP VP_CONTEXT gpa {gpa:#x} is not 4 KiB aligned")
            if foff == 0:
                raise self.fail("SNP VP_CONTEXT has no VMSA data (file_offset 0)")
            vmsa = self._data(foff, 4096, "VMSA", index, pos)
            if any(vmsa.view()[SNP_VMSA_SIZE_0_4_0:]):
                self.warnings.append(f"header {index}: VMSA has non-zero bytes at or beyond offset 1648; the "
                                     "0.4.0 igvm crate (older loaders) rejects such a file")
            return H.SnpVpContext(gpa=gpa, compatibility_mask=mask, vp_index=vp_index, vmsa=vmsa)
        if ptype in NATIVE_CONTEXT_PLATFORMS or ptype == PlatformType.CCA:
            size = 232 if ptype != PlatformType.CCA else 80
            if foff == 0:
                raise self.fail(f"{ptype.name} VP_CONTEXT has no data (file_offset 0)")
            page = self._data(foff, 4096, "VP context", index, pos).view()
            if any(page[size:]):
                raise self.fail(f"invalid VP context: bytes {size}..4095 after the {size}-byte context must be zero")
            if gpa and ptype != PlatformType.CCA:  # the reference model has no gpa for it: read as 0
                self.warnings.append(f"header {index}: native VP_CONTEXT gpa is {gpa:#x}; the spec says 0 and the "
                                     "reference parser ignores it (read as 0)")
                gpa = 0
            cls = H.CcaVpContext if ptype == PlatformType.CCA else H.NativeVpContext
            return cls(gpa=gpa, compatibility_mask=mask, vp_index=vp_index, context=bytes(page[:size]))
        # VSM_ISOLATION: u32 count + 32-byte register records
        if foff == 0:
            raise self.fail("VBS VP_CONTEXT has no data (file_offset 0; the reference crate panics)")
        count = struct.unpack_from("<I", self._data(foff, 4, "VBS VP context", index, pos).view())[0]
        if count == 0:
            raise self.fail("VBS vp context has no registers")
        view = self._data(foff, 4 + 32 * count, "VBS register list", index, pos).view()
        regs = []
        vtl = None
        for i in range(count):
            rvtl, name, mbz, value = H.VBS_REGISTER_STRUCT.unpack_from(view, 4 + 32 * i)
            if vtl is None:
                vtl = rvtl
            elif rvtl != vtl:
                raise self.fail(f"VBS register {i} has vtl {rvtl} but register 0 has vtl {vtl} (one VTL per "
                                "context; the reference crate panics)")
            if any(mbz):
                self.warnings.append(f"header {index}: VBS register {i} has non-zero reserved bytes")
            kept = H.vbs_register_value(name, value, arch == Architecture.X64)
            if kept != value:  # bytes the reference model has no place for: read as 0
                self.warnings.append(f"header {index}: VBS register {i} ({name:#x}) has non-zero bytes its type "
                                     "does not use; read as 0, as the reference parser reads them")
                value = kept
            regs.append(H.VbsRegister(name=name, value=value))
        if vp_index != 0:
            raise self.fail(f"VBS VP_CONTEXT vp_index is {vp_index}; only the BSP (0) is allowed "
                            "(the reference crate panics)")
        if gpa:  # the reference model has no gpa for it: read as 0
            self.warnings.append(f"header {index}: VBS VP_CONTEXT gpa is {gpa:#x}; the reference parser ignores it "
                                 "(read as 0)")
            gpa = 0
        return H.VbsVpContext(gpa=gpa, compatibility_mask=mask, vp_index=vp_index, vtl=vtl or 0,
                              registers=tuple(regs))


#: Headers whose flags the reference model keeps only some bits of (REQUIRED_MEMORY:
#: vtl2_protectable; RELOCATABLE_REGION: IS_VTL2, APPLY_RIP, APPLY_GDTR): the parser reads the
#: other bits as 0 with a warning, the writer refuses them.
_DROPPED_FLAG_BITS: dict[type[H.Header], int] = {H.RequiredMemory: 0x1, H.RelocatableRegion: 0x7}


def _type_name(typ: int) -> str:
    try:
        return HeaderType(typ).name
    except ValueError:
        return f"type {typ:#x}"


# =========================================================================== whole-file rules


def _validate(f: IgvmFile, indices: Sequence[int] | None = None, n_platforms: int | None = None, *,
              fields: bool = True) -> tuple[str, ...]:
    """Apply the reference crate's rules; return warnings, raise on errors.

    ``fields``: also check every header's fields against its description (what a writer is
    given; a parser has done that already while decoding).  ``indices``: each non-platform
    header's index in the file (a platform filter drops some).
    """
    rules = _Rules(f, indices, n_platforms)
    rules.platforms()
    rules.sections()
    rules.masks_and_fields(fields)
    rules.initializations()
    rules.directives()
    rules.vp_contexts_exist()
    return tuple(rules.warnings)




class _Rules:
    """The whole-file rules of ``IgvmFile::new_from_binary``, one method per concern."""

    def __init__(self, f: IgvmFile, indices: Sequence[int] | None, n_platforms: int | None) -> None:
        self.f = f
        self.warnings: list[str] = []
        self.n_plat = len(f.platforms) if n_platforms is None else n_platforms
        #: initialization headers, then directive items (headers and page runs)
        self.body: tuple[H.Header | PageRun, ...] = (*f.initializations, *f.directives.items())
        self.indices = range(self.n_plat, self.n_plat + len(f.initializations) + len(f.directives)) \
            if indices is None else indices
        self.masks: dict[int, H.SupportedPlatform] = {}
        #: (mask, vp_index, vtl) of the relocation headers, which need a matching VBS VP context
        self.needs_vp: list[tuple[int, int, int, int]] = []

    def fail(self, msg: str, pos: int | None = None) -> IgvmFormatError:
        """An error at ``pos`` in ``body`` (initializations, then directives)."""
        return IgvmFormatError(msg, header_index=self.indices[pos] if pos is not None else None)

    def platforms(self) -> None:
        f = self.f
        if f.revision not in (1, 2):
            raise IgvmFormatError(f"revision {f.revision} is not 1 or 2")
        if f.architecture not in (Architecture.X64, Architecture.AARCH64):
            raise IgvmFormatError(f"architecture {f.architecture!r} is not X64 or AARCH64")
        if f.revision == 1 and f.architecture != Architecture.X64:
            raise IgvmFormatError("format version 1 files are x64 only; use revision 2 for AArch64")
        if not f.platforms:
            raise IgvmFormatError("no valid platform headers")
        allowed = _X64_PLATFORMS if f.architecture == Architecture.X64 else _AARCH64_PLATFORMS
        types: set[PlatformType] = set()
        for i, p in enumerate(f.platforms):
            if not isinstance(p, H.SupportedPlatform):
                raise IgvmFormatError(f"{type(p).__name__} is not a platform header", header_index=i)
            for message in p.problems():
                raise IgvmFormatError(message, header_index=i)
            m = p.compatibility_mask
            if p.platform_type in types:
                raise IgvmFormatError(f"multiple platform headers with the same isolation type "
                                      f"{PlatformType(p.platform_type).name}", header_index=i)
            if m in self.masks:
                raise IgvmFormatError(f"platform headers share compatibility_mask {m:#x}", header_index=i)
            if p.platform_type not in allowed:
                raise IgvmFormatError(f"platform {PlatformType(p.platform_type).name} not supported on architecture "
                                      f"{f.architecture.name}", header_index=i)
            types.add(p.platform_type)
            self.masks[m] = p

    def sections(self) -> None:
        # Each class's SECTION is tested once (a file has 262,144 PAGE_DATA a GiB); the loops
        # below find and name the first misplaced header.
        if all(issubclass(t, H.Header) and getattr(t, "SECTION", None) == Section.INITIALIZATION
               for t in set(map(type, self.f.initializations))) \
                and all(t is PageRun or (issubclass(t, H.Header) and getattr(t, "SECTION", None) == Section.DIRECTIVE)
                        for t in set(map(type, self.f.directives.items()))):
            return
        for pos, h in enumerate(self.f.initializations):
            if getattr(h, "SECTION", None) != Section.INITIALIZATION:
                raise self.fail(f"{type(h).__name__} is not an initialization header", pos)
        nd = len(self.f.initializations)
        for pos, item in self.f.directives.items_at():
            if getattr(item, "SECTION", None) != Section.DIRECTIVE:
                raise self.fail(f"{type(item).__name__} is not a directive header", nd + pos)

    def _body(self) -> Iterator[tuple[int, H.Header | PageRun]]:
        """(position among initializations + flat directives, item) of each body item."""
        pos = 0
        run = PageRun
        for h in self.body:
            yield pos, h
            pos += h.count if type(h) is run else 1

    def masks_and_fields(self, fields: bool) -> None:
        """Warn about mask bits of no platform; with ``fields``, check every header's fields by
        its description, as the reader would find them (one pass: a file has 262,144 pages a GiB;
        a run of pages is checked once, by its first and last page)."""
        all_bits = 0
        for m in self.masks:
            all_bits |= m
        page_cls = H.PageData
        run_cls = PageRun
        not_all_bits = ~all_bits
        hm: int | None
        if not fields:  # (the parser's case: the same loop without the field tests)
            for pos, h in self._body():
                hm = h.compatibility_mask if type(h) is page_cls or type(h) is run_cls else h.mask
                if hm is not None and hm & not_all_bits:
                    self.mask_warnings(pos, h, hm)
            return
        try:
            for pos, h in self._body():
                if type(h) is page_cls:  # by far the most common header: one cheap test of every field
                    # Zero when every field is an in-range integer: a 4 KiB-aligned u64 GPA, u32
                    # mask and flags, a data type 0-3 (a negative number shifts to -1, a float
                    # raises TypeError); else the generic check names the field.
                    assert isinstance(h, H.PageData)
                    gpa = h.gpa
                    hm = h.compatibility_mask
                    if gpa & 0xFFF | gpa >> 64 | (hm | h.flags) >> 32 | h.data_type >> 2:
                        self.field_error(pos, h)
                elif type(h) is run_cls:  # the same test of its first and last page
                    assert isinstance(h, PageRun)
                    gpa = h.gpa
                    hm = h.compatibility_mask
                    if gpa & 0xFFF | gpa >> 64 | (gpa + (h.count - 1) * PAGE_SIZE_4K) >> 64 \
                            | (hm | h.flags) >> 32 | h.data_type >> 2:
                        self.field_error(pos, h)
                else:
                    assert isinstance(h, H.Header)
                    if not h.BODY.accepts(h) or h.rule() is not None:
                        self.field_error(pos, h)
                    hm = h.mask
                if hm is not None and hm & not_all_bits:
                    self.mask_warnings(pos, h, hm)
                elif hm == 0:
                    raise self.fail(f"{h.TYPE.name} compatibility_mask 0 applies to no platform (the reference "
                                    "parser drops such a header); give it a platform's bit", pos)
        except TypeError:  # a field that is no integer: find it and name it
            for pos, h in self._body():
                self.field_error(pos, h)
            raise

    def mask_warnings(self, pos: int, h: H.Header | PageRun, hm: int) -> None:
        for i in range(h.count if type(h) is PageRun else 1):
            self.warnings.append(f"header {self.indices[pos + i]}: {h.TYPE.name} compatibility_mask {hm:#x} "
                                 "names bits of no declared platform (accepted by the reference parser)")

    def field_error(self, pos: int, h: H.Header | PageRun) -> None:
        if isinstance(h, PageRun):
            bad = h.first_bad_page()
            if bad is not None:
                for message in h.page(bad).problems():
                    raise self.fail(message, pos + bad)
            return
        for message in h.problems():
            raise self.fail(message, pos)

    def initializations(self) -> None:
        relocs: dict[int, list[tuple[int, int]]] = {}
        pt_bits: set[int] = set()
        corim_docs: set[int] = set()
        corim_sigs: set[int] = set()
        fail = self.fail
        for pos, h in enumerate(self.f.initializations):
            if isinstance(h, H.CcaPolicy):
                if self.f.architecture != Architecture.AARCH64:
                    raise fail("CCA_POLICY is only valid in AArch64 files", pos)
                for bit in _bits(h.compatibility_mask):
                    cp = self.masks.get(bit)
                    if cp is None or cp.platform_type != PlatformType.CCA:
                        raise fail(f"CCA policy compatibility mask {bit:#x} does not reference a CCA platform", pos)
            elif isinstance(h, H.RelocatableRegion | H.PageTableRelocation):
                if isinstance(h, H.RelocatableRegion):
                    start, size = h.relocation_region_gpa, h.relocation_region_size
                else:
                    start, size = h.gpa, h.size
                    for bit in _bits(h.compatibility_mask):
                        if bit in pt_bits:
                            raise fail("page table relocation header specified twice for compatibility mask "
                                       f"{bit:#x}", pos)
                        pt_bits.add(bit)
                if start + size > 1 << 64:
                    raise fail(f"{h.TYPE.name} at GPA {start:#x} with size {size:#x} runs past 2^64 (the reference "
                               "crate panics)", pos)
                for bit in _bits(h.compatibility_mask):
                    for ostart, osize in relocs.get(bit, ()):
                        if start < ostart + osize and ostart < start + size:
                            raise fail(f"relocation regions overlap at GPA {max(start, ostart):#x}", pos)
                    relocs.setdefault(bit, []).append((start, size))
                self.needs_vp.append((pos, h.compatibility_mask, h.vp_index, h.vtl))
            elif isinstance(h, H.CorimDocument | H.CorimSignature):
                docs = isinstance(h, H.CorimDocument)
                for bit in _bits(h.compatibility_mask):
                    if docs:
                        if bit in corim_docs:
                            raise fail(f"multiple CoRIM documents for compatibility mask {bit:#x}", pos)
                        corim_docs.add(bit)
                    elif bit not in corim_docs:
                        raise fail(f"CoRIM signature for mask {bit:#x} has no earlier CoRIM document", pos)
                    elif bit in corim_sigs:
                        raise fail(f"multiple CoRIM signatures for compatibility mask {bit:#x}", pos)
                    else:
                        corim_sigs.add(bit)

    def directives(self) -> None:
        area_state: dict[int, int] = {}  # 1 allocated, 2 inserted
        pt_regions = [(h.compatibility_mask, h.gpa, h.size) for h in self.f.initializations
                      if isinstance(h, H.PageTableRelocation)]
        self.vbs_contexts: list[tuple[int, int, int]] = []
        page_cls = H.PageData
        nd = len(self.f.initializations)
        fail = self.fail
        run_cls = PageRun
        for dpos, h in self.f.directives.items_at():
            if type(h) is page_cls or type(h) is run_cls:  # by far the most common; fields() checked it
                continue
            assert isinstance(h, H.Header)
            pos = nd + dpos
            if isinstance(h, H.ParameterArea):
                if h.parameter_area_index in area_state:
                    raise fail(f"invalid parameter area index {h.parameter_area_index}: declared twice", pos)
                area_state[h.parameter_area_index] = 1
            elif isinstance(h, H.ParameterUsage | H.ParameterInsert):
                state = area_state.get(h.parameter_area_index)
                if state != 1:
                    why = "already inserted" if state == 2 else "not declared"
                    raise fail(f"invalid parameter area index {h.parameter_area_index} in {h.TYPE.name}: "
                               f"the area is {why}", pos)
                if isinstance(h, H.ParameterInsert):
                    area_state[h.parameter_area_index] = 2
                    for pmask, pgpa, psize in pt_regions:
                        if pmask & h.compatibility_mask and pgpa <= h.gpa < pgpa + psize:
                            raise fail(f"parameter insert at GPA {h.gpa:#x} inside the page table region", pos)
            elif isinstance(h, H.VpContextBase):
                self.vp_context(h, pos)

    def vp_context(self, h: H.VpContextBase, pos: int) -> None:
        arch = self.f.architecture
        vp = self.masks.get(h.compatibility_mask)
        if vp is None:
            raise self.fail(f"VP_CONTEXT compatibility_mask {h.compatibility_mask:#x} is not exactly one "
                            "platform's mask", pos)
        ok = _VP_CONTEXT_PLATFORMS.get(type(h), frozenset())
        if vp.platform_type not in ok:
            raise self.fail(f"{type(h).__name__} does not fit platform {PlatformType(vp.platform_type).name}", pos)
        if isinstance(h, H.NativeVpContext) and arch != Architecture.X64:
            raise self.fail("x64 native VP context in an AArch64 file", pos)
        if isinstance(h, H.CcaVpContext) and arch != Architecture.AARCH64:
            raise self.fail("CCA VP context in an x64 file", pos)
        if isinstance(h, H.VbsVpContext):
            if not h.registers:
                raise self.fail("VBS vp context has no registers", pos)
            if h.vp_index != 0:
                raise self.fail(f"VBS VP_CONTEXT vp_index is {h.vp_index}; only 0 is allowed", pos)
            allowed_regs = X64_VBS_REGISTERS if arch == Architecture.X64 else AARCH64_VBS_REGISTERS
            for r in h.registers:
                if r.name not in allowed_regs:
                    raise self.fail(f"unsupported {arch.name} register {r.name:#x} in VBS VP context", pos)
                if len(r.value) != 16:
                    raise self.fail("VBS register value must be 16 bytes", pos)
                if H.vbs_register_value(r.name, r.value, arch == Architecture.X64) != bytes(r.value):
                    raise self.fail(f"VBS register {r.name:#x} has non-zero bytes its type does not use (the "
                                    "reference parser drops them)", pos)
            self.vbs_contexts.append((h.compatibility_mask, h.vp_index, h.vtl))

    def vp_contexts_exist(self) -> None:
        for pos, mask, vp_index, vtl in self.needs_vp:
            if not any(cm & mask and cvp == vp_index and cvtl == vtl for cm, cvp, cvtl in self.vbs_contexts):
                raise self.fail(f"no matching vp context for vp index {vp_index} and vtl {vtl}", pos)


_VP_CONTEXT_PLATFORMS: dict[type[H.Header], frozenset[PlatformType]] = {
    H.SnpVpContext: frozenset(VMSA_PLATFORMS),
    H.NativeVpContext: frozenset(NATIVE_CONTEXT_PLATFORMS),
    H.CcaVpContext: frozenset({PlatformType.CCA}),
    H.VbsVpContext: frozenset({PlatformType.VSM_ISOLATION}),
}


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low
        mask ^= low
