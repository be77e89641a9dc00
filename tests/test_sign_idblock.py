"""SNP ID block / ID auth / IGVM SNP_ID_BLOCK: known answers, cross-tool checks, verification.

Vectors: ``shared/vectors/measure/idblock.json`` (RFC 6979 signatures agreed by OpenSSL,
python-ecdsa and COCONUT igvmmeasure; randomized sev-snp-measure outputs).  Keys: the
TEST-ONLY keys in ``shared/keys``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from igvm_builder.errors import IgvmFormatError, SigningError, VerificationError
from igvm_builder.sign import (
    IGVM_ID_BLOCK_SIZE,
    TEST_ONLY_KEY_DIGESTS,
    IdAuthInfo,
    IdBlock,
    IgvmSnpIdBlock,
    IgvmSnpIdBlockPublicKey,
    PemFileKey,
    SnpPublicKey,
    SnpSignature,
    igvm_id_block_body,
    igvm_public_key_to_sev,
    igvm_signature_to_sev,
    key_digest,
    parse_igvm_id_block_body,
    sev_public_key,
    sev_public_key_to_igvm,
    sev_signature_to_igvm,
    sign_id_block,
    verify_id_block,
    verify_igvm_id_block_body,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())
KEYS = VECTORS["keys"]
RFC6979 = VECTORS["rfc6979_vectors"]
SNP_CREATE = VECTORS["snp_create_id_block"]

KEY_FORMATS = {
    "sec1": ("id_key_pem", "author_key_pem"),
    "pkcs8": ("id_key_pkcs8_pem", "author_key_pkcs8_pem"),
}


def _keys(fmt: str) -> tuple[PemFileKey, PemFileKey]:
    id_name, author_name = KEY_FORMATS[fmt]
    return PemFileKey(SHARED / KEYS[id_name]), PemFileKey(SHARED / KEYS[author_name])


def _sign_vector(vec: dict, fmt: str, *, mask: int = 1):
    params = vec["params"]
    id_key, author_key = _keys(fmt)
    return sign_id_block(
        bytes.fromhex(vec["launch_digest"]),
        policy=int(params["policy"], 0),
        family_id=bytes.fromhex(params["family_id"]),
        image_id=bytes.fromhex(params["image_id"]),
        guest_svn=params["guest_svn"],
        version=params["version"],
        id_key=id_key,
        author_key=author_key,
        compatibility_mask=mask,
    )


def _le(hex72: str) -> int:
    return int.from_bytes(bytes.fromhex(hex72), "little")


# ------------------------------------------------------------------------------------------------
# RFC 6979 known answers


@pytest.mark.parametrize("fmt", sorted(KEY_FORMATS))
@pytest.mark.parametrize("index", range(len(RFC6979)))
def test_rfc6979_vector_byte_for_byte(index: int, fmt: str) -> None:
    vec = RFC6979[index]
    signed = _sign_vector(vec, fmt)
    assert signed.id_block.hex() == vec["id_block_hex"]
    assert signed.id_auth.hex() == vec["id_auth_hex"]
    assert hashlib.sha256(signed.id_auth).hexdigest() == vec["id_auth_sha256"]
    assert signed.igvm_body.hex() == vec["igvm_snp_id_block_body_hex"]
    assert hashlib.sha256(signed.igvm_body).hexdigest() == vec["igvm_snp_id_block_body_sha256"]
    auth = IdAuthInfo.unpack(signed.id_auth)
    assert auth.id_block_sig.r_comp.hex() == vec["id_block_sig_r_le72"]
    assert auth.id_block_sig.s_comp.hex() == vec["id_block_sig_s_le72"]
    assert auth.id_key_sig.r_comp.hex() == vec["id_key_sig_r_le72"]
    assert auth.id_key_sig.s_comp.hex() == vec["id_key_sig_s_le72"]
    assert signed.id_key_digest.hex() == KEYS["id_key_digest"]
    assert signed.author_key_digest is not None
    assert signed.author_key_digest.hex() == KEYS["author_key_digest"]
    assert signed.deterministic
    assert signed.uses_test_only_key
    assert signed.compatibility_mask == 1


@pytest.mark.parametrize("index", range(len(RFC6979)))
def test_rfc6979_signatures_per_key_source(index: int) -> None:
    """KeySource.sign alone gives the vector's R and S (LE 72 -> integers)."""
    vec = RFC6979[index]
    id_key, author_key = _keys("sec1")
    block = bytes.fromhex(vec["id_block_hex"])
    assert id_key.sign(block) == (_le(vec["id_block_sig_r_le72"]), _le(vec["id_block_sig_s_le72"]))
    sev_id = bytes.fromhex(KEYS["id_key_sev_pubkey_hex"])
    assert author_key.sign(sev_id) == (_le(vec["id_key_sig_r_le72"]), _le(vec["id_key_sig_s_le72"]))


