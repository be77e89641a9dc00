"""Pages read through an mmap leave the resident set (blob.dontneed, blob.PageReleaser).

Residency is read from ``/proc/self/pagemap`` (bit 63: the page is mapped in this process), so
these tests see what the kernel does, fault-around and large folios included.
"""

from __future__ import annotations

import mmap
import random
import struct
from pathlib import Path

import pytest

from igvm_builder.format import blob
from igvm_builder.format.blob import RELEASE_ALIGN, FileSlice, PageReleaser, dontneed

PAGE = 4096
MIB = 1 << 20

pytestmark = pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux /proc/self/pagemap")


def _mapping_of(path: Path) -> tuple[int, int]:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            return int(start, 16), int(end, 16)
    raise AssertionError(f"{path} is not mapped")


def resident_pages(path: Path) -> list[int]:
    """Indices of the pages of the mapping of ``path`` that are mapped in this process."""
    start, end = _mapping_of(path)
    n = (end - start) // PAGE
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(start // PAGE * 8)
        entries = struct.unpack(f"<{n}Q", fh.read(n * 8))
    return [i for i, e in enumerate(entries) if e >> 63]


def _file(tmp_path: Path, mib: int) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(random.Random(7).randbytes(mib * MIB))
    return path


def test_dontneed_releases_whole_aligned_blocks(tmp_path: Path) -> None:
    """The contract of dontneed: the 2 MiB block around the range leaves the resident set, the
    rest stays.  (A kernel that maps a 2 MiB page-cache folio with one PMD drops the whole block
    even for a one-page range; one that maps folios page by page needs the widening.)"""
    path = _file(tmp_path, 8)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        total = sum(buf[i] for i in range(0, len(buf), PAGE))  # touch every page
        assert total >= 0
        assert len(resident_pages(path)) == 8 * MIB // PAGE
        dontneed(buf, 3 * PAGE, PAGE)  # one page of the first 2 MiB block
        left = resident_pages(path)
        block = RELEASE_ALIGN // PAGE
        assert not [i for i in left if i < block], "the whole first block is released"
        assert left == list(range(block, 8 * MIB // PAGE)), "nothing beyond it"
        dontneed(buf, len(buf) - PAGE, PAGE)  # the last block, clamped to the mapping
        assert max(resident_pages(path), default=-1) < len(buf) // PAGE - block


def test_page_releaser_closes_a_batch_before_the_next_page_and_reaches_the_furthest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, 1)
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(blob, "dontneed", lambda buf, off, n: calls.append((off, n)))
    with open(path, "rb") as fh:
        view = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        r = PageReleaser(every=4)
        pages = [FileSlice(view, i * PAGE, PAGE) for i in range(12)]
        for p in pages[:3]:
            r.note(p)
        r.note(pages[0])  # a deduplicated page: stored earlier in the file, noted last
        assert calls == [], "the batch is released when the next page comes, not while the caller holds this one"
        r.note(pages[4])
        assert calls == [(0, 3 * PAGE)], "up to the furthest page noted (2), not the last one (0)"
        for p in pages[5:8]:
            r.note(p)
        r.release(None)
        assert calls[1] == (4 * PAGE, 4 * PAGE)
        r.release(pages[8])  # nothing noted since: nothing to release
        assert len(calls) == 2


def test_measuring_a_deduplicated_file_leaves_little_resident(tmp_path: Path) -> None:
    """Every MiB of the blob ends with 32 zero pages, stored once in the file: the page that closes
    a release batch is then a page stored near the start of the file.  Measuring must still drop
    the pages it read (before the fix, 7/8 of the file stayed mapped)."""
    from igvm_builder.assemble import build
    from igvm_builder.config import load_config
    from igvm_builder.format import IgvmFile
    from igvm_builder.io import AtomicFile
    from igvm_builder.measure import measure_file

    mib = 48
    pool = bytearray(random.Random(3).randbytes(MIB))
    pool[224 * PAGE :] = bytes(32 * PAGE)
    data = tmp_path / "blob.bin"
    with open(data, "wb") as fh:
        for m in range(mib):
            for i in range(224):
                pool[i * PAGE : i * PAGE + 8] = (m * 224 + i).to_bytes(8, "little")
            fh.write(pool)
    cfg = tmp_path / "blob.toml"
    cfg.write_text(f'[image]\nplatforms = ["snp", "tdx"]\n[[blob]]\npath = "{data}"\ngpa = 0x100000000\n')
    image = tmp_path / "blob.igvm"
    out = AtomicFile(image)
    build(load_config(cfg), output=out)
    out.commit()
    assert image.stat().st_size < mib * MIB * 15 // 16  # the zero pages are stored once

    f = IgvmFile.load(image)
    ms = measure_file(f)
    assert all(m.digest for m in ms)
    resident = resident_pages(image)
    assert len(resident) * PAGE <= 4 * RELEASE_ALIGN, f"{len(resident) * PAGE / MIB:.1f} MiB left mapped"
