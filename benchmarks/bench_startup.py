"""Benchmark: start-up-bound commands, as whole processes, against sev-snp-measure and bare Python.

Run from the repository root (in the environment ``./dev`` makes; sev-snp-measure is a test
dependency)::

    python benchmarks/bench_startup.py [--runs N] [--json]

Each comparison runs the two commands in turn (A B A B ...; the machine's speed drifts, so
only runs taken side by side are compared) and prints, for each, the median wall time and the
median CPU time (user + system of the finished child, from ``getrusage``: on a busy machine the
CPU time is the steadier figure), then the median of the paired ratios (A/B) or differences (A-B).

* ``measure`` of an OVMF launch, as commands, against ``sev-snp-measure`` on the same launch
  (the IGVM file is built first from the equivalent config; the two digests must agree):
  bookworm ``OVMF.fd`` alone, and sid ``OVMF.amdsev.fd`` with Debian's 14 MB Linux bzImage
  measured (its SHA-256 in the kernel-hashes page).  Target: ratio <= 1.0.
* ``check -q`` and ``measure`` of a small file (``vectors/igvm/snp_v1.igvm``) against
  ``python -c pass`` with the same interpreter: the start-up the CLI adds.  Target: <= 60 ms.
* ``--version`` against ``python -c pass`` (for reference).
* ``build`` of the bookworm OVMF config (the first launch above) into an IGVM file, against
  ``sev-snp-measure`` computing the digest of the same launch (what the issue's table
  compares; no target: the build also writes and measures the 2 MB file), and against
  ``python -c pass`` (the time over bare Python).

The package's bytecode is compiled first (``compileall``; what installing a wheel does): an
environment with ``PYTHONDONTWRITEBYTECODE`` set would otherwise compile every module anew in
every run and time the compiler.  Both ``igvm-builder`` and ``sev-snp-measure`` run through
their console scripts.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIRMWARE = SHARED / "firmware"
VMLINUZ = SHARED / "inputs" / "vmlinuz-6.1.0-56-cloud-amd64"
SMALL = SHARED / "vectors" / "igvm" / "snp_v1.igvm"
CMDLINE = "console=ttyS0 root=/dev/vda1 ro"

RATIO_TARGET = 1.0
STARTUP_TARGET_MS = 60.0


def _script(name: str) -> list[str]:
    """The console script ``name`` installed beside this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed (pip install -e '.[test]')")
    return [found]


