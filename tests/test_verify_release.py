"""Release verification (``igvm-builder verify-release``, igvm_builder.repro.verify_release).

A release is made with ``igvm-builder build --reference-values``; then the tree is left
alone (it verifies), the kernel is rebuilt from changed source (named first among the
problems), or a config value is changed (the config's hash first, then the file and the
measurements, and with ``--igvm`` a semantic diff naming the command-line page).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_repro import compile_kernel, make_project  # shared fixtures' helpers (tests/ is on sys.path)

from igvm_builder.cli import main
from igvm_builder.errors import VerificationError
from igvm_builder.repro import verify_release

CMDLINE_GPA = 0x3000  # the kernel-launch layout (igvm_builder/assemble/plan.py)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_kernel(tmp_path_factory.mktemp("kernel") / "hello.elf")


@pytest.fixture
def release(tmp_path: Path, kernel: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    cfg = make_project(tmp_path / "proj", kernel)
    dist = tmp_path / "dist"
    dist.mkdir()
    igvm, ref = dist / "hello.igvm", dist / "hello.json"
    assert main(["build", str(cfg), "-o", str(igvm), "--reference-values", str(ref), "-q"]) == 0
    capsys.readouterr()
    return {"config": cfg, "igvm": igvm, "ref": ref, "kernel": tmp_path / "proj" / "build" / "hello.elf"}


def test_unchanged_tree_verifies(release: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, ref, igvm = (str(release[k]) for k in ("config", "ref", "igvm"))
    assert main(["verify-release", cfg, "--reference", ref, "--igvm", igvm]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cfg}: release verified against {ref}: sha256 ")
    assert out.count("\n") == 1
    report = verify_release(cfg, ref, igvm=igvm)
    assert report.ok and not report.problems
    kinds = [c.kind for c in report.checks]
    assert kinds.count("input") == 4  # config, common.toml (included), kernel, blob
    assert kinds.count("measurement") == 3  # native, snp, tdx
    assert kinds.index("input") < kinds.index("file") < kinds.index("measurement") < kinds.index("igvm")


def test_changed_kernel_named_first(release: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    compile_kernel(tmp_path / "k2" / "hello.elf", variant="2").replace(release["kernel"])
    cfg, ref = str(release["config"]), str(release["ref"])
    assert main(["verify-release", cfg, "--reference", ref]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{cfg}: release does NOT match {ref}:"
    assert lines[1].startswith("  kernel ../build/hello.elf: sha256 ") and " != published " in lines[1]
    assert lines[2].startswith("  file sha256 ")
    assert any(line.startswith("  platform sev_snp: measurement") or line.startswith("  platform snp:")
               for line in lines[3:]), lines
    report = verify_release(cfg, ref)
    assert [c.name for c in report.problems if c.kind == "input"] == ["../build/hello.elf"]


def test_changed_config_value(release: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = release["config"]
    cfg.write_text(cfg.read_text().replace('cmdline = "console=ttyS0"', 'cmdline = "console=ttyS0 quiet"'))
    report = verify_release(cfg, release["ref"], igvm=release["igvm"])
    assert not report.ok
    msgs = [c.message for c in report.problems]
    assert msgs[0].startswith("config hello.toml: sha256 ") and " != published " in msgs[0]
    assert not any(m.startswith("kernel") for m in msgs)
    assert any(c.kind == "file" for c in report.problems)
    assert {c.kind for c in report.problems} >= {"input", "file", "measurement"}
    assert report.diff is not None
    assert [(r.start, r.aspect) for r in report.diff.pages] == [(CMDLINE_GPA, "data")]
    assert main(["verify-release", str(cfg), "--reference", str(release["ref"]), "--igvm",
                 str(release["igvm"])]) == 1
    out = capsys.readouterr().out
    assert "semantic diff (released file -> rebuild):" in out
    assert f"page {CMDLINE_GPA:#x} (1 page) differs in data" in out


def test_json_and_released_file_mismatch(release: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "tampered.igvm"
    data = bytearray(release["igvm"].read_bytes())
    other.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))  # last byte: file data, invalid or not
    assert main(["verify-release", str(release["config"]), "--reference", str(release["ref"]), "--igvm",
                 str(other), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"config", "reference", "ok", "sha256", "checks", "diff"}
    assert doc["ok"] is False
    bad = [c for c in doc["checks"] if not c["ok"]]
    assert bad and all(c["kind"] == "igvm" for c in bad)
    assert set(bad[0]) == {"kind", "name", "ok", "message"}


def test_missing_input_and_bad_reference(release: dict[str, Path], tmp_path: Path) -> None:
    blob = release["config"].parent / "data" / "blob.bin"
    blob.unlink()
    report = verify_release(release["config"], release["ref"])
    assert report.problems[0].message.startswith("blob@0x800000 data/blob.bin: missing or unreadable")
    assert report.problems[-1].kind == "build"
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(VerificationError, match="not a JSON object"):
        verify_release(release["config"], bad)


def test_release_built_elsewhere(release: dict[str, Path]) -> None:
    """An input keyed by a path that climbs out of another checkout still matches."""
    doc = json.loads(release["ref"].read_text())
    entry = doc["inputs"].pop("../build/hello.elf")
    doc["inputs"]["../../../../elsewhere/build/hello.elf"] = {**entry, "path": "../../../../elsewhere/build/hello.elf"}
    report = verify_release(release["config"], doc)
    assert report.ok, report.render_text()
    kernel = next(c for c in report.checks if c.name == "../build/hello.elf")
    assert "(published as ../../../../elsewhere/build/hello.elf)" in kernel.message


def test_changed_policy_in_include(release: dict[str, Path]) -> None:
    """The SNP policy is no part of the launch digest but is a reference value: it is checked too."""
    common = release["config"].parent / "common.toml"
    common.write_text(common.read_text().replace("policy = 0x30000", "policy = 0xb0000"))
    report = verify_release(release["config"], release["ref"])
    kinds = {c.kind: c for c in report.problems}
    assert report.problems[0].kind == "input" and report.problems[0].name == "common.toml"
    assert report.problems[0].message.startswith("include common.toml: sha256 ")
    assert "file" in kinds
    assert "platform snp: policy.value 0xb0000 != published 0x30000" in [c.message for c in report.problems]
    assert all(c.ok for c in report.checks if c.kind == "measurement")
