"""SEV-SNP ID block signing: ID block, ID auth info, IGVM SNP_ID_BLOCK body, key sources.

Typical use::

    from igvm_builder.sign import key_source_from_spec, sign_id_block

    signed = sign_id_block(
        launch_digest, policy=0x30000, compatibility_mask=1,
        id_key=key_source_from_spec("keys/id.pem"),
        author_key=key_source_from_spec("pkcs11:token=snp;object=author?pin-source=/run/pin"),
    )
    signed.id_block, signed.id_auth      # 96 and 4096 bytes for SNP_LAUNCH_FINISH / QEMU
    signed.igvm_body                     # 696-byte body of the IGVM 0x30B directive

The IGVM file's GUEST_POLICY for the same platform must equal ``policy`` (the
IGVM body has no policy field; the loader takes it from GUEST_POLICY).
"""

from __future__ import annotations

from igvm_builder.sign.idblock import (
    CURVE_P384,
    ECDSA_P384_SHA384,
    ID_AUTH_INFO_SIZE,
    ID_BLOCK_SIZE,
    IGVM_ID_BLOCK_SIZE,
    TEST_ONLY_KEY_DIGESTS,
    IdAuthInfo,
    IdBlock,
    IdBlockVerification,
    IgvmSnpIdBlock,
    IgvmSnpIdBlockPublicKey,
    SignedIdBlock,
    SnpPublicKey,
    SnpSignature,
    assemble_signed_id_block,
    igvm_id_block_body,
    igvm_public_key_to_sev,
    igvm_signature_to_sev,
    key_digest,
    parse_igvm_id_block_body,
    sev_public_key,
    sev_public_key_to_igvm,
    sev_signature_to_igvm,
    verify_id_block,
    verify_igvm_id_block_body,
)
from igvm_builder.sign.keys import (
    CommandKey,
    EnvPemKey,
    InMemoryKey,
    KeySource,
    PemFileKey,
    Pkcs11Key,
    Pkcs11Uri,
    decode_signature,
    key_source_from_spec,
    parse_pkcs11_uri,
)
from igvm_builder.sign.twostep import TBS_FORMAT, ExportedTbs, TbsMessage, export_tbs, import_signature

__all__ = [
    "CURVE_P384",
    "ECDSA_P384_SHA384",
    "ID_AUTH_INFO_SIZE",
    "ID_BLOCK_SIZE",
    "IGVM_ID_BLOCK_SIZE",
    "TBS_FORMAT",
    "TEST_ONLY_KEY_DIGESTS",
    "CommandKey",
    "EnvPemKey",
    "ExportedTbs",
    "IdAuthInfo",
    "IdBlock",
    "IdBlockVerification",
    "IgvmSnpIdBlock",
    "IgvmSnpIdBlockPublicKey",
    "InMemoryKey",
    "KeySource",
    "PemFileKey",
    "Pkcs11Key",
    "Pkcs11Uri",
    "SignedIdBlock",
    "SnpPublicKey",
    "SnpSignature",
    "TbsMessage",
    "assemble_signed_id_block",
    "decode_signature",
    "export_tbs",
    "igvm_id_block_body",
    "igvm_public_key_to_sev",
    "igvm_signature_to_sev",
    "import_signature",
    "key_digest",
    "key_source_from_spec",
    "parse_igvm_id_block_body",
    "parse_pkcs11_uri",
    "sev_public_key",
    "sev_public_key_to_igvm",
    "sev_signature_to_igvm",
    "sign_id_block",
    "verify_id_block",
    "verify_igvm_id_block_body",
]


def sign_id_block(
    ld: bytes,
    *,
    policy: int,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    guest_svn: int = 0,
    version: int = 1,
    id_key: KeySource,
    author_key: KeySource | None = None,
    compatibility_mask: int,
) -> SignedIdBlock:
    """Sign an SNP ID block for launch digest ``ld`` (48 bytes).

    The ID key signs the 96-byte ID block; the author key (optional) signs the
    0x404-byte SEV-format ID public key.  Every signature is verified after signing
    and the assembled ID auth info is verified again; failures raise SigningError.
    With file/env keys the result is byte-for-byte reproducible (RFC 6979).
    """
    tbs = export_tbs(
        ld,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        guest_svn=guest_svn,
        version=version,
        id_public_key=id_key,
        author_public_key=author_key,
        compatibility_mask=compatibility_mask,
    )
    id_sig = id_key.sign(tbs.id_block_message)
    author_sig = None
    if author_key is not None:
        author_sig = author_key.sign(tbs.id_key_sev.pack())
    return assemble_signed_id_block(
        tbs.fields,
        id_key=tbs.id_key_sev,
        id_block_signature=id_sig,
        author_key=tbs.author_key_sev,
        id_key_signature=author_sig,
        compatibility_mask=compatibility_mask,
        deterministic=id_key.deterministic and (author_key is None or author_key.deterministic),
    )
