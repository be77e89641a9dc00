"""SEV-SNP ID block, ID authentication information, and the IGVM SNP_ID_BLOCK body.

Layouts (``shared/spec/MEASUREMENT.md`` §10, ``IGVM_FORMAT.md`` §5 and §18; SNP
firmware ABI ``SNP_LAUNCH_FINISH``; ``igvm_defs`` ``IGVM_VHS_SNP_ID_BLOCK``):

* ``ID_BLOCK`` (96 bytes) -- the exact byte string the ID key signs::

      0x00 LD[48] | 0x30 FAMILY_ID[16] | 0x40 IMAGE_ID[16] | 0x50 u32 VERSION (=1)
      | 0x54 u32 GUEST_SVN | 0x58 u64 POLICY

* Signature (0x200 bytes): ``R[72] | S[72] | zeros``; public key (0x404 bytes):
  ``u32 CURVE (=2, P-384) | QX[72] | QY[72] | zeros``.  R, S, QX, QY are
  **little-endian** integers zero-padded from 48 to 72 bytes.
* ``ID_AUTH_INFO`` (4096 bytes)::

      0x000 u32 ID_KEY_ALGO (=1) | 0x004 u32 AUTH_KEY_ALGO (=1, 0 without author key)
      | 0x040 ID_BLOCK_SIG | 0x240 ID_KEY | 0x680 ID_KEY_SIG | 0x880 AUTHOR_KEY

* IGVM ``IGVM_VHS_SNP_ID_BLOCK`` (696 bytes, directive 0x30B): no policy field (the
  loader takes it from the GUEST_POLICY header); its public key has a ``reserved``
  u32 after ``curve`` (152 bytes) and its signature is just ``r[72] | s[72]``.
  The author key signs the **SEV-format** 0x404-byte ID key.

Everything here is pure: frozen dataclasses and functions over ``bytes``.  The
only ``cryptography`` calls go through :mod:`igvm_builder.sign._ecdsa`.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from igvm_builder.errors import IgvmFormatError, SigningError, VerificationError
from igvm_builder.format.headers import SnpIdBlock as _FormatSnpIdBlock
from igvm_builder.format.headers import key_digest as _format_key_digest
from igvm_builder.recordclass import record
from igvm_builder.sign import _ecdsa

__all__ = [
    "CURVE_P384",
    "ECDSA_P384_SHA384",
    "ID_AUTH_INFO_SIZE",
    "ID_BLOCK_SIZE",
    "ID_BLOCK_VERSION",
    "IGVM_ID_BLOCK_SIZE",
    "IGVM_PUBLIC_KEY_SIZE",
    "IGVM_SIGNATURE_SIZE",
    "SEV_PUBLIC_KEY_SIZE",
    "SEV_SIGNATURE_SIZE",
    "TEST_ONLY_KEY_DIGESTS",
    "IdAuthInfo",
    "IdBlock",
    "IdBlockVerification",
    "IgvmSnpIdBlock",
    "IgvmSnpIdBlockPublicKey",
    "SignedIdBlock",
    "SnpPublicKey",
    "SnpSignature",
    "assemble_signed_id_block",
    "igvm_id_block_body",
    "igvm_public_key_to_sev",
    "igvm_signature_to_sev",
    "key_digest",
    "parse_igvm_id_block_body",
    "sev_public_key",
    "sev_public_key_to_igvm",
    "sev_signature_to_igvm",
    "verify_id_block",
    "verify_igvm_id_block_body",
]

ID_BLOCK_SIZE = 0x60
ID_AUTH_INFO_SIZE = 0x1000
SEV_SIGNATURE_SIZE = 0x200
SEV_PUBLIC_KEY_SIZE = 0x404
IGVM_SIGNATURE_SIZE = 144
IGVM_PUBLIC_KEY_SIZE = 152
IGVM_ID_BLOCK_SIZE = 696

#: ``ID_KEY_ALGO`` / ``AUTH_KEY_ALGO`` value for ECDSA P-384 with SHA-384.
ECDSA_P384_SHA384 = 1
#: ``CURVE`` value for NIST P-384.
CURVE_P384 = 2
#: The only ID block version the SNP firmware (and QEMU) accept.
ID_BLOCK_VERSION = 1

#: Width of an SNP little-endian integer field (R, S, QX, QY), of which 48 bytes are used.
_COMPONENT = 72
_P384_BYTES = 48

ID_BLOCK_SIG_OFFSET = 0x040
ID_KEY_OFFSET = 0x240
ID_KEY_SIG_OFFSET = 0x680
AUTHOR_KEY_OFFSET = 0x880

#: Key digests (SHA-384 of the SEV public-key structure) of the public TEST-ONLY keys in
#: ``shared/keys``.  Anything signed with them proves nothing; callers signing a release
#: should refuse (or at least warn loudly) when a key digest is in this set.
TEST_ONLY_KEY_DIGESTS: frozenset[bytes] = frozenset(
    bytes.fromhex(h)
    for h in (
        "f9d6dcd7b26e5ad5ce1bf14cd8f8b34cc8827dc833d2929396f1279fe99d9b1b2cc082dd5e556ddbf9761ec5f65d6a3f",
        "387039044909487b3c286319dac3c64d3cdbe0dc462c113de472be36cd0b87fcbdfe61d9de0fcef41c1c3071520baa36",
    )
)


def _le72(value: int, what: str) -> bytes:
    if not 0 <= value < 1 << (8 * _COMPONENT):
        raise IgvmFormatError(f"{what} does not fit in {_COMPONENT} bytes")
    return value.to_bytes(_COMPONENT, "little")


def _check_len(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        got = len(value) if isinstance(value, bytes | bytearray | memoryview) else type(value).__name__
        raise IgvmFormatError(f"{what} must be {size} bytes, got {got}")


def _check_uint(value: int, bits: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise IgvmFormatError(f"{what} must be an unsigned {bits}-bit integer, got {value!r}")


def _truncated(what: str, size: int, buf: bytes | memoryview, offset: int) -> IgvmFormatError:
    return IgvmFormatError(f"{what} needs {size} bytes, {max(len(buf) - offset, 0)} available", offset=offset)


# --------------------------------------------------------------------------------------------
# ID_BLOCK


@record(kw_only=True)
class IdBlock:
    """SNP ``ID_BLOCK`` (96 bytes), the message the ID key signs."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<48s16s16sIIQ")
    SIZE: ClassVar[int] = ID_BLOCK_SIZE

    ld: bytes
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    version: int = ID_BLOCK_VERSION
    guest_svn: int = 0
    policy: int = 0

    def __post_init__(self) -> None:
        _check_len(self.ld, 48, "ID block LD (launch digest)")
        _check_len(self.family_id, 16, "ID block FAMILY_ID")
        _check_len(self.image_id, 16, "ID block IMAGE_ID")
        _check_uint(self.version, 32, "ID block VERSION")
        _check_uint(self.guest_svn, 32, "ID block GUEST_SVN")
        _check_uint(self.policy, 64, "ID block POLICY")

    def pack(self) -> bytes:
        """The 96-byte little-endian ``ID_BLOCK``."""
        return self.STRUCT.pack(
            bytes(self.ld),
            bytes(self.family_id),
            bytes(self.image_id),
            self.version,
            self.guest_svn,
            self.policy,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> IdBlock:
        """Parse a 96-byte ``ID_BLOCK`` at ``offset``."""
        if len(buf) - offset < cls.SIZE:
            raise _truncated("ID_BLOCK", cls.SIZE, buf, offset)
        ld, family_id, image_id, version, guest_svn, policy = cls.STRUCT.unpack_from(buf, offset)
        return cls(
            ld=ld, family_id=family_id, image_id=image_id, version=version, guest_svn=guest_svn, policy=policy
        )


# --------------------------------------------------------------------------------------------
# Signature and public key structures


@record
class SnpSignature:
    """ECDSA signature as SNP stores it: R and S little-endian, 72 bytes each.

    ``pack()`` gives the 0x200-byte SEV ``SIGNATURE`` (R | S | 368 zero bytes);
    ``pack_igvm()`` the 144-byte ``IGVM_VHS_SNP_ID_BLOCK_SIGNATURE`` (``r_comp | s_comp``).
    """

    SIZE: ClassVar[int] = SEV_SIGNATURE_SIZE
    IGVM_SIZE: ClassVar[int] = IGVM_SIGNATURE_SIZE

    r_comp: bytes = bytes(_COMPONENT)
    s_comp: bytes = bytes(_COMPONENT)

    def __post_init__(self) -> None:
        _check_len(self.r_comp, _COMPONENT, "signature R")
        _check_len(self.s_comp, _COMPONENT, "signature S")

    @classmethod
    def from_rs(cls, r: int, s: int) -> SnpSignature:
        """From the integers (r, s) of an ECDSA signature."""
        return cls(_le72(r, "signature R"), _le72(s, "signature S"))

    @property
    def r(self) -> int:
        return int.from_bytes(self.r_comp, "little")

    @property
    def s(self) -> int:
        return int.from_bytes(self.s_comp, "little")

    @property
    def rs(self) -> tuple[int, int]:
        return self.r, self.s

    def is_zero(self) -> bool:
        return not any(self.r_comp) and not any(self.s_comp)

    def padding_is_zero(self) -> bool:
        """True if the bytes beyond the 48 used by P-384 are zero in R and S."""
        return not any(self.r_comp[_P384_BYTES:]) and not any(self.s_comp[_P384_BYTES:])

    def pack(self) -> bytes:
        return self.pack_igvm() + bytes(self.SIZE - self.IGVM_SIZE)

    def pack_igvm(self) -> bytes:
        return bytes(self.r_comp) + bytes(self.s_comp)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> SnpSignature:
        """Parse a 0x200-byte SEV signature (the reserved tail is not kept; see verify)."""
        if len(buf) - offset < cls.SIZE:
            raise _truncated("SEV signature", cls.SIZE, buf, offset)
        return cls.unpack_igvm(buf, offset)

    @classmethod
    def unpack_igvm(cls, buf: bytes | memoryview, offset: int = 0) -> SnpSignature:
        """Parse a 144-byte ``IGVM_VHS_SNP_ID_BLOCK_SIGNATURE``."""
        if len(buf) - offset < cls.IGVM_SIZE:
            raise _truncated("IGVM ID block signature", cls.IGVM_SIZE, buf, offset)
        return cls(bytes(buf[offset : offset + 72]), bytes(buf[offset + 72 : offset + 144]))


@record
class SnpPublicKey:
    """SEV ``PUBLIC_KEY`` structure (0x404 bytes): ``u32 curve | qx[72] | qy[72] | zeros``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I72s72s")
    SIZE: ClassVar[int] = SEV_PUBLIC_KEY_SIZE

    curve: int = 0
    qx: bytes = bytes(_COMPONENT)
    qy: bytes = bytes(_COMPONENT)

    def __post_init__(self) -> None:
        _check_uint(self.curve, 32, "public key CURVE")
        _check_len(self.qx, _COMPONENT, "public key QX")
        _check_len(self.qy, _COMPONENT, "public key QY")

    @classmethod
    def from_public_key(cls, public_key: _ecdsa.PublicKey, *, source: str | None = None) -> SnpPublicKey:
        """From a ``cryptography`` EC P-384 public key (SigningError for any other key)."""
        key = _ecdsa.require_p384_public(public_key, source)
        x, y = _ecdsa.public_key_xy(key)
        return cls(CURVE_P384, _le72(x, "QX"), _le72(y, "QY"))

    def to_public_key(self, what: str = "public key") -> _ecdsa.PublicKey:
        """The ``cryptography`` key; VerificationError if the curve or point is invalid."""
        if self.curve != CURVE_P384:
            raise VerificationError(f"{what} CURVE is {self.curve}, expected {CURVE_P384} (P-384)")
        if not self.padding_is_zero():
            raise VerificationError(f"{what} QX/QY have non-zero bytes beyond the 48 used by P-384")
        return _ecdsa.public_key_from_xy(
            int.from_bytes(self.qx, "little"), int.from_bytes(self.qy, "little"), what=what
        )

    def is_zero(self) -> bool:
        return self.curve == 0 and not any(self.qx) and not any(self.qy)

    def padding_is_zero(self) -> bool:
        return not any(self.qx[_P384_BYTES:]) and not any(self.qy[_P384_BYTES:])

    def pack(self) -> bytes:
        """The 0x404-byte SEV structure (what the author key signs and key digests hash)."""
        body = self.STRUCT.pack(self.curve, bytes(self.qx), bytes(self.qy))
        return body + bytes(self.SIZE - len(body))

    def digest(self) -> bytes:
        """SHA-384 of :meth:`pack` (``ID_KEY_DIGEST`` / ``AUTHOR_KEY_DIGEST`` in the report)."""
        return _ecdsa.sha384(self.pack())

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> SnpPublicKey:
        """Parse a 0x404-byte SEV public key (the reserved tail is not kept; see verify)."""
        if len(buf) - offset < cls.SIZE:
            raise _truncated("SEV public key", cls.SIZE, buf, offset)
        curve, qx, qy = cls.STRUCT.unpack_from(buf, offset)
        return cls(curve, qx, qy)

    def to_igvm(self, reserved: int = 0) -> IgvmSnpIdBlockPublicKey:
        return IgvmSnpIdBlockPublicKey(curve=self.curve, reserved=reserved, qx=self.qx, qy=self.qy)


@record(kw_only=True)
class IgvmSnpIdBlockPublicKey:
    """``IGVM_VHS_SNP_ID_BLOCK_PUBLIC_KEY`` (152 bytes): ``u32 curve | u32 reserved | qx[72] | qy[72]``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II72s72s")
    SIZE: ClassVar[int] = IGVM_PUBLIC_KEY_SIZE

    curve: int = 0
    reserved: int = 0
    qx: bytes = bytes(_COMPONENT)
    qy: bytes = bytes(_COMPONENT)

    def __post_init__(self) -> None:
        _check_uint(self.curve, 32, "IGVM public key curve")
        _check_uint(self.reserved, 32, "IGVM public key reserved")
        _check_len(self.qx, _COMPONENT, "IGVM public key qx")
        _check_len(self.qy, _COMPONENT, "IGVM public key qy")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.curve, self.reserved, bytes(self.qx), bytes(self.qy))

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> IgvmSnpIdBlockPublicKey:
        if len(buf) - offset < cls.SIZE:
            raise _truncated("IGVM ID block public key", cls.SIZE, buf, offset)
        curve, reserved, qx, qy = cls.STRUCT.unpack_from(buf, offset)
        return cls(curve=curve, reserved=reserved, qx=qx, qy=qy)

    def to_sev(self) -> SnpPublicKey:
        """The SEV 0x404-byte form (drops ``reserved``), as QEMU converts it."""
        return SnpPublicKey(self.curve, self.qx, self.qy)


