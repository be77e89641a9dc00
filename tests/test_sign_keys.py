"""Key sources (file, env, command, in-memory), spec strings, two-step flow, secret hygiene.

PKCS#11 (SoftHSM2) is in ``test_sign_pkcs11.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils

from igvm_builder.errors import IgvmError, SigningError
from igvm_builder.sign import (
    CommandKey,
    EnvPemKey,
    ExportedTbs,
    InMemoryKey,
    KeySource,
    PemFileKey,
    Pkcs11Key,
    decode_signature,
    export_tbs,
    import_signature,
    key_digest,
    key_source_from_spec,
    parse_pkcs11_uri,
    sign_id_block,
    verify_id_block,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())
KEYS = VECTORS["keys"]
VEC0 = VECTORS["rfc6979_vectors"][0]
VEC1 = VECTORS["rfc6979_vectors"][1]
ID_PEM = SHARED / KEYS["id_key_pem"]
ID_PKCS8 = SHARED / KEYS["id_key_pkcs8_pem"]
AUTHOR_PEM = SHARED / KEYS["author_key_pem"]
ID_BLOCK0 = bytes.fromhex(VEC0["id_block_hex"])
EXPECTED_RS0 = (
    int.from_bytes(bytes.fromhex(VEC0["id_block_sig_r_le72"]), "little"),
    int.from_bytes(bytes.fromhex(VEC0["id_block_sig_s_le72"]), "little"),
)


def _id_private() -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(ID_PEM.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _write_der(tmp_path: Path, fmt: serialization.PrivateFormat, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(
        _id_private().private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
    )
    return path


def _write_encrypted_pem(path: Path, password: str) -> Path:
    """The ID key as PKCS#8 PEM encrypted with ``password``."""
    path.write_bytes(
        _id_private().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    return path


def _sign_vec1(id_key: KeySource, author_key: KeySource | None):
    params = VEC1["params"]
    return sign_id_block(
        bytes.fromhex(VEC1["launch_digest"]),
        policy=int(params["policy"], 0),
        family_id=bytes.fromhex(params["family_id"]),
        image_id=bytes.fromhex(params["image_id"]),
        guest_svn=params["guest_svn"],
        id_key=id_key,
        author_key=author_key,
        compatibility_mask=1,
    )


# ------------------------------------------------------------------------------------------------
# File, env and in-memory keys


def test_pem_file_key_formats_agree(tmp_path: Path) -> None:
    sources = [
        PemFileKey(ID_PEM),
        PemFileKey(ID_PKCS8),
        PemFileKey(_write_der(tmp_path, serialization.PrivateFormat.TraditionalOpenSSL, "sec1.der")),
        PemFileKey(_write_der(tmp_path, serialization.PrivateFormat.PKCS8, "pkcs8.der")),
        InMemoryKey(_id_private()),
    ]
    for source in sources:
        assert source.deterministic
        assert key_digest(source.public_key()).hex() == KEYS["id_key_digest"]
        assert source.sign(ID_BLOCK0) == EXPECTED_RS0, source.description


def test_encrypted_pkcs8_needs_the_password(tmp_path: Path) -> None:
    password = "correct horse battery staple"
    path = _write_encrypted_pem(tmp_path / "enc.pem", password)
    assert PemFileKey(path, password=password).sign(ID_BLOCK0) == EXPECTED_RS0
    assert PemFileKey(path, password=password.encode()).sign(ID_BLOCK0) == EXPECTED_RS0
    with pytest.raises(SigningError, match="encrypted and no password") as info:
        PemFileKey(path).public_key()
    assert str(path) in str(info.value)
    with pytest.raises(SigningError, match="password is wrong") as info:
        PemFileKey(path, password="nope").public_key()
    assert "nope" not in str(info.value)
    with pytest.raises(SigningError, match="not encrypted"):
        PemFileKey(ID_PEM, password="x").public_key()


def test_pem_file_key_errors(tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="cannot read key file") as info:
        PemFileKey(tmp_path / "missing.pem").public_key()
    assert info.value.source == f"file:{tmp_path / 'missing.pem'}"
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match="cannot load a private key"):
        PemFileKey(junk).sign(b"x")
    pub = tmp_path / "pub.pem"
    pub.write_bytes(_public_pem(_id_private().public_key()))
    with pytest.raises(SigningError, match="cannot load a private key"):
        PemFileKey(pub).public_key()


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_env_pem_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pem = ID_PKCS8.read_text()
    monkeypatch.setenv("IGVM_TEST_ID_KEY", pem)
    assert EnvPemKey("IGVM_TEST_ID_KEY").sign(ID_BLOCK0) == EXPECTED_RS0
    # One line with literal \n escapes (how some CI systems store multi-line secrets).
    monkeypatch.setenv("IGVM_TEST_ID_KEY", ID_PEM.read_text().strip().replace("\n", "\\n"))
    assert EnvPemKey("IGVM_TEST_ID_KEY").sign(ID_BLOCK0) == EXPECTED_RS0
    # Base64 of the DER encoding.
    der = _id_private().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    monkeypatch.setenv("IGVM_TEST_ID_KEY", base64.b64encode(der).decode())
    key = EnvPemKey("IGVM_TEST_ID_KEY")
    assert key.deterministic and key.description == "env:IGVM_TEST_ID_KEY"
    assert key.sign(ID_BLOCK0) == EXPECTED_RS0
    assert EnvPemKey("X", environ={"X": pem}).sign(ID_BLOCK0) == EXPECTED_RS0

    monkeypatch.delenv("IGVM_TEST_UNSET", raising=False)
    with pytest.raises(SigningError, match="not set or empty") as info:
        EnvPemKey("IGVM_TEST_UNSET").public_key()
    assert str(info.value).startswith("env:IGVM_TEST_UNSET: ")
    monkeypatch.setenv("IGVM_TEST_ID_KEY", "not a key!")
    with pytest.raises(SigningError, match="neither PEM text nor base64 DER"):
        EnvPemKey("IGVM_TEST_ID_KEY").public_key()


