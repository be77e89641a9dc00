"""Issue #15, finding 7 for every entry point: a build killed while it writes leaves no temporary
file (at once, or after the next build of that output for SIGKILL on a file system without
``O_TMPFILE``) and the previous good output intact.

Killed here for real: a library-driven build (a Python subprocess calling ``build()`` with
``io.atomic_outputs``), a real ``scons -j2`` build and the CLI, with SIGTERM, SIGHUP and SIGKILL,
each with unnamed (``O_TMPFILE``) and named temporary files (``io.UNNAMED_TEMPORARIES = False``,
what a file system without ``O_TMPFILE`` gets).  The moment of the kill is made certain, not
guessed: the child pauses inside ``AtomicFile.write`` after its first write (a wrapper set up by
the child's own script or SConstruct) and says so on stdout.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igvm_builder import io
from igvm_builder.format import IgvmFile
from igvm_builder.io import AtomicFile, atomic_outputs, remove_stale_temporaries

REPO = Path(__file__).resolve().parents[1]
SITE_TOOLS = REPO / "site_scons" / "site_tools"

#: Set up in every child: its temporary-file kind, and a pause after the first write of an output.
_CHILD_PRELUDE = """\
import os, sys, time
import igvm_builder.io as _io
_io.UNNAMED_TEMPORARIES = os.environ["TEMPS"] == "unnamed"
_write = _io.AtomicFile.write
_paused = []
def _pausing_write(self, data):
    n = _write(self, data)
    pause = float(os.environ.get("PAUSE") or 0)
    if pause and not _paused:
        _paused.append(True)
        print("PAUSED", flush=True)
        time.sleep(pause)
    return n
_io.AtomicFile.write = _pausing_write
"""

_LIBRARY_BUILD = _CHILD_PRELUDE + """\
from igvm_builder.assemble import build
from igvm_builder.config import load_config
cfg, image, refs = sys.argv[1:4]
with _io.atomic_outputs(image, refs) as (out, refs_out):
    result = build(load_config(cfg), output=out)
    refs_out.write(result.reference_values.to_json().encode())
