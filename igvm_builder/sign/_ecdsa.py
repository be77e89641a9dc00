"""The one place that calls ``cryptography`` for the signing package.

Every ``cryptography`` exception (``UnsupportedAlgorithm``, ``InvalidSignature``,
``ValueError``/``TypeError`` from key loading or point validation) is translated
here into :class:`~igvm_builder.errors.SigningError` or
:class:`~igvm_builder.errors.VerificationError`.  Nothing in this module puts key
material (PEM text, DER bytes, private scalars, passwords) into a message: the
messages name the key *source* (``description``) and the key type only.

SEV-SNP uses ECDSA over NIST P-384 with SHA-384 (SNP firmware ABI, ``ID_KEY_ALGO``
/ ``AUTH_KEY_ALGO`` = 1, ``CURVE`` = 2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from igvm_builder.errors import SigningError, VerificationError

__all__ = [
    "P384_ORDER",
    "PrivateKey",
    "PublicKey",
    "check_signature_range",
    "decode_der_signature",
    "decode_signature",
    "describe_key",
    "encode_der_signature",
    "load_private_key",
    "load_public_key",
    "public_key_from_point",
    "public_key_from_xy",
    "public_key_pem",
    "public_key_xy",
    "require_p384_private",
    "require_p384_public",
    "same_public_key",
    "sha384",
    "sign_deterministic",
    "verify_digest",
    "verify_message",
]

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey

#: Order n of the P-384 base point (FIPS 186-4 D.1.2.4); valid r, s are in [1, n-1].
P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)

_CURVE_NAMES = {
    "secp384r1": "P-384 (secp384r1)",
    "secp256r1": "P-256 (secp256r1)",
    "secp521r1": "P-521 (secp521r1)",
    "secp256k1": "secp256k1",
    "secp224r1": "P-224 (secp224r1)",
    "secp192r1": "P-192 (secp192r1)",
}

_REQUIREMENT = "SEV-SNP ID and author keys must be ECDSA P-384 (secp384r1)"


def sha384(data: bytes) -> bytes:
    """SHA-384 of ``data`` (48 bytes)."""
    return hashlib.sha384(data).digest()


def describe_key(key: object) -> str:
    """Human name of a key's type and curve, e.g. ``EC P-256 (secp256r1)`` or ``RSA-2048``.

    Never includes key material.
    """
    from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa, x448, x25519

    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        name = key.curve.name
        return f"EC {_CURVE_NAMES.get(name, name)}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return "X25519"
    if isinstance(key, x448.X448PrivateKey | x448.X448PublicKey):
        return "X448"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return f"DSA-{key.key_size}"
    return type(key).__name__


def require_p384_private(key: object, source: str | None) -> ec.EllipticCurvePrivateKey:
    """Return ``key`` if it is an EC P-384 private key, else raise SigningError naming ``source``."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return key
    raise SigningError(f"key is {describe_key(key)}; {_REQUIREMENT}", source=source)


def require_p384_public(key: object, source: str | None) -> ec.EllipticCurvePublicKey:
    """Return ``key`` if it is an EC P-384 public key, else raise SigningError naming ``source``."""
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1):
        return key
    raise SigningError(f"public key is {describe_key(key)}; {_REQUIREMENT}", source=source)


def load_private_key(data: bytes, *, password: bytes | None, source: str) -> ec.EllipticCurvePrivateKey:
    """Load a P-384 private key: SEC1 or PKCS#8, PEM or DER, optionally encrypted.

    Raises SigningError (naming ``source``, never the data) when the bytes are not a
    private key, the password is missing or wrong, or the key is not P-384.
    """
    stripped = data.lstrip()
    is_pem = stripped.startswith(b"-----BEGIN")
    loader = serialization.load_pem_private_key if is_pem else serialization.load_der_private_key
    try:
        key = loader(stripped if is_pem else data, password=password)
    except TypeError as exc:
        # cryptography: "Password was not given but private key is encrypted" or
        # "Password was given but private key is not encrypted".
        if password is None:
            msg = "private key is encrypted and no password was given"
        else:
            msg = "a password was given but the private key is not encrypted"
        raise SigningError(msg, source=source) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        kind = "PEM" if is_pem else "DER"
        hint = " (or the password is wrong)" if password is not None else ""
        raise SigningError(
            f"cannot load a private key from this {kind} data{hint}; expected SEC1 or PKCS#8 EC P-384",
            source=source,
        ) from exc
    return require_p384_private(key, source)


def load_public_key(data: bytes, *, source: str) -> ec.EllipticCurvePublicKey:
    """Load a P-384 public key: SubjectPublicKeyInfo or X.509 certificate, PEM or DER."""
    # cryptography.x509 costs ~18 ms to import (its name parser compiles regexes at import);
    # only a certificate needs it, so signing with a key does not pay for it
    from cryptography import x509

    stripped = data.lstrip()
    is_pem = stripped.startswith(b"-----BEGIN")
    try:
        if is_pem and b"-----BEGIN CERTIFICATE" in stripped:
            key: object = x509.load_pem_x509_certificate(stripped).public_key()
        elif is_pem:
            key = serialization.load_pem_public_key(stripped)
        else:
            try:
                key = serialization.load_der_public_key(data)
            except ValueError:
                key = x509.load_der_x509_certificate(data).public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        if is_pem and b"PRIVATE KEY" in stripped:
            msg = "expected a public key (SubjectPublicKeyInfo or certificate) but got a private key"
        else:
            msg = "cannot load a public key (SubjectPublicKeyInfo or X.509 certificate, PEM or DER)"
        raise SigningError(msg, source=source) from exc
    return require_p384_public(key, source)


