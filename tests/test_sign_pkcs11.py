"""Pkcs11Key against a real PKCS#11 module: SoftHSM2 with a fresh token per test module.

These tests never skip: without ``softhsm2-util`` they fail, because CI (``.ci/run``)
must install the ``softhsm2`` package.  ECDSA in a token uses random nonces, so
signatures are compared by verification, and keys by their SEV key digests.
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

from igvm_builder.errors import SigningError
from igvm_builder.sign import (
    IdAuthInfo,
    PemFileKey,
    Pkcs11Key,
    _ecdsa,
    key_digest,
    key_source_from_spec,
    sign_id_block,
    verify_id_block,
    verify_igvm_id_block_body,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())
KEYS = VECTORS["keys"]
VEC1 = VECTORS["rfc6979_vectors"][1]
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
    module: str
    conf: Path
    tmp: Path

    def uri(self, path: str, query: str = f"pin-value={PIN}", *, with_module: bool = True) -> str:
        parts = [query] if query else []
        if with_module:
            parts.append(f"module-path={self.module}")
        return f"pkcs11:{path}" + ("?" + "&".join(parts) if parts else "")


def _softhsm_tools() -> tuple[str, str]:
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


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A fresh SoftHSM2 token directory with the TEST-ONLY ID and author keys and a P-256 key.

    Token ``igvm-test``: ``snp-id`` (id 01), ``snp-author`` (id 02), ``wrong-curve`` (P-256, id 03).
    Token ``igvm-nopub``: ``snp-id`` (id 01) whose public-key object was deleted.
    """
    util, module = _softhsm_tools()
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


def _pem_public(path: Path) -> ec.EllipticCurvePublicKey:
    return PemFileKey(path).public_key()


def test_public_key_digest_equals_pem_key(softhsm: SoftHsm) -> None:
    key = Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-id"))
    assert not key.deterministic
    assert key_digest(key.public_key()).hex() == KEYS["id_key_digest"]
    assert _ecdsa.same_public_key(key.public_key(), _pem_public(ID_PKCS8))
    author = Pkcs11Key(softhsm.uri(f"token={TOKEN};id=%02;type=private"))
    assert key_digest(author.public_key()).hex() == KEYS["author_key_digest"]


def test_signature_verifies_with_the_pem_public_key(softhsm: SoftHsm) -> None:
    key = Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-id;id=%01"))
    message = bytes.fromhex(VEC1["id_block_hex"])
    for _ in range(2):
        r, s = key.sign(message)
        assert _ecdsa.verify_message(_pem_public(ID_PKCS8), r, s, message)


def test_sign_id_block_with_token_keys(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = softhsm.tmp / "pin.txt"
    pin_file.write_text(PIN + "\n")
    id_key = Pkcs11Key(softhsm.uri(f"token={TOKEN};id=%01", f"pin-source=file:{pin_file}"))
    # Module and PIN from the environment (no module-path, no PIN in the URI).
    monkeypatch.setenv("IGVM_PKCS11_MODULE", softhsm.module)
    monkeypatch.setenv("IGVM_PKCS11_PIN", PIN)
    author = key_source_from_spec(f"pkcs11:token={TOKEN};object=snp-author")
    assert isinstance(author, Pkcs11Key)

    params = VEC1["params"]
    policy = int(params["policy"], 0)
    signed = sign_id_block(
        bytes.fromhex(VEC1["launch_digest"]),
        policy=policy,
        family_id=bytes.fromhex(params["family_id"]),
        image_id=bytes.fromhex(params["image_id"]),
        guest_svn=params["guest_svn"],
        id_key=id_key,
        author_key=author,
        compatibility_mask=1,
    )
    assert not signed.deterministic
    assert signed.id_block.hex() == VEC1["id_block_hex"]
    assert signed.id_key_digest.hex() == KEYS["id_key_digest"]
    assert (
        signed.author_key_digest is not None and signed.author_key_digest.hex() == KEYS["author_key_digest"]
    )
    expected = {
        "expected_id_key_digest": bytes.fromhex(KEYS["id_key_digest"]),
        "expected_author_key_digest": bytes.fromhex(KEYS["author_key_digest"]),
    }
    verify_id_block(signed.id_block, signed.id_auth, **expected)
    verify_igvm_id_block_body(signed.igvm_body, policy=policy, **expected)
    # Only the signatures differ from the deterministic vector.
    reference = bytes.fromhex(VEC1["id_auth_hex"])
    assert signed.id_auth[:0x40] == reference[:0x40]
    assert signed.id_auth[0x240:0x680] == reference[0x240:0x680]
    assert signed.id_auth[0x880:] == reference[0x880:]
    assert IdAuthInfo.nonzero_reserved(signed.id_auth) == []


def test_wrong_pin_is_reported_without_the_pin(softhsm: SoftHsm) -> None:
    wrong = "0000-wrong-pin"
    key = Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-id", f"pin-value={wrong}"))
    with pytest.raises(SigningError, match="rejected the PIN") as info:
        key.sign(b"message")
    assert wrong not in str(info.value) and wrong not in repr(info.value)
    assert wrong not in repr(key) and "pin-value=***" in key.description
    assert PIN not in str(info.value)


def test_wrong_curve_on_the_token(softhsm: SoftHsm) -> None:
    key = Pkcs11Key(softhsm.uri(f"token={TOKEN};object=wrong-curve"))
    with pytest.raises(SigningError, match=r"key is EC P-256 \(secp256r1\).*P-384") as info:
        key.sign(b"message")
    assert "object=wrong-curve" in str(info.value)
    with pytest.raises(SigningError, match="P-256"):
        key.public_key()


def test_lookup_failures(softhsm: SoftHsm) -> None:
    with pytest.raises(SigningError, match="no token matches"):
        Pkcs11Key(softhsm.uri("token=no-such-token;object=snp-id")).public_key()
    with pytest.raises(SigningError, match="no private key matches"):
        Pkcs11Key(softhsm.uri(f"token={TOKEN};object=no-such-key")).public_key()
    with pytest.raises(SigningError, match=r"3 private keys match the URI; add object= or id="):
        Pkcs11Key(softhsm.uri(f"token={TOKEN}")).public_key()
    with pytest.raises(SigningError, match="2 tokens match"):
        Pkcs11Key(softhsm.uri("object=snp-id")).public_key()
    with pytest.raises(SigningError, match="not logged in"):
        Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-id", "")).public_key()
    with pytest.raises(SigningError, match="cannot read pin-source"):
        Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-id", "pin-source=/nonexistent/pin")).public_key()


def test_token_without_public_key_object(softhsm: SoftHsm) -> None:
    uri = softhsm.uri(f"token={NOPUB_TOKEN};object=snp-id")
    with pytest.raises(SigningError, match="no public-key object or certificate"):
        Pkcs11Key(uri).public_key()
    key = Pkcs11Key(uri, public_key=_pem_public(ID_PKCS8))
    message = b"signed by a token that only holds the private key"
    r, s = key.sign(message)
    assert _ecdsa.verify_message(_pem_public(ID_PKCS8), r, s, message)
    # A public key that is not the token key's: the post-signing verification catches it.
    with pytest.raises(SigningError, match="does not verify with its public key"):
        Pkcs11Key(uri, public_key=_pem_public(AUTHOR_PKCS8)).sign(message)
