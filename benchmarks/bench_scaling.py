"""Benchmark: how build and measure scale with the image: 16 MiB, 256 MiB, 1 GiB and 4 GiB.

Run from the repository root::

    python benchmarks/bench_scaling.py [--sizes 16M,256M,1G,4G] [--runs N] [--workdir DIR] [--json]

For each size a blob of that many bytes is generated in the work directory: per MiB, 224
distinct pseudo-random 4 KiB pages (a page counter in the first 8 bytes of each) and 32 zero
pages, so every size has the same mix (one page in eight deduplicated, like the zero runs of a
real disk image) and a 4 GiB guest range still fits the 32-bit file offsets of an IGVM file.
The config places it at GPA 4 GiB for SEV-SNP and TDX (both measured on every page).  Then,
as whole processes, as a user runs them (the package's bytecode compiled first):

* ``igvm-builder build scaling.toml -o out.igvm -q`` (plan, lay out, write, measure both
  platforms, reference values, fsync + rename);
* ``igvm-builder measure out.igvm`` (mmap, parse and validate, SNP and TDX digests).

Each command's wall time, CPU time (user + system) and peak RSS (``ru_maxrss`` of that child,
from ``wait4``) are taken; with ``--runs N`` the median of N runs.  Printed per size: seconds
per GiB of guest data (wall and CPU) and the peak RSS; then least-squares lines
``time = fixed + slope x GiB`` of the CPU and the wall time over the sizes (the start-up is
the fixed part) with each size's distance from them, and the ratio of the largest to the
smallest peak RSS.  Time should be linear (small distances) and RSS flat (ratio near 1).  On
a machine other jobs share, the CPU time is the steadier figure.

The blob and the output of one size are deleted before the next; the 4 GiB case needs about
8 GiB of free disk in the work directory and takes minutes.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _child import igvm_builder_command, run_child

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
RANDOM_PAGES_PER_MIB = 224  # the other 32 pages of each MiB are zero
BLOB_GPA = 1 << 32
SIZES = {"16M": 16 * MIB, "256M": 256 * MIB, "1G": GIB, "4G": 4 * GIB}


def write_blob(path: Path, size: int, seed: int = 0x5CA1E) -> None:
    """``size`` bytes (a multiple of 1 MiB): per MiB, 224 distinct pages, then 32 zero pages."""
    pool = bytearray(random.Random(seed).randbytes(MIB))
    pool[RANDOM_PAGES_PER_MIB * PAGE :] = bytes((256 - RANDOM_PAGES_PER_MIB) * PAGE)
    page_no = 0
    with open(path, "wb") as fh:
        for _ in range(size // MIB):
            for off in range(0, RANDOM_PAGES_PER_MIB * PAGE, PAGE):
                pool[off : off + 8] = page_no.to_bytes(8, "little")
                page_no += 1
            fh.write(pool)


def write_config(path: Path, blob: Path) -> None:
    path.write_text(f"""# bench_scaling.py: one generated blob, measured for SEV-SNP and TDX
[image]
platforms = ["snp", "tdx"]
loader = "qemu"

[[blob]]
path = '{blob}'
gpa = {BLOB_GPA:#x}
""")


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def bench(workdir: Path, sizes: list[str], runs: int) -> dict[str, object]:
    compileall.compile_dir(REPO / "igvm_builder", quiet=1)
    ours = igvm_builder_command()
    results: dict[str, object] = {}
    for name in sizes:
        size = SIZES[name]
        blob, cfg, out = workdir / f"blob-{name}.bin", workdir / f"scaling-{name}.toml", workdir / f"out-{name}.igvm"
        t0 = time.perf_counter()
        write_blob(blob, size)
        gen_s = time.perf_counter() - t0
        write_config(cfg, blob)
        builds, measures = [], []
        for _ in range(runs):
            out.unlink(missing_ok=True)
            builds.append(run_child([*ours, "build", str(cfg), "-o", str(out), "-q"]))
            measures.append(run_child([*ours, "measure", str(out)]))
        results[name] = {"bytes": size, "file_bytes": out.stat().st_size, "generate_s": gen_s,
                         "build": _median(builds), "measure": _median(measures)}
        blob.unlink()
        out.unlink()
        Path(f"{out}.ref.json").unlink(missing_ok=True)
    return results


def summarize(results: dict[str, object]) -> dict[str, object]:
    """Per command, least-squares lines of wall and CPU time over the sizes, each size's
    distance from them, and how much the peak RSS varies."""
    summary: dict[str, object] = {}
    rows = {n: r for n, r in results.items() if isinstance(r, dict)}
    gib = [r["bytes"] / GIB for r in rows.values()]
    for job in ("build", "measure"):
        entry: dict[str, object] = {}
        for kind in ("wall_s", "cpu_s"):
            ys = [r[job][kind] for r in rows.values()]
            a, b = fit(gib, ys)
            entry[kind] = {"fixed_s": a, "slope_s_per_gib": b,
                           "off_line_s": {n: y - (a + b * g) for n, g, y in zip(rows, gib, ys, strict=True)}}
        rss = [r[job]["peak_rss_mib"] for r in rows.values()]
        entry["rss_max_over_min"] = max(rss) / min(rss)
        summary[job] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--runs", type=int, default=1, help="runs per size and command (median reported)")
    ap.add_argument("--workdir", type=Path, help="where to write the blobs and images (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or len(sizes) < 2:
        ap.error(f"--sizes: two or more of {', '.join(SIZES)}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=args.workdir))
    try:
        results = bench(workdir, sizes, max(1, args.runs))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(results)
    if args.json:
        json.dump({"sizes": results, "summary": summary, "cpus": os.cpu_count(),
                   "loadavg_after": os.getloadavg()}, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    print(f"SNP + TDX, one blob (7/8 distinct pages, 1/8 zero pages); whole commands, median of {args.runs} "
          f"run(s); load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'size':>6} {'file':>14} | {'build s':>8} {'s/GiB':>6} {'cpu/GiB':>7} {'RSS MiB':>7} | "
          f"{'measure s':>9} {'s/GiB':>6} {'cpu/GiB':>7} {'RSS MiB':>7}")
    for name, r in results.items():
        gib = r["bytes"] / GIB
        b, m = r["build"], r["measure"]
        print(f"{name:>6} {r['file_bytes']:>14,} | {b['wall_s']:8.2f} {b['wall_s'] / gib:6.2f} "
              f"{b['cpu_s'] / gib:7.2f} {b['peak_rss_mib']:7.0f} | {m['wall_s']:9.2f} {m['wall_s'] / gib:6.2f} "
              f"{m['cpu_s'] / gib:7.2f} {m['peak_rss_mib']:7.0f}")
    for job, s in summary.items():
        for kind, label in (("cpu_s", "cpu"), ("wall_s", "wall")):
            line = s[kind]
            off = ", ".join(f"{n} {d:+.2f} s" for n, d in line["off_line_s"].items())
            print(f"{job} {label}: {line['fixed_s']:.2f} s + {line['slope_s_per_gib']:.2f} s/GiB "
                  f"(each size off that line by: {off})")
        print(f"{job} peak RSS: largest / smallest {s['rss_max_over_min']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
