"""Runs of pages (``format/pages.py``): :class:`PageRun` and :class:`Directives` against the
per-page expansion they stand for.

The expectation is always the flat list of ``PageData`` headers, the form the model had before
runs existed: the same headers one by one (indexing, iteration, slicing, equality), the same
bytes when serialized, the same page digests and launch measurements; and a parsed file keeps
its runs compact (one item per run, not per page) while comparing equal to the flat model.
"""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice
from igvm_builder.format.pages import Directives, PageOffsets, PageRun
from igvm_builder.measure import measure_platform

PAGE = 4096
PT = D.PlatformType
SNP, TDX, SEV_ES, VBS = 1, 2, 4, 8


def _platforms() -> tuple[H.SupportedPlatform, ...]:
    return (H.SupportedPlatform(compatibility_mask=SNP, platform_type=PT.SEV_SNP, shared_gpa_boundary=1 << 46),
            H.SupportedPlatform(compatibility_mask=TDX, platform_type=PT.TDX, shared_gpa_boundary=1 << 47),
            H.SupportedPlatform(compatibility_mask=SEV_ES, platform_type=PT.SEV_ES),
            H.SupportedPlatform(compatibility_mask=VBS, platform_type=PT.VSM_ISOLATION, highest_vtl=2))


def _buffer(pages: int, seed: int = 0, *, duplicates: bool = True) -> memoryview:
    """4 KiB pages of distinct contents, but (``duplicates``) every 5th a copy of the 1st of its
    group of five."""
    out = bytearray()
    for i in range(pages):
        k = i - i % 5 if duplicates and i % 5 == 4 else i
        out += hashlib.sha256(f"{seed}:{k}".encode()).digest() * (PAGE // 32)
    return memoryview(bytes(out))


def _expanded(items: list[H.Header | PageRun]) -> list[H.Header]:
    """The per-page expansion, written independently of PageRun.pages()."""
    out: list[H.Header] = []
    for it in items:
        if not isinstance(it, PageRun):
            out.append(it)
            continue
        for i in range(it.count):
            # the data a per-page model holds: a window into the same buffer, or the fill itself
            data = FileSlice(it.source, it.start + i * PAGE, PAGE) if it.source is not None else it.fill
            out.append(H.PageData(gpa=it.gpa + i * PAGE, compatibility_mask=it.compatibility_mask, flags=it.flags,
                                  data_type=it.data_type, data=data))
    return out


# --------------------------------------------------------------------------- PageRun


def test_page_run_kinds_give_the_pages_they_stand_for() -> None:
    buf = _buffer(6)
    contiguous = PageRun(0x10000, 4, SNP, source=buf, start=PAGE)
    assert [p.gpa for p in contiguous.pages()] == [0x10000, 0x11000, 0x12000, 0x13000]
    assert [bytes(p.data) for p in contiguous.pages()] == [bytes(buf[i * PAGE : (i + 1) * PAGE]) for i in range(1, 5)]
    assert contiguous.end_gpa == 0x14000 and contiguous.mask == SNP and not contiguous.dataless
    assert isinstance(contiguous.data_at(0), FileSlice)  # a window, not a copy
    zeros = PageRun(0x20000, 3, TDX, flags=2, fill=bytes(PAGE))
    assert [(p.gpa, p.flags, bytes(p.data)) for p in zeros.pages()] == [
        (0x20000 + i * PAGE, 2, bytes(PAGE)) for i in range(3)]
    empty = PageRun(0x30000, 2, SNP, data_type=D.PageDataType.SECRETS)
    assert empty.dataless
    assert [(p.gpa, p.data_type, p.data) for p in empty.pages()] == [(0x30000, 1, b""), (0x31000, 1, b"")]
    assert contiguous.page(3) == list(contiguous.pages())[3]
    with pytest.raises(IndexError):
        contiguous.page(4)
    assert list(contiguous.sub(1, 3).pages()) == list(contiguous.pages())[1:3]
    assert list(zeros.with_mask(SNP | TDX).pages()) == [
        H.PageData(gpa=0x20000 + i * PAGE, compatibility_mask=SNP | TDX, flags=2, data=bytes(PAGE)) for i in range(3)]


def test_page_run_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(IgvmFormatError, match="at least one page"):
        PageRun(0, 0, SNP)
    with pytest.raises(IgvmFormatError, match="run past the end"):
        PageRun(0, 3, SNP, source=bytes(2 * PAGE))
    with pytest.raises(IgvmFormatError, match="0 or 4096"):
        PageRun(0, 3, SNP, fill=b"abc")


# --------------------------------------------------------------------------- Directives


def _sample_items() -> list[H.Header | PageRun]:
    buf = _buffer(8)
    return [
        H.PageData(gpa=0, compatibility_mask=SNP, data=b"x"),
        PageRun(0x1000, 5, SNP | TDX, source=buf, start=PAGE),
        H.ParameterArea(number_of_bytes=PAGE, parameter_area_index=0),
        PageRun(0x100000, 3, SNP, fill=bytes(PAGE)),
        H.ParameterInsert(gpa=0x200000, compatibility_mask=SNP, parameter_area_index=0),
        PageRun(0x300000, 2, TDX),
    ]


def test_directives_present_the_flat_list() -> None:
    items = _sample_items()
    flat = _expanded(items)
    d = Directives(items)
    assert len(d) == len(flat) == 13
    assert d.items() == tuple(items) and d.runs == 3
    assert list(d) == flat
    assert [d[i] for i in range(len(d))] == flat
    assert [d[i] for i in range(-len(d), 0)] == flat
    with pytest.raises(IndexError):
        d[len(d)]
    for a in range(len(flat) + 1):  # every contiguous slice, and a stepped one
        for b in range(a, len(flat) + 1):
            assert list(d[a:b]) == flat[a:b]
    assert list(d[::3]) == flat[::3]
    assert d == tuple(flat) and d == flat and tuple(flat) == d and not d != tuple(flat)
    assert d != tuple(flat[:-1]) and d != (*flat[:-1], flat[0])
    assert [pos for pos, _ in d.items_at()] == [0, 1, 6, 7, 10, 11]
    extra = H.ParameterInsert(gpa=0x400000, compatibility_mask=TDX, parameter_area_index=0)
    more = (extra,)
    assert list(d + more) == [*flat, extra]
    assert list(more + d) == [extra, *flat]
    assert type(more + d) is Directives and (more + d).items() == (extra, *items)
    assert hash(d) == hash(Directives(_expanded(items)))


def test_igvm_file_converts_and_compares_with_tuples() -> None:
    items = _sample_items()
    f = IgvmFile(platforms=_platforms()[:2], directives=tuple(_expanded(items)))
    assert type(f.directives) is Directives
    g = IgvmFile(platforms=_platforms()[:2], directives=Directives(items))
    assert f == g
    assert f.to_bytes() == g.to_bytes()


# --------------------------------------------------------------------------- parse / serialize


@st.composite
def page_lists(draw: st.DrawFn) -> list[H.Header | PageRun]:
    """Random runs and single pages: consecutive GPAs with distinct, repeated, zero and no data;
    masks, flags and types that sometimes break a run."""
    buf = _buffer(64, seed=draw(st.integers(0, 3)))
    items: list[H.Header | PageRun] = []
    gpa = draw(st.integers(0, 64)) * PAGE
    for _ in range(draw(st.integers(1, 8))):
        mask = draw(st.sampled_from([SNP, TDX, SNP | TDX, SNP | TDX | SEV_ES]))
        flags = draw(st.sampled_from([0, 0, 0, 2, 4]))
        dtype = draw(st.sampled_from([0, 0, 0, 1]))
        count = draw(st.integers(1, 12))
        kind = draw(st.sampled_from(["source", "zero", "repeat", "none", "single"]))
        if kind == "source":
            start = draw(st.integers(0, 64 - count)) * PAGE
            items.append(PageRun(gpa, count, mask, flags=flags, data_type=dtype, source=buf, start=start))
        elif kind == "zero":
            items.append(PageRun(gpa, count, mask, flags=flags, data_type=dtype, fill=bytes(PAGE)))
        elif kind == "repeat":
            items.append(PageRun(gpa, count, mask, flags=flags, data_type=dtype,
                                 fill=FileSlice(buf, draw(st.integers(0, 63)) * PAGE, PAGE)))
        elif kind == "none":
            items.append(PageRun(gpa, count, mask, flags=flags, data_type=dtype))
        else:
            count = 1
            items.append(H.PageData(gpa=gpa, compatibility_mask=mask, flags=flags, data_type=dtype,
                                    data=draw(st.sampled_from([b"", b"A" * PAGE, bytes(PAGE)]))))
        gpa += count * PAGE + draw(st.sampled_from([0, 0, PAGE, 0x100000]))
    return items


def _measurements(f: IgvmFile) -> list[bytes | None]:
    out = [measure_platform(f, PT.SEV_SNP, loader=loader).digest for loader in ("hyperv", "igvmmeasure")]
    out += [measure_platform(f, PT.TDX, tdx_two_pass=two).digest for two in (False, True)]
    out.append(measure_platform(f, PT.SEV_ES).digest)
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page_lists())
def test_compact_and_expanded_forms_agree(items: list[H.Header | PageRun]) -> None:
    """Runs and their expansion: identical bytes, page digests and measurements; the parsed
    file equals both and keeps its runs as runs."""
    vmsa = H.SnpVpContext(gpa=0xFFFF_FFFF_F000, compatibility_mask=SNP, vp_index=0, vmsa=bytes(PAGE))
    policy = H.GuestPolicy(policy=0x30000, compatibility_mask=SNP)
    platforms = _platforms()[:3]
    compact = IgvmFile(platforms=platforms, initializations=(policy,), directives=Directives([*items, vmsa]))
    flat = IgvmFile(platforms=platforms, initializations=(policy,), directives=(*_expanded(items), vmsa))
    data = flat.to_bytes()
    assert compact.to_bytes() == data
    assert compact.layout(page_digests=True).page_digests == flat.layout(page_digests=True).page_digests
    assert _measurements(compact) == _measurements(flat)
    parsed = IgvmFile.from_bytes(data)
    assert parsed == flat and parsed == compact
    assert parsed.to_bytes() == data
    assert _measurements(parsed) == _measurements(flat)
    # the measurement with the serializer's page digests (the build's path) agrees too
    digests = parsed.layout(page_digests=True).page_digests
    assert measure_platform(parsed, PT.SEV_SNP, page_digests=digests).digest == _measurements(flat)[0]


