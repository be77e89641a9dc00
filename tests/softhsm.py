"""A SoftHSM2 token directory holding the TEST-ONLY keys, for tests of PKCS#11 signing.

Use it from a test module through a module-scoped fixture::

    from softhsm import SoftHsm, softhsm_token

    @pytest.fixture(scope="module")
    def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
        yield from softhsm_token(tmp_path_factory)

Without ``softhsm2-util`` or ``libsofthsm2.so`` the fixture *fails* (it never skips):
CI (``.ci/run``) must install the ``softhsm2`` package.

Token ``igvm-test``: ``snp-id`` (id 01), ``snp-author`` (id 02), ``wrong-curve`` (a P-256
key, id 03).  Token ``igvm-nopub``: ``snp-id`` (id 01) whose public-key object was deleted.
While the fixture is active ``SOFTHSM2_CONF`` points at the new token directory and
``IGVM_PKCS11_MODULE`` / ``IGVM_PKCS11_PIN`` are unset.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())["keys"]
ID_PKCS8 = SHARED / KEYS["id_key_pkcs8_pem"]
AUTHOR_PKCS8 = SHARED / KEYS["author_key_pkcs8_pem"]

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "igvm-test"
NOPUB_TOKEN = "igvm-nopub"
PIN = "4711-test-pin"
SO_PIN = "12345678"


@dataclass(frozen=True)
class SoftHsm:
    """The token directory: ``module`` (libsofthsm2.so), ``conf`` (SOFTHSM2_CONF), ``tmp``."""

    module: str
    conf: Path
    tmp: Path

    def uri(self, path: str, query: str = f"pin-value={PIN}", *, with_module: bool = True) -> str:
        """``pkcs11:PATH?QUERY&module-path=...`` for this token directory."""
        parts = [query] if query else []
        if with_module:
            parts.append(f"module-path={self.module}")
        return f"pkcs11:{path}" + ("?" + "&".join(parts) if parts else "")

    @property
    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to see these tokens."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def softhsm_tools() -> tuple[str, str]:
    """``softhsm2-util`` and the module path; pytest.fail (no skip) when missing."""
    util = shutil.which("softhsm2-util")
    if util is None:
        pytest.fail(
            "softhsm2-util not found: .ci/run must install softhsm2 (apt-get install softhsm2) "
            "so the PKCS#11 signing tests run; they do not skip",
            pytrace=False,
        )
    module = os.environ.get("IGVM_TEST_SOFTHSM_MODULE") or next(
        (m for m in SOFTHSM_MODULES if Path(m).is_file()), None
    )
    if module is None:
        pytest.fail(
            "libsofthsm2.so not found in " + ", ".join(SOFTHSM_MODULES) + ": .ci/run must install softhsm2 "
            "(or set IGVM_TEST_SOFTHSM_MODULE)",
            pytrace=False,
        )
    return util, module


def _run(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, f"{argv[:2]} failed: {proc.stdout}{proc.stderr}"


def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """Generator behind the ``softhsm`` fixtures: create the tokens, yield, restore the environment."""
    util, module = softhsm_tools()
    tmp = tmp_path_factory.mktemp("softhsm")
    tokens = tmp / "tokens"
    tokens.mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    p256 = tmp / "p256.pkcs8.pem"
    p256.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for label in (TOKEN, NOPUB_TOKEN):
        _run([util, "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", PIN], env)
    for path, label, key_id, token in (
        (ID_PKCS8, "snp-id", "01", TOKEN),
        (AUTHOR_PKCS8, "snp-author", "02", TOKEN),
        (p256, "wrong-curve", "03", TOKEN),
        (ID_PKCS8, "snp-id", "01", NOPUB_TOKEN),
    ):
        _run(
            [util, "--import", str(path), "--token", token, "--label", label, "--id", key_id, "--pin", PIN],
            env,
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        mp.delenv("IGVM_PKCS11_MODULE", raising=False)
        mp.delenv("IGVM_PKCS11_PIN", raising=False)
        import pkcs11

        lib = pkcs11.lib(module)
        lib.reinitialize()  # re-read SOFTHSM2_CONF if the module was loaded before
        with lib.get_token(token_label=NOPUB_TOKEN).open(rw=True, user_pin=PIN) as session:
            for obj in list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY})):
                obj.destroy()
        yield SoftHsm(module=module, conf=conf, tmp=tmp)
