"""The parallel build pipeline (issue 4's performance work) computes exactly what the plain paths do.

* TDX: runs of consecutive file pages are hashed by the vectorized path (numpy); the MRTD must
  equal a naive record-by-record chain, and the per-page path, for runs of every length class
  and every way a run can end.
* Layout: finding identical pages by their kept SHA-384 (``page_digests``) gives the same bytes
  as finding them with Python's hash, including identical pages of different kinds of data.
* Streaming: the batches ``layout`` hands to ``on_data`` are the data section, at its offsets.
* ``build(output=...)``: the file written while measuring is the file; its SHA-256 and
  reference values are those of the bytes on disk.
* :class:`~igvm_builder.io.AtomicFile` and :func:`~igvm_builder.io.commit_together`: nothing is
  published on failure.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_build_helpers import VMLINUZ, config, q
from test_format_property import models
from test_measure_loaders import snp_ld, tdx_mrtd

import igvm_builder.format.file as file_mod
import igvm_builder.measure.engine as engine
from igvm_builder import cli
from igvm_builder.assemble import build
from igvm_builder.errors import OutputError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, same_bytes
from igvm_builder.format.defs import PageDataFlags, PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.io import AtomicFile, commit_together
from igvm_builder.measure import measure_platform

PAGE = 4096


def _buffer(pages: int, seed: int) -> memoryview:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(pages * PAGE))
    data[3 * PAGE : 4 * PAGE] = bytes(PAGE)  # a zero page
    data[5 * PAGE : 6 * PAGE] = data[7 * PAGE : 8 * PAGE]  # two identical pages
    return memoryview(bytes(data))


def _run(buf: memoryview, first_page: int, count: int, gpa: int, **kw: int) -> list[H.PageData]:
    return [H.PageData(gpa=gpa + i * PAGE, compatibility_mask=1,
                       data=FileSlice(buf, (first_page + i) * PAGE, PAGE), **kw) for i in range(count)]


def _tdx_case() -> tuple[IgvmFile, list[tuple[int, list[bytes | None]]]]:
    """Pages in runs of 1, 15, 16, 17, 300 (> one numpy batch) and 2100 (> one release window)
    pages, broken by a GPA gap, a jump in the buffer, another buffer, an unmeasured page,
    copied (bytes) data, a data-less page and a shared page; with the regions a loader sees."""
    a, b = _buffer(2500, 1), _buffer(40, 2)
    dirs: list[H.PageData] = []
    regions: list[tuple[int, list[bytes | None]]] = []

    def add(pages: list[H.PageData]) -> None:
        dirs.extend(pages)
        for p in pages:
            data = bytes(p.data) if len(p.data) else bytes(PAGE)
            if p.flags & PageDataFlags.SHARED:
                continue
            regions.append((p.gpa, [None if p.flags & PageDataFlags.UNMEASURED else data]))

    add(_run(a, 0, 1, 0x10_0000))
    add(_run(a, 1, 15, 0x20_0000))
    add(_run(a, 16, 16, 0x20_0000 + 15 * PAGE))  # continues the GPAs and the buffer: one run of 31
    add(_run(a, 40, 17, 0x40_0000))  # a jump in the buffer and in the GPAs
    add(_run(b, 0, 20, 0x40_0000 + 17 * PAGE))  # consecutive GPAs but another buffer
    add(_run(a, 57, 300, 0x80_0000))
    add(_run(a, 357, 1, 0x80_0000 + 300 * PAGE, flags=PageDataFlags.UNMEASURED))
    add(_run(a, 358, 2100, 0x80_0000 + 301 * PAGE))
    add([H.PageData(gpa=0x1000_0000, compatibility_mask=1, data=bytes(a[:100]))])  # copied, short
    add([H.PageData(gpa=0x1000_1000, compatibility_mask=1)])  # no data: measured as zeros
    add(_run(a, 2458, 20, 0x1000_2000, flags=PageDataFlags.SHARED))
    add(_run(a, 2478, 20, 0x1000_2000 + 20 * PAGE))
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.TDX),),
                 directives=tuple(dirs))
    # the naive chain takes (start, pages) regions; in single-pass order one page per region is
    # the same as any grouping, and the 100-byte page is measured zero-padded
    regions = [(gpa, [None if d is None else d.ljust(PAGE, b"\0") for d in pages]) for gpa, pages in regions]
    return f, regions


@pytest.mark.parametrize("min_run", [engine._TDX_MIN_RUN, 16])
def test_tdx_runs_match_the_naive_chain_and_the_page_path(monkeypatch: pytest.MonkeyPatch, min_run: int) -> None:
    monkeypatch.setattr(engine, "_TDX_MIN_RUN", min_run)  # 16: runs of 15/16/17 pages meet the threshold
    f, regions = _tdx_case()
    expected = tdx_mrtd(regions, two_pass=False)
    assert engine._numpy() is not None  # numpy is a dependency: the vectorized path is the one in use
    hashed_runs: list[int] = []
    real = engine._TdxRuns.hash_run
    monkeypatch.setattr(engine._TdxRuns, "hash_run",
                        lambda self, h, buf, start, gpa, n: (hashed_runs.append(n), real(self, h, buf, start, gpa, n)))
    vectorized = measure_platform(f, PlatformType.TDX)
    assert vectorized.digest == expected
    assert sum(hashed_runs) >= (2100 if min_run > 300 else 2100 + 300 + 31 + 17 + 20 + 20)
    assert engine._measure_tdx(f, 1, {}, False, vectorize=False).digest == expected
    monkeypatch.setattr(engine, "_numpy", lambda: None)  # as where numpy is missing
    fallback = measure_platform(f, PlatformType.TDX)
    assert fallback.digest == expected
    assert fallback.steps == vectorized.steps


def test_tdx_two_pass_ignores_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_TDX_MIN_RUN", 16)
    f, pages = _tdx_case()
    # two-pass regions: consecutive GPAs with the same measured-ness (a loader's view, §8.2)
    regions: list[tuple[int, list[bytes | None]]] = []
    for gpa, (data,) in pages:
        last = regions[-1] if regions else None
        if last and gpa == last[0] + PAGE * len(last[1]) and (data is None) == (last[1][-1] is None):
            last[1].append(data)
        else:
            regions.append((gpa, [data]))
    two = measure_platform(f, PlatformType.TDX, tdx_two_pass=True)
    assert two.digest == tdx_mrtd(regions, two_pass=True)
    assert two.digest != measure_platform(f, PlatformType.TDX).digest


# --------------------------------------------------------------------------- layout with page digests


def _dedup_file(reverse: bool = False) -> IgvmFile:
    """Identical pages of every kind: windows, bytes, short data (padded); ``reverse`` puts
    the copied and short pages before the windows (each kind is then seen first once)."""
    buf = _buffer(64, 3)
    zero_slice = FileSlice(buf, 3 * PAGE, PAGE)  # all zeros
    dirs = [
        *_run(buf, 0, 64, 0x100000),
        *_run(buf, 5, 4, 0x200000),  # pages already in the file
        H.PageData(gpa=0x300000, compatibility_mask=1, data=bytes(PAGE)),  # bytes equal to zero_slice
        H.PageData(gpa=0x301000, compatibility_mask=1, data=bytes(buf[7 * PAGE : 8 * PAGE])),  # bytes == a slice
        H.PageData(gpa=0x302000, compatibility_mask=1, data=b"\x01" * 10),  # short page: padded
        H.PageData(gpa=0x303000, compatibility_mask=1, data=b"\x01" * 10 + bytes(PAGE - 10)),  # == the padded one
        H.PageData(gpa=0x304000, compatibility_mask=1, data=zero_slice),
        H.PageData(gpa=0x305000, compatibility_mask=1, data=FileSlice(buf, 100, 200)),  # a short window
    ]
    if reverse:
        dirs.reverse()
    return IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),),
                    initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),),
                    directives=tuple(dirs))


@pytest.mark.parametrize("reverse", [False, True])
def test_page_digest_dedup_gives_the_canonical_bytes(reverse: bool) -> None:
    f = _dedup_file(reverse)
    plain_head, plain_blobs, _ = f.layout()
    head, blobs, _ = _dedup_file(reverse).layout(page_digests=True)
    plain = bytes(plain_head) + b"".join(bytes(b) for b in plain_blobs)
    assert bytes(head) + b"".join(bytes(b) for b in blobs) == plain
    parsed = IgvmFile.from_bytes(plain)
    assert parsed.to_bytes() == plain
    # 64 distinct input pages (two of them equal: one stored), the short page, the short window
    # (consecutive new pages of one buffer are stored as one window: count the bytes)
    assert sum(len(b) for b in plain_blobs) == (64 - 1 + 2) * PAGE  # (the short ones padded)
    assert sum(len(b) for b in blobs) == (64 - 1 + 2) * PAGE
    # every page's data is at its header's offset (independent of how the dups were found)
    for h in parsed.directives:
        assert isinstance(h, H.PageData)
        original = next(d for d in f.directives if d.gpa == h.gpa)
        assert bytes(h.data) == bytes(original.data).ljust(PAGE, b"\0")


def test_same_bytes_compares_contents() -> None:
    big = bytes(random.Random(5).randbytes(3 << 20))
    other = bytearray(big)
    other[-1] ^= 1
    assert same_bytes(memoryview(big), memoryview(bytes(big)))
    assert not same_bytes(memoryview(big), memoryview(other))  # differs in the last byte of the last window
    assert not same_bytes(memoryview(big), memoryview(big)[:-1])
    page = memoryview(big)[:PAGE]
    assert same_bytes(page.cast("Q"), memoryview(bytes(page)))  # by bytes, whatever the view's format
    assert FileSlice(memoryview(big), 0, PAGE) == bytes(page) and FileSlice(memoryview(big), 1, PAGE) != bytes(page)


def test_snp_digest_is_the_same_with_the_layouts_page_digests() -> None:
    f = _dedup_file()
    before = measure_platform(f, PlatformType.SEV_SNP, loader="qemu").digest
    digests = f.layout(page_digests=True).page_digests  # the SHA-384 of every 4 KiB window, by directive
    assert digests is not None and len(digests) == len(f.directives)
    windows = [i for i, h in enumerate(f.directives) if isinstance(h.data, FileSlice) and len(h.data) == PAGE]
    assert [i for i, d in enumerate(digests) if d is not None] == windows
    assert all(digests[i] == hashlib.sha384(bytes(f.directives[i].data)).digest() for i in windows)
    after = measure_platform(f, PlatformType.SEV_SNP, loader="qemu", page_digests=digests).digest
    steps = [(1, h.gpa, bytes(h.data).ljust(PAGE, b"\0")) for h in f.directives]
    assert before == after == snp_ld(steps)
    # the digests are used, not recomputed: a wrong one changes the result
    digests[windows[0]] = bytes(48)
    assert measure_platform(f, PlatformType.SEV_SNP, loader="qemu", page_digests=digests).digest != before


def test_layout_streams_the_data_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_mod, "STREAM_BLOBS", 7)
    f = _dedup_file()
    whole = f.to_bytes()
    image = bytearray(len(whole))
    batches: list[tuple[int, int, int]] = []

    def on_data(offset: int, blobs: list[object]) -> None:
        data = b"".join(bytes(b) for b in blobs)  # type: ignore[call-overload]
        image[offset : offset + len(data)] = data
        batches.append((offset, len(blobs), len(data)))

    head, blobs, _ = _dedup_file().layout(page_digests=True, on_data=on_data)
    image[: len(head)] = head
    assert bytes(image) == whole
    assert sum(n for _, n, _size in batches) == len(blobs)
    # each batch but the last: 7 blobs, or 7 pages' worth of bytes (windows of several pages)
    assert batches[0][0] == len(head) and all(n == 7 or size >= 7 * PAGE for _, n, size in batches[:-1])
    assert len(batches) >= 3


# --------------------------------------------------------------------------- build(output=...)


def _kernel_config(tmp_path: Path) -> object:
    initrd = tmp_path / "initrd.img"
    rng = random.Random(4)
    initrd.write_bytes(rng.randbytes(300 * PAGE) + bytes(40 * PAGE) + rng.randbytes(1000))
    return config(tmp_path, f"""