def test_vbs_measures_runs_as_their_pages() -> None:
    buf = _buffer(8)
    items: list[H.Header | PageRun] = [PageRun(0x1000, 6, VBS, source=buf), PageRun(0x10000, 3, VBS, flags=4),
                                       PageRun(0x20000, 2, VBS, fill=bytes(PAGE))]
    regs = (H.VbsRegister(name=0x40002, value=bytes(16)),)
    vp = H.VbsVpContext(gpa=0, compatibility_mask=VBS, vp_index=0, vtl=0, registers=regs)
    platforms = (_platforms()[3],)
    compact = IgvmFile(platforms=platforms, directives=Directives([*items, vp]))
    flat = IgvmFile(platforms=platforms, directives=(*_expanded(items), vp))
    assert compact.to_bytes() == flat.to_bytes()
    assert measure_platform(compact, PT.VSM_ISOLATION).digest == measure_platform(flat, PT.VSM_ISOLATION).digest


def test_parser_keeps_runs_compact_and_indices_flat() -> None:
    """A file of 4,096 consecutive pages parses into a handful of items; errors and warnings
    still name the file's header index."""
    n = 4096
    buf = _buffer(n, duplicates=False)
    f = IgvmFile(platforms=_platforms()[:2], directives=Directives([
        PageRun(0x100000, n, SNP | TDX, source=buf),
        PageRun(0x100000 + n * PAGE, n, SNP, fill=bytes(PAGE)),
        PageRun(0x100000 + 2 * n * PAGE, n, TDX),
        H.PageData(gpa=0, compatibility_mask=SNP | 1 << 7, data=b"o" * PAGE),  # a mask bit of no platform
    ]))
    data = f.to_bytes()
    tracemalloc.start()
    try:
        parsed = IgvmFile.from_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 3 x 4,096 pages: as PageData objects (with a FileSlice each) they would take over 1 MB
    assert peak < 100_000, peak
    assert len(parsed.directives.items()) == 4
    assert len(parsed.directives) == 3 * n + 1
    assert parsed == f
    assert parsed.warnings == (f"header {2 + 3 * n}: PAGE_DATA compatibility_mask 0x81 names bits of no declared "
                               "platform (accepted by the reference parser)",)
    # a bad page inside a run: the error names its header index
    bad = bytearray(data)
    first = 24 + 2 * (8 + 16)  # fixed header, 2 platform headers
    pos = first + 32 * (n + 100)  # a page of the zero-filled run
    bad[pos + 8] |= 1  # an unaligned GPA
    bad[20:24] = bytes(4)
    voff, vsize = struct.unpack_from("<II", bad, 8)
    bad[20:24] = struct.pack("<I", zlib.crc32(bad[voff : voff + vsize], zlib.crc32(bytes(bad[:24]))))
    with pytest.raises(IgvmFormatError) as info:
        IgvmFile.from_bytes(bytes(bad))
    assert info.value.header_index == 2 + n + 100


