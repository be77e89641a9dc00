"""The only module of the core that touches the file system: atomic writes, guarded reads.

A build's outputs appear complete or not at all: each is written to a temporary file in its
target directory, flushed to disk, then renamed over the target.  On any error the temporary
file is removed and the target is untouched, so a failed build leaves nothing behind.  The
temporary file has no name while it is written where the file system allows (``O_TMPFILE``),
so even a process killed by SIGKILL leaves nothing; a named one (``.igvm-<pid>-<random>.tmp``)
is locked by its writer and removed by the next commit into its directory once the writer is
gone (:func:`remove_stale_temporaries`).  File modes are fixed (not umask-dependent) so outputs are identical whatever the
caller's umask.

What an output path may name (docs/ARCHITECTURE.md, "Outputs"):

* a regular file, or a path that does not exist yet: replaced atomically as above;
* a symbolic link: the file it points to is replaced atomically (the link itself stays);
* ``-``: standard output; a character device (``/dev/null``, ``/dev/stdout``, a terminal) or a
  FIFO: written directly, and only once everything succeeded (the data waits in an unnamed
  temporary file until then), never replaced by a regular file;
* anything else (a directory, a block device, a socket) is refused before any work.

Two outputs of one command, or an output and an input, that are the same file are refused
before any work (:func:`check_distinct`); the outputs of one command are published under a
lock on their directories, so concurrent commands writing the same paths never leave a mixed
set (the ``.igvm`` of one and the ``.ref.json`` of the other).

Inputs are read through :func:`open_input` / :func:`read_input`: only regular files (a FIFO
would block forever, ``/dev/zero`` never ends), with a size limit for the small ones.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from igvm_builder.errors import IgvmError, InputError, OutputError

#: The output path that means standard output.
STDOUT = "-"


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, for an error message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def is_direct(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is an output written directly: ``-``, a character device or a FIFO."""
    name = os.fspath(path)
    if name == STDOUT:
        return True
    try:
        mode = os.stat(name).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


class SeekableOutput(Protocol):
    """What ``build(output=...)`` writes to: a seekable binary file opened for writing.

    :class:`AtomicFile` is one; so is any file from ``open(path, "wb")`` or an
    :class:`io.BytesIO`.
    """

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...


