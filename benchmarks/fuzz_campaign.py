"""Fuzz campaign (issue #15): the harness of ``tests/fuzz_pipeline.py`` run for longer, then
driven by hypothesis.

Usage::

    python benchmarks/fuzz_campaign.py [--seed S] [--executions N] [--hypothesis-examples M]
                                       [--oracle-every K] [--crashes DIR] [--json]

1. **Seeded mutations** (``fuzz_pipeline.campaign``): N inputs mutated from the reference vectors
   and a signed SNP file (byte mutations and model-field mutations); every accepted file goes
   through parse -> dump -> measure (two loaders) -> lint -> diff -> verify, one in four through
   sign -> verify as well.
2. **hypothesis**: M random IGVM models (``tests/test_format_property.models``: every header type,
   random masks, duplicate blobs, VMSAs, parameter areas) and M byte-mutated files
   (``test_format_property.mutated``), each through the same pipeline.

A crash is an exception that is not one of the project's one-line errors, an accepted file that
does not serialize back to the same model, or a file just signed that does not verify; with
``--oracle-every N``, also one mutated input in N on which the reference crate (``igvm-oracle``)
gives another verdict than ours, or re-serializes the file we write from it differently (a
panic of the crate on an input we reject is counted as ``crate_panics``, not as a crash); crashing
inputs are written to ``--crashes`` (default: a ``fuzz-crashes`` directory beside this script's
working directory, only created when there is one).  The data-less page bound is lowered to 4096
pages (``IGVM_BUILDER_MAX_IMPLIED_PAGES``) so that mutated 4 GiB areas exercise the refusal
instead of seconds of hashing.  Prints executions, parsed files, pipeline runs, crashes, time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("IGVM_BUILDER_MAX_IMPLIED_PAGES", "4096")


def _save(crash_dir: Path, data: bytes) -> str:
    crash_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(data).hexdigest()[:16] + ".igvm"
    (crash_dir / name).write_bytes(data)
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--executions", type=int, default=100_000)
    ap.add_argument("--hypothesis-examples", type=int, default=2_000)
    ap.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--oracle-every", type=int, default=0, metavar="N",
                    help="also check one mutated input in N against the reference crate (igvm-oracle: same "
                         "verdict, same re-serialization of the file we write); 0: never")
    args = ap.parse_args()

    import tempfile

    from fuzz_pipeline import OracleCheck, PipelineFailure, campaign, run_pipeline

    figures: dict[str, object] = {"seed": args.seed}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-oracle-") as scratch:
        oracle = OracleCheck(Path(scratch)) if args.oracle_every > 0 else None
        seeded = campaign(args.seed, args.executions, sign_every=4, stop_on_failure=False, check=oracle,
                          check_every=max(args.oracle_every, 1))
    figures["mutation"] = {"executions": seeded.executions, "parsed": seeded.parsed,
                           "pipeline_runs": seeded.pipelines, "crashes": len(seeded.failures),
                           "seconds": round(time.monotonic() - t0, 1)}
    if oracle is not None:
        figures["mutation"]["oracle_checked"] = oracle.checked  # type: ignore[index]
        figures["mutation"]["crate_panics"] = oracle.crate_panics  # type: ignore[index]
        figures["mutation"]["oracle_known_differences"] = dict(oracle.known)  # type: ignore[index]
    crashes = [f"{f.stage}: {str(f)[:200]} -> {_save(args.crashes, f.data)}" for f in seeded.failures]

    from hypothesis import HealthCheck, given, settings
    from test_format_property import models, mutated

    from igvm_builder.format import IgvmFile

    counts = {"executions": 0, "parsed": 0, "pipeline_runs": 0, "crashes": 0}
    vector = IgvmFile.from_bytes((ROOT.parent / "shared" / "vectors" / "igvm" / "snp_v1.igvm").read_bytes())

    def one(data: bytes) -> None:
        counts["executions"] += 1
        try:
            if run_pipeline(data, vector, sign=counts["executions"] % 4 == 0):
                counts["parsed"] += 1
                counts["pipeline_runs"] += 1
        except PipelineFailure as failure:
            counts["crashes"] += 1
            crashes.append(f"{failure.stage}: {str(failure)[:200]} -> {_save(args.crashes, failure.data)}")

    t1 = time.monotonic()
    run = settings(max_examples=args.hypothesis_examples, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
    run(given(models())(lambda f: one(f.to_bytes())))()
    run(given(mutated())(one))()
    counts["seconds"] = round(time.monotonic() - t1, 1)
    figures["hypothesis"] = counts
    figures["total"] = {
        "executions": seeded.executions + counts["executions"],
        "pipeline_runs": seeded.pipelines + counts["pipeline_runs"],
        "crashes": len(crashes),
        "seconds": round(time.monotonic() - t0, 1),
    }
    figures["crash_list"] = crashes
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key in ("mutation", "hypothesis", "total"):
            print(f"{key:>10}: " + ", ".join(f"{k} {v}" for k, v in figures[key].items()))  # type: ignore[attr-defined]
        for line in crashes:
            print(f"  crash {line}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