def test_validate_names_the_bad_page_of_a_run() -> None:
    run = PageRun(0xFFFF_FFFF_FFFF_E000, 3, SNP, fill=bytes(PAGE))  # its last page passes 2^64
    f = IgvmFile(platforms=_platforms()[:1], directives=Directives([H.PageData(gpa=0, compatibility_mask=SNP), run]))
    with pytest.raises(IgvmFormatError) as info:
        f.validate()
    assert info.value.header_index == 1 + 1 + 2
    assert "gpa" in str(info.value)


def test_platform_filter_keeps_runs_and_file_indices() -> None:
    buf = _buffer(10)
    f = IgvmFile(platforms=_platforms()[:2], directives=Directives([
        PageRun(0x1000, 10, TDX, source=buf), PageRun(0x100000, 10, SNP, source=buf),
        H.PageData(gpa=0x200000, compatibility_mask=SNP | 1 << 9)]))
    parsed = IgvmFile.from_bytes(f.to_bytes(), platform=PT.SEV_SNP)
    assert len(parsed.directives) == 11
    assert parsed.header_indices == (0, 1, *range(12, 23))
    assert any(w.startswith("header 22:") for w in parsed.warnings)


# --------------------------------------------------------------------------- layout state per page


def test_page_digests_buffer_is_a_sequence_of_digests() -> None:
    from igvm_builder.format.pages import PageDigests

    d = PageDigests(5)
    a, b = hashlib.sha384(b"a").digest(), hashlib.sha384(b"b").digest()
    d.put(1, a)
    d.fill(2, 2, b)
    assert list(d) == [None, a, b, b, None] and d == [None, a, b, b, None] and len(d) == 5
    assert d[-2] == b and d[1:3] == [a, b] and d[::-1] == [None, b, b, a, None]
    d[3] = None
    d[0] = a
    assert list(d) == [a, a, b, None, None]
    with pytest.raises(ValueError):
        d[0] = b"short"
    with pytest.raises(IndexError):
        d[5]


