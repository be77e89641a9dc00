"""A small release for the CLI-wide tests (JSON schemas, exit codes); this module holds no tests.

:func:`make_release` builds the kernel project of ``test_repro`` (native, SNP, TDX; loader
qemu) with its reference values, signs it with a freshly generated P-384 key (not a
TEST-ONLY key), and returns every path the tests use.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_repro import compile_kernel, make_project

from igvm_builder.cli import main


def new_key(path: Path) -> Path:
    """A new P-384 private key in PEM (PKCS#8) at ``path``."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def run(*argv: object) -> tuple[int, str, str]:
    """``igvm-builder ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def make_release(root: Path) -> dict[str, Path]:
    kernel = compile_kernel(root / "kernel" / "hello.elf")
    cfg = make_project(root / "proj", kernel)
    dist = root / "dist"
    dist.mkdir()
    paths = {"config": cfg, "igvm": dist / "hello.igvm", "ref": dist / "hello.json",
             "key": new_key(root / "id.pem"), "signed": dist / "hello.signed.igvm",
             "kernel": root / "proj" / "build" / "hello.elf"}
    rc, _, err = run("build", cfg, "-o", paths["igvm"], "--reference-values", paths["ref"], "-q")
    assert rc == 0, err
    rc, _, err = run("sign", paths["igvm"], "-o", paths["signed"], "--id-key", paths["key"], "--config", cfg, "-q")
    assert rc == 0, err
    return paths
