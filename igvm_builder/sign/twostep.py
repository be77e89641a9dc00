"""Two-step signing: export exactly what must be signed, sign elsewhere, import the signatures.

For air-gapped signing ceremonies and signing services that only take a digest:

1. ``tbs = export_tbs(ld, policy=..., id_public_key=..., author_public_key=..., compatibility_mask=...)``
   and ``tbs.to_json()`` -- needs only the *public* keys.
2. Off-line, for each entry of ``to_sign``: sign ``message_hex`` with ECDSA P-384 /
   SHA-384 (or, equivalently, sign the prehashed ``sha384_hex`` digest) with the
   key named in ``key`` (``id`` or ``author``).
3. ``import_signature(ExportedTbs.from_json(...), id_block_signature=..., id_key_signature=...)``
   gives the :class:`~igvm_builder.sign.idblock.SignedIdBlock`; signatures may be
   DER or raw ``r || s``, binary, hex or base64.  Each is verified.

JSON document (``to_json``, keys sorted, UTF-8, trailing newline)::

    {
      "format": "igvm-builder/snp-id-block-tbs/v1",
      "algorithm": "ECDSA_P384_SHA384",
      "compatibility_mask": 1,
      "id_block": {"ld": hex48, "family_id": hex16, "image_id": hex16,
                   "version": 1, "guest_svn": 0, "policy": "0x30000"},
      "id_key": {"public_key_pem": "...", "digest": hex48},
      "author_key": {"public_key_pem": "...", "digest": hex48} | null,
      "to_sign": [
        {"name": "id_block", "key": "id", "message_hex": <96-byte ID_BLOCK>,
         "sha384_hex": ..., "sha384_base64": ...},
        {"name": "id_key", "key": "author", "message_hex": <0x404-byte SEV ID key>, ...}
      ]
    }

``from_json`` recomputes every message and digest and rejects a document whose
``to_sign`` entries or digests do not match its fields.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Protocol

from igvm_builder.errors import IgvmFormatError, SigningError
from igvm_builder.recordclass import record
from igvm_builder.sign import _ecdsa
from igvm_builder.sign.idblock import (
    ID_BLOCK_VERSION,
    IdBlock,
    SignedIdBlock,
    SnpPublicKey,
    assemble_signed_id_block,
)

__all__ = ["TBS_FORMAT", "ExportedTbs", "TbsMessage", "export_tbs", "import_signature"]

TBS_FORMAT = "igvm-builder/snp-id-block-tbs/v1"
_ALGORITHM = "ECDSA_P384_SHA384"
_SOURCE = "to-be-signed document"


class KeyHolder(Protocol):
    """Anything that can name its public key: every :class:`~igvm_builder.sign.keys.KeySource`."""

    def public_key(self) -> _ecdsa.PublicKey: ...


@record(kw_only=True)
class TbsMessage:
    """One message to sign: ``name`` (``id_block``/``id_key``), which ``key`` signs it, the bytes."""

    name: str
    key: str
    message: bytes

    @property
    def sha384(self) -> bytes:
        return _ecdsa.sha384(self.message)

    def to_dict(self) -> dict[str, Any]:
        digest = self.sha384
        return {
            "name": self.name,
            "key": self.key,
            "message_hex": self.message.hex(),
            "sha384_hex": digest.hex(),
            "sha384_base64": base64.b64encode(digest).decode("ascii"),
        }


@record(kw_only=True)
class ExportedTbs:
    """Everything needed to sign an ID block elsewhere and assemble the result afterwards."""

    fields: IdBlock
    id_key: _ecdsa.PublicKey
    author_key: _ecdsa.PublicKey | None
    compatibility_mask: int

    @property
    def id_key_sev(self) -> SnpPublicKey:
        return SnpPublicKey.from_public_key(self.id_key, source="ID public key")

    @property
    def author_key_sev(self) -> SnpPublicKey | None:
        if self.author_key is None:
            return None
        return SnpPublicKey.from_public_key(self.author_key, source="author public key")

    @property
    def id_block_message(self) -> bytes:
        """The 96-byte ID block, signed by the ID key."""
        return self.fields.pack()

    @property
    def id_key_message(self) -> bytes | None:
        """The 0x404-byte SEV ID key, signed by the author key (None without an author key)."""
        return self.id_key_sev.pack() if self.author_key is not None else None

    def messages(self) -> tuple[TbsMessage, ...]:
        out = [TbsMessage(name="id_block", key="id", message=self.id_block_message)]
        if self.author_key is not None:
            out.append(TbsMessage(name="id_key", key="author", message=self.id_key_sev.pack()))
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        def key_dict(key: _ecdsa.PublicKey | None) -> dict[str, str] | None:
            if key is None:
                return None
            return {
                "public_key_pem": _ecdsa.public_key_pem(key),
                "digest": SnpPublicKey.from_public_key(key).digest().hex(),
            }

        f = self.fields
        return {
            "format": TBS_FORMAT,
            "algorithm": _ALGORITHM,
            "compatibility_mask": self.compatibility_mask,
            "id_block": {
                "ld": f.ld.hex(),
                "family_id": f.family_id.hex(),
                "image_id": f.image_id.hex(),
                "version": f.version,
                "guest_svn": f.guest_svn,
                "policy": f"{f.policy:#x}",
            },
            "id_key": key_dict(self.id_key),
            "author_key": key_dict(self.author_key),
            "to_sign": [m.to_dict() for m in self.messages()],
        }

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, two-space indent, trailing newline), UTF-8."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> ExportedTbs:
        """Parse and cross-check a document written by :meth:`to_json`."""
        from igvm_builder.io import parse_json

        doc = parse_json(data, source=_SOURCE, error=SigningError, what="to-be-signed document")
        if not isinstance(doc, dict) or doc.get("format") != TBS_FORMAT:
            raise SigningError(f"not an {TBS_FORMAT} document", source=_SOURCE)
        if doc.get("algorithm") != _ALGORITHM:
            raise SigningError(f"algorithm must be {_ALGORITHM}", source=_SOURCE)
        try:
            blk = doc["id_block"]
            fields = IdBlock(
                ld=bytes.fromhex(blk["ld"]),
                family_id=bytes.fromhex(blk["family_id"]),
                image_id=bytes.fromhex(blk["image_id"]),
                version=int(blk["version"]),
                guest_svn=int(blk["guest_svn"]),
                policy=int(str(blk["policy"]), 0),
            )
            mask = doc["compatibility_mask"]
            if not isinstance(mask, int):
                raise TypeError("compatibility_mask")
            id_key = _load_key(doc["id_key"], "id_key")
            author_key = _load_key(doc["author_key"], "author_key") if doc.get("author_key") else None
            listed = doc["to_sign"]
        except (KeyError, TypeError, ValueError, IgvmFormatError) as exc:
            raise SigningError(f"missing or malformed field ({exc})", source=_SOURCE) from exc
        tbs = cls(fields=fields, id_key=id_key, author_key=author_key, compatibility_mask=mask)
        if listed != [m.to_dict() for m in tbs.messages()]:
            raise SigningError(
                "the 'to_sign' entries do not match the ID block fields and keys (edited document?)",
                source=_SOURCE,
            )
        return tbs


def _load_key(entry: Any, name: str) -> _ecdsa.PublicKey:
    key = _ecdsa.load_public_key(str(entry["public_key_pem"]).encode("ascii"), source=f"{_SOURCE}: {name}")
    digest = SnpPublicKey.from_public_key(key).digest().hex()
    if entry.get("digest") != digest:
        raise SigningError(f"{name}.digest does not match {name}.public_key_pem", source=_SOURCE)
    return key


def _public(key: _ecdsa.PublicKey | KeyHolder, what: str) -> _ecdsa.PublicKey:
    if not isinstance(key, _ecdsa.PublicKey):
        key = key.public_key()
    return _ecdsa.require_p384_public(key, what)


def export_tbs(
    ld: bytes,
    *,
    policy: int,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    guest_svn: int = 0,
    version: int = ID_BLOCK_VERSION,
    id_public_key: _ecdsa.PublicKey | KeyHolder,
    author_public_key: _ecdsa.PublicKey | KeyHolder | None = None,
    compatibility_mask: int,
) -> ExportedTbs:
    """The to-be-signed messages for an ID block (see the module docstring for the JSON form)."""
    fields = IdBlock(
        ld=bytes(ld),
        family_id=bytes(family_id),
        image_id=bytes(image_id),
        version=version,
        guest_svn=guest_svn,
        policy=policy,
    )
    return ExportedTbs(
        fields=fields,
        id_key=_public(id_public_key, "ID public key"),
        author_key=_public(author_public_key, "author public key") if author_public_key is not None else None,
        compatibility_mask=compatibility_mask,
    )


def _rs(value: bytes | str | tuple[int, int], what: str) -> tuple[int, int]:
    if isinstance(value, tuple):
        r, s = value
        return int(r), int(s)
    try:
        return _ecdsa.decode_signature(value)
    except SigningError as exc:
        raise SigningError(f"{what}: {exc.message}") from None


def import_signature(
    tbs: ExportedTbs | bytes | str,
    *,
    id_block_signature: bytes | str | tuple[int, int],
    id_key_signature: bytes | str | tuple[int, int] | None = None,
    deterministic: bool = False,
) -> SignedIdBlock:
    """Assemble a :class:`SignedIdBlock` from signatures made elsewhere.

    ``id_block_signature`` is the ID key's signature over ``to_sign[id_block]``;
    ``id_key_signature`` the author key's over ``to_sign[id_key]`` (required exactly
    when the document has an author key).  Each is verified (SigningError naming
    which one failed).
    """
    if not isinstance(tbs, ExportedTbs):
        tbs = ExportedTbs.from_json(tbs)
    id_rs = _rs(id_block_signature, "ID block signature")
    if not _ecdsa.verify_message(tbs.id_key, *id_rs, tbs.id_block_message):
        raise SigningError("the ID block signature does not verify with the ID public key of the document")
    author_sev: SnpPublicKey | None = None
    author_rs: tuple[int, int] | None = None
    if tbs.author_key is not None:
        if id_key_signature is None:
            raise SigningError("the document has an author key: the author's ID key signature is required")
        author_rs = _rs(id_key_signature, "ID key signature")
        if not _ecdsa.verify_message(tbs.author_key, *author_rs, tbs.id_key_sev.pack()):
            raise SigningError(
                "the ID key signature does not verify with the author public key of the document"
            )
        author_sev = tbs.author_key_sev
    elif id_key_signature is not None:
        raise SigningError("an ID key signature was given but the document has no author key")
    return assemble_signed_id_block(
        tbs.fields,
        id_key=tbs.id_key_sev,
        id_block_signature=id_rs,
        author_key=author_sev,
        id_key_signature=author_rs,
        compatibility_mask=tbs.compatibility_mask,
        deterministic=deterministic,
    )
