"""Issue #15, outputs: what an output path may name, and what happens when it names something odd.

Findings 1 (outputs replaced device nodes and symbolic links), 5 (concurrent builds published a
mixed pair), 6 (colliding paths destroyed data) and 7 (SIGTERM/SIGHUP left temporary files).
Every device here is made under the test's temporary directory (a FIFO; a character device with
``os.mknod`` only where permitted); no test opens a real ``/dev`` node for writing.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_build_helpers import REPO, cli, q

from igvm_builder import io
from igvm_builder.errors import OutputError
from igvm_builder.format import IgvmFile
from igvm_builder.io import AtomicFile, atomic_outputs, check_distinct, commit_together


def _config(tmp: Path, name: str = "build.toml") -> Path:
    blob = tmp / "payload.bin"
    if not blob.exists():
        blob.write_bytes(bytes(range(256)) * 48)
    cfg = tmp / name
    cfg.write_text(f"[image]\nplatforms = [\"native\", \"snp\"]\n\n[[blob]]\npath = {q(blob)}\ngpa = 0x200000\n")
    return cfg


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".igvm-")]


def _writing_in(pid: int, directory: Path) -> bool:
    """True when process ``pid`` has a file open in ``directory``: a temporary output, named or not
    (an ``O_TMPFILE`` file shows as ``<directory>/#<inode> (deleted)``)."""
    prefix = f"{directory.resolve()}/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _reference_build(tmp: Path) -> tuple[bytes, dict[str, object]]:
    """The same config built to regular files in another directory (builds are deterministic)."""
    ref = tmp / "ref"
    ref.mkdir()
    proc = cli("build", str(_config(tmp)), "-o", str(ref / "x.igvm"), "--reference-values", str(ref / "x.json"))
    assert proc.returncode == 0, proc.stderr
    return (ref / "x.igvm").read_bytes(), json.loads((ref / "x.json").read_text())


# --------------------------------------------------------------------------- '-', FIFOs, devices


def test_output_dash_writes_standard_output(tmp_path: Path) -> None:
    expected, _ = _reference_build(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "igvm_builder", "build", str(_config(tmp_path)), "-o", "-"],
                          capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected  # only the file on stdout: the summary went to stderr
    assert IgvmFile.from_bytes(proc.stdout).platforms
    assert b"- : " not in proc.stdout and b"bytes, sha256" in proc.stderr
    # reference values to stdout (non-root could not do this before: /dev/stdout was replaced)
    out = tmp_path / "o.igvm"
    proc = subprocess.run([sys.executable, "-m", "igvm_builder", "build", str(_config(tmp_path)), "-o", str(out),
                           "--reference-values", "-"], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["file"]["sha256"] == __import__("hashlib").sha256(out.read_bytes()).hexdigest()


def test_output_fifo_is_written_not_replaced(tmp_path: Path) -> None:
    expected, expected_refs = _reference_build(tmp_path)
    fifo = tmp_path / "refs.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    out = tmp_path / "o.igvm"
    proc = cli("build", str(_config(tmp_path)), "-o", str(out), "--reference-values", str(fifo))
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still a FIFO, not a regular file
    assert json.loads(got[0]) == expected_refs
    assert out.read_bytes() == expected
    assert _leftovers(tmp_path) == []


def _mknod_chr(path: Path, major: int, minor: int) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node under a temporary directory here: {exc}")


def test_output_character_device_is_written_not_replaced(tmp_path: Path) -> None:
    """The root-like case of finding 1: a null device and a full device made under tmp_path."""
    null, full = tmp_path / "null", tmp_path / "full"
    _mknod_chr(null, 1, 3)
    _mknod_chr(full, 1, 7)
    cfg = _config(tmp_path)
    refs = tmp_path / "o.json"
    proc = cli("build", str(cfg), "-o", str(null), "--reference-values", str(null), "--depfile", str(null))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(null.lstat().st_mode)  # two outputs to one character device are allowed
    proc = cli("build", str(cfg), "-o", str(full), "--reference-values", str(refs))
    assert proc.returncode == 2 and "No space left on device" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and str(full) in proc.stderr
    assert stat.S_ISCHR(full.lstat().st_mode)
    assert not refs.exists() and _leftovers(tmp_path) == []  # the device failed first: no file published


def test_output_symlink_target_is_replaced(tmp_path: Path) -> None:
    expected, _ = _reference_build(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    (real / "image.igvm").write_bytes(b"old")
    link = tmp_path / "image.igvm"
    link.symlink_to(real / "image.igvm")
    dangling = tmp_path / "new.json"
    dangling.symlink_to(real / "new.json")
    proc = cli("build", str(_config(tmp_path)), "-o", str(link), "--reference-values", str(dangling))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and dangling.is_symlink()  # the links stay links
    assert (real / "image.igvm").read_bytes() == expected
    assert json.loads((real / "new.json").read_text())["file"]["size"] == len(expected)
    assert _leftovers(tmp_path) == [] and _leftovers(real) == []


def test_output_other_kinds_refused_before_work(tmp_path: Path) -> None:
    import socket

    sock_path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        with pytest.raises(OutputError, match=r"s\.sock: is a socket"):
            AtomicFile(sock_path)
    finally:
        s.close()
    with pytest.raises(OutputError, match="is a directory"):
        AtomicFile(tmp_path)


# --------------------------------------------------------------------------- colliding paths (finding 6)


def test_two_outputs_one_file_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    x = tmp_path / "x"
    x.write_bytes(b"precious")
    for other in (str(x), str(tmp_path / "." / "x")):
        proc = cli("build", str(cfg), "-o", str(x), "--reference-values", other)
        assert proc.returncode == 2 and "same file" in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    (tmp_path / "hard").hardlink_to(x)
    (tmp_path / "soft").symlink_to(x)
    for other in ("hard", "soft"):
        proc = cli("build", str(cfg), "-o", str(x), "--depfile", str(tmp_path / other))
        assert proc.returncode == 2 and "same file" in proc.stderr, proc.stderr
    # not existing yet, named two ways
    proc = cli("build", str(cfg), "-o", str(tmp_path / "n.igvm"), "--reference-values", str(tmp_path / "d/../n.igvm"))
    assert proc.returncode == 2, proc.stderr
    assert x.read_bytes() == b"precious" and not (tmp_path / "n.igvm").exists() and _leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="same file"):
        check_distinct(["-", "-"])


def _build_with_stdout(tmp: Path, stdout: object, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("IGVM_BUILDER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "igvm_builder", "build", str(_config(tmp)), *args],
                          stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=120)


def test_standard_output_named_twice_refused(tmp_path: Path) -> None:
    """``-`` is file descriptor 1: a path that is the same file (``/dev/stdout``, ``/proc/self/fd/1``,
    the file or FIFO stdout goes to) is the same output, refused before any work."""
    target = tmp_path / "stdout.bin"
    target.write_bytes(b"")
    for other in (str(target), "/dev/stdout", "/proc/self/fd/1"):
        for args in (("-o", "-", "--reference-values", other), ("-o", other, "--depfile", "-")):
            with open(target, "r+b") as stdout:
                proc = _build_with_stdout(tmp_path, stdout, *args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert b"is the same file as the output" in proc.stderr and proc.stderr.count(b"\n") == 1, proc.stderr
            assert target.read_bytes() == b"" and _leftovers(tmp_path) == []
    # standard output a pipe (an unnamed FIFO)
    proc = _build_with_stdout(tmp_path, subprocess.PIPE, "-o", "/dev/stdout", "--reference-values", "-")
    assert proc.returncode == 2 and b"same file" in proc.stderr and proc.stdout == b"", proc.stderr
    # standard output a named FIFO, also given by its path
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with open(fifo, "wb") as stdout:
        proc = _build_with_stdout(tmp_path, stdout, "-o", "-", "--reference-values", str(fifo))
    reader.join(timeout=60)
    assert proc.returncode == 2 and b"same file" in proc.stderr and got == [b""], proc.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    # stdout elsewhere: '-' and that path are two outputs
    with open(tmp_path / "elsewhere", "wb") as stdout:
        proc = _build_with_stdout(tmp_path, stdout, "-o", "-", "--reference-values", str(target))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(target.read_bytes())["file"]["sha256"] == __import__("hashlib").sha256(
        (tmp_path / "elsewhere").read_bytes()).hexdigest()


def test_two_nodes_of_one_character_device_are_one_output(tmp_path: Path) -> None:
    """Made with mknod under tmp_path: two nodes (and a link) of one full device are one output;
    outputs to the null device may repeat (nothing is kept), also as '-' when stdout is it."""
    full_a, full_b, null_a, null_b = (tmp_path / n for n in ("full-a", "full-b", "null-a", "null-b"))
    _mknod_chr(full_a, 1, 7)
    _mknod_chr(full_b, 1, 7)
    _mknod_chr(null_a, 1, 3)
    _mknod_chr(null_b, 1, 3)
    (tmp_path / "full-link").symlink_to(full_a)
    cfg = _config(tmp_path)
    for other in (full_b, tmp_path / "full-link"):
        proc = cli("build", str(cfg), "-o", str(full_a), "--reference-values", str(other))
        assert proc.returncode == 2 and "is the same device as the output" in proc.stderr, proc.stderr
        assert "No space left" not in proc.stderr  # refused before any work, not by the device
    with pytest.raises(OutputError, match="same device"):
        check_distinct([full_a, full_b])
    proc = cli("build", str(cfg), "-o", str(null_a), "--reference-values", str(null_b), "--depfile", str(null_a))
    assert proc.returncode == 0, proc.stderr
    with open(null_b, "wb") as stdout:
        proc = _build_with_stdout(tmp_path, stdout, "-o", "-", "--reference-values", str(null_a))
    assert proc.returncode == 0, proc.stderr
    assert all(stat.S_ISCHR(p.lstat().st_mode) for p in (full_a, full_b, null_a, null_b))
    assert _leftovers(tmp_path) == []


def test_output_naming_an_input_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    blob = tmp_path / "payload.bin"
    before = blob.read_bytes(), cfg.read_bytes()
    inc = tmp_path / "inc.toml"
    inc.write_text("[memory]\nsize = \"64M\"\n")
    cfg2 = tmp_path / "with-include.toml"
    cfg2.write_text(f"include = [{q(inc)}]\n" + cfg.read_text())
    (tmp_path / "link").symlink_to(blob)
    for out, cfg_path, needle in ((blob, cfg, "payload.bin"), (cfg, cfg, "build.toml"),
                                  (tmp_path / "link", cfg, "payload.bin"), (inc, cfg2, "inc.toml")):
        proc = cli("build", str(cfg_path), "-o", str(out))
        assert proc.returncode == 2, proc.stderr
        assert "is the input" in proc.stderr and needle in proc.stderr and len(proc.stderr.splitlines()) == 1
        proc = cli("build", str(cfg_path), "-o", str(tmp_path / "ok.igvm"), "--reference-values", str(out))
        assert proc.returncode == 2 and "is the input" in proc.stderr, proc.stderr
    assert (blob.read_bytes(), cfg.read_bytes()) == before
    assert inc.read_text() == "[memory]\nsize = \"64M\"\n"
    # measure and sign: the file read is not the file written
    built = tmp_path / "b.igvm"
    assert cli("build", str(cfg), "-o", str(built)).returncode == 0
    image = built.read_bytes()
    proc = cli("measure", str(built), "--reference-values", str(built))
    assert proc.returncode == 2 and "is the input" in proc.stderr, proc.stderr
    proc = cli("sign", str(built), "--remove", "-o", str(built))
    assert proc.returncode == 2 and "is the input" in proc.stderr, proc.stderr
    assert built.read_bytes() == image


# --------------------------------------------------------------------------- concurrent builds (finding 5)


def test_concurrent_commits_never_publish_a_mixed_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two commands publish ``x.igvm`` + ``x.json`` at once; the first one is slowed between its
    two renames (as a slow directory fsync did).  Without the lock the second one's pair lands in
    that gap and the first one's ``x.json`` then lands over it: a mixed pair."""
    igvm, refs = tmp_path / "x.igvm", tmp_path / "x.json"
    second_done = threading.Event()
    first = threading.current_thread()
    real_sync = io._sync_directory
    slowed: list[bool] = []

    def slow_sync(directory: str) -> None:
        real_sync(directory)
        if threading.current_thread() is first and not slowed:
            slowed.append(True)
            second_done.wait(timeout=1.0)  # the second command's publication would run now

    monkeypatch.setattr(io, "_sync_directory", slow_sync)

    def publish(tag: bytes) -> None:
        with atomic_outputs(igvm, refs) as (a, b):
            assert a is not None and b is not None
            a.write(b"igvm " + tag)
            b.write(b"refs " + tag)

    def second() -> None:
        time.sleep(0.1)
        publish(b"B")
        second_done.set()

    t = threading.Thread(target=second)
    t.start()
    publish(b"A")
    t.join()
    assert slowed
    assert igvm.read_bytes()[5:] == refs.read_bytes()[5:]  # a matching pair, whichever won
    assert _leftovers(tmp_path) == []


def test_commit_together_keeps_direct_outputs_first(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    a, b = AtomicFile(tmp_path / "a"), AtomicFile(fifo)
    a.write(b"regular")
    b.write(b"direct")
    commit_together(a, b)
    reader.join(timeout=10)
    assert got == [b"direct"] and (tmp_path / "a").read_bytes() == b"regular"


# --------------------------------------------------------------------------- SIGTERM / SIGHUP (finding 7)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_termination_signals_leave_no_temporary_file(tmp_path: Path, sig: signal.Signals) -> None:
    """The build blocks writing its image to a FIFO nobody reads, with the reference values'
    temporary file already in the directory; the signal must remove it."""
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("IGVM_BUILDER_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "igvm_builder", "build", str(_config(tmp_path)), "-o", str(fifo),
                             "--reference-values", str(out_dir / "x.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not _writing_in(proc.pid, out_dir):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the build never started its outputs"
            time.sleep(0.02)
        time.sleep(0.3)  # blocked opening the FIFO by now
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), (proc.returncode, err)
    assert b"Traceback" not in err
    assert _leftovers(out_dir) == [] and list(out_dir.iterdir()) == []
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_measure_and_sign_write_standard_output(tmp_path: Path) -> None:
    """measure --reference-values - and sign -o -: the data alone on stdout, summaries elsewhere."""
    expected, expected_refs = _reference_build(tmp_path)
    image = tmp_path / "ref" / "x.igvm"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "igvm_builder", "measure", str(image), "--loader", "qemu",
                           "--reference-values", "-"], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    refs = json.loads(proc.stdout)
    assert refs["platforms"]["snp"]["digest"] == expected_refs["platforms"]["snp"]["digest"]  # type: ignore[index]
    key = Path(__file__).resolve().parents[1].parent / "shared" / "keys" / "test-only-id-p384.pem"
    proc = subprocess.run([sys.executable, "-m", "igvm_builder", "sign", str(image), "-o", "-", "--id-key", str(key),
                           "--allow-test-keys", "--loader", "qemu"], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    signed = tmp_path / "signed.igvm"
    signed.write_bytes(proc.stdout)
    assert b"SEV-SNP ID block" in proc.stderr  # the summary line went to stderr
    verify = cli("verify", str(signed), "--loader", "qemu")
    assert verify.returncode == 0, verify.stderr
    assert len(expected) < len(proc.stdout)
