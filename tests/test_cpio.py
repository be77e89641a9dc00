"""igvm_builder.cpio: deterministic newc archives (the initrd format)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from igvm_builder.cpio import (
    CpioEntry,
    EntryKind,
    entries_from_directory,
    list_directory,
    pack_directory,
    write_newc,
)
from igvm_builder.errors import InputError

FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)


def parse_newc(data: bytes) -> list[tuple[dict[str, int], bytes, bytes]]:
    """An independent reader following the kernel's buffer-format.rst: (fields, name, data) per member."""
    members = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos:#x}"
        assert pos % 4 == 0
        values = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        fields = dict(zip(FIELDS, values, strict=True))
        name_start = pos + 110
        name = data[name_start : name_start + fields["namesize"] - 1]
        assert data[name_start + fields["namesize"] - 1] == 0
        data_start = name_start + fields["namesize"]
        data_start += -data_start % 4
        body = data[data_start : data_start + fields["filesize"]]
        pos = data_start + fields["filesize"]
        pos += -pos % 4
        if name == b"TRAILER!!!":
            assert not data[pos:].strip(b"\0"), "garbage after the trailer"
            return members
        members.append((fields, name, body))


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "empty").mkdir()
    (root / "init").write_text("#!/bin/sh\necho hi\n")
    (root / "init").chmod(0o700)
    (root / "etc" / "hostname").write_text("guest\n")
    (root / "etc" / "hostname").chmod(0o600)
    (root / "etc-b").write_bytes(b"x" * 5)
    os.symlink("busybox", root / "bin" / "sh")
    return root


def test_single_file_matches_the_format_byte_for_byte():
    data = write_newc([CpioEntry(name=b"a", kind=EntryKind.FILE, data=b"hi\n")])
    header = (
        b"070701"
        + b"00000001"
        + b"000081A4"
        + b"00000000" * 2
        + b"00000001"
        + b"00000000"
        + b"00000003"
        + b"00000000" * 4
        + b"00000002"
        + b"00000000"
    )
    # 110-byte header + "a\0" is 4-aligned: no name padding; 3 data bytes + 1 padding byte
    assert data.startswith(header + b"a\0" + b"hi\n\0")
    trailer = b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
    rest = data[len(header) + 2 + 4 :]
    assert rest.startswith(trailer + b"TRAILER!!!\0" + b"\0\0\0")
    assert len(data) == 512 and not rest[len(trailer) + 14 :].strip(b"\0")


def test_directory_archive_is_sorted_normalised_and_complete(tmp_path):
    data = pack_directory(make_tree(tmp_path / "root"))
    assert len(data) % 512 == 0
    members = parse_newc(data)
    names = [name for _, name, _ in members]
    assert names == [b"bin", b"bin/sh", b"empty", b"etc", b"etc/hostname", b"etc-b", b"init"]
    by_name = {name: (fields, body) for fields, name, body in members}
    assert by_name[b"init"][0]["mode"] == stat.S_IFREG | 0o755
    assert by_name[b"init"][1] == b"#!/bin/sh\necho hi\n"
    assert by_name[b"etc/hostname"][0]["mode"] == stat.S_IFREG | 0o644
    assert by_name[b"etc"][0]["mode"] == stat.S_IFDIR | 0o755
    assert by_name[b"etc"][0]["nlink"] == 2
    assert by_name[b"bin/sh"][0]["mode"] == stat.S_IFLNK | 0o777
    assert by_name[b"bin/sh"][1] == b"busybox"
    assert [f["ino"] for f, _, _ in members] == list(range(1, len(members) + 1))
    for fields, _, body in members:
        assert fields["uid"] == fields["gid"] == fields["mtime"] == 0
        assert fields["devmajor"] == fields["devminor"] == fields["rdevmajor"] == fields["rdevminor"] == 0
        assert fields["filesize"] == len(body)


def test_same_tree_gives_same_bytes_whatever_the_host_metadata(tmp_path):
    old_umask = os.umask(0o077)
    try:
        first = make_tree(tmp_path / "one")
    finally:
        os.umask(old_umask)
    second = make_tree(tmp_path / "other" / "place")
    os.utime(second / "init", (1, 1))
    os.utime(second / "etc", (2_000_000_000, 2_000_000_000))
    (second / "etc" / "hostname").chmod(0o664)
    assert pack_directory(first) == pack_directory(second)


def test_executable_bit_and_contents_change_the_archive(tmp_path):
    root = make_tree(tmp_path / "root")
    before = pack_directory(root)
    (root / "etc" / "hostname").chmod(0o755)
    after_chmod = pack_directory(root)
    assert after_chmod != before
    (root / "etc" / "hostname").chmod(0o644)
    assert pack_directory(root) == before
    (root / "etc" / "hostname").write_text("other\n")
    assert pack_directory(root) != before


def test_entries_round_trip_through_write(tmp_path):
    root = make_tree(tmp_path / "root")
    entries = entries_from_directory(root)
    assert write_newc(reversed(entries)) == write_newc(entries) == pack_directory(root)
    assert [m.name for m in list_directory(root)] == [e.name for e in entries]


@pytest.mark.parametrize("name", [b"", b"/abs", b"./x", b"a/../b", b"a//b", b"a/", b"nul\0"])
def test_invalid_names_are_rejected(name):
    with pytest.raises(InputError, match="invalid cpio member name"):
        CpioEntry(name=name, kind=EntryKind.FILE)


def test_inconsistent_entries_are_rejected():
    with pytest.raises(InputError, match="duplicate"):
        write_newc([CpioEntry(name=b"a", kind=EntryKind.FILE), CpioEntry(name=b"a", kind=EntryKind.FILE)])
    with pytest.raises(InputError, match="cannot have data"):
        CpioEntry(name=b"d", kind=EntryKind.DIRECTORY, data=b"x")
    with pytest.raises(InputError, match="empty target"):
        CpioEntry(name=b"l", kind=EntryKind.SYMLINK)


def test_special_files_and_missing_roots_are_input_errors(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(InputError, match="FIFO") as info:
        pack_directory(root)
    assert info.value.source == str(root / "fifo")
    with pytest.raises(InputError, match="not a directory"):
        pack_directory(tmp_path / "missing")
