"""Pkcs11Key against a real PKCS#11 module: SoftHSM2 with a fresh token per test module.

These tests never skip: without ``softhsm2-util`` they fail, because CI (``.ci/run``)
must install the ``softhsm2`` package.  ECDSA in a token uses random nonces, so
signatures are compared by verification, and keys by their SEV key digests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from softhsm import AUTHOR_PKCS8, ID_PKCS8, KEYS, NOPUB_TOKEN, PIN, SHARED, TOKEN, SoftHsm, softhsm_token

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

VECTORS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())
VEC1 = VECTORS["rfc6979_vectors"][1]


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """The SoftHSM2 tokens of ``tests/softhsm.py`` (TEST-ONLY ID/author keys, a P-256 key, a token without public key)."""
    yield from softhsm_token(tmp_path_factory)


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


def test_lookup_errors_list_what_was_found(softhsm: SoftHsm) -> None:
    """A wrong token label lists the tokens the module shows and the module path; a wrong object
    label lists the private keys on the token (labels and ids, as softhsm.py made them)."""
    with pytest.raises(SigningError) as info:
        Pkcs11Key(softhsm.uri("token=igvm-tset;object=snp-id")).public_key()
    text = str(info.value)
    assert f"(module {softhsm.module}; tokens found: " in text and "'igvm-test' (serial " in text
    assert "'igvm-nopub' (serial " in text and PIN not in text
    with pytest.raises(SigningError) as info:
        Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-idd")).public_key()
    text = str(info.value)
    assert "private keys on the token: " in text
    for label, key_id in (("snp-id", "01"), ("snp-author", "02"), ("wrong-curve", "03")):
        assert f"'{label}' (id {key_id})" in text


def test_bad_softhsm2_conf_is_one_clear_line(softhsm: SoftHsm, tmp_path: Path) -> None:
    """SoftHSM cannot initialize without its configuration: the error names the module tried and
    SOFTHSM2_CONF (a fresh process: the module reads its configuration once)."""
    import subprocess
    import sys

    src = tmp_path / "in.igvm"
    src.write_bytes((SHARED / "vectors" / "igvm" / "snp_v1.igvm").read_bytes())
    missing = tmp_path / "nope" / "softhsm2.conf"
    env = {**softhsm.env, "SOFTHSM2_CONF": str(missing)}
    proc = subprocess.run([sys.executable, "-m", "igvm_builder", "sign", str(src), "-o", str(tmp_path / "o.igvm"),
                           "--allow-test-keys", "--id-key", softhsm.uri(f"token={TOKEN};object=snp-id")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"the PKCS#11 module {softhsm.module} failed to initialize" in proc.stderr
    assert f"SOFTHSM2_CONF={missing} does not exist" in proc.stderr and PIN not in proc.stderr


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
