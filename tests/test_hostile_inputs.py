"""Issue #15, inputs: resource bounds (findings 2, 8), tracebacks that became one-line errors
(finding 9), silent acceptances (finding 10), signer errors that echoed secrets (finding 12)
and the smaller items of finding 13.

Every odd input is made under the test's temporary directory: FIFOs (``os.mkfifo``), a zero
device made with ``os.mknod`` where permitted, ``/proc/self/status`` read as an input (never
written).  Each command runs in a fresh interpreter with a timeout, so a hang fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from test_build_helpers import MEMTEST, SHARED, cli, q

ID_PEM = SHARED / "keys" / "test-only-id-p384.pem"
VECTOR = SHARED / "vectors" / "igvm" / "snp_v1.igvm"


def _one_line(proc: object, command: str, *needles: str) -> str:
    """Exit status 1 (2 for diff), one line on stderr naming every needle, no traceback."""
    rc, err = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert rc in (1, 2), (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"igvm-builder {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _blob_config(tmp: Path, blob: Path | str, name: str = "build.toml", extra: str = "") -> Path:
    cfg = tmp / name
    cfg.write_text(f"[image]\nplatforms = [\"native\"]\n{extra}\n[[blob]]\npath = {q(blob)}\ngpa = 0x200000\n")
    return cfg


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.bin"
    p.write_bytes(bytes(range(256)) * 16)
    return p


# --------------------------------------------------------------------------- FIFOs and devices (findings 2, 8)


def test_fifo_inputs_are_refused_up_front(tmp_path: Path, payload: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "o.igvm"
    # as a blob, as the config, as an include, as a kernel and an initrd
    _one_line(cli("build", str(_blob_config(tmp_path, fifo)), "-o", str(out)), "build", str(fifo), "a FIFO",
              "regular file")
    _one_line(cli("build", str(fifo), "-o", str(out)), "build", str(fifo), "a FIFO")
    inc = _blob_config(tmp_path, payload, "inc.toml", extra=f"include = [{q(fifo)}]")
    inc.write_text(f"include = [{q(fifo)}]\n" + _blob_config(tmp_path, payload, "x.toml").read_text())
    _one_line(cli("build", str(inc), "-o", str(out)), "build", str(fifo), "a FIFO")
    kcfg = tmp_path / "k.toml"
    kcfg.write_text(f"[image]\nplatforms = [\"native\"]\n[kernel]\npath = {q(fifo)}\n")
    _one_line(cli("build", str(kcfg), "-o", str(out)), "build", str(fifo), "kernel is a FIFO")
    kcfg.write_text(f"[image]\nplatforms = [\"native\"]\n[kernel]\npath = {q(MEMTEST)}\ninitrd = {q(fifo)}\n")
    _one_line(cli("build", str(kcfg), "-o", str(out)), "build", str(fifo), "initrd is a FIFO")
    # IGVM files, keys, reference values, documents, signatures
    for command, args in (("check", [str(fifo)]), ("dump", [str(fifo)]), ("measure", [str(fifo)]),
                          ("lint", [str(fifo)]),
                          ("sign", [str(VECTOR), "-o", str(out), "--id-key", str(fifo), "--allow-test-keys"]),
                          ("verify", [str(VECTOR), "--reference", str(fifo)]),
                          ("sign", [str(VECTOR), "-o", str(out), "--import-signature", str(fifo),
                                    "--id-signature", str(payload)])):
        _one_line(cli(command, *args), command, str(fifo), "FIFO")
    proc = cli("diff", str(fifo), str(VECTOR))
    assert proc.returncode == 2 and "FIFO" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not out.exists()


def test_device_and_proc_inputs_are_refused(tmp_path: Path) -> None:
    proc_file = "/proc/self/status"  # a regular file that says it is empty and is not
    _one_line(cli("build", str(_blob_config(tmp_path, proc_file)), "-o", str(tmp_path / "o.igvm")), "build",
              proc_file, "empty")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    _one_line(cli("build", str(_blob_config(tmp_path, empty)), "-o", str(tmp_path / "o.igvm")), "build",
              "empty.bin", "blob is empty")
    zero = tmp_path / "zero"
    try:
        os.mknod(zero, stat.S_IFCHR | 0o444, os.makedev(1, 5))
    except OSError as exc:
        pytest.skip(f"cannot make a device node under a temporary directory here: {exc}")
    _one_line(cli("build", str(zero), "-o", str(tmp_path / "o.igvm")), "build", "character device")
    _one_line(cli("build", str(_blob_config(tmp_path, zero)), "-o", str(tmp_path / "o.igvm")), "build",
              "blob is a character device")
    _one_line(cli("sign", str(VECTOR), "-o", str(tmp_path / "s.igvm"), "--id-key", str(zero), "--allow-test-keys"),
              "sign", "character device")


def test_size_caps(tmp_path: Path, payload: Path) -> None:
    from igvm_builder.io import CONFIG_LIMIT, JSON_LIMIT, KEY_LIMIT

    big = _blob_config(tmp_path, payload)
    big.write_text(big.read_text() + "#" * CONFIG_LIMIT + "\n")
    _one_line(cli("build", str(big), "-o", str(tmp_path / "o.igvm")), "build", "build.toml",
              f"the limit is {CONFIG_LIMIT} bytes")
    key = tmp_path / "big.pem"
    key.write_bytes(ID_PEM.read_bytes() + b"\n" * KEY_LIMIT)
    _one_line(cli("sign", str(VECTOR), "-o", str(tmp_path / "s.igvm"), "--id-key", str(key), "--allow-test-keys"),
              "sign", "big.pem", f"the limit is {KEY_LIMIT} bytes")
    ref = tmp_path / "ref.json"
    with open(ref, "wb") as fh:
        fh.truncate(JSON_LIMIT + 1)  # sparse: no disk used
    _one_line(cli("verify", str(VECTOR), "--reference", str(ref)), "verify", "ref.json",
              f"the limit is {JSON_LIMIT} bytes")


# --------------------------------------------------------------------------- tracebacks (finding 9)


def test_deep_nesting_is_one_line(tmp_path: Path, payload: Path) -> None:
    from igvm_builder.config import MAX_INCLUDE_DEPTH
    from igvm_builder.io import MAX_NESTING

    # 1,500 nested includes: each includes the next
    chain = [tmp_path / f"inc{i}.toml" for i in range(1500)]
    for i, path in enumerate(chain[:-1]):
        path.write_text(f"include = [{q(chain[i + 1])}]\n")
    chain[-1].write_text("[memory]\nsize = \"64M\"\n")
    top = tmp_path / "top.toml"
    top.write_text(f"include = [{q(chain[0])}]\n" + _blob_config(tmp_path, payload, "x.toml").read_text())
    _one_line(cli("build", str(top), "-o", str(tmp_path / "o.igvm")), "build",
              f"includes nested more than {MAX_INCLUDE_DEPTH} levels deep")
    # deeply nested TOML values: past the interpreter's recursion limit, and past ours
    for depth in (5000, MAX_NESTING + 1):
        deep = tmp_path / f"deep{depth}.toml"
        deep.write_text("x = " + "[" * depth + "]" * depth + "\n")
        _one_line(cli("build", str(deep), "-o", str(tmp_path / "o.igvm")), "build", deep.name,
                  f"nests more than {MAX_NESTING} levels deep")
    # deeply nested JSON to verify --reference, verify-release and sign --import-signature
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100000 + "]" * 100000)
    _one_line(cli("verify", str(VECTOR), "--reference", str(deep_json)), "verify", "deep.json",
              f"nests more than {MAX_NESTING} levels deep")
    _one_line(cli("verify-release", str(_blob_config(tmp_path, payload)), "--reference", str(deep_json)), "verify-release",
              "deep.json", "nests more than")
    sig = tmp_path / "sig.bin"
    sig.write_bytes(b"\x01" * 96)
    _one_line(cli("sign", str(VECTOR), "-o", str(tmp_path / "s.igvm"), "--import-signature", str(deep_json),
                  "--id-signature", str(sig)), "sign", "nests more than")


def test_long_numbers_are_one_line(tmp_path: Path, payload: Path) -> None:
    digits = "9" * 5000
    for body in (f"[memory]\nsize = \"{digits}\"\n", f"[memory]\nsize = \"{digits}M\"\n",
                 f"[memory]\nsize = {digits}\n", f"[snp]\npolicy = \"{digits}\"\n"):
        cfg = tmp_path / "n.toml"
        cfg.write_text(body + _blob_config(tmp_path, payload, "x.toml").read_text())
        line = _one_line(cli("build", str(cfg), "-o", str(tmp_path / "o.igvm")), "build", "n.toml")
        assert len(line) < 400  # the 5,000 digits are not echoed back


# --------------------------------------------------------------------------- cmd: signers (findings 2, 12)


def test_signer_errors_never_echo_arguments_or_stderr(tmp_path: Path) -> None:
    secret = "PIN-7431-very-secret"
    script = tmp_path / "signer.py"
    script.write_text("import sys\nsys.stderr.write('token login failed with pin " + secret + "\\n')\nsys.exit(4)\n")
    spec = f"cmd:{sys.executable} {script} --pin={secret}"
    pub = tmp_path / "pub.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(ID_PEM.read_bytes(), password=None)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = cli("sign", str(VECTOR), "-o", str(tmp_path / "s.igvm"), "--id-key", spec, "--allow-test-keys")
    assert proc.returncode == 2  # the key cannot be used (exit-code table)
    assert secret not in proc.stderr and secret not in proc.stdout, proc.stderr
    assert str(script) not in proc.stderr
    line = _one_line(proc, "sign", f"cmd:{Path(sys.executable).name}", "exited with status 4", "bytes to stderr, not shown")
    assert "--pin" not in line


def test_signer_output_is_capped(tmp_path: Path) -> None:
    from igvm_builder.errors import SigningError
    from igvm_builder.sign.keys import SIGNER_OUTPUT_LIMIT, CommandKey

    endless = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('A' * 65536)"]
    with pytest.raises(SigningError, match=f"printed more than {SIGNER_OUTPUT_LIMIT} bytes on stdout") as info:
        CommandKey(endless, timeout=60).public_key()
    assert "while True" not in str(info.value)
    noisy = [sys.executable, "-c", "import sys\nsys.stderr.write('E' * (8 << 20)); sys.exit(2)"]
    with pytest.raises(SigningError, match=r"exited with status 2 \(it wrote 8388608 bytes to stderr"):
        CommandKey(noisy, timeout=60).public_key()


# --------------------------------------------------------------------------- finding 13


def test_config_with_a_byte_order_mark(tmp_path: Path, payload: Path) -> None:
    plain = _blob_config(tmp_path, payload, "plain.toml")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a, b = tmp_path / "a.igvm", tmp_path / "b.igvm"
    assert cli("build", str(plain), "-o", str(a)).returncode == 0
    proc = cli("build", str(bom), "-o", str(b))
    assert proc.returncode == 0, proc.stderr
    assert a.read_bytes() == b.read_bytes()
    # the BOM does not shift the line numbers of errors
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xef\xbb\xbf[image]\nplatforms = [\"native\"]\nbogus = 1\n")
    _one_line(cli("build", str(bad), "-o", str(a)), "build", "bad.toml:3")


def test_reference_json_roundtrip_unaffected(tmp_path: Path, payload: Path) -> None:
    """The nesting check accepts what build writes (a regression guard for the limit)."""
    out, ref = tmp_path / "o.igvm", tmp_path / "o.json"
    assert cli("build", str(_blob_config(tmp_path, payload)), "-o", str(out), "--reference-values",
               str(ref)).returncode == 0
    from igvm_builder.errors import VerificationError
    from igvm_builder.io import load_json

    assert load_json(ref, "reference values", error=VerificationError) == json.loads(ref.read_text())