def _run(argv: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds of one run of ``argv``, and its standard output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, res.stdout


def paired(a: list[str], b: list[str], runs: int) -> dict[str, object]:
    """A and B in turn, ``runs`` times each after one warm-up run each."""
    _run(a), _run(b)
    rows = []
    for _ in range(runs):
        wa, ca, out_a = _run(a)
        wb, cb, out_b = _run(b)
        rows.append((wa, ca, wb, cb))
    med = statistics.median
    return {
        "a_wall_s": med(r[0] for r in rows), "a_cpu_s": med(r[1] for r in rows),
        "b_wall_s": med(r[2] for r in rows), "b_cpu_s": med(r[3] for r in rows),
        "wall_ratio": med(r[0] / r[2] for r in rows), "cpu_ratio": med(r[1] / r[3] for r in rows),
        "wall_diff_s": med(r[0] - r[2] for r in rows), "cpu_diff_s": med(r[1] - r[3] for r in rows),
        "a_out": out_a.strip(), "b_out": out_b.strip(),
    }


def _config(path: Path, firmware: Path, kernel: bool) -> Path:
    text = f"""[image]
platforms = ["snp"]
loader = "cloud-hypervisor"
[firmware]
path = '{firmware}'
[snp]
vcpus = 1
vcpu_type = "EPYC-v4"
guest_features = 0x1
vmm_type = "qemu"
"""
    if kernel:
        text += f"[kernel]\npath = '{VMLINUZ}'\ncmdline = \"{CMDLINE}\"\n"
    path.write_text(text)
    return path


def bench(workdir: Path, runs: int) -> dict[str, object]:
    compileall.compile_dir(REPO / "igvm_builder", quiet=1)
    ours, ssm, python = _script("igvm-builder"), _script("sev-snp-measure"), [sys.executable]
    results: dict[str, object] = {}
    launches = {
        "ovmf": (FIRMWARE / "bookworm-OVMF.fd", False),
        "ovmf+kernel": (FIRMWARE / "sid-OVMF.amdsev.fd", True),
    }
    for name, (firmware, kernel) in launches.items():
        igvm = workdir / f"{name}.igvm"
        _run([*ours, "build", str(_config(workdir / f"{name}.toml", firmware, kernel)), "-o", str(igvm), "-q"])
        ref = [*ssm, "--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC-v4", "--guest-features", "0x1",
               "--vmm-type", "QEMU", "--ovmf", str(firmware)]
        if kernel:
            ref += ["--kernel", str(VMLINUZ), "--append", CMDLINE]
        r = paired([*ours, "measure", "--platform", "snp", "--loader", "cloud-hypervisor", str(igvm)], ref, runs)
        digest = str(r["a_out"]).split()[2]  # "SEV_SNP sha384 <digest> loader=..."
        if digest != r["b_out"]:
            raise SystemExit(f"{name}: igvm-builder measure says {digest}, sev-snp-measure {r['b_out']}")
        r["igvm_bytes"] = igvm.stat().st_size
        results[f"measure {name} vs sev-snp-measure"] = r
        if name == "ovmf":
            build = [*ours, "build", str(workdir / f"{name}.toml"), "-o", str(workdir / "rebuilt.igvm"), "-q"]
            results["build ovmf (config to IGVM) vs sev-snp-measure (digest only)"] = paired(build, ref, runs)
            results["build ovmf (config to IGVM) vs python -c pass"] = paired(build, [*python, "-c", "pass"], runs)
    small = {
        "check -q (small file)": [*ours, "check", "-q", str(SMALL)],
        "measure (small file)": [*ours, "measure", str(SMALL)],
        "--version": [*ours, "--version"],
    }
    for name, argv in small.items():
        results[f"{name} vs python -c pass"] = paired(argv, [*python, "-c", "pass"], runs)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="paired runs per comparison (median reported)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        results = bench(Path(tmp), max(1, args.runs))
    ratios_ok = all(float(r["wall_ratio"]) <= RATIO_TARGET  # type: ignore[index]
                    for k, r in results.items() if k.startswith("measure") and "sev-snp-measure" in k)
    startup_ok = all(float(r["wall_diff_s"]) * 1000 <= STARTUP_TARGET_MS  # type: ignore[index]
                     for k, r in results.items() if k.startswith(("check", "measure (small")))
    results["cpus"] = os.cpu_count()
    results["loadavg_after"] = os.getloadavg()
    results["targets_met"] = ratios_ok and startup_ok
    if args.json:
        json.dump(results, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    print(f"{args.runs} paired runs each (A B A B ...), medians; wall | cpu (user+sys); "
          f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        a, b = name.split(" vs ")
        line = (f"{name}:\n  {a}: {r['a_wall_s'] * 1000:.0f} ms | {r['a_cpu_s'] * 1000:.0f} ms;  "
                f"{b}: {r['b_wall_s'] * 1000:.0f} ms | {r['b_cpu_s'] * 1000:.0f} ms;  ")
        if name.startswith("build") and "sev-snp-measure" in name:
            line += f"ratio {r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} (no target)"
        elif "sev-snp-measure" in name:
            line += (f"ratio {r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} (target <= {RATIO_TARGET}); "
                     f"digests agree; IGVM file {r['igvm_bytes']:,} bytes")
        else:
            line += (f"{'time' if name.startswith('build') else 'start-up'} added "
                     f"{r['wall_diff_s'] * 1000:.0f} ms | {r['cpu_diff_s'] * 1000:.0f} ms"
                     + (f" (target <= {STARTUP_TARGET_MS:.0f} ms)" if name.startswith(("check", "measure")) else ""))
        print(line)
    print("targets met" if results["targets_met"] else "TARGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
