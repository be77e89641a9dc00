"""The only module of the core that touches the file system: atomic writes.

A build's outputs appear complete or not at all: each is written under a temporary name in
its target directory, flushed to disk, then renamed over the target.  On any error the
temporary file is removed and the target is untouched, so a failed build leaves nothing
behind.  File modes are fixed (not umask-dependent) so outputs are identical whatever the
caller's umask.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import BinaryIO

from igvm_builder.errors import OutputError


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
        if os.path.isdir(self.path):  # found now, not after the work: the rename would fail
            raise OutputError("is a directory; name the file to write", source=self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=".igvm-", suffix=".tmp", dir=directory)
        except OSError as exc:
            why = "no such directory" if isinstance(exc, FileNotFoundError) else exc.strerror
            raise OutputError(f"cannot create a file in {directory}: {why}", source=self.path) from None
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

    # ---- finishing

    def sync(self) -> None:
        """Flush, fsync and close the temporary file (it is not yet at ``path``)."""
        fh = self._open()
        try:
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), self.mode)
            fh.close()
        except OSError as exc:
            raise self._error(exc) from None
        self._fh = None

    def publish(self) -> None:
        """Rename the synced temporary file to ``path`` and sync the directory entry."""
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise OutputError(f"cannot put the file in place: {exc.strerror or exc}", source=self.path) from None
        self._tmp = ""
        _sync_directory(os.path.dirname(os.path.abspath(self.path)))

    def commit(self) -> None:
        try:
            self.sync()
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


def commit_together(*files: AtomicFile | None) -> None:
    """Commit several outputs that belong together (a build's IGVM file and its reference
    values): every file is synced before any is renamed, so an error while writing any of them
    publishes none; should a rename fail, the files already renamed are removed again, so no
    output is left without its companion."""
    todo = [f for f in files if f is not None]
    published: list[str] = []
    try:
        for f in todo:
            f.sync()
        for f in todo:
            f.publish()
            published.append(f.path)
    except BaseException:
        for f in todo:
            f.discard()
        for path in published:
            remove_if_exists(path)
        raise


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike[str] | None) -> Iterator[tuple[AtomicFile | None, ...]]:
    """One :class:`AtomicFile` per path (None for a None path), committed together
    (:func:`commit_together`) when the block succeeds, all discarded when it raises."""
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


def _sync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes | memoryview] |
                 Callable[[BinaryIO], object], *, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, an iterable of chunks, or a function given the file) to ``path``
    atomically (:class:`AtomicFile`)."""
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