def sign_deterministic(key: ec.EllipticCurvePrivateKey, message: bytes, *, source: str) -> tuple[int, int]:
    """ECDSA P-384 / SHA-384 over ``message`` with an RFC 6979 nonce; returns (r, s).

    Never falls back to random nonces: if the OpenSSL build (or cryptography
    version) lacks deterministic ECDSA this raises SigningError.
    """
    try:
        algorithm = ec.ECDSA(hashes.SHA384(), deterministic_signing=True)
    except TypeError as exc:  # cryptography < 43 has no deterministic_signing argument
        raise SigningError(
            "this cryptography version has no deterministic ECDSA (RFC 6979); "
            "upgrade cryptography (>= 43) rather than sign with random nonces",
            source=source,
        ) from exc
    try:
        der = key.sign(message, algorithm)
    except UnsupportedAlgorithm as exc:
        raise SigningError(
            "the OpenSSL build used by cryptography has no deterministic ECDSA (RFC 6979); "
            "refusing to fall back to random nonces",
            source=source,
        ) from exc
    except ValueError as exc:
        raise SigningError("ECDSA signing failed", source=source) from exc
    return utils.decode_dss_signature(der)


def encode_der_signature(r: int, s: int) -> bytes:
    """DER ``ECDSA-Sig-Value`` of (r, s)."""
    return utils.encode_dss_signature(r, s)


def decode_der_signature(der: bytes) -> tuple[int, int] | None:
    """(r, s) from a strict DER ``ECDSA-Sig-Value``, or None if ``der`` is not one."""
    try:
        r, s = utils.decode_dss_signature(der)
    except ValueError:
        return None
    # decode_dss_signature tolerates nothing after the SEQUENCE; re-encode to be strict.
    if utils.encode_dss_signature(r, s) != der:
        return None
    return r, s


def check_signature_range(r: int, s: int) -> bool:
    """True if both r and s are in [1, n-1] for P-384."""
    return 0 < r < P384_ORDER and 0 < s < P384_ORDER


def verify_message(public_key: ec.EllipticCurvePublicKey, r: int, s: int, message: bytes) -> bool:
    """True if (r, s) is a valid ECDSA P-384 / SHA-384 signature of ``message``."""
    if not check_signature_range(r, s):
        return False
    try:
        public_key.verify(utils.encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def verify_digest(public_key: ec.EllipticCurvePublicKey, r: int, s: int, digest: bytes) -> bool:
    """True if (r, s) is a valid ECDSA P-384 signature of the SHA-384 ``digest``."""
    if len(digest) != 48 or not check_signature_range(r, s):
        return False
    try:
        public_key.verify(
            utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA384()))
        )
    except InvalidSignature:
        return False
    return True


def public_key_xy(public_key: ec.EllipticCurvePublicKey) -> tuple[int, int]:
    """Affine coordinates (x, y) of a public key."""
    numbers = public_key.public_numbers()
    return numbers.x, numbers.y


def public_key_from_xy(qx: int, qy: int, *, what: str) -> ec.EllipticCurvePublicKey:
    """P-384 public key from affine coordinates; VerificationError if not a valid point."""
    try:
        return ec.EllipticCurvePublicNumbers(qx, qy, ec.SECP384R1()).public_key()
    except ValueError as exc:
        raise VerificationError(f"{what} is not a valid P-384 point") from exc


def public_key_from_point(point: bytes, *, source: str) -> ec.EllipticCurvePublicKey:
    """P-384 public key from an SEC1 (uncompressed or compressed) point; SigningError if invalid."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point)
    except ValueError as exc:
        raise SigningError("the token's EC_POINT is not a valid P-384 point", source=source) from exc


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    """PEM SubjectPublicKeyInfo of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def same_public_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    """True if two EC public keys are the same point on the same curve."""
    return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()


_B64_STD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_B64_URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


def _text_candidates(text: str) -> list[bytes]:
    """Byte strings ``text`` may encode: hex, standard base64, URL-safe base64."""
    compact = "".join(text.split())
    out: list[bytes] = []
    hex_text = compact[2:] if compact[:2].lower() == "0x" else compact
    try:
        out.append(bytes.fromhex(hex_text))
    except ValueError:
        pass
    padded = compact.rstrip("=") + "=" * (-len(compact.rstrip("=")) % 4)
    chars = set(padded)
    try:
        if chars <= _B64_STD:
            out.append(base64.b64decode(padded, validate=True))
        elif chars <= _B64_URL:
            out.append(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError):
        pass
    return out


def decode_signature(data: bytes | str) -> tuple[int, int]:
    """(r, s) from an ECDSA P-384 signature in any common encoding.

    Accepted: DER ``ECDSA-Sig-Value`` or raw ``r || s`` (96 bytes, big-endian, as
    PKCS#11 and JOSE/Azure return it), each as binary, hex, or base64 (standard or
    URL-safe, padding optional).  Raises SigningError otherwise (the data itself is
    not echoed).
    """
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    candidates: list[bytes] = []
    try:
        text: str | None = raw.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        # Printable input is text (a binary DER or r||s is never all printable ASCII).
        candidates.extend(_text_candidates(text))
    else:
        candidates.append(raw)
    for blob in candidates:
        der = decode_der_signature(blob)
        if der is not None:
            return der
        if len(blob) == 96:
            return int.from_bytes(blob[:48], "big"), int.from_bytes(blob[48:], "big")
    raise SigningError(
        f"signature is neither DER nor a 96-byte r||s (binary, hex or base64); got {len(raw)} bytes of input"
    )