class AtomicFile:
    """A binary file that becomes ``path`` only when committed.

    Data goes to a temporary file next to ``path``.  Large files are handed to the disk while
    they are written: every :attr:`WRITEBACK` bytes, writeback of what was written so far is
    started (``posix_fadvise(DONTNEED)`` on Linux starts it without waiting), so the
    ``fsync`` of :meth:`commit` finds little left to do and the writing overlaps whatever
    the caller computes meanwhile (a build measures while it writes).

    Use as a context manager (commit on success, discard on an exception), or call
    :meth:`commit` / :meth:`discard`; :func:`commit_together` publishes several files only
    once all of them are on disk.
    """

    #: Start writeback every this many bytes.
    WRITEBACK = 32 << 20

    def __init__(self, path: str | os.PathLike[str], *, mode: int = 0o644) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self._tmp = ""
        self._fh: BinaryIO | None = None
        #: Written directly at commit (``-``, a character device, a FIFO), not renamed into place.
        self.direct = False
        #: The file renamed over at commit: ``path``, or the file a symbolic link points to.
        self.target = self.path
        #: The temporary file has no name until it is published (``O_TMPFILE``).
        self._unnamed = False
        if self.path == STDOUT:
            self.direct = True
        else:
            try:
                st = os.stat(self.path)  # follows symbolic links: what the path names now
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise OutputError(f"cannot write: {exc.strerror}", source=self.path) from None
            if st is not None and stat.S_ISDIR(st.st_mode):  # found now, not after the work
                raise OutputError("is a directory; name the file to write", source=self.path)
            if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
                self.direct = True
            elif st is not None and not stat.S_ISREG(st.st_mode):
                raise OutputError(f"is {_kind(st.st_mode)}; outputs are regular files, character devices, "
                                  "FIFOs or '-'", source=self.path)
            elif os.path.islink(self.path):
                self.target = os.path.realpath(self.path)  # replace what the link points to, keep the link
        if self.direct:
            import tempfile  # here, not at the top: reading commands import this module too

            # the data waits in an unnamed temporary file (gone with the process, however it ends)
            # and is copied to the device only once everything succeeded
            try:
                self._fh = tempfile.TemporaryFile()  # closed by sync()/discard()
            except OSError as exc:
                raise OutputError(f"cannot create a temporary file: {exc.strerror}", source=self.path) from None
            self._started = 0
            self._advise = None
            return
        directory = os.path.dirname(os.path.abspath(self.target))
        fd = _unnamed_temporary(directory)
        if fd < 0:  # no O_TMPFILE here: a named one, which names its owner
            import tempfile  # (and shutil, bz2, lzma: not needed with O_TMPFILE, the usual case)

            try:
                fd, self._tmp = tempfile.mkstemp(prefix=f".igvm-{os.getpid()}-", suffix=".tmp", dir=directory)
            except OSError as exc:
                why = "no such directory" if isinstance(exc, FileNotFoundError) else exc.strerror
                raise OutputError(f"cannot create a file in {directory}: {why}", source=self.path) from None
        else:
            self._unnamed = True
        _hold(fd)
        self._fh = os.fdopen(fd, "wb")
        self._started = 0  # the file offset up to which writeback was started
        self._advise = getattr(os, "posix_fadvise", None)

    # ---- writing

    def write(self, data: bytes | bytearray | memoryview) -> int:
        fh = self._open()
        try:
            n = fh.write(data)
            if self._advise is not None:
                end = fh.tell()
                if end - self._started >= self.WRITEBACK:  # (a write before the last start: nothing)
                    fh.flush()
                    with contextlib.suppress(OSError):
                        self._advise(fh.fileno(), self._started, end - self._started, os.POSIX_FADV_DONTNEED)
                    self._started = end
        except OSError as exc:  # e.g. the disk is full
            raise self._error(exc) from None
        return n

    def start_writeback(self) -> None:
        """Start writeback of everything written so far, without waiting for it (as every
        :attr:`WRITEBACK` bytes): a caller that has written the bulk of a smaller file and
        computes the rest (``sign``: the data section, then the headers once signed) overlaps
        the disk's work with its own."""
        fh = self._open()
        if self._advise is None:
            return
        try:
            fh.flush()
            end = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise self._error(exc) from None
        if end > self._started:
            with contextlib.suppress(OSError):
                self._advise(fh.fileno(), self._started, end - self._started, os.POSIX_FADV_DONTNEED)
            self._started = end

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write: {exc.strerror or exc}", source=self.path)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._open().seek(offset, whence)

    def tell(self) -> int:
        return self._open().tell()

    def fileno(self) -> int:
        return self._open().fileno()

    def _open(self) -> BinaryIO:
        if self._fh is None:
            raise ValueError(f"{self.path}: output already committed or discarded")
        return self._fh

    def flush(self) -> None:
        """Hand what was written to the file (so that a reader of :meth:`fileno` sees it)."""
        try:
            self._open().flush()
        except OSError as exc:
            raise self._error(exc) from None

    # ---- finishing

    def sync(self) -> None:
        """Flush and fsync the temporary file (it is not yet at ``path``; it stays open, and
        locked, until :meth:`publish`).  For a direct output, only flush: the data is copied to
        the device by :meth:`publish`."""
        fh = self._open()
        if self.direct:
            try:
                fh.flush()
            except OSError as exc:
                raise self._error(exc) from None
            return
        try:
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), self.mode)
        except OSError as exc:
            raise self._error(exc) from None

    def publish(self) -> None:
        """Rename the synced temporary file to ``path`` (an unnamed one is first given a
        temporary name) and sync the directory entry; for a direct output, copy the data to
        it."""
        if self.direct:
            self._copy_out()
            return
        fh = self._open()
        directory = os.path.dirname(os.path.abspath(self.target))
        try:
            if self._unnamed:
                self._tmp = self._name_unnamed(fh.fileno(), directory)
            _record_output(self._tmp, self.path)
            os.replace(self._tmp, self.target)
        except OSError as exc:
            raise OutputError(f"cannot put the file in place: {exc.strerror or exc}", source=self.path) from None
        self._tmp = ""
        done = self._fh if self._fh is not None else fh  # the file written, or _name_unnamed's copy
        self._fh = None
        with contextlib.suppress(OSError):
            done.close()  # releases the lock on the temporary file (now the output)
        _sync_directory(directory)

    def _name_unnamed(self, fd: int, directory: str) -> str:
        """A name for the unnamed temporary file ``fd``: linked where it is (no copy), else (no
        ``linkat`` through ``/proc`` after all) copied to a named temporary file."""
        try:
            return _link_unnamed(fd, directory)
        except OSError:
            pass
        import tempfile

        out, name = tempfile.mkstemp(prefix=f".igvm-{os.getpid()}-", suffix=".tmp", dir=directory)
        try:
            _hold(out)
            offset, size = 0, os.fstat(fd).st_size
            while offset < size:
                chunk = os.pread(fd, min(1 << 20, size - offset), offset)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                offset += len(chunk)
            os.fsync(out)
            os.fchmod(out, self.mode)
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()  # the unnamed file goes
        self._fh = os.fdopen(out, "wb")  # keeps the named one locked until it is renamed
        return name

    def _copy_out(self) -> None:
        import shutil

        fh = self._open()
        try:
            fh.seek(0)
            if self.path == STDOUT:
                sys.stdout.flush()
                dest = sys.stdout.buffer
                shutil.copyfileobj(fh, dest, 1 << 20)
                dest.flush()
            else:
                # no O_TRUNC, no O_CREAT: a device is written, never created or replaced; a FIFO
                # blocks here until it has a reader (as ``cat > fifo`` does)
                with open(os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), "wb") as dest:
                    shutil.copyfileobj(fh, dest, 1 << 20)
        except OSError as exc:
            raise self._error(exc) from None
        finally:
            self.discard()

    def commit(self) -> None:
        try:
            self.sync()
            with _locked_directories([self]):
                self.publish()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary file; ``path`` is left as it was."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = ""

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