def sev_public_key(public_key: _ecdsa.PublicKey) -> bytes:
    """The 0x404-byte SEV public-key structure of an EC P-384 public key."""
    return SnpPublicKey.from_public_key(public_key).pack()


def key_digest(public_key: _ecdsa.PublicKey | SnpPublicKey) -> bytes:
    """SHA-384 of the 0x404-byte SEV public-key structure (48 bytes), as in the attestation report
    (:func:`igvm_builder.format.headers.key_digest`, here also for a ``cryptography`` key)."""
    if not isinstance(public_key, SnpPublicKey):
        public_key = SnpPublicKey.from_public_key(public_key)
    return _format_key_digest(public_key)


def igvm_public_key_to_sev(buf: bytes) -> bytes:
    """152-byte IGVM public key -> 0x404-byte SEV public key (the reserved u32 is dropped)."""
    _check_len(bytes(buf), IGVM_PUBLIC_KEY_SIZE, "IGVM public key")
    return IgvmSnpIdBlockPublicKey.unpack(buf).to_sev().pack()


def sev_public_key_to_igvm(buf: bytes) -> bytes:
    """0x404-byte SEV public key -> 152-byte IGVM public key (reserved u32 = 0)."""
    _check_len(bytes(buf), SEV_PUBLIC_KEY_SIZE, "SEV public key")
    if any(buf[SnpPublicKey.STRUCT.size :]):
        raise IgvmFormatError("SEV public key has non-zero reserved bytes", offset=SnpPublicKey.STRUCT.size)
    return SnpPublicKey.unpack(buf).to_igvm().pack()