print("DONE", flush=True)
"""


def _config(directory: Path, payload: bytes) -> Path:
    (directory / "payload.bin").write_bytes(payload)
    cfg = directory / "x.toml"
    cfg.write_text('[image]\nplatforms = ["native", "snp"]\n\n[[blob]]\npath = "payload.bin"\ngpa = 0x200000\n')
    return cfg


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".igvm-"))


def _wait_for(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 120) -> bytes:
    """What ``proc`` printed up to and including the line ``marker``."""
    assert proc.stdout is not None
    seen = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while marker + b"\n" not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in time: {seen!r}"
        if sel.select(left):
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"ended before {marker!r}: {seen!r} {proc.stderr.read() if proc.stderr else b''!r}"
            seen += chunk
    return seen


def _kill_mid_write(argv: list[str], cwd: Path, env: dict[str, str], sig: signal.Signals
                    ) -> tuple[int, bytes, bytes]:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        before = _wait_for(proc, b"PAUSED")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, before + out, err


def _child_env(temps: str, pause: float) -> dict[str, str]:
    env = dict(os.environ, TEMPS=temps, PAUSE=str(pause), PYTHONUNBUFFERED="1")
    env.pop(io.RECORD_OUTPUTS_ENV, None)  # the kill tests' outputs are checked here, not by the oracles
    return env


# --------------------------------------------------------------------------- library-driven builds


@pytest.mark.parametrize("temps", ["unnamed", "named"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_library_build_killed_mid_write(tmp_path: Path, sig: signal.Signals, temps: str) -> None:
    script = tmp_path / "build.py"
    script.write_text(_LIBRARY_BUILD)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    image, refs = out_dir / "x.igvm", out_dir / "x.json"
    cfg = _config(tmp_path, b"old payload " * 4096)
    argv = [sys.executable, str(script), str(cfg), str(image), str(refs)]
    done = subprocess.run(argv, cwd=tmp_path, env=_child_env(temps, 0), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    good = image.read_bytes(), refs.read_bytes()

    _config(tmp_path, b"new payload " * 4096)
    rc, _, err = _kill_mid_write(argv, tmp_path, _child_env(temps, 600), sig)
    assert rc == -sig, (rc, err)  # a library sets no handler: the signal's default action ended it
    assert (image.read_bytes(), refs.read_bytes()) == good  # the previous good output, untouched
    left = _temporaries(out_dir)
    if temps == "unnamed":
        assert left == []  # nothing ever had a name
    else:
        assert len(left) == 2 and all(n.startswith(".igvm-") and n.endswith(".tmp") for n in left), left
        # the next build of these outputs (it holds their directory's lock) removes them
        done = subprocess.run(argv, cwd=tmp_path, env=_child_env(temps, 0), capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert _temporaries(out_dir) == []
        new = IgvmFile.load(image)
        assert json.loads(refs.read_bytes())["file"]["sha256"] == __import__("hashlib").sha256(
            image.read_bytes()).hexdigest()
        assert any(b"new payload" in bytes(getattr(h, "data", b""))[:16] for h in new.directives)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("temps", ["unnamed", "named"])
def test_cli_build_killed_by_sigkill(tmp_path: Path, temps: str) -> None:
    """SIGKILL cannot be handled: what the CLI's SIGTERM/SIGHUP cleanup (test_hostile_outputs.py)
    cannot do is left to the unnamed temporary file, or to the next build."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cfg = _config(tmp_path, b"payload " * 4096)
    refs = out_dir / "x.json"
    refs.write_text("previous\n")
    cli = _CHILD_PRELUDE + "from igvm_builder.cli import main\nsys.exit(main())\n"
    argv = [sys.executable, "-c", cli, "build", str(cfg), "-o", str(out_dir / "x.igvm"), "--reference-values",
            str(refs)]
    rc, _, err = _kill_mid_write(argv, tmp_path, _child_env(temps, 600), signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    assert refs.read_text() == "previous\n" and not (out_dir / "x.igvm").exists()
    assert len(_temporaries(out_dir)) == (0 if temps == "unnamed" else 2)
    done = subprocess.run(argv, env=_child_env(temps, 0), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _temporaries(out_dir) == [] and sorted(p.name for p in out_dir.iterdir()) == ["x.igvm", "x.json"]


# --------------------------------------------------------------------------- a real scons build

_SCONSTRUCT = _CHILD_PRELUDE + """\
env = Environment(tools=["igvm"], toolpath=[{site_tools!r}], IGVM_PROGRESS_INTERVAL=0)
env.IGVM("out/x", "x.toml")
"""


@pytest.mark.parametrize("temps", ["unnamed", "named"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_scons_build_killed_mid_write(tmp_path: Path, sig: signal.Signals, temps: str) -> None:
    """SCons handles SIGTERM and SIGHUP as it handles SIGINT (its Jobs' handler): no new action
    starts and the running one finishes, so its outputs are published whole, as a pair, and
    scons exits 2.  SIGKILL ends it at once: SCons had removed the out-of-date pair before the
    action (as it does for any target not marked Precious, so a failed build leaves no stale
    image), and nothing of the new one appears: no image, no reference values, and no
    temporary file once the next build ran."""
    (tmp_path / "SConstruct").write_text(_SCONSTRUCT.format(site_tools=str(SITE_TOOLS)))
    out_dir = tmp_path / "out"
    argv = [sys.executable, "-m", "SCons", "-Q", "-j2"]
    _config(tmp_path, b"old payload " * 4096)
    done = subprocess.run(argv, cwd=tmp_path, env=_child_env(temps, 0), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    image, refs = out_dir / "x.igvm", out_dir / "x.igvm.ref.json"
    good = image.read_bytes()
    assert b"old payload" in good

    _config(tmp_path, b"new payload " * 4096)
    pause = 600 if sig == signal.SIGKILL else 2
    rc, out, err = _kill_mid_write(argv, tmp_path, _child_env(temps, pause), sig)
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        assert not image.exists() and not refs.exists()
        assert len(_temporaries(out_dir)) == (0 if temps == "unnamed" else 2)
    else:
        assert rc == 2, (rc, out, err)  # SCons: "interrupted"
        pair = image.read_bytes(), refs.read_bytes()
        assert b"new payload" in pair[0]  # the running action finished: the new pair, whole
        assert json.loads(pair[1])["file"]["sha256"] == __import__("hashlib").sha256(pair[0]).hexdigest()
        assert _temporaries(out_dir) == []
    done = subprocess.run(argv, cwd=tmp_path, env=_child_env(temps, 0), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _temporaries(out_dir) == []
    assert b"new payload" in image.read_bytes()


# --------------------------------------------------------------------------- the pieces


def test_unnamed_temporary_has_no_name_until_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with AtomicFile(tmp_path / "a") as out:
        out.write(b"data")
        assert list(tmp_path.iterdir()) == []
    assert (tmp_path / "a").read_bytes() == b"data"
    monkeypatch.setattr(io, "UNNAMED_TEMPORARIES", False)
    with AtomicFile(tmp_path / "b") as out:
        out.write(b"data")
        (name,) = _temporaries(tmp_path)
        assert name.startswith(f".igvm-{os.getpid()}-") and name.endswith(".tmp")
    assert (tmp_path / "b").read_bytes() == b"data" and _temporaries(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temporaries_takes_only_a_dead_writers_files(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".igvm-{dead}-abc123.tmp"
        stale.write_bytes(b"x" * 100)
        other_live = tmp_path / f".igvm-{live.pid}-abc123.tmp"  # its writer is running
        other_live.write_bytes(b"x")
        mine = tmp_path / f".igvm-{os.getpid()}-abc123.tmp"
        mine.write_bytes(b"x")
        locked = tmp_path / f".igvm-{dead}-locked.tmp"  # a live writer holds it (its PID means
        locked.write_bytes(b"x")  # nothing here: another PID namespace)
        old_style = tmp_path / ".igvm-abcd1234.tmp"  # no owner in the name: never taken
        old_style.write_bytes(b"x")
        (tmp_path / f".igvm-{dead}-dir.tmp").mkdir()
        (tmp_path / f".igvm-{dead}-link.tmp").symlink_to(stale)
        (tmp_path / "x.igvm").write_bytes(b"output")
        with open(locked, "rb") as holder:
            fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
            removed = remove_stale_temporaries(tmp_path)
        assert removed == [stale.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
            other_live.name, mine.name, locked.name, old_style.name, f".igvm-{dead}-dir.tmp",
            f".igvm-{dead}-link.tmp", "x.igvm"])
        assert remove_stale_temporaries(tmp_path) == [locked.name]  # its holder let go
    finally:
        live.kill()
        live.wait()


def test_a_commit_removes_stale_temporaries_of_its_directory(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".igvm-{dead}-0123456789ab.tmp").write_bytes(b"half an image")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / f".igvm-{dead}-0123456789ab.tmp").write_bytes(b"not this build's directory")
    with atomic_outputs(tmp_path / "x.igvm") as (out,):
        assert out is not None
        out.write(b"image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "x.igvm"]
    assert _temporaries(other) != []


def test_unnamed_temporary_copied_when_it_cannot_be_linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``linkat`` through ``/proc`` after all: the data is copied to a named temporary file
    (locked, then renamed), never lost."""
    import errno

    def no_link(fd: int, directory: str) -> str:
        raise OSError(errno.ENOENT, "no /proc")

    monkeypatch.setattr(io, "_link_unnamed", no_link)
    data = os.urandom(3 << 20) + b"end"
    out = AtomicFile(tmp_path / "a", mode=0o640)
    out.write(data)
    assert list(tmp_path.iterdir()) == []
    out.commit()
    assert (tmp_path / "a").read_bytes() == data and (tmp_path / "a").stat().st_mode & 0o777 == 0o640
    assert _temporaries(tmp_path) == []


# --------------------------------------------------------------------------- scratch directories


def test_remove_stale_directories_takes_only_a_dead_owners_unlocked_ones(tmp_path: Path) -> None:
    from igvm_builder.io import remove_stale_directories

    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"igvm-repro-{dead}-abc_123"
        (stale / "a" / "out").mkdir(parents=True)
        (stale / "a" / "out" / "a.igvm").write_bytes(b"x" * 4096)
        (tmp_path / f"igvm-repro-{live.pid}-abc").mkdir()  # its process runs
        locked = tmp_path / f"igvm-repro-{dead}-locked"
        locked.mkdir()
        (tmp_path / f"igvm-sign-{dead}-other").mkdir()  # another prefix
        (tmp_path / f"igvm-repro-{dead}-file").write_bytes(b"not a directory")
        (tmp_path / f"igvm-repro-{dead}-link").symlink_to(stale)
        others = tmp_path / f"igvm-repro-{dead}-others"
        others.mkdir()
        os.chown(others, 4242, 4242)  # another user's (the tests run as root)
        fd = os.open(locked, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert remove_stale_directories(tmp_path, "igvm-repro-") == [stale.name]
        finally:
            os.close(fd)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
            f"igvm-repro-{live.pid}-abc", locked.name, f"igvm-sign-{dead}-other", f"igvm-repro-{dead}-file",
            f"igvm-repro-{dead}-link", others.name])
        assert remove_stale_directories(tmp_path, "igvm-repro-") == [locked.name]
    finally:
        live.kill()
        live.wait()


def test_repro_killed_by_sigkill_leaves_its_scratch_builds_to_the_next_run(tmp_path: Path) -> None:
    """``repro`` builds twice in a scratch directory under TMPDIR; a SIGKILL of its process group
    (as a CI cancellation sends) leaves it, the next repro removes it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cfg = _config(tmp_path, b"payload " * 4096)
    env = _child_env("unnamed", 0)
    env["TMPDIR"] = str(scratch)
    argv = [sys.executable, "-m", "igvm_builder", "repro", str(cfg)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob(f"igvm-repro-{proc.pid}-*/a/src")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (left,) = scratch.glob("igvm-repro-*")
    assert left.name.startswith(f"igvm-repro-{proc.pid}-")
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []  # the killed run's scratch builds and its own