#: Make temporary outputs with ``O_TMPFILE`` where the file system has it (Linux): such a file
#: has no name until it is published, so a process killed however (SIGKILL included) while it
#: writes leaves nothing behind.  Set to False to always use named temporary files.
UNNAMED_TEMPORARIES = True

#: A named temporary output: ``.igvm-<pid of its writer>-<random>.tmp``.  (A pattern, compiled by
#: :mod:`re` on first use and cached there: compiling it costs every command 0.2 ms of start-up.)
_TEMPORARY_NAME = r"\.igvm-([0-9]{1,10})-[0-9A-Za-z_]{1,32}\.tmp"


def _unnamed_temporary(directory: str) -> int:
    """An ``O_TMPFILE`` file in ``directory`` opened for writing, or -1 where there is none (not
    Linux, a file system without it, no ``/proc`` to name it through at publication)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not UNNAMED_TEMPORARIES or not flag or not os.path.isdir("/proc/self/fd"):
        return -1
    try:
        return os.open(directory, flag | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:  # unsupported (EOPNOTSUPP, EISDIR on old kernels), or a real error that
        return -1  # creating a named file then reports


def _link_unnamed(fd: int, directory: str) -> str:
    """Give the ``O_TMPFILE`` file ``fd`` a temporary name in ``directory`` (then renamed over the
    output): ``linkat`` through ``/proc/self/fd``, which needs no privilege."""
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for _ in range(100):
            name = f".igvm-{os.getpid()}-{os.urandom(6).hex()}.tmp"
            try:  # a dir_fd makes this linkat(AT_SYMLINK_FOLLOW): plain link() would link the /proc link
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                continue
            return os.path.join(directory, name)
    finally:
        os.close(dir_fd)
    raise FileExistsError(f"no free temporary name in {directory}")


def _hold(fd: int) -> None:
    """Lock the temporary file ``fd`` (``flock``) for as long as it is open: a live writer's
    temporary file is never taken for a dead one's (:func:`remove_stale_temporaries`), whatever
    its PID means in the process's namespace."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):  # no locks here: the writer's PID alone decides
        pass


