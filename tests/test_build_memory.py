"""A build with an output keeps nothing per page but its dedup table (issue 17: build RSS flat).

* The headers go to the output as they are made; a large build reads them back for the file's
  SHA-256 and for ``BuildResult.chunks()`` instead of keeping them: the bytes on disk, the result's
  bytes (after the output was committed) and a build without an output are the same file.
* An output that cannot be read back (opened write-only, or not a file) keeps them.
* The SEV-SNP digest is chained from the page digests as the layout makes them
  (``PageDigestStream``): equal to the digest of the parsed file.
* A whole CLI build of 32 MiB and of 512 MiB of distinct pages (SNP and TDX, the bench_scaling
  mix) peak within a few MiB of each other.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_helpers import REPO, config, q

import igvm_builder.assemble.pipeline as pipeline
import igvm_builder.format.file as file_mod
from igvm_builder.assemble import build
from igvm_builder.format.defs import PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.io import RECORD_OUTPUTS_ENV, AtomicFile
from igvm_builder.measure import measure_platform

PAGE = 4096
MIB = 1 << 20


def _blob(path: Path, mib: int, seed: int = 5) -> None:
    """Per MiB 224 distinct pages (a counter in each) and 32 zero pages (bench_scaling's mix)."""
    pool = bytearray(random.Random(seed).randbytes(MIB))
    pool[224 * PAGE :] = bytes(32 * PAGE)
    n = 0
    with open(path, "wb") as fh:
        for _ in range(mib):
            for off in range(0, 224 * PAGE, PAGE):
                pool[off : off + 8] = n.to_bytes(8, "little")
                n += 1
            fh.write(pool)


def _blob_config(tmp_path: Path, mib: int, name: str = "blob") -> Path:
    blob = tmp_path / f"{name}.bin"
    _blob(blob, mib)
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[image]\nplatforms = ["snp", "tdx"]\nloader = "qemu"\n[[blob]]\npath = {q(blob)}\n'
                    'gpa = 0x100000000\n')
    return path


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers handed over 4 KiB at a time and read back from the first byte on."""
    monkeypatch.setattr(file_mod, "HEAD_PIECE", 4096)
    monkeypatch.setattr(pipeline, "HEAD_KEEP", 0)
    monkeypatch.setattr(pipeline, "HEAD_READ", 5000)


def test_headers_are_read_back_from_the_output(tmp_path: Path, small_pieces: None) -> None:
    from igvm_builder.config import load_config

    cfg = load_config(_blob_config(tmp_path, 6))
    target = tmp_path / "out.igvm"
    with AtomicFile(target) as out:
        result = build(cfg, output=out)
    assert result._headers is not None  # read back, not kept
    on_disk = target.read_bytes()
    plain = build(cfg)
    assert plain._headers is None
    assert on_disk == plain.data == result.data  # (result.data: read back after the commit)
    assert b"".join(result.chunks()) == on_disk
    assert result.sha256 == plain.sha256 == hashlib.sha256(on_disk).hexdigest()
    assert result.size == len(on_disk) and result.reference_values == plain.reference_values
    parsed = IgvmFile.from_bytes(on_disk)  # (checks the checksum of headers the layout never held)
    digest = measure_platform(parsed, PlatformType.SEV_SNP, loader="qemu").digest
    assert digest is not None and result.reference_values["platforms"]["snp"]["digest"] == digest.hex()
    target.unlink()  # the result reads its own descriptor of the file, not the name
    assert result.data == on_disk


@pytest.mark.parametrize("kind", ["write-only", "bytesio"])
def test_outputs_that_cannot_be_read_back_keep_the_headers(tmp_path: Path, small_pieces: None, kind: str) -> None:
    from igvm_builder.config import load_config

    cfg = load_config(_blob_config(tmp_path, 2))
    plain = build(cfg).data
    if kind == "bytesio":
        buf = io.BytesIO()
        result = build(cfg, output=buf)
        assert buf.getvalue() == plain
    else:
        path = tmp_path / "out.igvm"
        with open(path, "wb") as fh:
            result = build(cfg, output=fh)
        assert path.read_bytes() == plain
    assert result._headers is None and result.data == plain
    assert result.sha256 == hashlib.sha256(plain).hexdigest()


#: A CLI build in a fresh process and its peak RSS: VmHWM, the high-water mark of this process's
#: own memory (``ru_maxrss`` would not do: Linux carries it across exec, so a child of pytest
#: reports pytest's peak when that is higher).
#: A CLI build in a fresh process, and the most anonymous memory (RssAnon: the heap, the dedup
#: table, buffers; not the pages of mapped inputs, which come and go with the windows being
#: hashed and written and which tests/test_resident.py checks) it held, sampled every 2 ms.
_PEAK_ANON = """
import sys, threading, time
from igvm_builder.cli import main
peak = [0]
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
code = main(["build", sys.argv[1], "-o", sys.argv[2], "-q"])
print("peak", code, peak[0])
"""


def test_build_memory_hardly_grows_with_the_image(tmp_path: Path) -> None:
    """Fresh CLI builds (SNP + TDX) of 64 MiB and 512 MiB of mostly distinct pages: the larger
    holds at most 6 MiB more anonymous memory (measured: +3.3 to +4.4 MiB: the dedup table,
    16 bytes a page, and headers kept up to 1 MiB; +10.4 MiB before the headers and page
    digests were streamed and the table became slots)."""
    peaks = {}
    for name, mib in (("small", 64), ("big", 512)):
        cfg = _blob_config(tmp_path, mib, name)
        env = {k: v for k, v in os.environ.items() if k != RECORD_OUTPUTS_ENV}  # (the oracle recorder reads it)
        out = tmp_path / f"{name}.igvm"
        proc = subprocess.run([sys.executable, "-c", _PEAK_ANON, str(cfg), str(out)],
                              capture_output=True, text=True, check=False, cwd=REPO, env=env)
        _, code, peak_kib = proc.stdout.splitlines()[-1].split()
        assert code == "0", proc.stderr
        peaks[name] = int(peak_kib)
        assert out.stat().st_size > mib * 7 // 8 * MIB  # (the distinct pages, stored)
        (tmp_path / f"{name}.bin").unlink()
        out.unlink()
    print("peak anonymous memory (KiB):", peaks)
    assert (peaks["big"] - peaks["small"]) * 1024 < 6 * MIB, peaks


def test_the_streamed_snp_digest_is_the_files(tmp_path: Path) -> None:
    """The SNP digest a build chains beside its layout, for a kernel image with an initrd of
    distinct, repeated and zero pages, equals the digest of the parsed file (hyperv and qemu)."""
    from test_build_helpers import VMLINUZ

    initrd = tmp_path / "initrd.img"
    rng = random.Random(8)
    initrd.write_bytes(rng.randbytes(900 * PAGE) + bytes(40 * PAGE) + rng.randbytes(PAGE) * 30 + b"x")
    for loader in ("hyperv", "qemu"):
        cfg = config(tmp_path, f'[image]\nplatforms = ["native", "snp"]\nloader = "{loader}"\n'
                               f'[kernel]\npath = {q(VMLINUZ)}\ninitrd = {q(initrd)}\n[memory]\nsize = "512M"\n')
        target = tmp_path / "k.igvm"
        with AtomicFile(target) as out:
            result = build(cfg, output=out)  # type: ignore[arg-type]
        parsed = IgvmFile.load(target)
        digest = measure_platform(parsed, PlatformType.SEV_SNP, loader=loader).digest
        assert digest is not None and result.reference_values["platforms"]["snp"]["digest"] == digest.hex()


def test_pages_compared_with_do_not_stay_resident(tmp_path: Path) -> None:
    """An image whose second half repeats its first half's pages in shuffled order: each page of
    the second half is confirmed against a page stored anywhere before it; those pages leave
    the resident set again (measured: none left; without that, the whole first half stayed
    mapped: 16 MiB here)."""
    import mmap

    from test_resident import resident_pages

    from igvm_builder.format import headers as H
    from igvm_builder.format.pages import Directives, PageRun

    n = 4096  # 16 MiB of distinct pages, then the same pages shuffled
    rng = random.Random(3)
    distinct = [rng.randbytes(PAGE) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    path = tmp_path / "image.bin"
    path.write_bytes(b"".join(distinct) + b"".join(distinct[i] for i in order))
    platform = H.SupportedPlatform(compatibility_mask=1, highest_vtl=0, platform_type=PlatformType.NATIVE,
                                   platform_version=1, shared_gpa_boundary=0)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        f = IgvmFile(platforms=(platform,), directives=Directives([PageRun(0, 2 * n, 1, source=memoryview(buf))]))
        laid = f.layout()
        assert sum(len(b) for b in laid.blobs) == n * PAGE  # the second half stored as the first
        left = resident_pages(path)
        print(f"resident after the layout: {len(left) * PAGE >> 10} KiB")
        assert len(left) * PAGE <= 4 * MIB, len(left)
        del f, laid  # (their views of the mapping)


class _SlowFile(io.BytesIO):
    """An output slower than the layout (each write waits), which may fail after ``fail_after``
    writes."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.writes = 0
        self.fail_after = fail_after

    def write(self, data: object) -> int:  # type: ignore[override]
        import time

        self.writes += 1
        if self.fail_after is not None and self.writes > self.fail_after:
            raise OSError(28, "No space left on device")
        time.sleep(0.002)
        return super().write(data)  # type: ignore[arg-type]