def test_signing_twice_is_identical() -> None:
    a = _sign_vector(RFC6979[1], "sec1")
    b = _sign_vector(RFC6979[1], "pkcs8")
    assert a == b


@pytest.mark.parametrize("index", range(len(RFC6979)))
def test_structures_round_trip_vectors(index: int) -> None:
    vec = RFC6979[index]
    params = vec["params"]
    block_bytes = bytes.fromhex(vec["id_block_hex"])
    auth_bytes = bytes.fromhex(vec["id_auth_hex"])
    body_bytes = bytes.fromhex(vec["igvm_snp_id_block_body_hex"])

    block = IdBlock(
        ld=bytes.fromhex(vec["launch_digest"]),
        family_id=bytes.fromhex(params["family_id"]),
        image_id=bytes.fromhex(params["image_id"]),
        version=params["version"],
        guest_svn=params["guest_svn"],
        policy=int(params["policy"], 0),
    )
    assert block.pack() == block_bytes
    assert IdBlock.unpack(block_bytes) == block

    auth = IdAuthInfo.unpack(auth_bytes)
    assert auth.pack() == auth_bytes
    assert auth.id_key_algo == vec["expected_verification"]["id_key_algo"]
    assert auth.auth_key_algo == vec["expected_verification"]["auth_key_algo"]
    assert auth.id_key.curve == vec["expected_verification"]["id_key_curve"]

    body = parse_igvm_id_block_body(body_bytes)
    assert body.pack() == body_bytes
    assert body.compatibility_mask == 1 and body.author_key_enabled == 1
    assert body.id_block(int(params["policy"], 0)).pack() == block_bytes
    assert body.id_auth_info().pack() == auth_bytes
    assert igvm_id_block_body(block, auth, compatibility_mask=1) == body_bytes
    assert IgvmSnpIdBlock.from_sev(block, auth, compatibility_mask=1, author_key_enabled=True) == body

    # IGVM <-> SEV conversions of the key and signature structures.
    assert igvm_public_key_to_sev(body_bytes[248:400]) == auth_bytes[0x240:0x644]
    assert sev_public_key_to_igvm(auth_bytes[0x240:0x644]) == body_bytes[248:400]
    assert igvm_public_key_to_sev(body_bytes[544:696]) == auth_bytes[0x880:0xC84]
    assert igvm_signature_to_sev(body_bytes[104:248]) == auth_bytes[0x40:0x240]
    assert sev_signature_to_igvm(auth_bytes[0x680:0x880]) == body_bytes[400:544]


def test_key_digests_and_sev_public_keys() -> None:
    for fmt in KEY_FORMATS:
        id_key, author_key = _keys(fmt)
        assert sev_public_key(id_key.public_key()).hex() == KEYS["id_key_sev_pubkey_hex"]
        assert sev_public_key(author_key.public_key()).hex() == KEYS["author_key_sev_pubkey_hex"]
        assert key_digest(id_key.public_key()).hex() == KEYS["id_key_digest"]
        assert key_digest(author_key.public_key()).hex() == KEYS["author_key_digest"]
    sev = bytes.fromhex(KEYS["id_key_sev_pubkey_hex"])
    assert len(sev) == 0x404
    assert key_digest(SnpPublicKey.unpack(sev)) == hashlib.sha384(sev).digest()
    assert {
        bytes.fromhex(KEYS["id_key_digest"]),
        bytes.fromhex(KEYS["author_key_digest"]),
    } == TEST_ONLY_KEY_DIGESTS