def _alive(pid: int) -> bool:
    """False only when no process ``pid`` exists (anything unclear counts as alive)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it exists, another user's
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary output files that processes which no longer exist left in
    ``directory`` (killed by SIGKILL, or on a file system without ``O_TMPFILE``), and return
    their names.  A file is removed only if its name is ``.igvm-<pid>-<random>.tmp``, no process
    ``pid`` exists and no process holds its lock (:func:`_hold`).  Every commit does this for the
    directories it publishes into, holding their locks."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = re.fullmatch(_TEMPORARY_NAME, entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _unlocked(fd):
                continue
            now = os.lstat(entry.path)  # still this file under that name
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class ScratchDirectory:
    """A temporary working directory, ``<tmp>/<prefix><pid>-<random>`` (``tempfile.gettempdir()``),
    removed with everything in it when the ``with`` block ends (as
    ``tempfile.TemporaryDirectory``), and locked (``flock``) while it exists.  Before it is made,
    the directories of that prefix that processes which no longer exist left behind (killed by
    SIGKILL: ``repro``'s two scratch builds, a ``cmd:`` signer's message files) are removed
    (:func:`remove_stale_directories`)."""

    def __init__(self, prefix: str) -> None:
        import tempfile

        parent = tempfile.gettempdir()
        remove_stale_directories(parent, prefix)
        self.name = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
        self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        _hold(self._fd)

    def cleanup(self) -> None:
        import shutil

        if self._fd >= 0:
            shutil.rmtree(self.name, ignore_errors=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


def remove_stale_directories(parent: str | os.PathLike[str], prefix: str) -> list[str]:
    """Remove the :class:`ScratchDirectory` directories ``<prefix><pid>-<random>`` in ``parent``
    that belong to this user, whose process ``pid`` no longer exists and whose lock nobody holds;
    return their names."""
    import shutil

    pattern = re.compile(re.escape(prefix) + r"([0-9]{1,10})-[0-9A-Za-z_]{1,32}")
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and _unlocked(fd):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


def _unlocked(fd: int) -> bool:
    """True if no process holds a lock on the file ``fd`` (or the file system has no locks)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except (ImportError, OSError):
        return True
    return True


def commit_together(*files: AtomicFile | None) -> None:
    """Commit several outputs that belong together (a build's IGVM file and its reference
    values): every file is synced before any is renamed, so an error while writing any of them
    publishes none; should a rename fail, the files already renamed are removed again, so no
    output is left without its companion."""
    todo = [f for f in files if f is not None]
    # direct outputs first: a device that fails (``/dev/full``) then publishes no file
    todo.sort(key=lambda f: not f.direct)
    published: list[str] = []
    try:
        for f in todo:
            f.sync()
        # one lock per directory, taken in a fixed order, held while the set is published: a
        # concurrent command writing the same paths publishes its set before or after this one
        with _locked_directories(todo):
            for f in todo:
                f.publish()
                if not f.direct:
                    published.append(f.target)
    except BaseException:
        for f in todo:
            f.discard()
        for path in published:
            remove_if_exists(path)
        raise


@contextlib.contextmanager
def _locked_directories(files: Sequence[AtomicFile]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the directory of every renamed output (none where the
    file system cannot lock: the publication is then unordered, as before), and remove what
    killed writers left there (:func:`remove_stale_temporaries`)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    dirs: dict[tuple[int, int], tuple[int, str]] = {}
    try:
        for f in files:
            if f.direct:
                continue
            directory = os.path.dirname(os.path.abspath(f.target))
            try:
                fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in dirs:
                os.close(fd)
            else:
                dirs[(st.st_dev, st.st_ino)] = (fd, directory)
        for key in sorted(dirs):  # one order for every process: no deadlock
            with contextlib.suppress(OSError):
                fcntl.flock(dirs[key][0], fcntl.LOCK_EX)
        for _fd, directory in dirs.values():  # what killed writers left there goes now
            remove_stale_temporaries(directory)
        yield
    finally:
        for fd, _directory in dirs.values():
            os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike[str] | None, inputs: Iterable[str | os.PathLike[str]] = ()
                   ) -> Iterator[tuple[AtomicFile | None, ...]]:
    """One :class:`AtomicFile` per path (None for a None path), committed together
    (:func:`commit_together`) when the block succeeds, all discarded when it raises.

    Outputs that are the same file, or an output that is one of ``inputs``, are refused
    first (:func:`check_distinct`)."""
    check_distinct([p for p in paths if p is not None], inputs)
    made: list[AtomicFile | None] = []
    try:
        for p in paths:  # a second output that cannot be created drops the first one too
            made.append(AtomicFile(p) if p is not None else None)
        yield tuple(made)
    except BaseException:
        for f in made:
            if f is not None:
                f.discard()
        raise
    commit_together(*made)


