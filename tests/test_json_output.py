"""Every command's ``--json`` output validates against its schema in docs/JSON.md.

The schemas are read from the document itself (the ``<!-- schema: NAME -->`` blocks), so
the documentation and the test cannot drift apart.  Each command runs on a real build (the
kernel project of test_repro, signed with a fresh P-384 key), in its passing and failing
outcomes where it has both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cli_release import make_release, run

DOC = Path(__file__).resolve().parents[1] / "docs" / "JSON.md"


def schemas() -> dict[str, Any]:
    text = DOC.read_text()
    found = re.findall(r"<!-- schema: ([\w-]+) -->\s*```json\n(.*?)\n```", text, re.DOTALL)
    out = {name: json.loads(body) for name, body in found}
    assert len(out) == len(found), "a command has two schemas"
    return out


SCHEMAS = schemas()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_release(tmp_path_factory.mktemp("release"))


def validated(command: str, rc_expected: int, *argv: object) -> Any:
    rc, out, err = run(command, *argv, "--json")
    assert rc == rc_expected, (command, argv, rc, err)
    doc = json.loads(out)
    jsonschema.Draft202012Validator(SCHEMAS[command]).validate(doc)
    assert "None" not in out and "True" not in out and "False" not in out  # no Python reprs
    return doc


def test_every_reporting_command_has_a_valid_schema() -> None:
    assert set(SCHEMAS) == {"build", "sign", "verify", "check", "lint", "repro", "verify-release", "measure",
                            "diff"}
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_build_and_sign(release: dict[str, Path], tmp_path: Path) -> None:
    doc = validated("build", 0, release["config"], "-o", tmp_path / "b.igvm")
    assert doc["loader"] == "qemu" and set(doc["platforms"]) == {"native", "snp", "tdx"}
    assert doc["sha256"] == json.loads(release["ref"].read_text())["file"]["sha256"]
    doc = validated("sign", 0, release["igvm"], "-o", tmp_path / "s.igvm", "--id-key", release["key"],
                    "--config", release["config"])
    assert (doc["action"], doc["loader"], doc["test_only_key"]) == ("added", "qemu", False)
    doc = validated("sign", 0, tmp_path / "s.igvm", "-o", tmp_path / "u.igvm", "--remove")
    assert doc == {"output": str(tmp_path / "u.igvm"), "action": "removed"}
    doc = validated("sign", 0, release["igvm"], "--export-tbs", tmp_path / "t.json", "--id-key", release["key"])
    assert doc["action"] == "exported" and doc["loader"] == "hyperv" and doc["loader_from"] == "default"


def test_verify(release: dict[str, Path]) -> None:
    doc = validated("verify", 0, release["signed"], "--reference", release["ref"])
    assert doc["ok"] and doc["loader"] == "qemu" and doc["reference_checked"]
    doc = validated("verify", 1, release["igvm"])
    assert not doc["ok"] and [f["kind"] for f in doc["failures"]] == ["missing"]


def test_check_lint_measure_diff(release: dict[str, Path], tmp_path: Path) -> None:
    doc = validated("check", 0, release["igvm"])
    assert doc["valid"] and doc["platforms"] == ["NATIVE", "SEV_SNP", "TDX"] and doc["error"] is None
    bad = tmp_path / "bad.igvm"
    bad.write_bytes(release["igvm"].read_bytes()[:100])
    doc = validated("check", 1, bad)
    assert not doc["valid"] and doc["error"]
    validated("lint", 0, release["igvm"], "--loader", "qemu")
    doc = validated("measure", 0, release["igvm"])
    assert [p["name"] for p in doc["platforms"]] == ["native", "snp", "tdx"]
    validated("measure", 0, release["igvm"], "--all-loaders")
    assert validated("diff", 0, release["igvm"], release["igvm"])["identical"]
    assert not validated("diff", 1, release["igvm"], release["signed"])["identical"]


def test_repro_and_verify_release(release: dict[str, Path], tmp_path: Path) -> None:
    assert validated("repro", 0, release["config"], "--in-process")["result"] == "reproducible"
    doc = validated("verify-release", 0, release["config"], "--reference", release["ref"], "--igvm",
                    release["igvm"])
    assert doc["ok"] and doc["checks"]
    other = tmp_path / "other.igvm"
    other.write_bytes(release["signed"].read_bytes())
    data = bytearray(other.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    doc = validated("verify-release", 1, release["config"], "--reference", release["ref"], "--igvm", other)
    assert not doc["ok"]