def test_given_public_key_must_match(tmp_path: Path) -> None:
    author_pub = serialization.load_pem_private_key(AUTHOR_PEM.read_bytes(), None).public_key()
    with pytest.raises(SigningError, match="does not match the private key"):
        PemFileKey(ID_PEM, public_key=author_pub).public_key()  # type: ignore[arg-type]
    pub = tmp_path / "id.pub.pem"
    pub.write_bytes(_public_pem(_id_private().public_key()))
    assert PemFileKey(ID_PEM, public_key=pub).sign(ID_BLOCK0) == EXPECTED_RS0


def _other_keys() -> dict[str, object]:
    return {
        "P-256": ec.generate_private_key(ec.SECP256R1()),
        "P-521": ec.generate_private_key(ec.SECP521R1()),
        "RSA-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.mark.parametrize("fmt", ["pkcs8", "sec1"])
def test_wrong_curve_or_key_type_is_rejected(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, key in _other_keys().items():
        if fmt == "sec1" and not isinstance(key, ec.EllipticCurvePrivateKey):
            continue  # SEC1 ("EC PRIVATE KEY") exists for EC keys only
        private_format = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if fmt == "sec1"
            else serialization.PrivateFormat.PKCS8
        )
        pem = key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, private_format, serialization.NoEncryption()
        )
        path = tmp_path / f"{name}.{fmt}.pem"
        path.write_bytes(pem)
        with pytest.raises(SigningError) as info:
            PemFileKey(path).sign(b"message")
        text = str(info.value)
        assert name in text and "P-384" in text and str(path) in text, text
        assert info.value.source == f"file:{path}"

        monkeypatch.setenv("IGVM_TEST_WRONG_KEY", pem.decode())
        with pytest.raises(SigningError, match=name) as info:
            EnvPemKey("IGVM_TEST_WRONG_KEY").public_key()
        assert "env:IGVM_TEST_WRONG_KEY" in str(info.value)

        with pytest.raises(SigningError, match=name):
            InMemoryKey(key, description="test key")

        pub = tmp_path / f"{name}.pub.pem"
        pub.write_bytes(
            key.public_key().public_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        with pytest.raises(SigningError, match=name):
            CommandKey(["true"], public_key=pub).public_key()


# ------------------------------------------------------------------------------------------------
# External command


SIGNER = r'''
"""Test-only external signer for CommandKey (see CommandKey's protocol)."""
import base64, hashlib, os, sys
from pathlib import Path
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

key_path, fmt = sys.argv[1], sys.argv[2]
key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
if sys.argv[-1] == "--public-key":
    assert os.environ["IGVM_SIGN_OPERATION"] == "public-key"
    sys.stdout.write(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    sys.exit(0)
assert os.environ["IGVM_SIGN_OPERATION"] == "sign"
assert os.environ["IGVM_SIGN_ALGORITHM"] == "ECDSA_P384_SHA384"
line = sys.stdin.read()
assert line.endswith("\n") and len(line) == 97, repr(line)
digest = bytes.fromhex(line.strip())
assert digest.hex() == os.environ["IGVM_SIGN_DIGEST_HEX"]
assert base64.b64decode(os.environ["IGVM_SIGN_DIGEST_B64"]) == digest
assert Path(os.environ["IGVM_SIGN_DIGEST_FILE"]).read_bytes() == digest
assert hashlib.sha384(Path(os.environ["IGVM_SIGN_MESSAGE_FILE"]).read_bytes()).digest() == digest
if fmt == "fail":
    sys.stderr.write("first line\nsigner: the HSM is unavailable\n")
    sys.exit(3)
if fmt == "garbage":
    print("hello world")
    sys.exit(0)
der = key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA384()), deterministic_signing=True))
r, s = utils.decode_dss_signature(der)
raw = r.to_bytes(48, "big") + s.to_bytes(48, "big")
out = {
    "der-hex": der.hex() + "\n",
    "der-b64": base64.b64encode(der).decode() + "\n",
    "der-bin": der,
    "raw-hex": "  " + raw.hex().upper() + "\r\n",
    "raw-b64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
    "raw-bin": raw,
}[fmt]
if isinstance(out, bytes):
    sys.stdout.buffer.write(out)
else:
    sys.stdout.write(out)
'''


@pytest.fixture
def signer(tmp_path: Path) -> Path:
    path = tmp_path / "signer.py"
    path.write_text(SIGNER)
    return path


@pytest.mark.parametrize("fmt", ["der-hex", "der-b64", "der-bin", "raw-hex", "raw-b64url", "raw-bin"])
def test_command_key_matches_pem_file_key(signer: Path, fmt: str) -> None:
    key = CommandKey([sys.executable, str(signer), str(ID_PEM), fmt])
    assert not key.deterministic
    assert key_digest(key.public_key()).hex() == KEYS["id_key_digest"]  # via --public-key
    assert key.sign(ID_BLOCK0) == PemFileKey(ID_PEM).sign(ID_BLOCK0) == EXPECTED_RS0


def test_command_key_in_sign_id_block_is_byte_identical(signer: Path, tmp_path: Path) -> None:
    pub = tmp_path / "id.pub.pem"
    pub.write_bytes(_public_pem(_id_private().public_key()))
    id_key = CommandKey(
        [sys.executable, str(signer), str(ID_PEM), "der-b64"], public_key=pub, deterministic=True
    )
    author = CommandKey([sys.executable, str(signer), str(AUTHOR_PEM), "raw-hex"])
    signed = _sign_vec1(id_key, author)
    assert signed.id_auth.hex() == VEC1["id_auth_hex"]
    assert signed.igvm_body.hex() == VEC1["igvm_snp_id_block_body_hex"]
    reference = _sign_vec1(PemFileKey(ID_PEM), PemFileKey(AUTHOR_PEM))
    assert signed == dataclasses.replace(reference, deterministic=False)
    assert not signed.deterministic  # the author command does not claim RFC 6979


def test_command_key_spec_string(signer: Path) -> None:
    spec = f"cmd:{sys.executable} {signer} {ID_PEM} raw-b64url"
    key = key_source_from_spec(spec)
    assert isinstance(key, CommandKey)
    assert key.argv == (sys.executable, str(signer), str(ID_PEM), "raw-b64url")
    assert key.sign(ID_BLOCK0) == EXPECTED_RS0


def test_command_key_failures(signer: Path, tmp_path: Path) -> None:
    with pytest.raises(SigningError, match=r"exited with status 3 \(it wrote \d+ bytes to stderr, not shown") as info:
        CommandKey([sys.executable, str(signer), str(ID_PEM), "fail"]).sign(ID_BLOCK0)
    assert str(info.value).startswith("cmd:")
    assert "HSM is unavailable" not in str(info.value) and str(ID_PEM) not in str(info.value)  # issue #15
    with pytest.raises(SigningError, match="neither DER nor a 96-byte"):
        CommandKey([sys.executable, str(signer), str(ID_PEM), "garbage"]).sign(ID_BLOCK0)
    # Signs with the author key while claiming the ID key's public key: caught by verification.
    pub = tmp_path / "id.pub.pem"
    pub.write_bytes(_public_pem(_id_private().public_key()))
    with pytest.raises(SigningError, match="does not verify with its public key"):
        CommandKey([sys.executable, str(signer), str(AUTHOR_PEM), "der-hex"], public_key=pub).sign(ID_BLOCK0)
    with pytest.raises(SigningError, match="not found"):
        CommandKey([str(tmp_path / "no-such-signer")], public_key=pub).sign(ID_BLOCK0)
    with pytest.raises(SigningError, match="did not finish"):
        CommandKey([sys.executable, "-c", "import time; time.sleep(30)"], public_key=pub, timeout=0.5).sign(
            b"x"
        )
    with pytest.raises(SigningError, match="printed no public key"):
        CommandKey([sys.executable, "-c", "pass"]).public_key()
    with pytest.raises(SigningError, match="non-empty sequence"):
        CommandKey([])


# ------------------------------------------------------------------------------------------------
# Spec strings and PKCS#11 URIs


def test_key_source_from_spec(tmp_path: Path) -> None:
    assert isinstance(key_source_from_spec(str(ID_PEM)), PemFileKey)
    plain = key_source_from_spec(str(ID_PEM))
    prefixed = key_source_from_spec(f"file:{ID_PEM}")
    uri = key_source_from_spec(f"file://{ID_PEM}")
    assert isinstance(prefixed, PemFileKey) and isinstance(uri, PemFileKey)
    assert plain.path == prefixed.path == uri.path == ID_PEM  # type: ignore[attr-defined]
    assert prefixed.description == f"file:{ID_PEM}"
    env = key_source_from_spec("env:IGVM_ID_KEY")
    assert isinstance(env, EnvPemKey) and env.var == "IGVM_ID_KEY"
    p11 = key_source_from_spec("pkcs11:token=t;object=o?pin-value=1234", pkcs11_module="/x/mod.so")
    assert isinstance(p11, Pkcs11Key) and p11.module() == "/x/mod.so"
    cmd = key_source_from_spec("cmd:signer --key 'a b'")
    assert isinstance(cmd, CommandKey) and cmd.argv == ("signer", "--key", "a b")
    for bad in ("", "   ", "cmd:", "cmd:'unbalanced", "env:", "file:"):
        with pytest.raises(SigningError):
            key_source_from_spec(bad)


def test_parse_pkcs11_uri() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;object=snp-id;id=%01%AB;type=private;serial=1234"
        "?pin-source=file:/run/pin&module-path=/usr/lib/softhsm/libsofthsm2.so"
    )
    assert uri.token == "My Token" and uri.object == "snp-id" and uri.id == b"\x01\xab"
    assert uri.serial == "1234" and uri.type == "private"
    assert uri.pin_source == "file:/run/pin" and uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.redacted().startswith(
        "pkcs11:token=My%20Token;serial=1234;object=snp-id;id=%01%AB;type=private?"
    )
    for bad, message in [
        ("pkcs11:token=a;slot-id=3", "unsupported PKCS#11 URI path attribute 'slot-id'"),
        ("pkcs11:token=a;pin-value=1", "belongs in the query part"),
        ("pkcs11:token=a;token=b", "given twice"),
        ("pkcs11:object=a;type=public", "type=private"),
        ("pkcs11:object=a?module-name=softhsm2", "unsupported PKCS#11 URI query attribute 'module-name'"),
        ("pkcs11:object=a?pin-value=1&pin-source=/p", "both pin-value and pin-source"),
        ("pkcs11:object", "has no value"),
        ("pkcs12:object=a", "must start with"),
    ]:
        with pytest.raises(SigningError, match=message):
            parse_pkcs11_uri(bad)


