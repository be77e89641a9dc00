"""Benchmark: ``igvm-builder diff`` of two large builds that differ in one page.

Usage::

    python benchmarks/bench_diff.py [--repeat R]

``bench_build.py``'s kernel case (Debian's bzImage + a 256 MiB initrd, native + SNP + TDX,
a 283 MB file) is built twice, the second time with one more word on the command line (one
page differs, and every launch digest).  Each run is a fresh interpreter calling
``igvm_builder.cli.main(["diff", A, B])``; it reports its wall time and peak RSS.  A diff compares
every page on every common platform and measures both files on every platform.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(a: str, b: str, result: str) -> None:
    import resource

    from igvm_builder import cli

    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        saved, sys.stdout = sys.stdout, null
        try:
            rc = cli.main(["diff", a, b])
        finally:
            sys.stdout = saved
    with open(result, "w") as fh:
        json.dump({"rc": rc, "wall_s": time.perf_counter() - t0,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, fh)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs (best is reported)")
    args = ap.parse_args(argv)
    from bench_build import INITRD_MIB, write_configs, write_initrd

    from igvm_builder.assemble import build
    from igvm_builder.config import load_config
    from igvm_builder.io import AtomicFile

    work = Path(tempfile.mkdtemp(prefix="bench-diff-"))
    try:
        initrd = work / "initrd.img"
        write_initrd(initrd, INITRD_MIB)
        kernel = write_configs(work, initrd)["kernel"]
        other = work / "kernel2.toml"
        other.write_text(kernel.read_text().replace('ro quiet"', 'ro quiet loglevel=3"'))
        files = []
        for cfg in (kernel, other):
            out = work / (cfg.stem + ".igvm")
            with AtomicFile(out) as fh:
                build(load_config(cfg), output=fh)
            files.append(out)
        runs = []
        for _ in range(args.repeat):
            subprocess.run([sys.executable, __file__, "--child", str(files[0]), str(files[1]),
                            str(work / "r.json")], check=True)
            runs.append(json.loads((work / "r.json").read_text()))
        assert all(r["rc"] == 1 for r in runs)  # the files differ
        best = min(r["wall_s"] for r in runs)
        print(f"diff of two {files[0].stat().st_size:,}-byte builds differing in one page: best of "
              f"{args.repeat} {best:.2f} s, peak RSS {max(r['peak_rss_mib'] for r in runs):.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
