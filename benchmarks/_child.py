"""Running one command as a child process and reading what it cost (shared by the benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def igvm_builder_command() -> list[str]:
    """The installed ``igvm-builder`` script beside this Python, else ``python -m igvm_builder``."""
    script = Path(sys.executable).parent / "igvm-builder"
    return [str(script)] if script.exists() else [sys.executable, "-m", "igvm_builder"]


def run_child(argv: list[str], env: Mapping[str, str] | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one run of ``argv`` (``wait4``), in the
    environment ``env`` (default: this one)."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=null, stderr=subprocess.PIPE, cwd=REPO,
                                env=env)
        assert proc.stderr is not None
        err = proc.stderr.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {err.decode().strip()}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}
