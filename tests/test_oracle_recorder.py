"""The session's oracle pass itself (``tests/oracles.py``) can fail: it sees the library's outputs,
reports a disagreement, a file the crate rejects, and a whole-suite run that recorded too little."""

from __future__ import annotations

import os
import random
import shutil
import types
from pathlib import Path

import oracles
import pytest
from test_build_helpers import MEMTEST, build_bytes, cli, config, q, write_config

from igvm_builder.format import IgvmFile
from igvm_builder.measure.result import Measurement


def _body(tmp_path: Path, platforms: str = '"native", "snp"') -> str:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(random.Random(os.urandom(8)).randbytes(5000))  # content no other test builds
    return f'[image]\nplatforms = [{platforms}]\n[kernel]\npath = {q(MEMTEST)}\ninitrd = {q(blob)}\n'


def _recorder(request: pytest.FixtureRequest) -> oracles.OracleRecorder:
    plugin = request.config.pluginmanager.get_plugin("igvm-oracle-recorder")
    assert isinstance(plugin, oracles.OracleRecorder)
    return plugin


def test_builds_in_process_and_in_subprocesses_are_recorded(tmp_path: Path, request: pytest.FixtureRequest,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    rec = _recorder(request)
    assert rec.store.parent == tmp_path_factory.getbasetemp()  # rotated by pytest, even after a killed run
    before = len(rec.files)
    data = build_bytes(config(tmp_path, _body(tmp_path)))
    assert len(rec.files) == before + 1
    stored, who = next(v for v in rec.files.values() if v[0].read_bytes() == data)
    assert "test_builds_in_process_and_in_subprocesses_are_recorded" in who and stored.exists()
    published_before = set(rec.published.glob("*.igvm"))
    cfg = write_config(tmp_path, _body(tmp_path), "sub.toml")
    proc = cli("build", str(cfg), "-o", str(tmp_path / "sub.igvm"))
    assert proc.returncode == 0, proc.stderr
    new = set(rec.published.glob("*.igvm")) - published_before
    assert [p.read_bytes() for p in new] == [(tmp_path / "sub.igvm").read_bytes()]
    assert Path(new.pop().with_suffix(".path").read_text()) == tmp_path / "sub.igvm"


def test_a_digest_disagreement_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.igvm"
    path.write_bytes(build_bytes(config(tmp_path, _body(tmp_path, '"native", "snp", "tdx"'))))
    assert oracles.check_file(path).problems == []
    real = oracles.measure_platform

    def off_by_one_bit(*args: object, **kwargs: object) -> Measurement:
        m = real(*args, **kwargs)  # type: ignore[arg-type]
        assert m.digest is not None
        return Measurement(m.platform, m.compatibility_mask, m.algorithm, bytes([m.digest[0] ^ 1]) + m.digest[1:])

    monkeypatch.setattr(oracles, "measure_platform", off_by_one_bit)
    problems = oracles.check_file(path).problems
    assert [p.split(":")[0] for p in problems] == ["SEV_SNP digest", "TDX digest", "SEV_SNP digest", "SEV_SNP digest"]
    assert "igvmmeasure --native-zero" in problems[-1]


def test_a_file_the_crate_rejects_is_reported(tmp_path: Path) -> None:
    data = bytearray(build_bytes(config(tmp_path, _body(tmp_path))))
    data[20] ^= 0xFF  # the checksum
    path = tmp_path / "bad.igvm"
    path.write_bytes(bytes(data))
    (problem,) = oracles.check_file(path).problems
    assert problem.startswith("igvm-oracle (parse) rejects it")


def test_a_whole_suite_run_with_too_few_files_fails(monkeypatch: pytest.MonkeyPatch,
                                                    request: pytest.FixtureRequest) -> None:
    rec = oracles.OracleRecorder(request.config)  # a second recorder: undo its wrapping at once
    rec._unwrap()  # (and gives the session recorder's output directory back to the environment)
    assert os.environ[oracles.RECORD_OUTPUTS_ENV] == str(_recorder(request).published)
    monkeypatch.setattr(rec, "_whole_suite", lambda: True)
    session = types.SimpleNamespace(testsfailed=0, shouldstop=False)
    rec.record(IgvmFile.from_bytes((oracles.SHARED / "vectors" / "igvm" / "snp_v1.igvm").read_bytes()))
    rec._check(session)  # type: ignore[arg-type]
    shutil.rmtree(rec.store)
    assert rec.failed
    assert any(line.startswith("FAILED: a run of the whole suite checked only 1 files") for line in rec.lines)
