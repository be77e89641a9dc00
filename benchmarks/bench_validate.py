"""Benchmark: ``IgvmFile.validate()`` and ``to_bytes()`` of a model with 262,144 pages.

Usage::

    python benchmarks/bench_validate.py [--pages N] [--repeat R] [--rounds K] [--tree DIR ...]

The model is one NATIVE platform and N PAGE_DATA headers without data (``to_bytes()`` then
writes only the headers: the per-header cost, not the copying of pages), plus, as a second
case, N/4 directives, a quarter each PARAMETER_AREA, PARAMETER_INSERT, REQUIRED_MEMORY and
PAGE_DATA with flags (the other header types take the generic field checks).  Each run is a
fresh interpreter that builds the models once, then times each operation ``R`` times with
``timeit`` (the cyclic GC paused, as timeit does) and reports the best CPU time
(``time.process_time``).

``--tree DIR`` (repeatable) times the ``igvm_builder`` package found in ``DIR`` instead of
this checkout's (e.g. ``git archive <commit> igvm_builder | tar -x -C DIR``), so an older
commit can be compared with the current code.  The trees run interleaved, ``K`` rounds of one
child each (the machine may be shared: interleaving spreads the noise over all of them); the
best of all rounds is printed per tree.  A tree whose ``validate()`` does not exist or fails
is reported as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, timeit
sys.path.insert(0, sys.argv[1])
pages, repeat = int(sys.argv[2]), int(sys.argv[3])
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType

platforms = (H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.NATIVE),)
page_model = IgvmFile(revision=1, platforms=platforms,
                      directives=tuple(H.PageData(gpa=i * 4096, compatibility_mask=1) for i in range(pages)))
mixed = []
for i in range(pages // 16):
    gpa = i * 0x3000
    mixed.append(H.ParameterArea(parameter_area_index=i, number_of_bytes=0x1000))
    mixed.append(H.ParameterInsert(gpa=gpa, compatibility_mask=1, parameter_area_index=i))
    mixed.append(H.RequiredMemory(gpa=gpa + 0x1000, compatibility_mask=1, number_of_bytes=0x1000))
    mixed.append(H.PageData(gpa=gpa + 0x2000, compatibility_mask=1, flags=2, data_type=1))
mixed_model = IgvmFile(revision=1, platforms=platforms, directives=tuple(mixed))

def best(fn):
    timer = timeit.Timer(fn, timer=time.process_time)
    return min(timer.repeat(repeat=repeat, number=1))

out = {"pages": pages}
for name, model in (("pages", page_model), ("mixed", mixed_model)):
    out[name + "_headers"] = len(model.directives)
    out[name + "_validate"] = best(model.validate)
    out[name + "_to_bytes"] = best(model.to_bytes)
print(json.dumps(out))
"""

METRICS = ("pages_validate", "pages_to_bytes", "mixed_validate", "mixed_to_bytes")


def run_child(tree: Path, pages: int, repeat: int) -> dict[str, float] | str:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(pages), str(repeat)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=262_144, help="PAGE_DATA headers (default 262,144 = 1 GiB)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per operation in one interpreter")
    parser.add_argument("--rounds", type=int, default=3, help="fresh interpreters per tree, interleaved")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="a directory holding an igvm_builder package to time (default: this checkout)")
    args = parser.parse_args(argv)
    trees = args.tree or [ROOT]
    best: dict[Path, dict[str, float]] = {t: {} for t in trees}
    failed: dict[Path, str] = {}
    for _ in range(args.rounds):
        for tree in trees:
            if tree in failed:
                continue
            result = run_child(tree, args.pages, args.repeat)
            if isinstance(result, str):
                failed[tree] = result
                continue
            for key in METRICS:
                best[tree][key] = min(best[tree].get(key, float("inf")), result[key])
    print(f"{args.pages} PAGE_DATA headers; mixed: {args.pages // 16 * 4} directives "
          f"(PARAMETER_AREA, PARAMETER_INSERT, REQUIRED_MEMORY, PAGE_DATA); best CPU ms of {args.rounds} x {args.repeat}")
    print(f"{'tree':<40} " + " ".join(f"{m:>15}" for m in METRICS))
    for tree in trees:
        if tree in failed:
            print(f"{tree!s:<40} failed: {failed[tree]}")
            continue
        print(f"{tree!s:<40} " + " ".join(f"{best[tree][m] * 1e3:15.1f}" for m in METRICS))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
