"""Benchmark: ``igvm-builder sign --reference-values`` of a large image, and ``measured_vmsa``.

Run from the repository root::

    python benchmarks/bench_sign_refs.py [--size 1G] [--runs N] [--tree DIR ...] [--workdir DIR] [--json]

A blob of ``--size`` bytes (bench_scaling's mix: per MiB 224 distinct pages and 32 zero pages)
is built into an SEV-SNP + TDX image (loader qemu) with its reference values; then, as whole
processes, each run one after the other:

* ``sign IMAGE -o OUT --config CFG --id-key <TEST-ONLY key> --allow-test-keys -q`` (signing only);
* the same with ``--reference BUILD.json --reference-values OUT.json`` (the signed image's
  reference values too).

Wall time, CPU time (user + system) and peak RSS (``ru_maxrss`` from ``wait4``) are taken; the
median of ``--runs`` runs is printed.  ``--tree DIR`` (repeatable) runs the ``igvm_builder``
package found in DIR instead of this checkout's (``git archive <commit> igvm_builder | tar -x -C
DIR``; its bytecode is compiled first), so an older commit can be compared: the trees run
interleaved, run by run.  The reference values of every tree are compared byte for byte.

Also, per tree, in a fresh interpreter: microseconds per ``kvm_vmsa.measured_vmsa`` call (qemu and
cloud-hypervisor; best of 7 repeats of 2,000 calls, ``timeit``).

The TEST-ONLY key of ``../shared/keys`` signs; the output proves nothing.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _child import run_child
from bench_scaling import MIB, SIZES, write_blob, write_config

REPO = Path(__file__).resolve().parent.parent
KEY = REPO.parent / "shared" / "keys" / "test-only-id-p384.pem"

VMSA_CHILD = r"""
import json, sys, timeit
sys.path.insert(0, sys.argv[1])
import igvm_builder.kvm_vmsa as K
from igvm_builder.sev_vmsa import build_vmsa, reset_vmsa_fields
assert K.__file__.startswith(sys.argv[1]), K.__file__
page = build_vmsa(reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1)
                  | {"rip": 0x100000, "cs.selector": 0x8})
out = {}
for vmm in ("qemu", "cloud-hypervisor"):
    out[vmm] = min(timeit.repeat(lambda: K.measured_vmsa(page, vmm), number=2000, repeat=7)) / 2000 * 1e6
print(json.dumps(out))
"""


def _command(tree: Path) -> tuple[list[str], dict[str, str]]:
    """``python -m igvm_builder`` running the package of ``tree`` (``-P``: the working directory,
    the checkout, does not come first on ``sys.path``), checked."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
    where = subprocess.run([sys.executable, "-P", "-c", "import igvm_builder; print(igvm_builder.__file__)"],
                           env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(tree) + os.sep):
        raise SystemExit(f"{tree}: python imports igvm_builder from {where}")
    return [sys.executable, "-P", "-m", "igvm_builder"], env


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def bench(workdir: Path, size: int, runs: int, trees: list[Path]) -> dict[str, object]:
    blob, cfg, image, refs = (workdir / "blob.bin", workdir / "sign.toml", workdir / "image.igvm",
                              workdir / "image.json")
    write_blob(blob, size)
    write_config(cfg, blob)
    argv, env = _command(REPO)
    subprocess.run([*argv, "build", str(cfg), "-o", str(image), "--reference-values", str(refs), "-q"], env=env,
                   check=True)
    for tree in trees:  # every tree's bytecode compiled first (PYTHONDONTWRITEBYTECODE may be set)
        compileall.compile_dir(tree / "igvm_builder", quiet=1)
    rows: dict[str, dict[str, list[dict[str, float]]]] = {str(t): {"sign": [], "sign+refs": []} for t in trees}
    outputs: dict[str, bytes] = {}
    for _ in range(runs):
        for i, tree in enumerate(trees):
            argv, env = _command(tree)
            out, out_refs = workdir / f"signed-{i}.igvm", workdir / f"signed-{i}.json"
            sign = [*argv, "sign", str(image), "-o", str(out), "--config", str(cfg), "--id-key", str(KEY),
                    "--allow-test-keys", "-q"]
            rows[str(tree)]["sign"].append(run_child(sign, env=env))
            rows[str(tree)]["sign+refs"].append(run_child(
                [*sign, "--reference", str(refs), "--reference-values", str(out_refs)], env=env))
            outputs[str(tree)] = out_refs.read_bytes()
            out.unlink()
    vmsa = {}
    for tree in trees:
        proc = subprocess.run([sys.executable, "-c", VMSA_CHILD, str(tree)], capture_output=True, text=True,
                              check=True)
        vmsa[str(tree)] = json.loads(proc.stdout)
    return {
        "image_bytes": image.stat().st_size,
        "jobs": {t: {job: _median(r) for job, r in jobs.items()} for t, jobs in rows.items()},
        "measured_vmsa_us": vmsa,
        "same_reference_values": len(set(outputs.values())) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", choices=list(SIZES), help="blob size (default 1G)")
    ap.add_argument("--runs", type=int, default=3, help="runs per command and tree (median reported)")
    ap.add_argument("--tree", type=Path, action="append", default=[],
                    help="an igvm_builder tree to time instead of / besides this checkout (repeatable)")
    ap.add_argument("--workdir", type=Path, help="where to write the blob and images (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    trees = [t.resolve() for t in args.tree] or [REPO]
    workdir = Path(tempfile.mkdtemp(prefix="bench-sign-refs-", dir=args.workdir))
    try:
        results = bench(workdir, SIZES[args.size], max(1, args.runs), trees)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()
    if args.json:
        json.dump(results, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    print(f"SNP + TDX image of a {args.size} blob ({results['image_bytes'] / MIB:.0f} MiB), loader qemu; "
          f"median of {args.runs} run(s); load average after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    jobs = results["jobs"]
    assert isinstance(jobs, dict)
    for tree, by_job in jobs.items():
        for job, r in by_job.items():
            print(f"{tree}  {job:<9}  wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB")
    vmsa = results["measured_vmsa_us"]
    assert isinstance(vmsa, dict)
    for tree, per_vmm in vmsa.items():
        print(f"{tree}  measured_vmsa: " + ", ".join(f"{vmm} {us:.1f} us" for vmm, us in per_vmm.items()))
    print("reference values identical across trees:", results["same_reference_values"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
