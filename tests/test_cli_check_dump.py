"""``igvm-builder check`` and ``dump`` as a user runs them: ``python -m igvm_builder`` in a subprocess.

Exit codes and stderr shape for valid, invalid and missing files; ``dump --json`` against golden
files in ``tests/golden/dump/`` (regenerate with ``IGVM_REGEN_GOLDEN=1``; review the diff);
the text dump names the VP registers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VECTORS = SHARED / "vectors" / "igvm"
NEGATIVE = VECTORS / "negative"
GOLDEN = Path(__file__).resolve().parent / "golden" / "dump"
REGEN = os.environ.get("IGVM_REGEN_GOLDEN") == "1"
GOLDEN_VECTORS = ["snp_v1", "vbs_v1_reloc", "native_v2_minimal"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("IGVM_BUILDER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "igvm_builder", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], command: str, path: Path,
                          rc: int | None = None) -> None:
    # check's verdict on an invalid file is 1; an unreadable file, or dump of an unusable one, 2
    assert proc.returncode == (rc if rc is not None else 1 if command == "check" else 2), proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"igvm-builder {command}: error: ")
    assert str(path) in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- check


@pytest.mark.parametrize("name", ["snp_v1", "tdx_v1", "vbs_v1_reloc", "native_v2_minimal"])
def test_check_valid(name: str) -> None:
    path = VECTORS / f"{name}.igvm"
    proc = run_cli("check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: valid IGVM")
    assert proc.stderr == ""
    quiet = run_cli("check", "-q", str(path))
    assert (quiet.returncode, quiet.stdout) == (0, "")


@pytest.mark.parametrize("command", ["check", "dump"])
@pytest.mark.parametrize("name", ["bad_checksum.igvm", "page_gpa_unaligned.igvm", "vbs_ctx_offset0.igvm"])
def test_invalid_file(command: str, name: str) -> None:
    path = NEGATIVE / name
    assert_one_line_error(run_cli(command, str(path)), command, path)


@pytest.mark.parametrize("command", ["check", "dump"])
def test_rejected_vector(command: str) -> None:
    path = VECTORS / "native_v1_nodata_REJECTED.igvm"
    assert_one_line_error(run_cli(command, str(path)), command, path)


@pytest.mark.parametrize("command", ["check", "dump"])
def test_missing_file(command: str, tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.igvm"
    assert_one_line_error(run_cli(command, str(path)), command, path, rc=2)


@pytest.mark.parametrize("command", ["check", "dump"])
def test_empty_file(command: str, tmp_path: Path) -> None:
    path = tmp_path / "empty.igvm"
    path.write_bytes(b"")
    assert_one_line_error(run_cli(command, str(path)), command, path)


def test_check_warns_on_stderr() -> None:
    path = NEGATIVE / "guest_policy_unknown_mask_OK.igvm"
    proc = run_cli("check", str(path))
    assert proc.returncode == 0
    assert "warning" in proc.stderr and "0x10" in proc.stderr


@pytest.mark.parametrize("command", ["check", "dump"])
def test_platform_filter(command: str) -> None:
    path = VECTORS / "snp_v1.igvm"
    assert run_cli(command, "--platform", "snp", str(path)).returncode == 0
    missing = run_cli(command, "--platform", "tdx", str(path))
    assert_one_line_error(missing, command, path)
    assert "TDX" in missing.stderr
    usage = run_cli(command, "--platform", "nonsense", str(path))
    assert usage.returncode == 2


# --------------------------------------------------------------------------- dump --json


def golden_path(name: str) -> Path:
    return GOLDEN / f"{name}.json"


@pytest.mark.parametrize("name", GOLDEN_VECTORS)
def test_dump_json_golden(name: str) -> None:
    proc = run_cli("dump", "--json", str(VECTORS / f"{name}.igvm"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert proc.stdout == json.dumps(doc, indent=2, sort_keys=True) + "\n"  # sorted keys, stable form
    path = golden_path(name)
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(proc.stdout)
    assert path.is_file(), f"missing golden file {path}; run with IGVM_REGEN_GOLDEN=1"
    assert doc == json.loads(path.read_text())


def test_dump_json_schema_basics() -> None:
    doc = json.loads(run_cli("dump", "--json", str(VECTORS / "snp_v1.igvm")).stdout)
    assert doc["schema_version"] == 1
    assert doc["platform_filter"] is None
    assert set(doc) == {"schema_version", "file", "platform_filter", "platforms", "headers", "counts", "warnings"}
    for e in doc["headers"]:
        assert {"index", "section", "type", "type_id", "kind", "tlv"} <= set(e)
        for key in ("gpa", "compatibility_mask", "flags", "policy"):
            if key in e:
                assert isinstance(e[key], str) and e[key].startswith("0x"), (e["kind"], key)
    filtered = json.loads(run_cli("dump", "--json", "--platform", "snp", str(VECTORS / "snp_v1.igvm")).stdout)
    assert filtered["platform_filter"] == "SEV_SNP"


def test_dump_json_warnings() -> None:
    doc = json.loads(run_cli("dump", "--json", str(NEGATIVE / "page_flags_reserved_OK.igvm")).stdout)
    assert any("reserved flag" in w for w in doc["warnings"])
    page = next(e for e in doc["headers"] if e["type"] == "PAGE_DATA" and e["reserved_flags"] != "0x0")
    assert page["reserved_flags"] == "0x80000000"


# --------------------------------------------------------------------------- dump (text)


def test_dump_text_vbs_registers() -> None:
    proc = run_cli("dump", str(VECTORS / "vbs_v1_reloc.igvm"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "registers=10" in out
    for reg in ("Rip", "Rsp", "Rflags", "Cr0", "Cr3", "Cr4", "Efer", "Cs", "Ds", "Gdtr"):
        assert any(line.strip().startswith(reg + " ") for line in out.splitlines()), reg
    assert "selector=0x8 attributes=0xa09b" in out
    assert "base=0x206000 limit=0x17" in out


def test_dump_text_snp_and_native_registers() -> None:
    snp = run_cli("dump", str(VECTORS / "snp_v1.igvm")).stdout
    assert "rip=0xfff0" in snp and "cs.selector=0xf000" in snp and "sev_features=0x1" in snp
    native = run_cli("dump", str(VECTORS / "native_v2_minimal.igvm")).stdout
    assert "rip=0x1000" in native and "rsp=0x8000" in native and "code_selector=0x8" in native


def test_dump_text_layout() -> None:
    out = run_cli("dump", str(VECTORS / "snp_v1.igvm")).stdout
    lines = out.splitlines()
    header_lines = [ln for ln in lines if ln.startswith("[")]
    assert len(header_lines) == 14
    assert header_lines[0].startswith("[ 0] platform  SUPPORTED_PLATFORM")
    assert "[ 5] directive PAGE_DATA          gpa=0x3000 mask=0x1 flags=unmeasured type=NORMAL data=none" in lines
    assert any(ln.startswith("[ 7] directive PAGE_DATA") and "type=CPUID_DATA data=4096B sha256=118bbb36f373…" in ln
               for ln in lines)
    # The type column is aligned: every summary starts at the same column.
    starts = {re.match(r"^\[\s*\d+\] \S+\s+\S+\s+", ln).end() for ln in header_lines}
    assert len(starts) == 1
    assert lines[-1].startswith("counts: 1 platform, 1 initialization, 12 directive")