def _layout_file(n: int, seed: int = 0) -> IgvmFile:
    buf = _buffer(n, seed)  # every 5th page a duplicate
    return IgvmFile(platforms=_platforms()[:2], directives=Directives([
        PageRun(0x100000, n, SNP | TDX, source=buf),
        PageRun(0x100000 + n * PAGE, 8, SNP, fill=FileSlice(buf, 2 * PAGE, PAGE)),  # a page stored before
        H.PageData(gpa=0, compatibility_mask=SNP, data=bytes(buf[3 * PAGE : 4 * PAGE])),  # its bytes too
    ]))


@pytest.mark.parametrize("page_digests", [False, True])
def test_dedup_keys_that_clash_still_give_the_canonical_bytes(monkeypatch: pytest.MonkeyPatch,
                                                              page_digests: bool) -> None:
    """Every page given the same 64-bit dedup key (as if all digests or hashes collided): the
    byte-for-byte confirmation keeps distinct pages apart and finds the identical ones."""
    from igvm_builder.format import file as file_mod

    f = _layout_file(64)
    expected = f.layout(page_digests=page_digests)
    monkeypatch.setattr(file_mod, "_digest_key", lambda digest: 7)
    monkeypatch.setattr(file_mod, "_content_hash", lambda view: 7)
    clashing = f.layout(page_digests=page_digests)
    assert clashing.head == expected.head
    assert b"".join(bytes(b) for b in clashing.blobs) == b"".join(bytes(b) for b in expected.blobs)
    # and that is the file of one PageData per page, deduplicated
    flat = IgvmFile(platforms=f.platforms, directives=tuple(f.directives))
    assert flat.to_bytes() == bytes(expected.head) + b"".join(bytes(b) for b in expected.blobs)
    data = b"".join(bytes(b) for b in expected.blobs)
    assert len(data) == (64 - 64 // 5 + 0) * PAGE  # the repeated and copied pages stored once


@pytest.mark.parametrize("seed", range(12))
def test_page_offsets_answers_stay(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """The layout's dedup table, with random keys over the whole int64 range (repeats, keys that
    share their low 32 bits, neighbours, the extremes) recorded in random order in a table
    that starts tiny and gets new tables again and again: a key's first ``setdefault`` records
    it or answers with the offset of a key with the same low 32 bits recorded before, and from
    then on every answer for that key is that same one."""
    import random

    r = random.Random(seed)
    monkeypatch.setattr(PageOffsets, "MIN_SLOTS", r.choice([1, 2, 8]))
    pool = [r.randrange(-(1 << 63), 1 << 63) for _ in range(300)]
    pool += [-(1 << 63), (1 << 63) - 1, 0, -1, 1] + [pool[0] + d for d in (-1, 1)]
    pool += [k + (r.randrange(1, 1 << 20) << 32) for k in pool[:40]]  # same low bits, other keys
    table = PageOffsets(r.choice([0, 3, 1000]))
    answer: dict[int, int] = {}  # key -> what the table answers for it
    owner: dict[int, int] = {}  # recorded offset -> its key
    offset = 0
    for _ in range(r.randrange(50, 1500)):
        key = r.choice(pool)
        offset += r.randrange(1, 5) * PAGE
        if key not in answer:
            got = table.get(key)
            if r.random() < 0.5 and got is None:
                table.add(key, offset)
            else:
                assert table.setdefault(key, offset) == got
            if got is None:
                owner[offset] = key
                answer[key] = offset
            else:
                assert owner[got] & 0xFFFF_FFFF == key & 0xFFFF_FFFF and owner[got] != key
                answer[key] = got
        else:
            assert table.setdefault(key, offset) == answer[key]
            if owner.get(answer[key]) == key:
                with pytest.raises(ValueError):
                    table.add(key, offset)
        assert table.get(key) == answer[key]
    assert len(table) == len(owner)
    assert all(table.get(k) == answer.get(k) for k in pool if k in answer)
    assert table.nbytes >= 8 * len(owner)
    with pytest.raises(ValueError):  # offsets are 32-bit file offsets after the fixed header
        PageOffsets().setdefault(5, 0)
    with pytest.raises(ValueError):
        PageOffsets().setdefault(5, 1 << 32)


def _scattered_file(seed: int) -> IgvmFile:
    """Runs over random stretches of one buffer (pages repeated at every distance, within a run
    and across runs), pages repeated by fill runs and by PageData of copied bytes."""
    import random

    r = random.Random(seed)
    buf = _buffer(120, seed, duplicates=False)
    items: list[H.Header | PageRun] = []
    gpa = 0x100000
    for _ in range(150):
        kind = r.random()
        if kind < 0.8:
            start, count = r.randrange(120), r.randrange(1, 12)
            count = min(count, 120 - start)
            items.append(PageRun(gpa, count, SNP | TDX, source=buf, start=start * PAGE))
        elif kind < 0.9:
            count, page = r.randrange(1, 4), r.randrange(120)
            items.append(PageRun(gpa, count, SNP, fill=FileSlice(buf, page * PAGE, PAGE)))
        else:
            count, page = 1, r.randrange(120)
            items.append(H.PageData(gpa=gpa, compatibility_mask=SNP, data=bytes(buf[page * PAGE : (page + 1) * PAGE])))
        gpa += count * PAGE
    return IgvmFile(platforms=_platforms()[:2], directives=Directives(items))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("page_digests", [False, True])
def test_layout_with_a_growing_or_clashing_table_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                           page_digests: bool) -> None:
    """The file is byte for byte the file of one PageData per page, with the dedup table sized for
    the layout, with one that starts at 2 slots and gets new tables again and again, with keys
    of 4 bits (the table answers with other pages often), and with every key clashing."""
    from igvm_builder.format import file as file_mod

    f = _scattered_file(seed)
    f.validate()
    expected = f.layout(page_digests=page_digests)
    expected_bytes = bytes(expected.head) + b"".join(bytes(b) for b in expected.blobs)
    flat = IgvmFile(platforms=f.platforms, directives=tuple(f.directives))
    assert flat.to_bytes() == expected_bytes
    data_pages = (len(expected_bytes) - len(expected.head)) // PAGE
    assert data_pages <= 120 + 1  # every page stored once (and the PageData copies' bytes are the buffer's)

    class Tiny(PageOffsets):  # a table that starts with 2 slots whatever the layout asks for
        MIN_SLOTS = 2

        def __init__(self, capacity: int = 0) -> None:
            super().__init__(0)

    monkeypatch.setattr(file_mod, "PageOffsets", Tiny)
    laid = f.layout(page_digests=page_digests)
    assert bytes(laid.head) + b"".join(bytes(b) for b in laid.blobs) == expected_bytes
    assert laid.page_digests == expected.page_digests
    # keys that differ in few bits (the table answers with another page), and keys that clash
    monkeypatch.setattr(file_mod, "_digest_key", lambda digest: hash(digest) & 0x3_0000_0003)
    monkeypatch.setattr(file_mod, "_content_hash", lambda view: hash(bytes(view)) & 0x3_0000_0003)
    shared = f.layout(page_digests=page_digests)
    assert bytes(shared.head) + b"".join(bytes(b) for b in shared.blobs) == expected_bytes
    monkeypatch.setattr(file_mod, "_digest_key", lambda digest: 7)
    monkeypatch.setattr(file_mod, "_content_hash", lambda view: 7)
    clashing = f.layout(page_digests=page_digests)
    assert bytes(clashing.head) + b"".join(bytes(b) for b in clashing.blobs) == expected_bytes


def test_layout_state_per_page_is_small() -> None:
    """What the layout keeps per page of a run (page digests, dedup table, headers, data
    windows) stays under 150 bytes a page (measured: 139, of which the table's 16 and the page
    digests' 54; 141 with the sorted-arrays table, 209 with a dict, 330 before the compact
    digests, dedup keys and windows): no object per page."""
    n = 16384
    f = _layout_file(n, seed=1)
    f.validate()
    tracemalloc.start()
    try:
        layout = f.layout(page_digests=True, validate=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a window per stretch of new pages (a duplicate every 5th page ends one), not a blob per page
    assert len(layout.blobs) <= n // 5 + 8
    table = PageOffsets(n + 8).nbytes  # an anonymous mapping: tracemalloc does not see it
    print(f"layout: {(peak + table) / n:.0f} bytes a page at the peak, of which the table {table / n:.0f}")
    assert peak + table < 150 * n, (peak + table) / n


def _streamed_layout(f: IgvmFile, *, keep: bool) -> tuple[int, bytes, bytes]:
    """Lay ``f`` out handing its headers, data and page digests over as it goes, the SNP digest
    measured from the digests in another thread: the peak traced memory, the file's bytes put
    together from what was handed over (``keep``; else the consumers keep nothing) and the
    SNP digest."""
    import threading

    from igvm_builder.format.pages import PageDigestStream

    pieces: dict[int, bytes] = {}

    def on_head(offset: int, piece: bytearray) -> None:
        if keep:
            pieces[offset] = bytes(piece)

    def on_data(offset: int, blobs: list[H.BlobLike]) -> None:
        for b in blobs:
            data = bytes(b) if not isinstance(b, FileSlice) else bytes(b.view())
            if keep:
                pieces[offset] = data
            offset += len(data)

    stream = PageDigestStream(len(f.directives), limit=4096)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(
        measure_platform(f, PT.SEV_SNP, loader="igvmmeasure", page_digests=stream).digest or b""))
    tracemalloc.start()
    try:
        reader.start()
        laid = f.layout(page_digests=stream, validate=False, on_head=on_head, on_data=on_data)
        stream.finish()
        reader.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pieces[0] = bytes(laid.head)
    data = bytearray()
    for offset in sorted(pieces):
        assert offset == len(data), (offset, len(data))  # contiguous, nothing twice
        data += pieces[offset]
    return peak, bytes(data), result[0]


def test_streamed_layout_gives_the_same_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed header (with the checksum of headers it never held), the header pieces and the
    data handed over are the file ``to_bytes`` gives, and the SNP digest read from the stream
    beside the layout is the file's."""
    from igvm_builder.format import file as file_mod

    monkeypatch.setattr(file_mod, "HEAD_PIECE", 4096)
    for f in (_layout_file(5000, seed=2), _scattered_file(3)):
        f.validate()
        _, data, digest = _streamed_layout(f, keep=True)
        assert data == f.to_bytes()
        assert digest == measure_platform(f, PT.SEV_SNP, loader="igvmmeasure").digest
        assert len(f.layout().head) > 4 * 4096  # (several pieces)


def _distinct_file(n: int) -> IgvmFile:
    """A run of ``n`` distinct pages (one window of the data section), then a page repeated."""
    buf = _buffer(n, 5, duplicates=False)
    return IgvmFile(platforms=_platforms()[:2], directives=Directives([
        PageRun(0x100000, n, SNP | TDX, source=buf),
        PageRun(0x100000 + n * PAGE, 8, SNP, fill=FileSlice(buf, 2 * PAGE, PAGE))]))


def test_streamed_layout_keeps_nothing_per_page_but_its_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """With its headers, data and page digests handed over as it goes, the layout of 4 x as many
    distinct pages peaks at nearly the same traced memory; what grows is the dedup table, an
    anonymous mapping (16 bytes a page).  Measured: +0.1 bytes a page (8.3 and 8.4 MiB, most of
    it this test's copy of a batch of data); it kept 139 bytes a page without the streams.  (What the layout keeps besides is the list
    of the data section's windows, one per stretch of new pages of one buffer, about 100
    bytes each: with every 5th page a duplicate, 44 bytes a page.)"""
    from igvm_builder.format import file as file_mod

    monkeypatch.setattr(file_mod, "HEAD_PIECE", 64 << 10)
    small, _, _ = _streamed_layout(_distinct_file(16384), keep=False)
    big, _, _ = _streamed_layout(_distinct_file(65536), keep=False)
    grow = (big - small) / (65536 - 16384)
    print(f"streamed layout: peak {small / 2**20:.1f} MiB -> {big / 2**20:.1f} MiB, {grow:.1f} bytes a page")
    assert grow < 4, grow


@pytest.mark.parametrize("chunk", [32, 96, 4096])
def test_parser_chunks_do_not_split_runs(tmp_path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The parser reads PAGE_DATA records a chunk at a time (releasing each chunk of a mapped
    file): with chunks of 1, 3 or 128 records the runs, warnings and errors are the same."""
    from igvm_builder.format import file as file_mod

    f = _layout_file(500)
    path = tmp_path / "f.igvm"
    path.write_bytes(f.to_bytes())
    whole = IgvmFile.load(path)
    monkeypatch.setattr(file_mod, "_PARSE_CHUNK", chunk)
    chunked = IgvmFile.load(path)
    assert chunked.directives.items() == whole.directives.items()
    assert chunked == whole == f and chunked.warnings == whole.warnings
    assert len(whole.directives.items()) < 500 // 5 * 2 + 8  # runs, not pages


@pytest.mark.parametrize("seed", range(40))
def test_page_digests_against_a_list(seed: int) -> None:
    """Random writes (runs, single digests, removals, reserved runs written in place) agree with
    a plain list; a run's view is the digests it covers; segments never overlap."""
    import random

    from igvm_builder.format.pages import PageDigests

    r = random.Random(seed)
    n = r.randrange(1, 40)
    d, ref = PageDigests(n), [None] * n
    for _ in range(30):
        op, i = r.random(), r.randrange(n)
        if op < 0.4:
            c, g = r.randrange(1, n - i + 1), hashlib.sha384(bytes([r.randrange(256)])).digest()
            d.fill(i, c, g)
            ref[i : i + c] = [g] * c
        elif op < 0.7:
            g = hashlib.sha384(bytes([r.randrange(256)])).digest()
            d[i] = ref[i] = g
        elif op < 0.85:
            d[i] = ref[i] = None
        else:
            c = r.randrange(1, n - i + 1)
            buf, at = d.reserve(i, c)
            for j in range(c):
                ref[i + j] = buf[at + 48 * j : at + 48 * (j + 1)] = hashlib.sha384(bytes([j])).digest()
        assert list(d) == ref
        for a in range(n):
            view = d.run(a, min(4, n - a))
            if view is not None:
                assert [bytes(view[k : k + 48]) for k in range(0, len(view), 48)] == ref[a : a + min(4, n - a)]
    assert all(a + len(b) // 48 <= c for a, b, c in zip(d._starts, d._bufs, d._starts[1:], strict=False))


def test_crc32_combine_against_zlib() -> None:
    """The checksum of headers handed over before the fixed header exists: crc32(a + b) from the
    two CRCs and len(b), for lengths around the 1 MiB block it works in."""
    import random

    from igvm_builder.format.file import _crc32_combine

    r = random.Random(9)
    for la, lb in ((0, 0), (1, 0), (0, 1), (48, 4096), (3, (1 << 20) - 1), (7, 1 << 20), (60, (1 << 20) + 5),
                   (0, 3 << 20)):
        a, b = r.randbytes(la), r.randbytes(lb)
        assert _crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b), (la, lb)


def test_page_digest_stream_order_and_endings() -> None:
    """The stream takes digests in directive order only and gives them, in order, to a reader in
    another thread as they are published (None where a directive has none); a reader waiting on
    a layout that fails stops with IgvmError; once the reader has left, the layout never waits."""
    import threading

    from igvm_builder.errors import IgvmError
    from igvm_builder.format.pages import PageDigestStream

    d, e = bytes(range(48)), bytes(range(100, 148))
    stream = PageDigestStream(10, limit=2)
    got: list[bytes | None] = []

    def read() -> None:
        got.extend(stream[i] for i in range(3))
        got.extend(None if x is None else bytes(x) for x in stream.iter_run(3, 6))
        got.append(stream[9])

    reader = threading.Thread(target=read)
    reader.start()
    stream.put(3, d)
    with pytest.raises(IndexError):
        stream.put(2, d)  # before the last one
    with pytest.raises(IndexError):
        stream.fill(9, 2, d)  # past the end
    buf, at = stream.reserve(4, 2)
    buf[at : at + 96] = e * 2
    stream.fill(7, 2, d)
    for upto in range(1, 10):  # (waits whenever the reader is more than 2 behind)
        stream.publish(upto)
    stream.finish()
    reader.join()
    assert got == [None, None, None, d, e, e, None, d, d, None]

    failing = PageDigestStream(4)
    errors: list[BaseException] = []

    def wait_then_fail() -> None:
        try:
            failing[2]
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=wait_then_fail)
    reader.start()
    failing.publish(1)
    failing.abandon()
    reader.join()
    assert len(errors) == 1 and isinstance(errors[0], IgvmError)

    left = PageDigestStream(100, limit=1)
    left.detach()
    left.reserve(0, 50)
    left.publish(50)  # nobody reads: no wait
    left.finish()


def test_a_failed_reader_does_not_hold_the_layout() -> None:
    """The SEV-SNP measurement beside a layout fails at once (the file has no GUEST_POLICY for the
    default loader): the layout still runs to its end instead of waiting for a reader that is
    gone, and the reader's error is the measurement's."""
    import threading

    from igvm_builder.errors import MeasurementError
    from igvm_builder.format.pages import PageDigestStream

    f = _distinct_file(20000)
    stream = PageDigestStream(len(f.directives), limit=16)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            measure_platform(f, PT.SEV_SNP, page_digests=stream)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    laid = f.layout(page_digests=stream)
    stream.finish()
    reader.join()
    assert bytes(laid.head) + b"".join(bytes(b) for b in laid.blobs) == f.to_bytes()
    assert len(errors) == 1 and isinstance(errors[0], MeasurementError) and "GUEST_POLICY" in str(errors[0])
