"""``igvm-builder build --depfile``: a Make/Ninja dependency file (PEERS.md §3.1: no producer
offers one), checked by driving GNU Make with it.

The output must be rebuilt when the config, an included config or any input it names changes,
be up to date otherwise, survive an input being dropped from the config and then deleted (the
``-MP`` phony targets), and cope with a space in a file name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from test_build_helpers import MEMTEST, REPO

from igvm_builder.commands.build import depfile_text

MAKE = shutil.which("make")  # ./dev test installs it; without it the Make tests fail, never skip


def test_depfile_text_escapes_like_gcc() -> None:
    text = depfile_text("out dir/a.igvm", ["cfg.toml", "my kernel", "odd#name", "price$", "cfg.toml"])
    assert text == ("out\\ dir/a.igvm: cfg.toml \\\n  my\\ kernel \\\n  odd\\#name \\\n  price$$\n\n"
                    "cfg.toml:\n\nmy\\ kernel:\n\nodd\\#name:\n\nprice$$:\n")


def _make(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert MAKE is not None, "GNU Make not found: ./dev test installs it (Debian package make)"
    return subprocess.run([MAKE, "-C", str(directory), *args], capture_output=True, text=True, env=env, timeout=300)


def _age(directory: Path) -> None:
    """Set every file one minute back, so that a later touch is newer whatever the clock's grain."""
    old = time.time() - 60
    for p in directory.iterdir():
        os.utime(p, (old, old))


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


def test_make_rebuilds_exactly_when_an_input_changes(tmp_path: Path) -> None:
    shutil.copyfile(MEMTEST, tmp_path / "my kernel")
    (tmp_path / "initrd.img").write_bytes(os.urandom(5000))
    (tmp_path / "common.toml").write_text('[memory]\nsize = "1G"\n')
    config = '''include = ["common.toml"]
[image]
platforms = ["native", "snp"]
[kernel]
path = "my kernel"
initrd = "initrd.img"
'''
    (tmp_path / "cfg.toml").write_text(config)
    (tmp_path / "Makefile").write_text(
        "out.igvm: cfg.toml\n"
        f"\t{sys.executable} -m igvm_builder build cfg.toml -o out.igvm --depfile out.igvm.d -q\n"
        "-include out.igvm.d\n")
    first = _make(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    dep = (tmp_path / "out.igvm.d").read_text()
    for name in ("cfg.toml", "common.toml", "my\\ kernel", "initrd.img"):
        assert name in dep, dep
    assert _make(tmp_path, "-q").returncode == 0  # up to date
    for changed in ("initrd.img", "common.toml", "my kernel", "cfg.toml"):
        _age(tmp_path)
        assert _make(tmp_path, "-q").returncode == 0, changed
        _touch(tmp_path / changed)
        assert _make(tmp_path, "-q").returncode == 1, f"{changed} changed: out.igvm must be rebuilt"
        rebuilt = _make(tmp_path)
        assert rebuilt.returncode == 0 and "igvm_builder build" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
        assert _make(tmp_path, "-q").returncode == 0
    # drop the initrd from the config and delete it: Make must not stop at the vanished file
    _age(tmp_path)
    (tmp_path / "cfg.toml").write_text(config.replace('initrd = "initrd.img"\n', ""))
    (tmp_path / "initrd.img").unlink()
    again = _make(tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "initrd.img" not in (tmp_path / "out.igvm.d").read_text()


def test_depfile_is_written_with_the_outputs_or_not_at_all(tmp_path: Path) -> None:
    from test_build_helpers import assert_cli_error, cli

    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[image]\nplatforms = ["native"]\n[kernel]\npath = "missing.bin"\n')
    proc = cli("build", str(cfg), "-o", str(tmp_path / "out.igvm"), "--depfile", str(tmp_path / "out.d"))
    assert_cli_error(proc, "missing.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]