def test_igvm_public_key_has_reserved_word_after_curve() -> None:
    sev = SnpPublicKey.unpack(bytes.fromhex(KEYS["id_key_sev_pubkey_hex"]))
    igvm = sev.to_igvm().pack()
    assert len(igvm) == 152
    assert igvm[:8] == (2).to_bytes(4, "little") + bytes(4)
    assert igvm[8:80] == sev.pack()[4:76]
    assert igvm[80:152] == sev.pack()[76:148]


# ------------------------------------------------------------------------------------------------
# Verification


@pytest.mark.parametrize("index", range(len(RFC6979)))
def test_verify_vectors(index: int) -> None:
    vec = RFC6979[index]
    expected = vec["expected_verification"]
    policy = int(vec["params"]["policy"], 0)
    result = verify_id_block(
        bytes.fromhex(vec["id_block_hex"]),
        bytes.fromhex(vec["id_auth_hex"]),
        expected_id_key_digest=bytes.fromhex(expected["id_key_digest"]),
        expected_author_key_digest=bytes.fromhex(expected["author_key_digest"]),
    )
    assert result.id_key_digest.hex() == expected["id_key_digest"]
    assert result.author_key_digest is not None
    assert result.author_key_digest.hex() == expected["author_key_digest"]
    assert result.id_block.policy == policy
    assert result.uses_test_only_key
    body_result = verify_igvm_id_block_body(bytes.fromhex(vec["igvm_snp_id_block_body_hex"]), policy=policy)
    assert body_result == result


def _parse_snp_create_output(stdout: str) -> tuple[bytes, bytes]:
    fields = dict(part.split("=", 1) for part in stdout.strip().split(","))
    return base64.b64decode(fields["id-block"]), base64.b64decode(fields["id-auth"])


@pytest.mark.parametrize("index", range(len(SNP_CREATE)))
def test_recorded_snp_create_id_block_outputs_verify(index: int) -> None:
    case = SNP_CREATE[index]
    expected = case["expected_verification"]
    block, auth = _parse_snp_create_output(case["stdout"])
    assert block.hex() == case["id_block_hex"]
    assert len(auth) == 4096
    result = verify_id_block(
        block,
        auth,
        expected_id_key_digest=bytes.fromhex(expected["id_key_digest"]),
        expected_author_key_digest=bytes.fromhex(expected["author_key_digest"]),
    )
    assert result.id_block.ld.hex() == case["launch_digest"]
    assert (result.id_block.version, result.id_block.guest_svn, result.id_block.policy) == (1, 0, 0x30000)
    info = IdAuthInfo.unpack(auth)
    assert (info.id_key_algo, info.auth_key_algo, info.id_key.curve) == (
        expected["id_key_algo"],
        expected["auth_key_algo"],
        expected["id_key_curve"],
    )
    assert IdAuthInfo.nonzero_reserved(auth) == []
    # The same block converted to an IGVM body verifies against policy 0x30000 only.
    body = igvm_id_block_body(IdBlock.unpack(block), info, compatibility_mask=1)
    verify_igvm_id_block_body(body, policy=0x30000)
    with pytest.raises(VerificationError, match="ID_BLOCK_SIG"):
        verify_igvm_id_block_body(body, policy=0x3001F)