def test_a_slow_output_holds_the_layout_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Header pieces wait for a slow output instead of piling up: never more than PENDING_HEADS
    handed over and not yet written; the file is the same."""
    from igvm_builder.config import load_config

    monkeypatch.setattr(file_mod, "HEAD_PIECE", 4096)
    monkeypatch.setattr(pipeline._Writer, "PENDING_HEADS", 2)
    seen: list[int] = []
    put_head = pipeline._Writer.put_head

    def spy(self: pipeline._Writer, offset: int, piece: bytearray) -> None:
        put_head(self, offset, piece)
        seen.append(self.pending)

    monkeypatch.setattr(pipeline._Writer, "put_head", spy)
    cfg = load_config(_blob_config(tmp_path, 64))  # 8 strides of pages: 8 pieces and the last
    out = _SlowFile()
    build(cfg, output=out)
    assert len(seen) >= 8 and max(seen) <= 2, seen
    assert out.getvalue() == build(cfg).data


def test_a_failing_output_does_not_hold_the_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output fails (disk full) while the layout still has header pieces to hand over: the
    build ends with that error instead of waiting for a writer that is gone."""
    import threading

    from igvm_builder.config import load_config

    monkeypatch.setattr(file_mod, "HEAD_PIECE", 4096)
    monkeypatch.setattr(pipeline._Writer, "PENDING_HEADS", 1)
    cfg = load_config(_blob_config(tmp_path, 64))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            build(cfg, output=_SlowFile(fail_after=3))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the build waits for a writer that failed"
    assert len(errors) == 1 and isinstance(errors[0], OSError) and errors[0].errno == 28, errors