def test_pkcs11_without_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IGVM_PKCS11_MODULE", raising=False)
    with pytest.raises(SigningError, match="IGVM_PKCS11_MODULE"):
        Pkcs11Key("pkcs11:token=t;object=o").public_key()
    monkeypatch.setenv("IGVM_PKCS11_MODULE", "/from/env.so")
    assert Pkcs11Key("pkcs11:token=t").module() == "/from/env.so"
    assert Pkcs11Key("pkcs11:token=t?module-path=/from/uri.so").module() == "/from/uri.so"


# ------------------------------------------------------------------------------------------------
# Signature decoding and the two-step flow


def test_decode_signature_encodings() -> None:
    r, s = EXPECTED_RS0
    der = utils.encode_dss_signature(r, s)
    raw = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    for blob in (
        der,
        raw,
        der.hex(),
        raw.hex(),
        "0x" + raw.hex(),
        base64.b64encode(der),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        der.hex().upper() + "\n",
    ):
        assert decode_signature(blob) == (r, s)
    for bad in (b"", "hello", der + b"\0", raw[:95], "zz" * 48):
        with pytest.raises(SigningError, match="neither DER nor"):
            decode_signature(bad)


def _external_sign(key_path: Path, digest_hex: str) -> bytes:
    """What a remote signer does with a ``sha384_hex`` entry (randomized nonce on purpose)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(bytes.fromhex(digest_hex), ec.ECDSA(utils.Prehashed(hashes.SHA384())))


def test_two_step_flow_reproduces_the_vector() -> None:
    id_key, author_key = PemFileKey(ID_PEM), PemFileKey(AUTHOR_PEM)
    params = VEC1["params"]
    tbs = export_tbs(
        bytes.fromhex(VEC1["launch_digest"]),
        policy=int(params["policy"], 0),
        family_id=bytes.fromhex(params["family_id"]),
        image_id=bytes.fromhex(params["image_id"]),
        guest_svn=params["guest_svn"],
        id_public_key=id_key.public_key(),
        author_public_key=author_key,  # a KeySource works too
        compatibility_mask=1,
    )
    document = tbs.to_json()
    assert b"PRIVATE" not in document
    doc = json.loads(document)
    assert doc["id_key"]["digest"] == KEYS["id_key_digest"]
    assert doc["author_key"]["digest"] == KEYS["author_key_digest"]
    assert [e["name"] for e in doc["to_sign"]] == ["id_block", "id_key"]
    assert doc["to_sign"][0]["message_hex"] == VEC1["id_block_hex"]
    assert doc["to_sign"][1]["message_hex"] == KEYS["id_key_sev_pubkey_hex"]
    assert ExportedTbs.from_json(document) == tbs
    assert ExportedTbs.from_json(document).to_json() == document

    # Deterministic signatures (what KeySource.sign gives) in two encodings: the vector's bytes.
    id_rs = id_key.sign(bytes.fromhex(doc["to_sign"][0]["message_hex"]))
    author_rs = author_key.sign(bytes.fromhex(doc["to_sign"][1]["message_hex"]))
    signed = import_signature(
        document,
        id_block_signature=utils.encode_dss_signature(*id_rs),
        id_key_signature=base64.b64encode(
            author_rs[0].to_bytes(48, "big") + author_rs[1].to_bytes(48, "big")
        ),
        deterministic=True,
    )
    assert signed == _sign_vec1(id_key, author_key)

    # Randomized signatures over the digests verify too (different bytes, same keys).
    signed = import_signature(
        tbs,
        id_block_signature=_external_sign(ID_PEM, doc["to_sign"][0]["sha384_hex"]).hex(),
        id_key_signature=_external_sign(AUTHOR_PEM, doc["to_sign"][1]["sha384_hex"]),
    )
    verify_id_block(signed.id_block, signed.id_auth)
    assert signed.id_block.hex() == VEC1["id_block_hex"]


def test_two_step_errors() -> None:
    id_key, author_key = PemFileKey(ID_PEM), PemFileKey(AUTHOR_PEM)
    tbs = export_tbs(
        bytes(48), policy=0x30000, id_public_key=id_key, author_public_key=author_key, compatibility_mask=1
    )
    doc = json.loads(tbs.to_json())
    id_sig = utils.encode_dss_signature(*id_key.sign(tbs.id_block_message))
    author_sig = utils.encode_dss_signature(*author_key.sign(tbs.id_key_sev.pack()))
    with pytest.raises(SigningError, match="ID block signature does not verify"):
        import_signature(tbs, id_block_signature=author_sig, id_key_signature=author_sig)
    with pytest.raises(SigningError, match="ID key signature does not verify"):
        import_signature(tbs, id_block_signature=id_sig, id_key_signature=id_sig)
    with pytest.raises(SigningError, match="author's ID key signature is required"):
        import_signature(tbs, id_block_signature=id_sig)
    with pytest.raises(SigningError, match="ID block signature: signature is neither"):
        import_signature(tbs, id_block_signature="nonsense", id_key_signature=author_sig)

    edited = json.loads(json.dumps(doc))
    edited["id_block"]["policy"] = "0x3001f"
    with pytest.raises(SigningError, match="edited document"):
        ExportedTbs.from_json(json.dumps(edited))
    edited = json.loads(json.dumps(doc))
    edited["author_key"]["digest"] = "00" * 48
    with pytest.raises(SigningError, match=r"author_key\.digest does not match"):
        ExportedTbs.from_json(json.dumps(edited))
    with pytest.raises(SigningError, match="not JSON"):
        ExportedTbs.from_json(b"{")
    with pytest.raises(SigningError, match="not an igvm-builder"):
        ExportedTbs.from_json(b"{}")
    del edited["id_block"]
    edited["author_key"] = doc["author_key"]
    with pytest.raises(SigningError, match="missing or malformed"):
        ExportedTbs.from_json(json.dumps(edited))

    no_author = export_tbs(bytes(48), policy=0x30000, id_public_key=id_key, compatibility_mask=1)
    assert [m.name for m in no_author.messages()] == ["id_block"]
    with pytest.raises(SigningError, match="has no author key"):
        import_signature(no_author, id_block_signature=id_sig, id_key_signature=author_sig)
    signed = import_signature(no_author.to_json(), id_block_signature=id_sig)
    assert signed.author_key_digest is None


# ------------------------------------------------------------------------------------------------
# Secret hygiene: no key material in descriptions, reprs or error messages


def _secrets(pem_path: Path, password: str | None = None) -> list[str]:
    """Strings that must never be printed: PEM body lines, the scalar (hex/dec, BE/LE), DER hex."""
    key = serialization.load_pem_private_key(pem_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    d = key.private_numbers().private_value
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = [ln for ln in pem_path.read_text().splitlines() if ln and not ln.startswith("-----")]
    out = [*body, f"{d:096x}", f"{d:096X}", d.to_bytes(48, "little").hex(), str(d), der.hex()]
    out += [ln[i : i + 24] for ln in body for i in range(0, len(ln) - 23, 24)]  # fragments of the body
    if password:
        out.append(password)
    return out


def _assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"secret material leaked into: {text[:200]!r}"


def test_no_secret_material_in_reprs_or_errors(
    tmp_path: Path, signer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "s3cret-passw0rd"
    pin = "98765-pin-value"
    secrets = _secrets(ID_PEM, password) + _secrets(ID_PKCS8) + _secrets(AUTHOR_PEM) + [pin]

    enc = _write_encrypted_pem(tmp_path / "enc.pem", password)
    monkeypatch.setenv("IGVM_TEST_SECRET_KEY", ID_PEM.read_text())
    monkeypatch.setenv("IGVM_TEST_BROKEN_KEY", ID_PEM.read_text()[:-60])  # truncated PEM
    monkeypatch.setenv("IGVM_PKCS11_MODULE", str(tmp_path / "no-such-module.so"))
    sources: list[KeySource] = [
        PemFileKey(ID_PEM),
        PemFileKey(ID_PKCS8),
        PemFileKey(enc, password=password),
        EnvPemKey("IGVM_TEST_SECRET_KEY", password=None),
        InMemoryKey(_id_private()),
        CommandKey([sys.executable, str(signer), str(ID_PEM), "der-hex"]),
        Pkcs11Key(f"pkcs11:token=t;object=o?pin-value={pin}"),
        key_source_from_spec(f"pkcs11:token=t;object=o?pin-value={pin}"),
    ]
    for source in sources:
        source.sign(b"warm up") if not isinstance(source, Pkcs11Key) else None  # load keys into memory
        for text in (str(source), repr(source), source.description):
            _assert_clean(text, secrets)
        assert pin not in source.description

    failing = [
        lambda: PemFileKey(enc).public_key(),
        lambda: PemFileKey(enc, password="wrong-" + password).public_key(),
        lambda: PemFileKey(ID_PEM, password=password).public_key(),
        lambda: EnvPemKey("IGVM_TEST_BROKEN_KEY").public_key(),
        lambda: EnvPemKey("IGVM_TEST_SECRET_KEY", password=password).public_key(),
        lambda: PemFileKey(ID_PEM, public_key=AUTHOR_PEM.read_bytes()).public_key(),
        lambda: CommandKey([sys.executable, str(signer), str(ID_PEM), "fail"]).sign(b"m"),
        lambda: CommandKey([sys.executable, str(signer), str(ID_PEM), "garbage"]).sign(b"m"),
        lambda: CommandKey(["true"], public_key=ID_PEM).public_key(),
        lambda: Pkcs11Key(f"pkcs11:token=t;object=o?pin-value={pin}").sign(b"m"),
        lambda: Pkcs11Key(f"pkcs11:token=t;object=o;bogus=1?pin-value={pin}"),
        lambda: key_source_from_spec(f"pkcs11:token=t;object=o?pin-value={pin}&pin-source=/x"),
        lambda: decode_signature(ID_PEM.read_bytes()),
        lambda: import_signature(b"{" + ID_PEM.read_bytes(), id_block_signature=b""),
    ]
    for trigger in failing:
        with pytest.raises(IgvmError) as info:
            trigger()
        err = info.value
        assert isinstance(err, SigningError), type(err)
        for text in (str(err), repr(err), err.message, str(err.source), *map(str, err.args)):
            _assert_clean(text, secrets)
    assert os.environ["IGVM_TEST_SECRET_KEY"]  # (the environment itself is the caller's business)


# ------------------------------------------------------------------------------------------------
# RFC 6979 is required: no silent fallback to random nonces


def test_missing_deterministic_ecdsa_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm

    from igvm_builder.sign import _ecdsa

    class NoRfc6979Key:
        """Stands in for a key whose OpenSSL build lacks deterministic ECDSA."""

        def sign(self, data: bytes, algorithm: object) -> bytes:
            raise UnsupportedAlgorithm("deterministic ECDSA not supported")

    with pytest.raises(SigningError, match="refusing to fall back to random nonces"):
        _ecdsa.sign_deterministic(NoRfc6979Key(), b"m", source="test")  # type: ignore[arg-type]

    real_ecdsa = ec.ECDSA

    def old_cryptography_ecdsa(algorithm: object, **kwargs: object) -> ec.ECDSA:
        if kwargs:
            raise TypeError("ECDSA() got an unexpected keyword argument 'deterministic_signing'")
        return real_ecdsa(algorithm)  # type: ignore[arg-type]

    monkeypatch.setattr(_ecdsa.ec, "ECDSA", old_cryptography_ecdsa)
    with pytest.raises(SigningError, match="no deterministic ECDSA") as info:
        PemFileKey(ID_PEM).sign(ID_BLOCK0)
    assert info.value.source == f"file:{ID_PEM}"


# --------------------------------------------------------------------------- CKA_EC_POINT decoding


def _p384_key_with_x_starting(first: int) -> ec.EllipticCurvePrivateKey:
    while True:  # about 256 tries
        key = ec.generate_private_key(ec.SECP384R1())
        if key.public_key().public_numbers().x.to_bytes(48, "big")[0] == first:
            return key


@pytest.mark.parametrize("first_x_byte", [0x5F, 0x00, 0x81, 0xFF])
def test_token_ec_point_bare_or_der(first_x_byte: int) -> None:
    """CKA_EC_POINT as PKCS#11 says (DER OCTET STRING) and bare, as some tokens store it: the same
    key either way.  X starting with 0x5f is the case a tag-and-length guess misreads: the bare
    97-byte point ``04 5f ...`` also parses as an OCTET STRING of the 95 bytes that follow."""
    from pkcs11.util.ec import encode_named_curve_parameters

    from igvm_builder.sign.keys import ec_public_key_from_token

    public = _p384_key_with_x_starting(first_x_byte).public_key()
    params = encode_named_curve_parameters("secp384r1")
    bare = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    compressed = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    assert len(bare) == 97 and bare[1] == first_x_byte
    for point in (bare, compressed, b"\x04" + bytes([len(bare)]) + bare,
                  b"\x04" + bytes([len(compressed)]) + compressed):
        got = ec_public_key_from_token(params, point, source="token")
        assert got.public_numbers() == public.public_numbers(), point[:3].hex()


def test_token_ec_point_garbage_is_a_signing_error() -> None:
    from pkcs11.util.ec import encode_named_curve_parameters

    from igvm_builder.errors import SigningError
    from igvm_builder.sign.keys import ec_public_key_from_token

    params = encode_named_curve_parameters("secp384r1")
    for junk in (b"", b"\x04\x05abc", b"\x30\x03\x02\x01\x01", bytes(97)):
        with pytest.raises(SigningError):
            ec_public_key_from_token(params, junk, source="token")