def test_live_snp_create_id_block_verifies(tmp_path: Path) -> None:
    """sev-snp-measure's snp-create-id-block (randomized ECDSA): its output verifies here."""
    exe = shutil.which("snp-create-id-block")
    assert exe is not None, "snp-create-id-block (sev-snp-measure==0.0.13, test extra) must be installed"
    vec = RFC6979[2]  # a launch digest different from the recorded outputs
    ld = bytes.fromhex(vec["launch_digest"])
    argv = [
        exe,
        "--measurement",
        base64.b64encode(ld).decode(),
        "--idkey",
        str(SHARED / KEYS["id_key_pem"]),
        "--authorkey",
        str(SHARED / KEYS["author_key_pem"]),
    ]
    outputs = []
    for _ in range(2):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
        block, auth = _parse_snp_create_output(proc.stdout)
        assert block.hex() == vec["id_block_hex"]  # family/image 0, svn 0, policy 0x30000 = vector 2
        result = verify_id_block(
            block,
            auth,
            expected_id_key_digest=bytes.fromhex(KEYS["id_key_digest"]),
            expected_author_key_digest=bytes.fromhex(KEYS["author_key_digest"]),
        )
        assert result.id_block.ld == ld
        # Everything but the two signatures equals our deterministic ID auth info.
        ours = bytes.fromhex(vec["id_auth_hex"])
        assert auth[:0x40] == ours[:0x40]
        assert auth[0x240:0x680] == ours[0x240:0x680]
        assert auth[0x880:] == ours[0x880:]
    assert outputs[0] != outputs[1]  # randomized nonces: a reminder of why we do not use it to sign


def test_verify_reports_which_signature_failed() -> None:
    vec = RFC6979[0]
    block = bytes.fromhex(vec["id_block_hex"])
    auth = bytearray(bytes.fromhex(vec["id_auth_hex"]))

    other_block = IdBlock.unpack(block)
    other_block = IdBlock(ld=other_block.ld, policy=0x3001F)
    with pytest.raises(VerificationError, match=r"ID block signature \(ID_BLOCK_SIG\) does not verify"):
        verify_id_block(other_block, bytes(auth))

    bad = bytearray(auth)
    bad[0x40] ^= 1  # R of ID_BLOCK_SIG
    with pytest.raises(VerificationError, match="ID_BLOCK_SIG"):
        verify_id_block(block, bytes(bad))

    bad = bytearray(auth)
    bad[0x680 + 72] ^= 1  # S of ID_KEY_SIG
    with pytest.raises(VerificationError, match=r"ID key signature \(ID_KEY_SIG\) does not verify") as info:
        verify_id_block(block, bytes(bad))
    assert KEYS["author_key_digest"] in str(info.value)

    # Author key replaced by the ID key: the ID_KEY_SIG check names the author key digest.
    bad = bytearray(auth)
    bad[0x880:0xC84] = auth[0x240:0x644]
    with pytest.raises(VerificationError, match="ID_KEY_SIG"):
        verify_id_block(block, bytes(bad))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0x000, 2, "ID_KEY_ALGO is 2"),
        (0x004, 7, "AUTH_KEY_ALGO is 7"),
        (0x240, 3, "CURVE is 3"),
        (0x880, 1, "CURVE is 1"),
        (0x010, 1, "reserved bytes at offset 0x8"),
        (0x1FF + 0x40, 1, "reserved bytes at offset 0xd0"),
        (0xFFF, 1, "reserved bytes at offset 0xc84"),
    ],
)
def test_verify_rejects_bad_fields(offset: int, value: int, message: str) -> None:
    vec = RFC6979[0]
    auth = bytearray(bytes.fromhex(vec["id_auth_hex"]))
    auth[offset] = value
    with pytest.raises(VerificationError, match=message):
        verify_id_block(bytes.fromhex(vec["id_block_hex"]), bytes(auth))


