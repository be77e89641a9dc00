"""Benchmark: ``igvm-builder dump`` (text and ``--json``) of a large IGVM file.

Usage::

    python benchmarks/bench_dump.py [--pages N] [--repeat R]

The file is ``bench_parse.py``'s (one NATIVE platform, N distinct 4 KiB pages, default 65,536 =
256 MiB), generated in a temporary directory.  Each run is a fresh interpreter calling
``igvm_builder.cli.main(["dump", ...])`` with standard output going to ``/dev/null``, with and
without ``PYTHONUNBUFFERED=1`` (common in CI and container images: every ``write`` on standard
output then reaches the kernel, so output must be batched); the child reports its wall time and
peak RSS (``ru_maxrss``).  The dump holds one header at a time, so the peak RSS should not grow
with N beyond the parsed model (about 300 bytes per header).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args: list[str], result: str) -> None:
    """Run the dump with this process's own standard output (the parent sends it to /dev/null)."""
    import resource

    from igvm_builder import cli

    t0 = time.perf_counter()
    rc = cli.main(["dump", *args])
    sys.stdout.flush()
    wall = time.perf_counter() - t0
    with open(result, "w") as fh:
        json.dump({"rc": rc, "wall_s": wall,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, fh)


def run(args: list[str], unbuffered: bool, result: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    subprocess.run([sys.executable, __file__, "--child", str(result), *args], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # --child RESULT DUMP-ARGS...
        child(argv[2:], argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=65536, help="4 KiB pages in the file (default 65,536)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each case (best is reported)")
    args = ap.parse_args(argv)
    from bench_parse import write_big_file

    with tempfile.TemporaryDirectory(prefix="bench-dump-") as tmp:
        path = Path(tmp) / "big.igvm"
        size = write_big_file(path, args.pages)
        print(f"file: {size:,} bytes, {args.pages:,} pages; best of {args.repeat} runs, output to /dev/null")
        for label, dump_args in (("dump", [str(path)]), ("dump --json", ["--json", str(path)])):
            for unbuffered in (False, True):
                runs = [run(dump_args, unbuffered, Path(tmp) / "result.json") for _ in range(args.repeat)]
                assert all(r["rc"] == 0 for r in runs)
                best = min(runs, key=lambda r: r["wall_s"])
                env = "PYTHONUNBUFFERED=1" if unbuffered else "buffered stdout"
                print(f"  {label:<12} {env:<18} {best['wall_s']:.2f} s, peak RSS "
                      f"{max(r['peak_rss_mib'] for r in runs):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
