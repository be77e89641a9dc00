"""One exit-code table for every command (igvm_builder.cli.EXIT_CODES, docs/JSON.md):
0 ok, 1 the check ran and failed, 2 usage error or unusable input; 141 quietly when the
reader closes standard output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_release import make_release, run

from igvm_builder import cli
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType


@pytest.fixture(scope="module")
def r(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = make_release(tmp_path_factory.mktemp("release"))
    bad = paths["igvm"].parent / "truncated.igvm"
    bad.write_bytes(paths["igvm"].read_bytes()[:100])
    paths["bad"] = bad
    paths["missing"] = paths["igvm"].parent / "missing.igvm"
    broken = paths["igvm"].parent / "broken.toml"
    broken.write_text("[image]\nplatforms = [\"snp\"]\nloader = \"vmware\"\n")
    paths["broken"] = broken
    return paths


# (command, arguments with {name} placeholders, expected status)
TABLE = [
    ("check", ["{igvm}"], 0),
    ("check", ["{bad}"], 1),
    ("check", ["{missing}"], 2),
    ("check", ["--platform", "vbs", "{igvm}"], 1),
    ("check", ["--bogus", "{igvm}"], 2),
    ("dump", ["{igvm}"], 0),
    ("dump", ["{bad}"], 2),
    ("dump", ["{missing}"], 2),
    ("measure", ["{igvm}"], 0),
    ("measure", ["{igvm}", "--loader", "QEMU"], 0),
    ("measure", ["{igvm}", "--loader", "vmware"], 2),
    ("measure", ["{igvm}", "--platform", "vbs"], 2),
    ("measure", ["{missing}"], 2),
    ("build", ["{config}", "-o", "{tmp}/o.igvm"], 0),
    ("build", ["{broken}", "-o", "{tmp}/o.igvm"], 2),
    ("build", ["{missing}", "-o", "{tmp}/o.igvm"], 2),
    ("build", ["{config}"], 2),
    ("lint", ["{igvm}", "--loader", "qemu"], 0),
    ("lint", ["{missing}"], 2),
    ("sign", ["{igvm}", "-o", "{tmp}/s.igvm", "--id-key", "{key}"], 0),
    ("sign", ["{igvm}", "-o", "{tmp}/s.igvm"], 2),
    ("sign", ["{igvm}", "-o", "{tmp}/s.igvm", "--id-key", "{missing}"], 2),
    ("sign", ["{missing}", "-o", "{tmp}/s.igvm", "--id-key", "{key}"], 2),
    ("verify", ["{signed}", "--loader", "qemu"], 0),
    ("verify", ["{signed}", "--loader", "QEMU", "--id-key-digest", "00" * 48], 1),
    ("verify", ["{igvm}"], 1),
    ("verify", ["{missing}"], 2),
    ("verify", ["{signed}", "--reference", "{missing}"], 2),
    ("diff", ["{igvm}", "{igvm}"], 0),
    ("diff", ["{igvm}", "{signed}"], 1),
    ("diff", ["{igvm}", "{missing}"], 2),
    ("repro", ["{config}", "--in-process"], 0),
    ("repro", ["{missing}", "--in-process"], 2),
    ("verify-release", ["{config}", "--reference", "{ref}", "--igvm", "{igvm}"], 0),
    ("verify-release", ["{config}", "--reference", "{ref}", "--igvm", "{bad}"], 1),
    ("verify-release", ["{config}", "--reference", "{missing}"], 2),
    ("verify-release", ["{config}"], 2),
]


@pytest.mark.parametrize(("command", "argv", "expected"), TABLE,
                         ids=[f"{c}-{' '.join(a)}-{e}" for c, a, e in TABLE])
def test_exit_code_table(r: dict[str, Path], tmp_path: Path, command: str, argv: list[str], expected: int) -> None:
    args = [a.format(tmp=tmp_path, **{k: str(v) for k, v in r.items()}) for a in argv]
    rc, out, err = run(command, *args)
    assert rc == expected, (command, args, out, err)
    assert expected in cli.EXIT_CODES
    if rc == 2:
        assert "Traceback" not in err and err.strip(), err
        assert out == ""
    assert "None" not in out + err and "False" not in out + err  # no Python reprs


def test_every_command_is_in_the_table() -> None:
    assert {c for c, _, _ in TABLE} == set(cli.COMMANDS)
    for command in cli.COMMANDS:
        statuses = {e for c, _, e in TABLE if c == command}
        assert {0, 2} <= statuses, command


def test_changed_input_fails_verify_release(r: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "proj"
    shutil.copytree(r["config"].parents[1], cfg)
    copy = cfg / "configs" / "hello.toml"
    copy.write_text(copy.read_text().replace("console=ttyS0", "console=ttyS1"))
    rc, out, _ = run("verify-release", copy, "--reference", r["ref"])
    assert rc == 1 and "config hello.toml: sha256 " in out and "None" not in out and "False" not in out


def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    pages = [H.PageData(gpa=0x10000 + i * 0x2000, compatibility_mask=1) for i in range(4000)]  # no runs
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.NATIVE),),
                 directives=tuple(pages))
    big = tmp_path / "big.igvm"  # its JSON dump (2.6 MB) is more than any pipe buffer holds
    big.write_bytes(f.to_bytes())
    proc = subprocess.Popen([sys.executable, "-m", "igvm_builder", "dump", "--json", str(big)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == cli.EXIT_PIPE_CLOSED
    assert err == b""


def test_one_default_loader_and_loader_names_in_any_case(tmp_path: Path) -> None:
    from igvm_builder import config
    from igvm_builder.commands import _common
    from igvm_builder.measure import profiles

    assert profiles.DEFAULT_LOADER == config.DEFAULT_LOADER == _common.DEFAULT_LOADER == cli.DEFAULT_LOADER
    assert cli.DEFAULT_LOADER == "hyperv"
    assert set(_common.LOADERS) == set(profiles.PROFILES)
    assert set(_common.BUILD_LOADERS) == set(config.BUILD_LOADERS)
    rc, out, _ = run("--help")
    assert rc == 0 and "default SEV-SNP loader profile of every command is hyperv" in " ".join(out.split())
    cfg = tmp_path / "c.toml"
    (tmp_path / "b.bin").write_bytes(bytes(4096))
    cfg.write_text('[image]\nplatforms = ["snp"]\nloader = "Cloud-Hypervisor"\n\n[[blob]]\npath = "b.bin"\n'
                   'gpa = 0x100000\n')
    assert config.load_config(cfg).loader == "cloud-hypervisor"
    assert profiles.get_profile("HyperV").name == "hyperv"


def test_verify_release_reference_mismatch_is_spelled_as_json(r: dict[str, Path], tmp_path: Path) -> None:
    import json

    ref = json.loads(r["ref"].read_text())
    ref["platforms"]["snp"]["id_block"]["present"] = True  # a published value the rebuild does not have
    edited = tmp_path / "ref.json"
    edited.write_text(json.dumps(ref))
    rc, out, _ = run("verify-release", r["config"], "--reference", edited)
    assert rc == 1 and "id_block.present false != published true" in out