def test_verify_rejects_padding_point_and_digest_mismatch() -> None:
    vec = RFC6979[0]
    block = bytes.fromhex(vec["id_block_hex"])
    auth = bytes.fromhex(vec["id_auth_hex"])
    bad = bytearray(auth)
    bad[0x40 + 50] = 1  # byte 50 of R (beyond the 48 used)
    with pytest.raises(VerificationError, match="beyond the 48"):
        verify_id_block(block, bytes(bad))
    bad = bytearray(auth)
    bad[0x244] ^= 1  # QX of the ID key: not on the curve any more
    with pytest.raises(VerificationError, match="not a valid P-384 point"):
        verify_id_block(block, bytes(bad))
    bad = bytearray(auth)
    bad[0x40:0x240] = bytes(0x200)
    with pytest.raises(VerificationError, match="missing"):
        verify_id_block(block, bytes(bad))
    with pytest.raises(VerificationError, match="ID key digest is f9d6"):
        verify_id_block(block, auth, expected_id_key_digest=bytes(48))
    with pytest.raises(VerificationError, match="author key digest is 3870"):
        verify_id_block(block, auth, expected_author_key_digest=bytes(48))
    with pytest.raises(VerificationError, match="96 bytes"):
        verify_id_block(block[:95], auth)
    with pytest.raises(VerificationError, match="4096 bytes"):
        verify_id_block(block, auth + b"\0")


def test_verify_igvm_body_checks() -> None:
    vec = RFC6979[0]
    body = bytes.fromhex(vec["igvm_snp_id_block_body_hex"])
    parsed = parse_igvm_id_block_body(body)

    def mutate(**changes: object) -> bytes:
        return dataclasses.replace(parsed, **changes).pack()  # type: ignore[arg-type]

    with pytest.raises(VerificationError, match="version is 2"):
        verify_igvm_id_block_body(mutate(version=2), policy=0x30000)
    with pytest.raises(VerificationError, match="reserved bytes"):
        verify_igvm_id_block_body(mutate(reserved=b"\0\1\0"), policy=0x30000)
    key = parsed.id_public_key
    with pytest.raises(VerificationError, match=r"id_public_key\.reserved"):
        verify_igvm_id_block_body(
            mutate(id_public_key=IgvmSnpIdBlockPublicKey(curve=2, reserved=1, qx=key.qx, qy=key.qy)),
            policy=0x30000,
        )
    with pytest.raises(VerificationError, match="author_key_enabled is 2"):
        verify_igvm_id_block_body(mutate(author_key_enabled=2), policy=0x30000)
    # Author key disabled: the ID signature still verifies, no author digest is reported.
    result = verify_igvm_id_block_body(mutate(author_key_enabled=0), policy=0x30000)
    assert result.author_key_digest is None


def test_sign_without_author_key() -> None:
    vec = RFC6979[1]
    id_key, _ = _keys("sec1")
    signed = sign_id_block(
        bytes.fromhex(vec["launch_digest"]),
        policy=0x3001F,
        family_id=bytes.fromhex(vec["params"]["family_id"]),
        image_id=bytes.fromhex(vec["params"]["image_id"]),
        guest_svn=7,
        id_key=id_key,
        author_key=None,
        compatibility_mask=0x3,
    )
    assert signed.id_block.hex() == vec["id_block_hex"]
    assert signed.author_key_digest is None
    auth = IdAuthInfo.unpack(signed.id_auth)
    assert auth.auth_key_algo == 0
    assert signed.id_auth[0x680:] == bytes(0x1000 - 0x680)
    # The ID block signature is the vector's (same key, same message, RFC 6979).
    assert signed.id_auth[:0x680][8:] == bytes.fromhex(vec["id_auth_hex"])[8:0x680]
    body = parse_igvm_id_block_body(signed.igvm_body)
    assert body.compatibility_mask == 3
    assert body.author_key_enabled == 0 and body.author_key_algorithm == 0
    assert signed.igvm_body[400:] == bytes(IGVM_ID_BLOCK_SIZE - 400)
    assert verify_igvm_id_block_body(signed.igvm_body, policy=0x3001F).author_key_digest is None
    verify_id_block(signed.id_block, signed.id_auth)


