"""Helpers for the Arm CCA tests: the shared CCA vectors, the realm-measurements oracle
(veraison/cca-realm-measurements, ``shared/tools`` section 4) and igvm-oracle checks."""

from __future__ import annotations

import gzip
import json
import shlex
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CCA_VECTORS = SHARED / "vectors" / "cca"
REALM_MEASUREMENTS = SHARED / "tools" / "oracles" / "realm-measurements"
IGVM_ORACLE = SHARED / "tools" / "oracles" / "igvm-oracle"
CASES = sorted(p.name for p in CCA_VECTORS.iterdir() if (p / "case.json").is_file())
HASHES = ("sha256", "sha512")


@cache
def case(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CCA_VECTORS / name / "case.json").read_text())
    return data


@cache
def calls(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CCA_VECTORS / name / "calls.json").read_text())
    return data


def trace(name: str, alg: str) -> list[dict[str, Any]]:
    lines = (CCA_VECTORS / name / f"trace_{alg}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def call_page(name: str, entry: dict[str, Any]) -> bytes:
    """The 4 KiB page a ``calls.json`` DATA entry names (``pad_before`` zeros, then the file from
    ``offset``, zero-padded; ``gunzip`` for a compressed kernel)."""
    raw = (CCA_VECTORS / name / entry["file"]).read_bytes()
    if entry.get("gunzip"):
        raw = gzip.decompress(raw)
    pad = entry.get("pad_before", 0)
    chunk = bytes(pad) + raw[entry["offset"]: entry["offset"] + 4096 - pad]
    return chunk + bytes(4096 - len(chunk))


def oracle_rim(args: list[str], cwd: Path, alg: str) -> str:
    """Run realm-measurements with ``args`` in ``cwd``; the RIM it prints, cut to the digest size."""
    proc = subprocess.run([str(REALM_MEASUREMENTS), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"realm-measurements {shlex.join(args)}: {proc.stderr.strip()}"
    rims = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("RIM:")]
    assert len(rims) == 1, proc.stdout
    return rims[0][: {"sha256": 64, "sha512": 128}[alg]]


def igvm_oracle_accepts(path: Path) -> None:
    """The reference crate parses ``path`` (as a CCA file) and serializes it back byte for byte."""
    for cmd in (["parse", str(path), "--isolation", "cca"], ["roundtrip", str(path)]):
        proc = subprocess.run([str(IGVM_ORACLE), *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"igvm-oracle {' '.join(cmd)}: {proc.stdout} {proc.stderr}"