#: When this environment variable names a directory, every IGVM file published as an output
#: is also copied there, as ``<sha256>.igvm`` with its output path in ``<sha256>.path``.  The
#: test suite sets it to check everything it builds, including in CLI and SCons subprocesses,
#: with the reference implementations (tests/oracles.py).  Unset, it costs one lookup.
RECORD_OUTPUTS_ENV = "IGVM_BUILDER_RECORD_OUTPUTS"


def _record_output(tmp: str, path: str) -> None:
    directory = os.environ.get(RECORD_OUTPUTS_ENV)
    if not directory:
        return
    import hashlib
    import tempfile

    with contextlib.suppress(OSError), open(tmp, "rb") as src:
        if src.read(4) != b"IGVM":
            return
        src.seek(0)
        fd, copy = tempfile.mkstemp(prefix=".record-", dir=directory)
        os.close(fd)
        digest = hashlib.sha256()
        with open(copy, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        name = os.path.join(directory, digest.hexdigest())
        os.replace(copy, name + ".igvm")
        with open(name + ".path", "w", encoding="utf-8") as note:
            note.write(os.path.abspath(path))


def _sync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes | memoryview] |
                 Callable[[BinaryIO], object], *, mode: int = 0o644,
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write ``data`` (bytes, an iterable of chunks, or a function given the file) to ``path``
    atomically (:class:`AtomicFile`); ``path`` naming one of ``inputs`` is refused first."""
    check_distinct([path], inputs)
    with AtomicFile(path, mode=mode) as out:
        if callable(data):
            data(out)  # type: ignore[arg-type]
        elif isinstance(data, bytes | bytearray | memoryview):
            out.write(data)
        else:
            for chunk in data:
                out.write(chunk)


def remove_if_exists(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _identity(path: str) -> tuple[object, ...]:
    """What makes two outputs one: a character device by its device number (whichever node or
    link names it: ``/dev/tty`` and a copy made with ``mknod`` are one terminal), anything else by
    device and inode (``-`` is whatever file descriptor 1 is, so ``/dev/stdout``,
    ``/proc/self/fd/1`` or the file stdout is redirected to are the same output as ``-``), a
    path that does not exist yet by its resolved path."""
    try:
        st = os.fstat(1) if path == STDOUT else os.stat(path)
    except OSError:  # standard output closed; a path not made yet
        return ("stdout",) if path == STDOUT else ("path", os.path.realpath(path))
    if stat.S_ISCHR(st.st_mode):
        return ("device", st.st_rdev)
    return ("file", st.st_dev, st.st_ino)


def _null_device() -> tuple[object, ...]:
    try:
        return ("device", os.stat(os.devnull).st_rdev)
    except OSError:  # pragma: no cover - a system without /dev/null
        return ("device", None)


def check_distinct(outputs: Sequence[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before any work, outputs that are the same file (through symbolic links, hard
    links, ``..``; ``-`` and whatever names standard output; two nodes of one character device)
    and an output that is one of ``inputs``: the last write would silently win, the data would
    be interleaved, or an input would be overwritten.  Several outputs to the null device
    (``/dev/null``, or ``-`` when standard output is it) are allowed: nothing is kept anyway;
    ``-`` twice is not."""
    seen: dict[tuple[object, ...], str] = {}
    null = None
    for out in outputs:
        name = os.fspath(out)
        ident = _identity(name)
        other = seen.get(ident)
        if other is not None:
            if null is None:
                null = _null_device()
            if ident != null or name == other == STDOUT:
                what = "device" if ident[0] == "device" else "file"
                raise OutputError(f"is the same {what} as the output {other}; name different files", source=name)
        seen[ident] = name
    for inp in inputs:
        name = os.fspath(inp)
        other = seen.get(_identity(name))
        if other is not None and not _is_chr(name):
            raise OutputError(f"is the input {name}; writing it would destroy it (name another output)",
                              source=other)