def igvm_signature_to_sev(buf: bytes) -> bytes:
    """144-byte IGVM signature -> 0x200-byte SEV signature."""
    _check_len(bytes(buf), IGVM_SIGNATURE_SIZE, "IGVM signature")
    return SnpSignature.unpack_igvm(buf).pack()


def sev_signature_to_igvm(buf: bytes) -> bytes:
    """0x200-byte SEV signature -> 144-byte IGVM signature."""
    _check_len(bytes(buf), SEV_SIGNATURE_SIZE, "SEV signature")
    if any(buf[IGVM_SIGNATURE_SIZE:]):
        raise IgvmFormatError("SEV signature has non-zero reserved bytes", offset=IGVM_SIGNATURE_SIZE)
    return SnpSignature.unpack(buf).pack_igvm()


# --------------------------------------------------------------------------------------------
# ID_AUTH_INFO


@record(kw_only=True)
class IdAuthInfo:
    """SNP ``ID_AUTH_INFO`` (4096 bytes).

    Without an author key ``auth_key_algo`` is 0 and the author fields are zero.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II56s512s1028s60s512s1028s892s")
    SIZE: ClassVar[int] = ID_AUTH_INFO_SIZE
    #: (offset, length) of every reserved area, including the structure tails.
    RESERVED: ClassVar[tuple[tuple[int, int], ...]] = (
        (0x008, 0x38),
        (ID_BLOCK_SIG_OFFSET + IGVM_SIGNATURE_SIZE, SEV_SIGNATURE_SIZE - IGVM_SIGNATURE_SIZE),
        (ID_KEY_OFFSET + 148, SEV_PUBLIC_KEY_SIZE - 148),
        (0x644, 0x3C),
        (ID_KEY_SIG_OFFSET + IGVM_SIGNATURE_SIZE, SEV_SIGNATURE_SIZE - IGVM_SIGNATURE_SIZE),
        (AUTHOR_KEY_OFFSET + 148, SEV_PUBLIC_KEY_SIZE - 148),
        (0xC84, 0x37C),
    )

    id_key_algo: int = ECDSA_P384_SHA384
    auth_key_algo: int = 0
    id_block_sig: SnpSignature
    id_key: SnpPublicKey
    id_key_sig: SnpSignature = SnpSignature()
    author_key: SnpPublicKey = SnpPublicKey()

    def __post_init__(self) -> None:
        _check_uint(self.id_key_algo, 32, "ID_KEY_ALGO")
        _check_uint(self.auth_key_algo, 32, "AUTH_KEY_ALGO")

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.id_key_algo,
            self.auth_key_algo,
            b"",
            self.id_block_sig.pack(),
            self.id_key.pack(),
            b"",
            self.id_key_sig.pack(),
            self.author_key.pack(),
            b"",
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> IdAuthInfo:
        """Parse 4096 bytes (reserved areas are not kept; :func:`verify_id_block` checks them)."""
        if len(buf) - offset < cls.SIZE:
            raise _truncated("ID_AUTH_INFO", cls.SIZE, buf, offset)
        id_key_algo, auth_key_algo = struct.unpack_from("<II", buf, offset)
        return cls(
            id_key_algo=id_key_algo,
            auth_key_algo=auth_key_algo,
            id_block_sig=SnpSignature.unpack(buf, offset + ID_BLOCK_SIG_OFFSET),
            id_key=SnpPublicKey.unpack(buf, offset + ID_KEY_OFFSET),
            id_key_sig=SnpSignature.unpack(buf, offset + ID_KEY_SIG_OFFSET),
            author_key=SnpPublicKey.unpack(buf, offset + AUTHOR_KEY_OFFSET),
        )

    @classmethod
    def nonzero_reserved(cls, buf: bytes | memoryview) -> list[int]:
        """Offsets of reserved areas of a packed ``ID_AUTH_INFO`` that are not all zero."""
        return [off for off, size in cls.RESERVED if any(buf[off : off + size])]


# --------------------------------------------------------------------------------------------
# IGVM_VHS_SNP_ID_BLOCK


#: The four key fields of IGVM_VHS_SNP_ID_BLOCK, kept here as structures, not bytes.
_KEY_FIELDS = ("id_key_signature", "id_public_key", "author_key_signature", "author_public_key")
#: The other fields, in layout order: the format model's description (one for both).
_IGVM_ID_BLOCK_SCALARS = tuple(f.name for f in _FormatSnpIdBlock.BODY.values if f.name not in _KEY_FIELDS)


@record(kw_only=True)
class IgvmSnpIdBlock:
    """``IGVM_VHS_SNP_ID_BLOCK`` (696 bytes), the body of an IGVM 0x30B directive.

    Field names and order mirror ``igvm_defs``.  There is no policy: the loader
    takes it from the GUEST_POLICY header of the same platform.
    """

    # One description of the 0x30B body: the format model's (format/headers.py).
    STRUCT: ClassVar[struct.Struct] = _FormatSnpIdBlock.STRUCT
    SIZE: ClassVar[int] = IGVM_ID_BLOCK_SIZE

    compatibility_mask: int
    author_key_enabled: int = 0
    reserved: bytes = bytes(3)
    ld: bytes
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    version: int = ID_BLOCK_VERSION
    guest_svn: int = 0
    id_key_algorithm: int = ECDSA_P384_SHA384
    author_key_algorithm: int = 0
    id_key_signature: SnpSignature
    id_public_key: IgvmSnpIdBlockPublicKey
    author_key_signature: SnpSignature = SnpSignature()
    author_public_key: IgvmSnpIdBlockPublicKey = IgvmSnpIdBlockPublicKey()

    def __post_init__(self) -> None:
        body = _FormatSnpIdBlock.BODY
        for name in _IGVM_ID_BLOCK_SCALARS:
            message = body.by_name[name].problem(getattr(self, name))
            if message is not None:
                raise IgvmFormatError(f"IGVM SNP_ID_BLOCK {message}")

    def header(self) -> _FormatSnpIdBlock:
        """The SNP_ID_BLOCK directive of the format model (key fields as their bytes)."""
        return _FormatSnpIdBlock(
            **{name: getattr(self, name) for name in _IGVM_ID_BLOCK_SCALARS},
            id_key_signature=self.id_key_signature.pack_igvm(),
            id_public_key=self.id_public_key.pack(),
            author_key_signature=self.author_key_signature.pack_igvm(),
            author_public_key=self.author_public_key.pack(),
        )

    def pack(self) -> bytes:
        return self.header().pack_body()

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> IgvmSnpIdBlock:
        if len(buf) - offset < cls.SIZE:
            raise _truncated("IGVM_VHS_SNP_ID_BLOCK", cls.SIZE, buf, offset)
        values = _FormatSnpIdBlock.BODY.unpack(buf, offset)
        return cls(
            **{name: values[name] for name in _IGVM_ID_BLOCK_SCALARS},
            id_key_signature=SnpSignature.unpack_igvm(values["id_key_signature"]),
            id_public_key=IgvmSnpIdBlockPublicKey.unpack(values["id_public_key"]),
            author_key_signature=SnpSignature.unpack_igvm(values["author_key_signature"]),
            author_public_key=IgvmSnpIdBlockPublicKey.unpack(values["author_public_key"]),
        )

    @classmethod
    def from_sev(
        cls, id_block: IdBlock, id_auth: IdAuthInfo, *, compatibility_mask: int, author_key_enabled: bool
    ) -> IgvmSnpIdBlock:
        """Build the IGVM body from the SEV ID block and ID auth info (policy is dropped)."""
        return cls(
            compatibility_mask=compatibility_mask,
            author_key_enabled=1 if author_key_enabled else 0,
            ld=id_block.ld,
            family_id=id_block.family_id,
            image_id=id_block.image_id,
            version=id_block.version,
            guest_svn=id_block.guest_svn,
            id_key_algorithm=id_auth.id_key_algo,
            author_key_algorithm=id_auth.auth_key_algo if author_key_enabled else 0,
            id_key_signature=id_auth.id_block_sig,
            id_public_key=id_auth.id_key.to_igvm(),
            author_key_signature=id_auth.id_key_sig if author_key_enabled else SnpSignature(),
            author_public_key=id_auth.author_key.to_igvm()
            if author_key_enabled
            else IgvmSnpIdBlockPublicKey(),
        )

    def id_block(self, policy: int) -> IdBlock:
        """The SEV ``ID_BLOCK`` a loader rebuilds, with ``policy`` from the GUEST_POLICY header."""
        return IdBlock(
            ld=self.ld,
            family_id=self.family_id,
            image_id=self.image_id,
            version=self.version,
            guest_svn=self.guest_svn,
            policy=policy,
        )

    def id_auth_info(self) -> IdAuthInfo:
        """The SEV ``ID_AUTH_INFO`` a loader rebuilds (author fields zero when disabled)."""
        enabled = bool(self.author_key_enabled)
        return IdAuthInfo(
            id_key_algo=self.id_key_algorithm,
            auth_key_algo=self.author_key_algorithm if enabled else 0,
            id_block_sig=self.id_key_signature,
            id_key=self.id_public_key.to_sev(),
            id_key_sig=self.author_key_signature if enabled else SnpSignature(),
            author_key=self.author_public_key.to_sev() if enabled else SnpPublicKey(),
        )


def igvm_id_block_body(
    id_block: IdBlock, id_auth: IdAuthInfo, *, compatibility_mask: int, author_key_enabled: bool | None = None
) -> bytes:
    """The 696-byte IGVM SNP_ID_BLOCK body for a signed ID block.

    ``author_key_enabled`` defaults to ``id_auth.auth_key_algo != 0``.  The policy of
    ``id_block`` is not stored: the IGVM file's GUEST_POLICY for the same platform
    must equal it.
    """
    if author_key_enabled is None:
        author_key_enabled = id_auth.auth_key_algo != 0
    return IgvmSnpIdBlock.from_sev(
        id_block, id_auth, compatibility_mask=compatibility_mask, author_key_enabled=author_key_enabled
    ).pack()


def parse_igvm_id_block_body(body: bytes | memoryview) -> IgvmSnpIdBlock:
    """Parse a 696-byte IGVM SNP_ID_BLOCK body (IgvmFormatError if the size is wrong)."""
    if len(body) != IGVM_ID_BLOCK_SIZE:
        raise IgvmFormatError(f"IGVM SNP_ID_BLOCK body must be {IGVM_ID_BLOCK_SIZE} bytes, got {len(body)}")
    return IgvmSnpIdBlock.unpack(body)


# --------------------------------------------------------------------------------------------
# Verification


@record(kw_only=True)
class IdBlockVerification:
    """What :func:`verify_id_block` established."""

    id_block: IdBlock
    id_key_digest: bytes
    author_key_digest: bytes | None

    @property
    def uses_test_only_key(self) -> bool:
        """True if the ID or author key is one of the public TEST-ONLY keys."""
        return self.id_key_digest in TEST_ONLY_KEY_DIGESTS or self.author_key_digest in TEST_ONLY_KEY_DIGESTS


def _check_signature_encoding(sig: SnpSignature, what: str) -> None:
    if sig.is_zero():
        raise VerificationError(f"{what} is missing (all zero)")
    if not sig.padding_is_zero():
        raise VerificationError(f"{what}: R/S have non-zero bytes beyond the 48 used by P-384")


def verify_id_block(
    id_block: bytes | IdBlock,
    id_auth: bytes | IdAuthInfo,
    *,
    author_key_enabled: bool | None = None,
    expected_id_key_digest: bytes | None = None,
    expected_author_key_digest: bytes | None = None,
) -> IdBlockVerification:
    """Verify an SNP ID block and its ID auth info, as the SNP firmware does at LAUNCH_FINISH.

    Checks ID_KEY_ALGO (= 1) and the ID key's curve (= P-384) and point; reserved
    areas zero (when given bytes); ``ID_BLOCK_SIG`` over the 96-byte ID block with the
    ID key; and, when the author key is enabled (default: ``AUTH_KEY_ALGO != 0``),
    AUTH_KEY_ALGO, the author key, and ``ID_KEY_SIG`` over the 0x404-byte SEV-format
    ID key with the author key.  Optionally compares the key digests.

    Raises VerificationError saying which check (and which signature) failed.
    """
    if isinstance(id_block, IdBlock):
        block = id_block
        block_bytes = id_block.pack()
    else:
        block_bytes = bytes(id_block)
        if len(block_bytes) != ID_BLOCK_SIZE:
            raise VerificationError(f"ID block must be {ID_BLOCK_SIZE} bytes, got {len(block_bytes)}")
        block = IdBlock.unpack(block_bytes)
    if isinstance(id_auth, IdAuthInfo):
        auth = id_auth
    else:
        auth_bytes = bytes(id_auth)
        if len(auth_bytes) != ID_AUTH_INFO_SIZE:
            raise VerificationError(f"ID auth info must be {ID_AUTH_INFO_SIZE} bytes, got {len(auth_bytes)}")
        bad = IdAuthInfo.nonzero_reserved(auth_bytes)
        if bad:
            raise VerificationError(
                "ID auth info has non-zero reserved bytes at offset " + ", ".join(f"{o:#x}" for o in bad)
            )
        auth = IdAuthInfo.unpack(auth_bytes)

    if auth.id_key_algo != ECDSA_P384_SHA384:
        raise VerificationError(
            f"ID_KEY_ALGO is {auth.id_key_algo}, expected {ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)"
        )
    id_key = auth.id_key.to_public_key("ID key (ID_KEY)")
    id_digest = auth.id_key.digest()
    _check_signature_encoding(auth.id_block_sig, "ID block signature (ID_BLOCK_SIG)")
    if not _ecdsa.verify_message(id_key, *auth.id_block_sig.rs, block_bytes):
        raise VerificationError(
            "ID block signature (ID_BLOCK_SIG) does not verify: the ID key "
            f"(digest {id_digest.hex()}) did not sign this 96-byte ID block"
        )

    if author_key_enabled is None:
        author_key_enabled = auth.auth_key_algo != 0
    author_digest: bytes | None = None
    if author_key_enabled:
        if auth.auth_key_algo != ECDSA_P384_SHA384:
            raise VerificationError(
                f"AUTH_KEY_ALGO is {auth.auth_key_algo}, expected {ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)"
            )
        author_key = auth.author_key.to_public_key("author key (AUTHOR_KEY)")
        author_digest = auth.author_key.digest()
        _check_signature_encoding(auth.id_key_sig, "ID key signature (ID_KEY_SIG)")
        if not _ecdsa.verify_message(author_key, *auth.id_key_sig.rs, auth.id_key.pack()):
            raise VerificationError(
                "ID key signature (ID_KEY_SIG) does not verify: the author key "
                f"(digest {author_digest.hex()}) did not sign the SEV-format ID key "
                f"(digest {id_digest.hex()})"
            )

    if expected_id_key_digest is not None and bytes(expected_id_key_digest) != id_digest:
        raise VerificationError(
            f"ID key digest is {id_digest.hex()}, expected {bytes(expected_id_key_digest).hex()}"
        )
    if expected_author_key_digest is not None and bytes(expected_author_key_digest) != author_digest:
        got = author_digest.hex() if author_digest is not None else "none (author key disabled)"
        raise VerificationError(
            f"author key digest is {got}, expected {bytes(expected_author_key_digest).hex()}"
        )
    return IdBlockVerification(id_block=block, id_key_digest=id_digest, author_key_digest=author_digest)


def verify_igvm_id_block_body(
    body: bytes | IgvmSnpIdBlock,
    *,
    policy: int,
    expected_id_key_digest: bytes | None = None,
    expected_author_key_digest: bytes | None = None,
) -> IdBlockVerification:
    """Verify an IGVM SNP_ID_BLOCK body the way a loader uses it.

    ``policy`` is the GUEST_POLICY of the platform the directive applies to; the
    loader rebuilds ID_BLOCK with it (and QEMU forces VERSION to 1, so any other
    version is rejected here).  Reserved fields must be zero.
    """
    parsed = body if isinstance(body, IgvmSnpIdBlock) else parse_igvm_id_block_body(body)
    if parsed.version != ID_BLOCK_VERSION:
        raise VerificationError(
            f"IGVM SNP_ID_BLOCK version is {parsed.version}; loaders (QEMU) and the SNP firmware use "
            f"{ID_BLOCK_VERSION}, so the signature cannot match"
        )
    if parsed.author_key_enabled not in (0, 1):
        raise VerificationError(
            f"IGVM SNP_ID_BLOCK author_key_enabled is {parsed.author_key_enabled}, not 0 or 1"
        )
    if any(parsed.reserved):
        raise VerificationError("IGVM SNP_ID_BLOCK reserved bytes are not zero")
    if parsed.id_public_key.reserved:
        raise VerificationError("IGVM SNP_ID_BLOCK id_public_key.reserved is not zero")
    if parsed.author_key_enabled and parsed.author_public_key.reserved:
        raise VerificationError("IGVM SNP_ID_BLOCK author_public_key.reserved is not zero")
    return verify_id_block(
        parsed.id_block(policy),
        parsed.id_auth_info(),
        author_key_enabled=bool(parsed.author_key_enabled),
        expected_id_key_digest=expected_id_key_digest,
        expected_author_key_digest=expected_author_key_digest,
    )


# --------------------------------------------------------------------------------------------
# Signed result


@record(kw_only=True)
class SignedIdBlock:
    """A signed SNP ID block in every form a consumer needs.

    ``id_block`` (96 bytes) and ``id_auth`` (4096 bytes) go to SNP_LAUNCH_FINISH
    (e.g. QEMU ``id-block=``/``id-auth=`` base64); ``igvm_body`` (696 bytes) is the
    body of the IGVM SNP_ID_BLOCK (0x30B) directive.  ``deterministic`` is True when
    both signatures came from RFC 6979 key sources (the bytes are reproducible).
    """

    fields: IdBlock
    id_block: bytes
    id_auth: bytes
    igvm_body: bytes
    id_key_digest: bytes
    author_key_digest: bytes | None
    compatibility_mask: int
    deterministic: bool

    @property
    def uses_test_only_key(self) -> bool:
        """True if the ID or author key is one of the public TEST-ONLY keys in ``shared/keys``."""
        return self.id_key_digest in TEST_ONLY_KEY_DIGESTS or self.author_key_digest in TEST_ONLY_KEY_DIGESTS


def assemble_signed_id_block(
    fields: IdBlock,
    *,
    id_key: SnpPublicKey,
    id_block_signature: tuple[int, int],
    author_key: SnpPublicKey | None = None,
    id_key_signature: tuple[int, int] | None = None,
    compatibility_mask: int,
    deterministic: bool = False,
) -> SignedIdBlock:
    """Put signatures made elsewhere into the ID auth info and IGVM body, and verify the result.

    Raises SigningError if a signature does not verify (a signer must never hand
    out an unverifiable ID block).
    """
    if (author_key is None) != (id_key_signature is None):
        raise SigningError("an author key and the author's ID key signature must be given together")
    _check_uint(compatibility_mask, 32, "compatibility_mask")
    auth = IdAuthInfo(
        id_key_algo=ECDSA_P384_SHA384,
        auth_key_algo=ECDSA_P384_SHA384 if author_key is not None else 0,
        id_block_sig=SnpSignature.from_rs(*id_block_signature),
        id_key=id_key,
        id_key_sig=SnpSignature.from_rs(*id_key_signature) if id_key_signature else SnpSignature(),
        author_key=author_key if author_key is not None else SnpPublicKey(),
    )
    block_bytes = fields.pack()
    auth_bytes = auth.pack()
    try:
        result = verify_id_block(block_bytes, auth_bytes, author_key_enabled=author_key is not None)
    except VerificationError as exc:
        raise SigningError(f"signed ID block does not verify: {exc.message}") from exc
    body = igvm_id_block_body(
        fields, auth, compatibility_mask=compatibility_mask, author_key_enabled=author_key is not None
    )
    return SignedIdBlock(
        fields=fields,
        id_block=block_bytes,
        id_auth=auth_bytes,
        igvm_body=body,
        id_key_digest=result.id_key_digest,
        author_key_digest=result.author_key_digest,
        compatibility_mask=compatibility_mask,
        deterministic=deterministic,
    )


# Import-time layout checks (survive ``python -O``).
for _cls, _size in (
    (IdBlock, ID_BLOCK_SIZE),
    (IdAuthInfo, ID_AUTH_INFO_SIZE),
    (IgvmSnpIdBlock, IGVM_ID_BLOCK_SIZE),
    (IgvmSnpIdBlockPublicKey, IGVM_PUBLIC_KEY_SIZE),
):
    if _cls.STRUCT.size != _size:
        raise ImportError(f"{_cls.__name__} layout does not match the spec size {_size}")
if SnpPublicKey.STRUCT.size != 148:
    raise ImportError("SnpPublicKey layout does not match the spec")
del _cls, _size
