"""The only module of the core that touches the file system: atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import BinaryIO


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes | memoryview] |
                 Callable[[BinaryIO], object], *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory,
    fsync, then rename.  On any error the temporary file is removed and ``path`` is
    untouched, so a failed build leaves no partial output.  The file mode is fixed
    (not umask-dependent) so outputs are identical whatever the caller's umask.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".igvm-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            elif isinstance(data, bytes | bytearray | memoryview):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_if_exists(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
