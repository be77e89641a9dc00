"""Deterministic ``newc`` cpio archives (the Linux initramfs format).

The output is a pure function of the entries' names, kinds, executable bits,
symlink targets and file contents: entries are sorted by path, owner and group
are 0, every mtime is 0, inode numbers are assigned in sorted order, modes are
normalised (directories and executables 0755, other files 0644, symlinks 0777)
and no device numbers are recorded.  Two checkouts of the same directory tree
therefore give byte-identical archives, whatever their location, umask, owner
or timestamps.

Layout (``Documentation/driver-api/early-userspace/buffer-format.rst`` in the
Linux tree): each entry is a 110-byte ASCII header (``070701`` followed by
thirteen 8-digit hexadecimal fields), the NUL-terminated name padded to a
multiple of 4 bytes, and the data padded to a multiple of 4 bytes.  The archive
ends with the entry ``TRAILER!!!`` and is zero-padded to a multiple of 512 bytes,
as GNU cpio does.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Iterable

from igvm_builder.errors import InputError
from igvm_builder.recordclass import record

__all__ = [
    "CpioEntry",
    "EntryKind",
    "TreeMember",
    "entries_from_directory",
    "list_directory",
    "pack_directory",
    "write_newc",
]

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER_NAME = b"TRAILER!!!"
BLOCK_SIZE = 512
_MAX_FIELD = 0xFFFFFFFF


class EntryKind(enum.Enum):
    """The kinds of entries an archive may hold."""

    DIRECTORY = "dir"
    FILE = "file"
    SYMLINK = "symlink"


_MODES = {
    (EntryKind.DIRECTORY, False): stat.S_IFDIR | 0o755,
    (EntryKind.DIRECTORY, True): stat.S_IFDIR | 0o755,
    (EntryKind.FILE, False): stat.S_IFREG | 0o644,
    (EntryKind.FILE, True): stat.S_IFREG | 0o755,
    (EntryKind.SYMLINK, False): stat.S_IFLNK | 0o777,
    (EntryKind.SYMLINK, True): stat.S_IFLNK | 0o777,
}


@record(kw_only=True)
class CpioEntry:
    """One archive member.

    ``name`` is a relative path with ``/`` separators (no leading ``/`` or
    ``./``, no ``.`` or ``..`` components).  ``data`` is the file contents, or
    the link target for a symlink, and must be empty for a directory.
    """

    name: bytes
    kind: EntryKind
    data: bytes = b""
    executable: bool = False

    def __post_init__(self) -> None:
        shown = self.name.decode("utf-8", "backslashreplace")
        parts = self.name.split(b"/")
        if not self.name or any(p in (b"", b".", b"..") for p in parts) or b"\0" in self.name:
            raise InputError(f"invalid cpio member name {shown!r}")
        if self.kind is EntryKind.DIRECTORY and self.data:
            raise InputError(f"cpio directory {shown!r} cannot have data")
        if self.kind is EntryKind.SYMLINK and not self.data:
            raise InputError(f"cpio symlink {shown!r} has an empty target")
        if len(self.data) > _MAX_FIELD:
            raise InputError(f"cpio member {shown!r} is larger than 4 GiB (newc limit)")

    @property
    def mode(self) -> int:
        """The normalised ``st_mode`` written to the archive."""
        return _MODES[self.kind, self.executable]

    def sort_key(self) -> tuple[bytes, ...]:
        """Path components: sorts every directory before its contents."""
        return tuple(self.name.split(b"/"))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(*, ino: int, mode: int, nlink: int, filesize: int, namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, 0, 0, namesize, 0)
    #        ino  mode uid gid nlink mtime size  devmaj devmin rdevmaj rdevmin namesize check
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` as a deterministic newc archive.

    Entries are sorted by path; duplicate names raise :class:`InputError`.
    Parent directories are not invented: list them explicitly (as
    :func:`entries_from_directory` does) if the unpacker needs them.
    """
    ordered = sorted(entries, key=CpioEntry.sort_key)
    out = bytearray()
    previous: bytes | None = None
    for ino, entry in enumerate(ordered, start=1):
        if entry.name == previous:
            raise InputError(f"duplicate cpio member {entry.name.decode('utf-8', 'backslashreplace')!r}")
        previous = entry.name
        name = entry.name + b"\0"
        nlink = 2 if entry.kind is EntryKind.DIRECTORY else 1
        out += _header(ino=ino, mode=entry.mode, nlink=nlink, filesize=len(entry.data), namesize=len(name))
        out += name
        out += _pad4(HEADER_SIZE + len(name))
        out += entry.data
        out += _pad4(len(entry.data))
    trailer = TRAILER_NAME + b"\0"
    out += _header(ino=0, mode=0, nlink=1, filesize=0, namesize=len(trailer))
    out += trailer
    out += _pad4(HEADER_SIZE + len(trailer))
    out += b"\0" * (-len(out) % BLOCK_SIZE)
    return bytes(out)


@record
class TreeMember:
    """One member of a directory tree as found on disk (contents not read).

    ``link`` is the symlink target for symlinks, ``b""`` otherwise.
    """

    name: bytes
    kind: EntryKind
    executable: bool
    path: str
    link: bytes = b""


def list_directory(root: str | os.PathLike[str]) -> list[TreeMember]:
    """The members of the tree under ``root`` (not ``root`` itself), sorted by path.

    Symlinks are listed as symlinks (never followed); a file is executable if
    any of its execute bits is set.  Sockets, FIFOs and device nodes raise
    :class:`InputError`, as does a missing or non-directory ``root``.
    """
    top = os.fspath(root)
    if not os.path.isdir(top):
        raise InputError("not a directory", source=top)
    members: list[TreeMember] = []

    def walk(directory: str, prefix: bytes) -> None:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for child in children:
            name = prefix + os.fsencode(child.name)
            mode = child.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                members.append(TreeMember(name, EntryKind.DIRECTORY, False, child.path))
                walk(child.path, name + b"/")
            elif stat.S_ISREG(mode):
                members.append(TreeMember(name, EntryKind.FILE, bool(mode & 0o111), child.path))
            elif stat.S_ISLNK(mode):
                link = os.fsencode(os.readlink(child.path))
                members.append(TreeMember(name, EntryKind.SYMLINK, False, child.path, link))
            else:
                raise InputError(
                    "cannot pack a socket, FIFO or device node into a cpio archive", source=child.path
                )

    walk(top, b"")
    return members


def entries_from_directory(root: str | os.PathLike[str]) -> list[CpioEntry]:
    """Read the tree under ``root`` into archive entries (see :func:`list_directory`)."""
    entries: list[CpioEntry] = []
    for member in list_directory(root):
        if member.kind is EntryKind.FILE:
            with open(member.path, "rb") as fh:
                data = fh.read()
        else:
            data = member.link
        entries.append(CpioEntry(name=member.name, kind=member.kind, data=data, executable=member.executable))
    return entries


def pack_directory(root: str | os.PathLike[str]) -> bytes:
    """The deterministic newc archive of the tree under ``root``."""
    return write_newc(entries_from_directory(root))