def _is_chr(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------- inputs

#: Size limit of a config file or an included config (bytes).
CONFIG_LIMIT = 1 << 20
#: Size limit of a key file, a public key, a certificate or a PIN file (bytes).
KEY_LIMIT = 1 << 20
#: Size limit of a JSON document read (reference values, a to-be-signed document), bytes.
JSON_LIMIT = 64 << 20
#: Size limit of a signature file (bytes).
SIGNATURE_LIMIT = 1 << 16


def open_input(path: str | os.PathLike[str], what: str, *, limit: int | None = None,
               error: type[IgvmError] = InputError) -> io.BufferedReader:
    """Open ``path`` (an input: ``what`` names it in errors) for reading in binary.

    Only a regular file is accepted, and this is found before anything is read: a FIFO would
    block forever, a device such as ``/dev/zero`` never ends.  A file larger than ``limit``
    bytes is refused.  Errors are ``error`` (default :class:`InputError`), one line naming the
    file and the limit."""
    name = os.fspath(path)
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror}", source=name) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"the {what} is {_kind(st.st_mode)}; give a regular file", source=name)
        if limit is not None and st.st_size > limit:
            raise error(f"the {what} is {st.st_size} bytes; the limit is {limit} bytes", source=name)
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike[str], what: str, *, limit: int,
               error: type[IgvmError] = InputError) -> bytes:
    """The contents of the regular file ``path`` (:func:`open_input`), at most ``limit`` bytes
    (a file that grows past it while read, or a ``/proc`` file that reports size 0 and has more,
    is refused too)."""
    name = os.fspath(path)
    with open_input(name, what, limit=limit, error=error) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise error(f"cannot read {what}: {exc.strerror}", source=name) from None
    if len(data) > limit:
        raise error(f"the {what} is more than {limit} bytes; the limit is {limit} bytes", source=name)
    return data


# --------------------------------------------------------------------------- documents

#: Deepest nesting of arrays/objects (tables) accepted in a JSON document or a TOML config;
#: nothing igvm-builder reads nests more than a few levels.
MAX_NESTING = 64


def check_nesting(doc: object, *, source: str | None, error: type[IgvmError], what: str = "document") -> None:
    """Refuse ``doc`` (decoded JSON or TOML) if it nests deeper than :data:`MAX_NESTING`
    (walked without recursion)."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_NESTING:
                raise error(f"the {what} nests more than {MAX_NESTING} levels deep", source=source)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def parse_json(data: bytes | str, *, source: str | None, error: type[IgvmError], what: str = "JSON document"
               ) -> Any:
    """Decode JSON ``data``: one-line ``error`` naming ``source`` for text that is not JSON, that
    nests deeper than :data:`MAX_NESTING` (and deeper than the interpreter can decode), or
    whose numbers are too long to convert."""
    import json

    try:
        doc = json.loads(data)
    except RecursionError:
        raise error(f"the {what} nests more than {MAX_NESTING} levels deep", source=source) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"not JSON: {exc}", source=source) from None
    check_nesting(doc, source=source, error=error, what=what)
    return doc


def load_json(path: str | os.PathLike[str], what: str, *, error: type[IgvmError], limit: int = JSON_LIMIT) -> Any:
    """:func:`read_input` then :func:`parse_json`."""
    name = os.fspath(path)
    return parse_json(read_input(name, what, limit=limit, error=error), source=name, error=error, what=what)


def map_input(path: str | os.PathLike[str], what: str, *,
              error: type[IgvmError] = InputError) -> bytes | mmap.mmap:
    """A read-only mapping of the regular file ``path`` (:func:`open_input`; ``what`` names it in
    errors): how every large input is read, nothing copied, pages faulted in as they are used
    (and released with :func:`igvm_builder.format.blob.dontneed`).  An empty file gives ``b""``
    (there is nothing to map)."""
    name = os.fspath(path)
    with open_input(name, what, error=error) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as exc:
            raise error(f"cannot map {what}: {exc.strerror}", source=name) from None


def sha256_input(path: str | os.PathLike[str], what: str, *,
                 error: type[IgvmError] = InputError) -> tuple[str, int]:
    """The SHA-256 (hex) and size of the regular file ``path``, read as a stream."""
    import hashlib

    name = os.fspath(path)
    with open_input(name, what, error=error) as fh:
        try:
            return hashlib.file_digest(fh, "sha256").hexdigest(), os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise error(f"cannot read {what}: {exc.strerror}", source=name) from None
