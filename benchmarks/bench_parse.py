"""Benchmark: parse + validate a 1 GiB IGVM file (262,144 pages of distinct data).

Usage::

    python benchmarks/bench_parse.py [--pages N] [--repeat R] [--keep DIR] [--check]

The file is generated streaming (headers first, then one 4 KiB page at a time, never the
whole file in memory) in a temporary directory: one NATIVE platform, N PAGE_DATA headers, page
``i`` filled with the little-endian u64 ``i`` repeated (so no two pages deduplicate).  Then, in a
fresh interpreter per run, ``IgvmFile.load()`` is timed and the child's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is reported.

Targets (issue #2): wall time <= 1 s and peak RSS <= 100 MiB for 262,144 pages.
``--check`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igvm_builder.format import IgvmFile  # noqa: E402
from igvm_builder.format import headers as H  # noqa: E402
from igvm_builder.format.defs import IGVM_MAGIC_VALUE, PlatformType  # noqa: E402

PAGE = 4096
TARGET_SECONDS = 1.0
TARGET_RSS_MIB = 100.0
PAGES_PER_WRITE = 256  # 1 MiB per write() call


def page_bytes(i: int) -> bytes:
    return i.to_bytes(8, "little") * (PAGE // 8)


def write_big_file(path: Path, pages: int) -> int:
    """Write the benchmark file streaming; returns its size.  Layout = the canonical writer's."""
    platform = H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.NATIVE)
    tlv = struct.Struct("<II")
    fixed_size = 24
    var_size = (8 + 16) + pages * (8 + 24)
    data_start = fixed_size + var_size
    total = data_start + pages * PAGE
    if total > 0xFFFF_FFFF:
        raise SystemExit("too many pages: file offsets are 32-bit")
    var = bytearray()
    var += tlv.pack(int(platform.TYPE), platform.SIZE) + platform.pack_body()
    page_tlv = tlv.pack(int(H.PageData.TYPE), H.PageData.SIZE)
    for i in range(pages):
        hdr = H.PageData(gpa=i * PAGE, compatibility_mask=1)
        var += page_tlv + hdr.pack_body(data_start + i * PAGE)
    fixed = bytearray(struct.pack("<6I", IGVM_MAGIC_VALUE, 1, fixed_size, var_size, total, 0))
    struct.pack_into("<I", fixed, 20, zlib.crc32(var, zlib.crc32(fixed)))
    with open(path, "wb") as fh:
        fh.write(fixed)
        fh.write(var)
        del var
        for start in range(0, pages, PAGES_PER_WRITE):
            fh.write(b"".join(page_bytes(i) for i in range(start, min(start + PAGES_PER_WRITE, pages))))
    return total


def self_check() -> None:
    """The generator writes exactly what the library's canonical writer writes (small N)."""
    import io

    n = 64
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.igvm"
        write_big_file(path, n)
        model = IgvmFile(
            revision=1,
            platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.NATIVE),),
            directives=tuple(H.PageData(gpa=i * PAGE, compatibility_mask=1, data=page_bytes(i)) for i in range(n)),
        )
        sink = io.BytesIO()
        model.write(sink)
        if sink.getvalue() != path.read_bytes():
            raise SystemExit("benchmark generator does not match the canonical writer")


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from igvm_builder.format import IgvmFile
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
f = IgvmFile.load(sys.argv[1])
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": t1 - t0, "maxrss_kib": peak, "baseline_kib": base,
                  "headers": len(f.headers), "warnings": len(f.warnings)}))
"""


def measure(path: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(ROOT)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=262_144, help="number of 4 KiB pages (default 1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs, each in a fresh interpreter")
    parser.add_argument("--keep", type=Path, help="write the file into this directory and keep it")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    self_check()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"bench-{args.pages}.igvm"
        if not path.exists() or path.stat().st_size != 24 + 24 + args.pages * (32 + PAGE):
            size = write_big_file(path, args.pages)
        else:
            size = path.stat().st_size
        print(f"file: {path} ({size / 2**30:.3f} GiB, {args.pages} pages)")
        runs = [measure(path) for _ in range(args.repeat)]
        for r in runs:
            if r["headers"] != args.pages + 1:
                raise SystemExit(f"parsed {r['headers']} headers, expected {args.pages + 1}")
        best = min(r["seconds"] for r in runs)
        rss = max(r["maxrss_kib"] for r in runs) / 1024
        base = min(r["baseline_kib"] for r in runs) / 1024
        for i, r in enumerate(runs):
            print(f"run {i}: load {r['seconds']:.3f} s, peak RSS {r['maxrss_kib'] / 1024:.1f} MiB "
                  f"(interpreter + imports {r['baseline_kib'] / 1024:.1f} MiB)")
        ok_t = best <= TARGET_SECONDS
        ok_m = rss <= TARGET_RSS_MIB
        print(f"best load: {best:.3f} s (target <= {TARGET_SECONDS} s) {'OK' if ok_t else 'MISSED'}")
        print(f"peak RSS:  {rss:.1f} MiB (target <= {TARGET_RSS_MIB:.0f} MiB; baseline {base:.1f} MiB) "
              f"{'OK' if ok_m else 'MISSED'}")
        if args.keep is None:
            os.unlink(path)
    return 0 if (ok_t and ok_m) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