def test_coconut_style_disabled_author_algorithm_is_accepted() -> None:
    """COCONUT writes author_key_algorithm = 1 with the author key disabled; loaders ignore it."""
    id_key, _ = _keys("sec1")
    signed = sign_id_block(bytes(48), policy=0x30000, id_key=id_key, author_key=None, compatibility_mask=1)
    parsed = parse_igvm_id_block_body(signed.igvm_body)
    body = dataclasses.replace(parsed, author_key_algorithm=1).pack()
    assert verify_igvm_id_block_body(body, policy=0x30000).author_key_digest is None
    assert parse_igvm_id_block_body(body).id_auth_info().auth_key_algo == 0


# ------------------------------------------------------------------------------------------------
# Structures: sizes, malformed input, seeded round-trips


def test_struct_sizes() -> None:
    assert IdBlock.STRUCT.size == 96
    assert IdAuthInfo.STRUCT.size == 4096
    assert IgvmSnpIdBlock.STRUCT.size == 696
    assert IgvmSnpIdBlockPublicKey.STRUCT.size == 152
    assert len(SnpSignature().pack()) == 0x200
    assert len(SnpSignature().pack_igvm()) == 144
    assert len(SnpPublicKey().pack()) == 0x404


def test_malformed_inputs_raise_format_errors() -> None:
    with pytest.raises(IgvmFormatError, match="696 bytes"):
        parse_igvm_id_block_body(bytes(695))
    with pytest.raises(IgvmFormatError, match="696 bytes"):
        parse_igvm_id_block_body(bytes(697))
    with pytest.raises(IgvmFormatError, match="LD"):
        IdBlock(ld=bytes(32))
    with pytest.raises(IgvmFormatError, match="POLICY"):
        IdBlock(ld=bytes(48), policy=1 << 64)
    with pytest.raises(IgvmFormatError, match="ID_BLOCK"):
        IdBlock.unpack(bytes(95))
    with pytest.raises(IgvmFormatError, match="ID_AUTH_INFO"):
        IdAuthInfo.unpack(bytes(4095))
    with pytest.raises(IgvmFormatError, match="72 bytes"):
        SnpSignature.from_rs(1 << 576, 1)
    with pytest.raises(IgvmFormatError, match="non-zero reserved"):
        sev_public_key_to_igvm(bytes(0x403) + b"\1")
    with pytest.raises(IgvmFormatError, match="non-zero reserved"):
        sev_signature_to_igvm(bytes(0x1FF) + b"\1")
    with pytest.raises(IgvmFormatError, match="152 bytes"):
        igvm_public_key_to_sev(bytes(150))


def test_wrong_curve_public_key_for_sev_structure() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SigningError, match="P-256"):
        key_digest(p256)


@pytest.mark.parametrize("seed", range(200))
def test_seeded_round_trips(seed: int) -> None:
    rng = random.Random(seed)
    body = bytes(rng.getrandbits(8) for _ in range(IGVM_ID_BLOCK_SIZE))
    parsed = parse_igvm_id_block_body(body)
    assert parsed.pack() == body
    assert IgvmSnpIdBlock.unpack(parsed.pack()) == parsed

    block = IdBlock(
        ld=rng.randbytes(48),
        family_id=rng.randbytes(16),
        image_id=rng.randbytes(16),
        version=rng.getrandbits(32),
        guest_svn=rng.getrandbits(32),
        policy=rng.getrandbits(64),
    )
    assert IdBlock.unpack(block.pack()) == block

    auth = IdAuthInfo(
        id_key_algo=rng.getrandbits(32),
        auth_key_algo=rng.getrandbits(32),
        id_block_sig=SnpSignature(rng.randbytes(72), rng.randbytes(72)),
        id_key=SnpPublicKey(rng.getrandbits(32), rng.randbytes(72), rng.randbytes(72)),
        id_key_sig=SnpSignature(rng.randbytes(72), rng.randbytes(72)),
        author_key=SnpPublicKey(rng.getrandbits(32), rng.randbytes(72), rng.randbytes(72)),
    )
    packed = auth.pack()
    assert len(packed) == 4096
    assert IdAuthInfo.unpack(packed) == auth
    assert IdAuthInfo.nonzero_reserved(packed) == []
