"""Inputs mapped once (read-only mmap, never copied), their SHA-256 computed in the background,
and zero-copy windows over them whose pages leave the resident set once consumed."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from igvm_builder.errors import InputError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, as_view, dontneed, sha256_released
from igvm_builder.recordclass import record

_T = TypeVar("_T")


class Task(Generic[_T]):
    """``fn()`` running in a daemon thread named ``name``: :meth:`result` waits for it and gives
    its value or raises its error.

    (A daemon thread, not an executor's: an interrupted build must not wait at exit for a
    thread hashing a large input; the build cancels and joins its threads itself.  And not
    ``concurrent.futures``, whose import brings logging, traceback and tokenize: 5 ms of a small
    build's start-up.)
    """

    __slots__ = ("_done", "_error", "_value")

    def __init__(self, name: str, fn: Callable[[], _T]) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # re-raised by result() in the caller's thread
                self._error = exc
            finally:
                self._done.set()

        threading.Thread(target=run, name=name, daemon=True).start()

    def wait(self) -> None:
        """Wait until ``fn`` has returned or failed."""
        self._done.wait()

    def result(self) -> _T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def in_thread(name: str, fn: Callable[[], _T]) -> Task[_T]:
    """``fn()`` in a daemon thread named ``name`` (:class:`Task`)."""
    return Task(name, fn)


# --------------------------------------------------------------------------- resident-set control

#: Passes over input bytes (hashing, writing) read them in windows of this size.
WINDOW = 8 << 20


@record
class _Mapped:
    """A chunk of the output that is ``buf[offset : offset + len(chunk)]`` of an mmap'd input."""

    buf: mmap.mmap
    offset: int


def _source_of(view: memoryview, start: int) -> _Mapped | None:
    """``view[start:]`` as a place in an mmap, if ``view`` is a whole-file mmap view (:class:`_Inputs`)."""
    obj = view.obj
    if isinstance(obj, mmap.mmap) and view.nbytes == len(obj):
        return _Mapped(obj, start)
    return None


def _windows(chunks: Sequence[bytes | memoryview], sources: Sequence[_Mapped | None]
             ) -> Iterator[bytes | memoryview]:
    """``chunks`` in order; mmap'd runs in windows, each released once the next is requested."""
    for i, chunk in enumerate(chunks):
        src = sources[i] if i < len(sources) else None
        if src is None:
            yield chunk
            continue
        n = len(chunk)
        for off in range(0, n, WINDOW):
            yield chunk[off : off + WINDOW]
            dontneed(src.buf, src.offset + off, min(WINDOW, n - off))


def _coalesce(blobs: Iterable[H.BlobLike]) -> tuple[list[bytes | memoryview], list[_Mapped | None]]:
    """The file data as few large chunks: consecutive windows of one input that follow each other
    in it (the usual case: a kernel or an initrd page after page) become one view."""
    chunks: list[bytes | memoryview] = []
    sources: list[_Mapped | None] = []
    run: memoryview | None = None
    run_start = run_end = 0

    def flush() -> None:
        if run is not None:
            chunks.append(run[run_start:run_end])
            sources.append(_source_of(run, run_start))

    for b in blobs:
        if type(b) is FileSlice:
            buf = b._buf  # the buffer the slice is a window of
            if buf is run and b.start == run_end:
                run_end += b.length
                continue
            flush()
            run, run_start, run_end = buf, b.start, b.start + b.length
        else:
            flush()
            run = None
            chunks.append(as_view(b))
            sources.append(None)
    flush()
    return chunks, sources


# --------------------------------------------------------------------------- input reading


class _Inputs:
    """Maps each input file once (read-only mmap: no copy of large inputs).

    Each input's SHA-256 (for the reference values) is computed in a background thread from
    the moment it is mapped, while the launch is planned: hashlib releases the GIL on large
    buffers, so this costs no wall time on a machine with a second core.
    """

    def __init__(self) -> None:
        self._maps: dict[str, memoryview] = {}
        self._hashers: dict[str, _Hasher] = {}

    def get(self, path: str, role: str) -> memoryview:
        view = self._maps.get(path)
        if view is None:
            from igvm_builder.io import map_input

            # a regular file only: a FIFO would block, /dev/zero never ends, /proc files look empty
            buf = map_input(path, role)
            if not len(buf):
                raise InputError(f"the {role} is empty (0 bytes); nothing to load", source=path)
            view = memoryview(buf).toreadonly()
            self._maps[path] = view
            self._hashers[path] = _Hasher(view)
        return view

    def sha256(self) -> dict[str, str]:
        """SHA-256 of every input."""
        return {path: hasher.result() for path, hasher in self._hashers.items()}

    def sha256_of(self, path: str) -> bytes:
        """SHA-256 of the input ``path`` (already mapped with :meth:`get`), as bytes."""
        return bytes.fromhex(self._hashers[path].result())

    def cancel(self) -> None:
        """Stop the background hashing (the build failed)."""
        for hasher in self._hashers.values():
            hasher.stop = True


class _Hasher:
    """SHA-256 of an input, read in windows that leave the resident set once hashed; in a
    thread for inputs of a window or more."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.stop = False
        self.future = in_thread("igvm-build-input-sha256", self._hash) if len(view) >= WINDOW else None

    def _hash(self) -> str:
        return sha256_released(self.view, window=WINDOW, stop=lambda: self.stop) or ""

    def result(self) -> str:
        if self.future is None:
            return self._hash()
        return self.future.result() or self._hash()  # "" when stopped
