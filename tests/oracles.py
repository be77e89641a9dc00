"""The reference implementations as oracles for every IGVM file the test session builds.

Two prebuilt tools from ``../shared/tools/oracles`` (see its README.md) judge a file:

* ``igvm-oracle`` (microsoft/igvm at e6c3ff1): ``parse`` must accept it, ``roundtrip`` must
  re-serialize it byte for byte, and ``measure --json`` must give the SEV-SNP, TDX and VBS
  digests we compute under the ``hyperv`` profile (the crate's own model; TDX single pass);
* COCONUT ``igvmmeasure`` (svsm f4bc4bc, igvm 0.4.0), for files with an SEV-SNP platform: its
  digest (``measure -i``) and its ``--native-zero`` digest must equal our ``igvmmeasure`` and
  ``igvmmeasure-native-zero`` profiles.

:class:`OracleRecorder` (registered by ``conftest.py``) collects the files the library makes:
every build's file model, every file ``sign`` makes, and every IGVM file any process of the
session publishes as an output (CLI and SCons subprocesses included), each stored once per
content.  At the end of the session every file is checked; any disagreement, a missing tool, or
(in a run of the whole suite) fewer files than :data:`MIN_FILES` fails the run, and the counts
are printed in the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from igvm_builder.assemble import pipeline
from igvm_builder.errors import IgvmError, MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.blob import as_view
from igvm_builder.format.defs import PlatformType
from igvm_builder.io import RECORD_OUTPUTS_ENV
from igvm_builder.measure import measure_platform
from igvm_builder.measure.engine import MAX_AREA_BYTES
from igvm_builder.sign import image as sign_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOOLS = SHARED / "tools" / "oracles"
IGVM_ORACLE = TOOLS / "igvm-oracle"
IGVMMEASURE = TOOLS / "igvmmeasure"

#: A run of the whole suite must have checked at least this many distinct files (it makes
#: about 175, 155 of them with an SEV-SNP platform) and this many with an SEV-SNP platform: a
#: recorder that silently stopped seeing the library's outputs fails the run instead of passing
#: with nothing checked.
MIN_FILES = 150
MIN_SNP_FILES = 120

#: Platforms whose digest igvm-oracle computes (the crate's measurement module).
_ORACLE_MEASURED = {"SEV_SNP": PlatformType.SEV_SNP, "TDX": PlatformType.TDX,
                    "VSM_ISOLATION": PlatformType.VSM_ISOLATION}


def require_tools() -> None:
    """Raise (never skip) when an oracle is missing: CI must have them."""
    for tool in (IGVM_ORACLE, IGVMMEASURE):
        if not os.access(tool, os.X_OK):
            raise RuntimeError(f"{tool} is missing or not executable: the oracle checks need ../shared/tools")


def _run(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, timeout=120,
                              check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([os.fspath(a) for a in argv], -1, "", "timed out after 120 s")


def _huge_area(f: IgvmFile) -> int | None:
    """The size of an inserted parameter area too large to measure (over 4 GiB: our engine refuses
    it, the crate would hash every one of its pages, up to 2^52 of them)."""
    sizes = {h.parameter_area_index: h.number_of_bytes for h in f.directives if isinstance(h, H.ParameterArea)}
    for h in f.directives:
        if isinstance(h, H.ParameterInsert) and sizes.get(h.parameter_area_index, 0) > MAX_AREA_BYTES:
            return sizes[h.parameter_area_index]
    return None


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return f"exit {proc.returncode}: {text[0] if text else '(no output)'}"


@dataclass
class Verdict:
    """What the oracles said about one file."""

    path: Path
    platforms: tuple[str, ...] = ()
    digests_compared: int = 0
    igvmmeasure_checked: bool = False
    #: igvmmeasure's igvm 0.4.0 refused the file, as our parser's warning predicted
    rejected_by_0_4_0: str | None = None
    #: why the digests were not compared (parse and roundtrip were)
    unmeasurable: str | None = None
    problems: list[str] = field(default_factory=list)


def _ours(f: IgvmFile, ptype: PlatformType, loader: str) -> str:
    try:
        return measure_platform(f, ptype, loader=loader).hex or "none"
    except MeasurementError as exc:
        return f"error: {exc}"


def check_file(path: str | os.PathLike[str]) -> Verdict:
    """Run both oracles over ``path`` and compare them with our parser and measurements."""
    path = Path(path)
    v = Verdict(path)
    # ``roundtrip`` parses with the very call ``parse`` makes (``IgvmFile::new_from_binary(bytes,
    # None)``; exit 1 with ``error: ...`` when it rejects the file), then serializes and compares.
    # ``parse`` itself also prints the whole parsed file in Rust's debug notation, which takes
    # seconds for a kernel-sized file, so the verdict is taken from here.
    proc = _run(IGVM_ORACLE, "roundtrip", path)
    lines = proc.stdout.splitlines()
    parsed = any(line.startswith(("identical", "differ", "serialize failed")) for line in lines) \
        or "(serialize)" in proc.stdout + proc.stderr
    if not parsed:
        v.problems.append(f"igvm-oracle (parse) rejects it ({_why(proc)})")
        return v
    if proc.returncode != 0 or not proc.stdout.startswith("identical"):
        v.problems.append(f"igvm-oracle roundtrip is not byte-identical ({_why(proc)})")
    try:
        f = IgvmFile.load(path)
    except IgvmError as exc:
        v.problems.append(f"our parser rejects what the reference crate accepts: {exc}")
        return v
    v.platforms = tuple(p.platform_type.name for p in f.platforms)
    huge = _huge_area(f)
    if huge is not None:
        v.unmeasurable = f"a parameter area of {huge:#x} bytes is inserted"
        return v
    proc = _run(IGVM_ORACLE, "measure", path, "--json")
    rows = []
    for line in proc.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            v.problems.append(f"igvm-oracle measure: {line} ({_why(proc)})")
    if len(rows) != len(f.platforms):
        v.problems.append(f"igvm-oracle measure printed {len(rows)} platforms, the file has {len(f.platforms)} "
                          f"({_why(proc)})")
    for row in rows:
        ptype = _ORACLE_MEASURED.get(row["platform"])
        if ptype is None:
            continue
        theirs = row["digest"] or f"error: {row.get('error')}"
        ours = _ours(f, ptype, "hyperv")
        v.digests_compared += 1
        if theirs.startswith("error") and ours.startswith("error"):
            continue  # both refuse to measure it (e.g. SNP without a GUEST_POLICY)
        if theirs != ours:
            v.problems.append(f"{row['platform']} digest: igvm-oracle {theirs}, ours (hyperv) {ours}")
    if f.platform(PlatformType.SEV_SNP) is not None:
        v.igvmmeasure_checked = True
        old_crate = [w for w in f.warnings if "0.4.0" in w]  # what igvm 0.4.0 (igvmmeasure's) rejects
        for options, loader in (((), "igvmmeasure"), (("--native-zero",), "igvmmeasure-native-zero")):
            proc = _run(IGVMMEASURE, *options, path, "measure", "-i", "-b")
            if proc.returncode == 1 and old_crate and proc.stderr.startswith("Error: Invalid"):
                v.rejected_by_0_4_0 = f"{proc.stderr.strip()} ({old_crate[0]})"  # our parser's warning said so
                continue
            theirs = proc.stdout.strip().lower() if proc.returncode == 0 else f"error: {_why(proc)}"
            ours = _ours(f, PlatformType.SEV_SNP, loader)
            if theirs != ours:
                v.problems.append(f"SEV_SNP digest: igvmmeasure {' '.join(options)} {theirs}, ours ({loader}) "
                                  f"{ours}")
    return v


def _check_safely(path: Path) -> Verdict:
    try:
        return check_file(path)
    except Exception as exc:  # a crash of the check is a failure of that file, not of the session
        return Verdict(path, problems=[f"the check itself failed: {exc!r}"])


def check_files(paths: Iterable[Path], workers: int | None = None) -> list[Verdict]:
    """:func:`check_file` over ``paths``, a few at a time (the tools run as subprocesses)."""
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(_check_safely, paths))


# --------------------------------------------------------------------------- session recorder

_LAYOUT = IgvmFile.layout
_OPEN = open
_CLOCK = time.perf_counter


class OracleRecorder:
    """pytest plugin: records every IGVM file the session's builds produce, checks them at the end.

    Recorded: the model of every build in this process (``build._build_model``, which serves
    ``build()``, ``build_file()`` and so ``repro`` and the SCons tool when run in process), every
    signed or unsigned file ``sign`` makes (``sign.image._insert`` / ``remove_id_block``), and
    every IGVM file published as an output by any process of the session, CLI and SCons
    subprocesses included (the library copies those when ``IGVM_BUILDER_RECORD_OUTPUTS`` names
    a directory: :data:`igvm_builder.io.RECORD_OUTPUTS_ENV`).  Models tests assemble by hand
    (property tests, negative cases) are not library outputs and are not recorded.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        # under pytest's base temporary directory, which pytest rotates: a killed session leaves
        # no store behind for good
        factory = getattr(config, "_tmp_path_factory", None)
        base = factory.getbasetemp() if factory is not None else None
        self.store = Path(tempfile.mkdtemp(prefix="igvm-oracle-store-", dir=base))
        self.published = self.store / "published"
        self.published.mkdir()
        self.files: dict[str, tuple[Path, str]] = {}  # sha256 -> (stored file, who made it)
        self.lock = threading.Lock()
        self.deselected = 0
        self.modules: set[str] = set()
        self.lines: list[str] = []
        self.failed = False
        self._env_before = os.environ.get(RECORD_OUTPUTS_ENV)
        os.environ[RECORD_OUTPUTS_ENV] = str(self.published)  # inherited by subprocesses
        self._patches: list[tuple[Any, str, Any]] = []
        self._wrap(pipeline, "_build_model", lambda result: result[0])
        self._wrap(sign_image, "_insert", lambda result: result)
        self._wrap(sign_image, "remove_id_block", lambda result: result[0])

    def _wrap(self, module: Any, name: str, pick: Any) -> None:
        original = getattr(module, name)
        recorder = self

        def recording(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            recorder.record(pick(result))
            return result

        self._patches.append((module, name, original))
        setattr(module, name, recording)

    def _unwrap(self) -> None:
        for module, name, original in self._patches:
            setattr(module, name, original)
        if self._env_before is None:
            os.environ.pop(RECORD_OUTPUTS_ENV, None)
        else:
            os.environ[RECORD_OUTPUTS_ENV] = self._env_before

    def record(self, f: IgvmFile) -> None:
        """Store the canonical bytes of ``f`` once per content.  Serialized with the ``layout``
        and ``open`` of the start of the session: tests that spy on or break those (a full disk)
        must not see the recorder."""
        who = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        head, blobs = _LAYOUT(f)[:2]
        digest = hashlib.sha256(head)
        for b in blobs:
            digest.update(as_view(b))
        key = digest.hexdigest()
        with self.lock:
            if key in self.files:
                return
            target = self.store / f"{key}.igvm"
            self.files[key] = (target, who)
        with _OPEN(target, "wb") as out:
            out.write(head)
            for b in blobs:
                out.write(as_view(b))

    def _collect_published(self) -> int:
        """The outputs processes published; returns how many were not already recorded."""
        new = 0
        for path in sorted(self.published.glob("*.igvm")):
            if path.stem not in self.files:
                note = path.with_suffix(".path")
                self.files[path.stem] = (path, note.read_text() if note.exists() else "?")
                new += 1
        return new

    # ---- hooks

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += len(items)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.modules = {os.path.basename(str(item.path)) for item in items}

    def _whole_suite(self) -> bool:
        tests = {p.name for p in Path(__file__).parent.glob("test_*.py")}
        return not self.deselected and tests <= self.modules

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            return
        try:
            self._check(session)
        finally:
            self._unwrap()
        if self.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        else:
            shutil.rmtree(self.store, ignore_errors=True)

    def _check(self, session: pytest.Session) -> None:
        out = self.lines
        try:
            require_tools()
        except RuntimeError as exc:
            out.append(f"FAILED: {exc}")
            self.failed = True
            return
        published = self._collect_published()
        producers = {path: test for path, test in self.files.values()}
        started = _CLOCK()
        verdicts = check_files(sorted(producers))
        seconds = _CLOCK() - started
        snp = sum(v.igvmmeasure_checked for v in verdicts)
        by_platform: dict[str, int] = {}
        for v in verdicts:
            for p in v.platforms:
                by_platform[p] = by_platform.get(p, 0) + 1
        bad = [v for v in verdicts if v.problems]
        out.append(f"{len(verdicts)} distinct IGVM files checked by igvm-oracle (parse, roundtrip, "
                   f"{sum(v.digests_compared for v in verdicts)} SNP/TDX/VBS digests vs the hyperv profile); "
                   f"{snp} SEV-SNP files by igvmmeasure (default and --native-zero); {seconds:.1f} s")
        out.append("platforms: " + ", ".join(f"{k} {n}" for k, n in sorted(by_platform.items())))
        out.append(f"of them {published} seen only as published outputs (CLI and SCons subprocesses); "
                   f"{sum(v.unmeasurable is not None for v in verdicts)} not measured (parameter area over 4 GiB); "
                   f"{sum(v.rejected_by_0_4_0 is not None for v in verdicts)} refused by igvmmeasure's igvm 0.4.0 "
                   "as our parser's warning predicts")
        for v in bad:
            self.failed = True
            out.append(f"DISAGREE {v.path.name} (made by {producers[v.path]}):")
            out += [f"    {p}" for p in v.problems]
        complete = self._whole_suite() and not session.testsfailed and not session.shouldstop
        if complete and (len(verdicts) < MIN_FILES or snp < MIN_SNP_FILES):
            self.failed = True
            out.append(f"FAILED: a run of the whole suite checked only {len(verdicts)} files ({snp} SEV-SNP); "
                       f"expected at least {MIN_FILES} ({MIN_SNP_FILES}): the recorder misses the library's "
                       "outputs")
        if self.failed:
            out.append(f"the files are kept in {self.store}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.lines:
            return
        terminalreporter.section("reference-implementation oracles (igvm-oracle, igvmmeasure)",
                                 red=self.failed, green=not self.failed)
        for line in self.lines:
            terminalreporter.line(line)