[image]
platforms = ["native", "snp", "tdx"]
loader = "qemu"
[kernel]
path = {q(VMLINUZ)}
initrd = {q(initrd)}
cmdline = "console=ttyS0"
[memory]
size = "512M"
""")


def test_build_writes_while_measuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_mod, "STREAM_BLOBS", 100)  # several batches for this small build
    monkeypatch.setattr(AtomicFile, "WRITEBACK", 1 << 20)  # and writeback started along the way
    cfg = _kernel_config(tmp_path)
    target = tmp_path / "out.igvm"
    with AtomicFile(target) as out:
        result = build(cfg, output=out)  # type: ignore[arg-type]
    on_disk = target.read_bytes()
    plain = build(cfg)  # type: ignore[arg-type]
    assert on_disk == plain.data == result.data
    assert result.sha256 == plain.sha256 == hashlib.sha256(on_disk).hexdigest()
    assert result.reference_values == plain.reference_values
    parsed = IgvmFile.from_bytes(on_disk)
    for name, ptype in (("snp", PlatformType.SEV_SNP), ("tdx", PlatformType.TDX)):
        digest = measure_platform(parsed, ptype, loader="qemu").digest
        assert digest is not None and result.reference_values["platforms"][name]["digest"] == digest.hex()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".igvm-")] == []


def test_build_restores_the_switch_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import threading

    import igvm_builder.assemble as build_mod

    cfg = _kernel_config(tmp_path)
    before = sys.getswitchinterval()
    seen: list[float] = []
    layout = IgvmFile.layout

    def spy(self: IgvmFile, **kw: object) -> object:
        seen.append(sys.getswitchinterval())
        return layout(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(IgvmFile, "layout", spy)
    build(cfg)  # type: ignore[arg-type]
    assert seen == [pytest.approx(build_mod.BUILD_SWITCH_INTERVAL)]
    assert sys.getswitchinterval() == before
    # concurrent builds (SCons -j runs Python actions in threads): restored when the last ends
    errors: list[BaseException] = []

    def one() -> None:
        try:
            build(cfg)  # type: ignore[arg-type]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sys.getswitchinterval() == before
    # and after a failed build
    monkeypatch.setattr(engine, "_measure_tdx", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build(cfg)  # type: ignore[arg-type]
    assert sys.getswitchinterval() == before


def test_failed_measurement_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _kernel_config(tmp_path)  # writes build.toml
    from igvm_builder.errors import MeasurementError

    def fail(*_a: object, **_k: object) -> None:
        raise MeasurementError("injected failure after the layout")

    monkeypatch.setattr(engine, "_measure_tdx", fail)  # fails in the measuring thread
    out = tmp_path / "out" / "image.igvm"
    out.parent.mkdir()
    rc = cli.main(["build", str(tmp_path / "build.toml"), "-o", str(out), "--reference-values", str(out) + ".json"])
    assert rc == 2
    assert "injected failure after the layout" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- atomic outputs


def test_atomic_file_out_of_order_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AtomicFile, "WRITEBACK", 4096)
    target = tmp_path / "f.bin"
    with AtomicFile(target) as out:
        out.seek(100)
        for i in range(10):
            out.write(bytes([i]) * 5000)
        out.seek(0)
        out.write(b"H" * 100)
    assert target.read_bytes() == b"H" * 100 + b"".join(bytes([i]) * 5000 for i in range(10))
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_atomic_file_discarded_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), AtomicFile(target) as out:
        out.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_commit_together_publishes_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = AtomicFile(tmp_path / "a.igvm"), AtomicFile(tmp_path / "a.igvm.json")
    a.write(b"igvm")
    b.write(b"{}")
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        if dst.endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match=r"a\.igvm\.json: cannot put the file in place: No space left"):
        commit_together(a, b)
    assert list(tmp_path.iterdir()) == []  # a.igvm was renamed, then removed again
    monkeypatch.setattr(os, "replace", real_replace)
    c, d = AtomicFile(tmp_path / "c"), AtomicFile(tmp_path / "d")
    c.write(b"1")
    d.write(b"2")
    commit_together(c, None, d)
    assert (tmp_path / "c").read_bytes() == b"1" and (tmp_path / "d").read_bytes() == b"2"



@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.randoms(use_true_random=False))
def test_digest_dedup_matches_hash_dedup_on_random_files(f: IgvmFile, rnd: random.Random) -> None:
    """Random files (format property models: duplicate blobs of every size, 4 KiB VMSAs and
    parameter areas among them), with some page data turned into windows of one buffer so the
    layout's fast path runs: finding duplicates by SHA-384 gives the canonical bytes."""
    import dataclasses

    chosen = [i for i, h in enumerate(f.directives)
              if type(h) is H.PageData and len(h.data) == PAGE and rnd.random() < 0.7]
    view = memoryview(b"".join(bytes(f.directives[i].data) for i in chosen))
    directives = list(f.directives)
    for n, i in enumerate(chosen):
        directives[i] = dataclasses.replace(directives[i], data=FileSlice(view, n * PAGE, PAGE))
    windowed = dataclasses.replace(f, directives=tuple(directives))
    plain_head, plain_blobs, _ = f.layout(validate=False)
    head, blobs, _ = windowed.layout(validate=False, page_digests=True)
    assert bytes(head) + b"".join(bytes(b) for b in blobs) == bytes(plain_head) + b"".join(bytes(b) for b in plain_blobs)
