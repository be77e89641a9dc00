"""Sign and verify whole IGVM files: the SEV-SNP ID block as an ``SNP_ID_BLOCK`` directive.

Signing (:func:`sign_igvm`):

1. Find the SEV_SNP platform and the GUEST_POLICY that applies to it (the loader
   rebuilds the firmware ID block with that policy, so it is what gets signed).
2. Measure the SNP launch digest with a loader profile (default
   :data:`~igvm_builder.measure.profiles.DEFAULT_LOADER`); the ID block directive
   itself is not measured, so measuring before inserting it is exact.
3. Sign the 96-byte ID block (and, with an author key, the SEV-format ID key).
4. Return a new :class:`~igvm_builder.format.file.IgvmFile` with exactly one
   ``SNP_ID_BLOCK`` for the SNP compatibility mask, appended after the last
   directive; an existing block for that mask is removed.  Nothing else changes.
5. Verify the result before returning it.

Verification (:func:`verify_igvm`) checks, and reports each failure with its own
kind and one-line message (:class:`IdBlockVerificationError`): exactly one ID block
for the SNP platform; its structure and both signatures under the file's
GUEST_POLICY (a block signed for another policy is reported as a policy mismatch
when the signed policy can be found); the signed LD against the digest recomputed
for the loader; the ID and author key digests; and optionally the reference values
written by ``igvm-builder build/measure --reference-values``.

The two-step flow over whole files is :func:`export_igvm_tbs` /
:func:`import_igvm_signature` (see :mod:`igvm_builder.sign.twostep`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from igvm_builder.errors import IgvmError, SigningError, VerificationError
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PLATFORM_NAMES, PLATFORM_SHORT, HeaderType, PageDataFlags, PlatformType
from igvm_builder.format.file import IgvmFile, Layout
from igvm_builder.format.pages import Directives, PageRun
from igvm_builder.hexstr import parse_hex
from igvm_builder.measure.engine import measure_platform
from igvm_builder.measure.profiles import PROFILES, get_profile
from igvm_builder.measure.result import Measurement
from igvm_builder.recordclass import record, replace
from igvm_builder.sign import _ecdsa, sign_id_block
from igvm_builder.sign.idblock import (
    TEST_ONLY_KEY_DIGESTS,
    IgvmSnpIdBlock,
    SignedIdBlock,
    parse_igvm_id_block_body,
    verify_igvm_id_block_body,
)
from igvm_builder.sign.keys import KeySource, key_source_from_spec
from igvm_builder.sign.twostep import ExportedTbs, export_tbs, import_signature

__all__ = [
    "FAILURE_KINDS",
    "IdBlockVerificationError",
    "VerifyFailure",
    "VerifyReport",
    "export_igvm_tbs",
    "find_id_blocks",
    "import_igvm_signature",
    "import_igvm_signature_measured",
    "parse_id16",
    "sign_igvm",
    "sign_igvm_layout",
    "sign_igvm_measured",
    "sign_image",
    "snp_target",
    "verify_igvm",
]

_SNP = PlatformType.SEV_SNP

#: Every ``VerifyFailure.kind``, in the order the checks run.
FAILURE_KINDS = (
    "platform",  # no SEV_SNP platform, or no (or an ambiguous) GUEST_POLICY for it
    "missing",  # no SNP_ID_BLOCK for the SNP platform: the file is not signed
    "duplicate",  # more than one SNP_ID_BLOCK for the SNP platform
    "signature",  # a signature (or the block's structure) does not verify
    "policy",  # signed for another policy than GUEST_POLICY (or the reference's)
    "launch-digest",  # the signed LD is not the file's digest for the loader
    "id-key-digest",  # signed with another ID key than expected
    "author-key-digest",  # another (or no) author key than expected
    "reference",  # the reference values disagree with the file, or cannot be read
)

#: Policies tried, besides single-bit changes of GUEST_POLICY, to name the policy a
#: block was signed for when its signature does not verify under GUEST_POLICY.
_COMMON_POLICIES = (0x30000, 0x3001F, 0x10000, 0x20000, 0x70000, 0xB0000, 0x130000, 0x1B0000, 0x3000F)


# --------------------------------------------------------------------------------------------
# Helpers shared by signing and verification


def snp_target(f: IgvmFile, error: type[IgvmError] = SigningError) -> tuple[H.SupportedPlatform, int]:
    """The SEV_SNP platform header and the GUEST_POLICY policy that applies to it.

    Raises ``error`` (SigningError by default) when the file has no SEV_SNP platform,
    no GUEST_POLICY for it, or several that disagree.
    """
    platform = f.platform(_SNP)
    if platform is None:
        have = ", ".join(p.platform_type.name for p in f.platforms) or "none"
        raise error(
            f"the file has no SEV_SNP platform (it has: {have}); only SEV-SNP launches take an ID block"
        )
    mask = platform.compatibility_mask
    policies = {
        h.policy
        for h in f.initializations
        if isinstance(h, H.GuestPolicy) and h.compatibility_mask & mask == mask
    }
    if not policies:
        raise error(
            f"no GUEST_POLICY for the SEV_SNP platform (mask {mask:#x}): the ID block signs the guest "
            "policy, and a loader cannot launch the file without one"
        )
    if len(policies) > 1:
        values = ", ".join(f"{p:#x}" for p in sorted(policies))
        raise error(f"several GUEST_POLICY headers for the SEV_SNP platform disagree ({values})")
    return platform, policies.pop()


def find_id_blocks(f: IgvmFile, mask: int) -> list[H.SnpIdBlock]:
    """Every SNP_ID_BLOCK directive whose compatibility mask includes ``mask``."""
    return [h for h in f.directives.items() if isinstance(h, H.SnpIdBlock) and h.compatibility_mask & mask]


#: A launch's vCPU count and CPU model (``-smp``, ``-cpu``): what the KVM loaders' digest depends
#: on (``measure --vcpus``); (None, None) = the file's VP contexts.
Vcpus = tuple[int | None, str | int | None]


def _measure(f: IgvmFile, loader: str, vcpus: Vcpus = (None, None)) -> bytes:
    digest = measure_platform(f, _SNP, loader=loader, vcpus=vcpus[0], vcpu_type=vcpus[1]).digest
    if digest is None:  # pragma: no cover - SNP always has a digest
        raise SigningError("the SEV_SNP platform has no launch digest")
    return digest


def _loader_name(loader: str | None) -> str:
    return get_profile(loader).name


def parse_id16(value: bytes | bytearray | str | None, what: str) -> bytes:
    """A 16-byte FAMILY_ID / IMAGE_ID from bytes or hex text (``0x`` prefix and dashes allowed).

    ``None`` gives 16 zero bytes.
    """
    if value is None:
        return bytes(16)
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = parse_hex(value, dashes=True)
        except ValueError:
            raise SigningError(f"{what} must be 32 hexadecimal digits (16 bytes), got '{value}'") from None
    else:
        raise SigningError(f"{what} must be 16 bytes or hex text, got {type(value).__name__}")
    if len(raw) != 16:
        raise SigningError(f"{what} must be 16 bytes, got {len(raw)}")
    return raw


def _guest_svn(value: int | str | None) -> int:
    if value is None:
        return 0
    try:
        svn = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 0)
    except ValueError:
        raise SigningError(f"guest_svn must be an integer, got '{value}'") from None
    if not 0 <= svn <= 0xFFFF_FFFF:
        raise SigningError(f"guest_svn {svn} is out of range (0..0xffffffff)")
    return svn


def _without_id_blocks(f: IgvmFile, mask: int) -> tuple[list[H.Header | PageRun], int]:
    """``f``'s directives (runs of pages kept as runs) without the SNP_ID_BLOCKs of ``mask``, and
    how many there were."""
    directives: list[H.Header | PageRun] = []
    removed = 0
    for h in f.directives.items():
        if isinstance(h, H.SnpIdBlock) and h.compatibility_mask & mask:
            removed += 1
            rest = h.compatibility_mask & ~mask
            if rest:  # a block shared with other (non-SNP) masks keeps those bits only
                directives.append(replace(h, compatibility_mask=rest))
            continue
        directives.append(h)
    return directives, removed


def _with_directives(f: IgvmFile, directives: list[H.Header | PageRun],
                     warnings: tuple[str, ...] | None = None) -> IgvmFile:
    """``f`` with ``directives``, validated; with ``warnings``, not validated again: the caller
    validated a model whose rules these directives follow alike, and those were its warnings."""
    out = IgvmFile(
        revision=f.revision,
        architecture=f.architecture,
        platforms=f.platforms,
        initializations=f.initializations,
        directives=Directives(directives),
        warnings=warnings or (),
    )
    return out.validate() if warnings is None else out


def _with_id_block(f: IgvmFile, block: H.SnpIdBlock, warnings: tuple[str, ...] | None = None) -> IgvmFile:
    """``f`` with every SNP_ID_BLOCK for ``block``'s mask removed and ``block`` appended
    (``warnings``: as :func:`_with_directives`)."""
    directives, _removed = _without_id_blocks(f, block.compatibility_mask)
    return _with_directives(f, [*directives, block], warnings)


def remove_id_block(f: IgvmFile) -> tuple[IgvmFile, int]:
    """``f`` without the SEV-SNP ID block(s) of its SEV_SNP platform (e.g. before handing the
    image to a signer that adds its own, or to launch without ID authentication), and how many
    were removed.  The launch digest does not change: the ID block is not measured.  Every other
    header is kept as it is.  SigningError when the file has no SEV_SNP platform."""
    platform = f.platform(_SNP)
    if platform is None:
        have = ", ".join(p.platform_type.name for p in f.platforms) or "none"
        raise SigningError(f"the file has no SEV_SNP platform (it has: {have}), so no ID block")
    directives, removed = _without_id_blocks(f, platform.compatibility_mask)
    return (_with_directives(f, directives) if removed else f), removed


def _insert(f: IgvmFile, signed: SignedIdBlock, platform: H.SupportedPlatform, policy: int,
            warnings: tuple[str, ...] | None = None) -> IgvmFile:
    """Insert ``signed`` into ``f`` and check the result the way a loader will use it.

    ``warnings``: those of ``f`` with a placeholder ID block in the signed block's place, which
    the caller validated (the result, the same headers but the block's contents, is not
    validated again); None: the result is validated."""
    mask = platform.compatibility_mask
    if signed.compatibility_mask != mask:
        raise SigningError(
            f"the ID block is for compatibility mask {signed.compatibility_mask:#x}, but the SEV_SNP "
            f"platform has mask {mask:#x}"
        )
    if signed.fields.policy != policy:
        raise SigningError(
            f"the ID block was signed for policy {signed.fields.policy:#x}, but the file's GUEST_POLICY "
            f"is {policy:#x}"
        )
    out = _with_id_block(f, H.SnpIdBlock.unpack_body(memoryview(signed.igvm_body)), warnings)
    blocks = find_id_blocks(out, mask)
    if len(blocks) != 1 or blocks[0].pack_body() != signed.igvm_body:  # pragma: no cover - invariant
        raise SigningError("the signed file does not hold exactly the one new ID block")
    try:
        verify_igvm_id_block_body(
            signed.igvm_body,
            policy=snp_target(out, SigningError)[1],
            expected_id_key_digest=signed.id_key_digest,
            expected_author_key_digest=signed.author_key_digest,
        )
    except VerificationError as exc:  # pragma: no cover - sign_id_block verified it already
        raise SigningError(f"the signed file does not verify: {exc.message}") from None
    return out


# --------------------------------------------------------------------------------------------
# Signing


def sign_igvm(
    f: IgvmFile,
    *,
    id_key: KeySource,
    author_key: KeySource | None = None,
    loader: str | None = None,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    guest_svn: int = 0,
    ld: bytes | None = None,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> tuple[IgvmFile, SignedIdBlock]:
    """Sign the SEV-SNP launch of ``f``; return the signed file and the signed ID block.

    ``ld`` is the launch digest to sign; by default the SNP digest of ``f`` under
    ``loader`` (default :data:`~igvm_builder.measure.profiles.DEFAULT_LOADER`), for
    ``vcpus`` vCPUs of model ``vcpu_type`` on the KVM loaders (default: the file's VP contexts).
    The policy is the GUEST_POLICY of the SEV_SNP platform.  The returned file has
    exactly one SNP_ID_BLOCK for the SNP mask, after the last directive; every other
    header is unchanged.  SigningError when the file has no SEV_SNP platform or no
    GUEST_POLICY for it, or when a key source fails.
    """
    platform, policy = snp_target(f, SigningError)
    if ld is not None and (not isinstance(ld, bytes | bytearray) or len(ld) != 48):
        raise SigningError("ld (the launch digest to sign) must be 48 bytes")
    _placeholder, template = _template(f, platform.compatibility_mask)
    if ld is None:
        ld = _measure(template, _loader_name(loader), (vcpus, vcpu_type))
    signed = _sign_block(bytes(ld), policy, platform.compatibility_mask, id_key=id_key, author_key=author_key,
                         family_id=family_id, image_id=image_id, guest_svn=guest_svn)
    return _insert(f, signed, platform, policy, template.warnings), signed


def _template(f: IgvmFile, mask: int) -> tuple[H.SnpIdBlock, IgvmFile]:
    """A placeholder ID block for the SEV-SNP platform ``mask`` and ``f`` with it in place of its
    ID blocks for that mask, validated: what is measured and laid out before the block is signed.
    A model that breaks a rule is an :class:`IgvmFormatError` naming the header here, before any
    work (the signed file is that one with the signed block's bytes, so it is not validated again)."""
    directives, _removed = _without_id_blocks(f, mask)
    placeholder = H.SnpIdBlock.unpack_body(memoryview(mask.to_bytes(4, "little") + bytes(H.SnpIdBlock.SIZE - 4)))
    template = IgvmFile(revision=f.revision, architecture=f.architecture, platforms=f.platforms,
                        initializations=f.initializations, directives=Directives([*directives, placeholder]))
    return placeholder, template.validate()


def _sign_block(ld: bytes, policy: int, mask: int, *, id_key: KeySource, author_key: KeySource | None,
                family_id: bytes, image_id: bytes, guest_svn: int) -> SignedIdBlock:
    """The signed ID block of launch digest ``ld`` for the SEV-SNP platform ``mask`` (the
    arguments of :func:`sign_igvm`, checked here)."""
    return sign_id_block(
        ld,
        policy=policy,
        family_id=parse_id16(family_id, "family_id"),
        image_id=parse_id16(image_id, "image_id"),
        guest_svn=_guest_svn(guest_svn),
        id_key=id_key,
        author_key=author_key,
        compatibility_mask=mask,
    )


def sign_igvm_layout(
    f: IgvmFile,
    *,
    id_key: KeySource,
    author_key: KeySource | None = None,
    loader: str | None = None,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    guest_svn: int = 0,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
    on_data: Callable[[int, list[H.BlobLike]], object] | None = None,
) -> tuple[IgvmFile, SignedIdBlock, Layout]:
    """:func:`sign_igvm`, and the signed file's serialization (:meth:`IgvmFile.layout`), with
    each page of file data hashed once (:func:`sign_igvm_measured` also returns the SEV-SNP
    measurement that was signed).

    The ID block directive has no file data, a fixed size, and is not measured: the file is
    laid out once with a placeholder block in its place, the SHA-384 of each page that the
    layout computes (to find identical pages) is what the launch digest chains, and once
    signed, the block's bytes (the last variable header) take the placeholder's and the
    checksum is recomputed.  The signed model is checked as :func:`sign_igvm` checks it, and the
    headers are checked to hold the signed block.  ``on_data(file_offset, blobs)`` receives the
    data section as it is laid out (:meth:`IgvmFile.layout`'s), before anything is signed: a
    writer can store it meanwhile, and the headers (``Layout.head``) once this returns.

    ``f`` is validated (as the file with the placeholder) before anything is laid out or
    measured: a model built by hand that breaks a rule is an :class:`IgvmFormatError` naming
    the header, and ``on_data`` sees none of it.
    """
    out, signed, layout, _measurement = sign_igvm_measured(
        f, id_key=id_key, author_key=author_key, loader=loader, family_id=family_id, image_id=image_id,
        guest_svn=guest_svn, vcpus=vcpus, vcpu_type=vcpu_type, on_data=on_data)
    return out, signed, layout


def sign_igvm_measured(
    f: IgvmFile,
    *,
    id_key: KeySource,
    author_key: KeySource | None = None,
    loader: str | None = None,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    guest_svn: int = 0,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
    on_data: Callable[[int, list[H.BlobLike]], object] | None = None,
) -> tuple[IgvmFile, SignedIdBlock, Layout, Measurement]:
    """:func:`sign_igvm_layout`, and the SEV-SNP :class:`Measurement` whose digest was signed
    (``loader``, ``vcpus``, ``vcpu_type`` as given).  The ID block is not measured, so it is the
    signed file's measurement too: the signed image's reference values take it instead of
    hashing every page again (:func:`igvm_builder.sign.stage.signed_reference_values`)."""
    platform, policy = snp_target(f, SigningError)
    mask = platform.compatibility_mask
    placeholder, template = _template(f, mask)
    laid = template.layout(validate=False, page_digests=True, on_data=on_data)  # (validated by _template)
    measurement = measure_platform(template, _SNP, loader=_loader_name(loader), vcpus=vcpus, vcpu_type=vcpu_type,
                                   page_digests=laid.page_digests)
    if measurement.digest is None:  # pragma: no cover - SNP always has a digest
        raise SigningError("the SEV_SNP platform has no launch digest")
    signed = _sign_block(measurement.digest, policy, mask, id_key=id_key, author_key=author_key,
                         family_id=family_id, image_id=image_id, guest_svn=guest_svn)
    out = _insert(f, signed, platform, policy, template.warnings)
    head = _with_block_bytes(laid.head, placeholder.pack_body(), signed.igvm_body)
    return out, signed, Layout(head, laid.blobs, laid.page_digests), measurement


def _with_block_bytes(head: bytes | memoryview, placeholder: bytes, body: bytes) -> memoryview:
    """The headers ``head`` (fixed and variable) whose last variable header, the SNP_ID_BLOCK
    ``placeholder``, is ``body`` instead, with the checksum recomputed: a new read-only view
    (``head`` is not changed), as :attr:`Layout.head` is."""
    tlv = struct.Struct("<II")
    size = tlv.size + len(body)
    if len(body) != len(placeholder) or len(body) % 8 or len(head) < size + 24 \
            or head[-size:] != tlv.pack(int(HeaderType.SNP_ID_BLOCK), len(body)) + placeholder:
        raise SigningError("the laid-out headers do not end with the ID block placeholder")  # pragma: no cover
    out = bytearray(head)
    out[-len(body):] = body
    out[20:24] = bytes(4)  # the checksum (IGVM_FIXED_HEADER.checksum) is over the headers with it zero
    out[20:24] = struct.pack("<I", zlib.crc32(out))
    return memoryview(out).toreadonly()


def sign_image(
    data: bytes,
    *,
    id_key: str,
    author_key: str | None = None,
    loader: str | None = None,
    family_id: bytes | str | None = None,
    image_id: bytes | str | None = None,
    guest_svn: int | str | None = None,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> bytes:
    """Sign the IGVM file ``data`` with key *spec strings*; return the signed file's bytes.

    Key specs are those of :func:`~igvm_builder.sign.keys.key_source_from_spec`
    (``PATH``, ``file:PATH``, ``env:VAR``, ``pkcs11:...``, ``cmd:...``).  ``family_id``
    and ``image_id`` are 16 bytes or hex text; ``None`` means zeros (and svn 0).
    Test-only keys are not refused here (the CLI refuses them).
    """
    f = IgvmFile.from_bytes(data)
    out, _ = sign_igvm(
        f,
        id_key=key_source_from_spec(id_key),
        author_key=key_source_from_spec(author_key) if author_key else None,
        loader=loader,
        family_id=parse_id16(family_id, "family_id"),
        image_id=parse_id16(image_id, "image_id"),
        guest_svn=_guest_svn(guest_svn),
        vcpus=vcpus,
        vcpu_type=vcpu_type,
    )
    return out.to_bytes()


def export_igvm_tbs(
    f: IgvmFile,
    *,
    id_key: KeySource | _ecdsa.PublicKey,
    author_key: KeySource | _ecdsa.PublicKey | None = None,
    loader: str | None = None,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    guest_svn: int = 0,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> ExportedTbs:
    """What must be signed for ``f`` (two-step flow); only the public keys are needed."""
    platform, policy = snp_target(f, SigningError)
    return export_tbs(
        _measure(f, _loader_name(loader), (vcpus, vcpu_type)),
        policy=policy,
        family_id=parse_id16(family_id, "family_id"),
        image_id=parse_id16(image_id, "image_id"),
        guest_svn=_guest_svn(guest_svn),
        id_public_key=id_key,
        author_public_key=author_key,
        compatibility_mask=platform.compatibility_mask,
    )


def import_igvm_signature(
    f: IgvmFile,
    tbs: ExportedTbs | bytes | str,
    *,
    id_block_signature: bytes | str | tuple[int, int],
    id_key_signature: bytes | str | tuple[int, int] | None = None,
    loader: str | None = None,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> tuple[IgvmFile, SignedIdBlock]:
    """Put signatures made elsewhere into ``f`` (second half of the two-step flow).

    ``f`` must be the file the document was exported from: its SNP digest under
    ``loader`` must equal the document's LD, and its GUEST_POLICY and SNP mask the
    document's.  Every signature is verified (SigningError naming which one failed).
    """
    out, signed, _measurement = import_igvm_signature_measured(
        f, tbs, id_block_signature=id_block_signature, id_key_signature=id_key_signature, loader=loader,
        vcpus=vcpus, vcpu_type=vcpu_type)
    return out, signed


def import_igvm_signature_measured(
    f: IgvmFile,
    tbs: ExportedTbs | bytes | str,
    *,
    id_block_signature: bytes | str | tuple[int, int],
    id_key_signature: bytes | str | tuple[int, int] | None = None,
    loader: str | None = None,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> tuple[IgvmFile, SignedIdBlock, Measurement]:
    """:func:`import_igvm_signature`, and the SEV-SNP :class:`Measurement` of ``f`` the document's
    launch digest was checked against (the signed file's too, as :func:`sign_igvm_measured`'s)."""
    if not isinstance(tbs, ExportedTbs):
        tbs = ExportedTbs.from_json(tbs)
    platform, policy = snp_target(f, SigningError)
    mask = platform.compatibility_mask
    if tbs.compatibility_mask != mask:
        raise SigningError(
            f"the to-be-signed document is for compatibility mask {tbs.compatibility_mask:#x}, but the "
            f"file's SEV_SNP platform has mask {mask:#x}: not the file it was exported from"
        )
    if tbs.fields.policy != policy:
        raise SigningError(
            f"the to-be-signed document is for policy {tbs.fields.policy:#x}, but the file's GUEST_POLICY "
            f"is {policy:#x}: not the file it was exported from"
        )
    name = _loader_name(loader)
    _placeholder, template = _template(f, mask)
    measurement = measure_platform(template, _SNP, loader=name, vcpus=vcpus, vcpu_type=vcpu_type)
    measured = measurement.digest
    if measured is None:  # pragma: no cover - SNP always has a digest
        raise SigningError("the SEV_SNP platform has no launch digest")
    if tbs.fields.ld != measured:
        raise SigningError(
            f"the to-be-signed document is for launch digest {tbs.fields.ld.hex()}, but the file measures "
            f"{measured.hex()} under loader {name}: not the file it was exported from (or another --loader)"
        )
    signed = import_signature(tbs, id_block_signature=id_block_signature, id_key_signature=id_key_signature)
    return _insert(f, signed, platform, policy, template.warnings), signed, measurement


# --------------------------------------------------------------------------------------------
# Verification


@record
class VerifyFailure:
    """One failed check: ``kind`` (one of :data:`FAILURE_KINDS`) and a one-line message."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


class IdBlockVerificationError(VerificationError):
    """The ID block of a file does not verify; :attr:`failures` lists every failed check."""

    def __init__(self, failures: Iterable[VerifyFailure], *, source: str | None = None) -> None:
        self.failures = tuple(failures)
        if not self.failures:  # pragma: no cover - programming error
            raise ValueError("IdBlockVerificationError needs at least one failure")
        if len(self.failures) == 1:
            message = self.failures[0].message
        else:
            message = f"{len(self.failures)} checks failed: " + "; ".join(x.message for x in self.failures)
        super().__init__(message, source=source)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(x.kind for x in self.failures)


@record(kw_only=True)
class VerifyReport:
    """What :func:`verify_igvm` established about a signed file."""

    compatibility_mask: int
    loader: str
    launch_digest: bytes
    policy: int
    family_id: bytes
    image_id: bytes
    guest_svn: int
    id_key_digest: bytes
    author_key_digest: bytes | None
    reference_checked: bool = False
    #: What the reference values were checked for, one item per platform they record (``snp``,
    #: ``tdx``, ``native (no launch measurement)``...).
    reference_platforms: tuple[str, ...] = ()
    #: Pages of the file the ID block does not cover: pages for other platforms only (their
    #: compatibility mask lacks the SEV-SNP bit) and SEV-SNP pages whose contents are not
    #: measured (UNMEASURED, SHARED, or a loader-filled SECRETS/CPUID page).
    uncovered_pages: int = 0
    uncovered_detail: str = ""

    @property
    def uses_test_only_key(self) -> bool:
        """True if the ID or author key is one of the public TEST-ONLY keys."""
        return self.id_key_digest in TEST_ONLY_KEY_DIGESTS or self.author_key_digest in TEST_ONLY_KEY_DIGESTS

    def summary(self) -> str:
        """One line for people: what verified, under which loader, with which keys."""
        author = self.author_key_digest.hex() if self.author_key_digest is not None else "none"
        ref = ""
        if self.reference_checked:
            ref = ", reference values match" + (f" for {', '.join(self.reference_platforms)}"
                                                if self.reference_platforms else "")
        return (
            f"SEV-SNP ID block verifies (loader {self.loader}, launch digest {self.launch_digest.hex()}, "
            f"policy {self.policy:#x}, guest svn {self.guest_svn}, ID key digest {self.id_key_digest.hex()}, "
            f"author key digest {author}{ref})"
        )


@record
class _Reference:
    digest: bytes | None
    digests: dict[str, bytes]
    loader: str | None
    policy: int | None
    id_key_digest: bytes | None
    author_key_digest: bytes | None
    #: the vCPU count and CPU model the KVM loaders' digest was computed for (``kvm_vmsas``)
    vcpus: Vcpus = (None, None)


_SNP_NAMES = ("snp", "sev-snp", "sev_snp")


def _ref_hex(value: Any, what: str, size: int = 48) -> bytes:
    if isinstance(value, Mapping):
        value = value.get("digest")
    if not isinstance(value, str):
        raise VerificationError(f"reference values: {what} must be a hex string")
    try:
        raw = parse_hex(value)
    except ValueError:
        raise VerificationError(f"reference values: {what} is not hexadecimal") from None
    if len(raw) != size:
        raise VerificationError(f"reference values: {what} must be {size} bytes, got {len(raw)}")
    return raw


def _ref_int(value: Any, what: str) -> int:
    if isinstance(value, Mapping) and "value" in value:  # {"value": "0x30000", ...decoded bits}
        value = value["value"]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise VerificationError(f"reference values: {what} must be an integer or a '0x...' string")


def _parse_reference(ref: Any) -> _Reference:
    """The SEV-SNP part of a reference-values document (``build/measure --reference-values``).

    Read: ``platforms.snp`` (also keyed ``SEV_SNP``/``sev-snp``, or a list entry with
    ``"platform": "SEV_SNP"``, or a top-level ``snp``; a plain hex string is the digest)
    with ``digest`` (hex; also ``launch_digest``/``measurement``), optional
    ``digests`` (loader -> hex), ``loader`` and ``policy``; the loader also from the
    top level or ``build.loader``; key digests (``id_key_digest``, ``author_key_digest``)
    from that entry, a ``signing``/``sign``/``id_block`` table, or the top level.
    """
    if not isinstance(ref, Mapping):
        raise VerificationError("reference values must be a JSON object")
    entry: Any = None
    plats = ref.get("platforms")
    if isinstance(plats, Mapping):
        for name, value in plats.items():
            if str(name).lower() in _SNP_NAMES:
                entry = value
    elif isinstance(plats, list):
        for value in plats:
            if isinstance(value, Mapping) and str(value.get("platform", "")).lower() in _SNP_NAMES:
                entry = value
    if entry is None and isinstance(ref.get("snp"), Mapping):
        entry = ref["snp"]
    if isinstance(entry, str):  # "platforms": {"snp": "<digest>"}
        entry = {"digest": entry}
    if not isinstance(entry, Mapping):
        raise VerificationError("the reference values have no SEV-SNP entry (platforms.snp)")

    digest_value = next((entry[k] for k in ("digest", "launch_digest", "measurement") if k in entry), None)
    digest = _ref_hex(digest_value, "platforms.snp.digest") if digest_value is not None else None
    digests: dict[str, bytes] = {}
    table = entry.get("digests", entry.get("loaders"))
    if isinstance(table, Mapping):
        for name, value in table.items():
            digests[str(name)] = _ref_hex(value, f"platforms.snp.digests.{name}")
    build: Mapping[str, Any] = _mapping(ref.get("build"))
    loader = entry.get("loader") or ref.get("loader") or build.get("loader")
    if loader is not None and not isinstance(loader, str):
        raise VerificationError("reference values: loader must be a string")
    policy = _ref_int(entry["policy"], "platforms.snp.policy") if entry.get("policy") is not None else None

    def key(name: str) -> bytes | None:
        for where in (entry, *(ref.get(t) for t in ("signing", "sign", "id_block")), ref):
            if isinstance(where, Mapping) and where.get(name):
                return _ref_hex(where[name], name)
        return None

    if digest is None and not digests and policy is None and key("id_key_digest") is None:
        raise VerificationError("the reference values' SEV-SNP entry has no digest, policy or key digest")
    vcpus: Vcpus = (None, None)
    kvm = entry.get("kvm_vmsas")
    if isinstance(kvm, Mapping) and kvm.get("vcpus_source") == "given":
        count, model = entry.get("vcpus"), kvm.get("vcpu_type")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise VerificationError("reference values: platforms.snp.vcpus must be a positive integer")
        if model is not None and not isinstance(model, str | int):
            raise VerificationError("reference values: platforms.snp.kvm_vmsas.vcpu_type must be a string")
        vcpus = (count, model)
    return _Reference(
        digest=digest,
        digests=digests,
        loader=loader,
        policy=policy,
        id_key_digest=key("id_key_digest"),
        author_key_digest=key("author_key_digest"),
        vcpus=vcpus,
    )


def _policy_candidates(policy: int, extra: Iterable[int | None]) -> list[int]:
    seen = {policy}
    out: list[int] = []
    for value in (*extra, *_COMMON_POLICIES, *(policy ^ (1 << bit) for bit in range(64))):
        if value is not None and value not in seen and 0 <= value < 1 << 64:
            seen.add(value)
            out.append(value)
    return out


def _signed_policy(parsed: IgvmSnpIdBlock, candidates: Iterable[int]) -> int | None:
    """The policy, among ``candidates``, whose ID block the ID key signed (None if none)."""
    try:
        key = parsed.id_public_key.to_sev().to_public_key()
    except VerificationError:
        return None
    r, s = parsed.id_key_signature.rs
    for policy in candidates:
        if _ecdsa.verify_message(key, r, s, parsed.id_block(policy).pack()):
            return policy
    return None


def _loader_hint(f: IgvmFile, ld: bytes, loader: str, vcpus: Vcpus = (None, None)) -> str | None:
    for name in PROFILES:
        if name == loader:
            continue
        try:
            if _measure(f, name, vcpus) == ld:
                return name
        except IgvmError:
            continue
    return None


def _check_signatures(parsed: IgvmSnpIdBlock, policy: int, ref_policy: int | None, explain: bool,
                      fail: Callable[[str, str], None]) -> None:
    """The block's structure and both signatures, with the policy the loader will use; with
    ``explain``, a failing ID signature that verifies under another likely policy is reported
    as the policy mismatch it is."""
    try:
        verify_igvm_id_block_body(parsed, policy=policy)
        return
    except VerificationError as exc:
        if not explain:
            fail("signature", f"{exc.message} (--explain looks for the policy it was signed for)")
            return
        signed_policy = _signed_policy(parsed, _policy_candidates(policy, (ref_policy,)))
        if signed_policy is None:
            fail("signature", exc.message)
            return
    fail("policy", f"policy mismatch: the ID block was signed for policy {signed_policy:#x}, but the file's "
         f"GUEST_POLICY is {policy:#x} (changed after signing; the SNP firmware would reject the launch)")
    try:  # the rest (author signature, structure) under the policy that was signed
        verify_igvm_id_block_body(parsed, policy=signed_policy)
    except VerificationError as inner:
        fail("signature", inner.message)


def _launch_digest_mismatch(f: IgvmFile, signed: bytes, digest: bytes, loader: str, launch: Vcpus,
                            explain: bool) -> str:
    """The message for a signed launch digest that is not the file's under ``loader``; with
    ``explain``, naming the loader whose digest it is, if any."""
    other = _loader_hint(f, signed, loader, launch) if explain else None
    if other is not None:
        return (f"launch digest mismatch under loader {loader}: the ID block signs {signed.hex()}, the "
                f"file's digest under loader {other} (verify with --loader {other}, or re-sign for {loader})")
    why = ("pages, VMSAs or directives changed after signing" if explain else
           "pages, VMSAs or directives changed after signing, or signed for another loader: --explain "
           "measures under the others")
    return (f"launch digest mismatch: the ID block signs {signed.hex()}, but the file measures "
            f"{digest.hex()} under loader {loader} ({why})")


def _check_digest(expected: bytes | None, what: str) -> bytes | None:
    if expected is None:
        return None
    expected = bytes(expected)
    if len(expected) != 48:
        raise VerificationError(f"the expected {what} must be 48 bytes (96 hex digits), got {len(expected)}")
    return expected


def verify_igvm(
    f: IgvmFile,
    *,
    loader: str | None = None,
    id_key_digest: bytes | None = None,
    author_key_digest: bytes | None = None,
    reference: Mapping[str, Any] | None = None,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
    explain: bool = False,
) -> VerifyReport:
    """Verify the SEV-SNP ID block of ``f`` as a loader and the SNP firmware would use it.

    ``loader`` is the loader profile whose launch digest the block must sign (default:
    the reference values' loader, else :data:`DEFAULT_LOADER`).  ``id_key_digest`` /
    ``author_key_digest`` (48 bytes) pin the keys.  ``reference`` is a parsed
    reference-values document (``--reference-values`` JSON): its SNP digest, policy
    and key digests must match the file.  ``vcpus`` / ``vcpu_type``: the launch's vCPU count
    and CPU model on the KVM loaders (default: the reference values' when they record them,
    else the file's VP contexts).  ``explain``: when a check fails, also look for why: the
    policy the ID key did sign (an ECDSA verification for each of ~70 likely policies) and
    the loader whose digest the block signs (the file measured again under every other
    loader); without it a failure costs no more than a success.

    Raises :class:`IdBlockVerificationError` (a VerificationError) listing every
    failed check, each with a kind from :data:`FAILURE_KINDS` and one line of text.
    """
    failures: list[VerifyFailure] = []

    def fail(kind: str, message: str) -> None:
        failures.append(VerifyFailure(kind, message))

    def stop(kind: str, message: str) -> IdBlockVerificationError:
        fail(kind, message)
        return IdBlockVerificationError(failures)

    id_key_digest = _check_digest(id_key_digest, "ID key digest")
    author_key_digest = _check_digest(author_key_digest, "author key digest")
    ref: _Reference | None = None
    if reference is not None:
        try:
            ref = _parse_reference(reference)
        except VerificationError as exc:
            fail("reference", f"cannot use the reference values: {exc.message}")
    if loader is None and ref is not None and ref.loader is not None:
        if ref.loader in PROFILES:
            loader = ref.loader
        else:
            fail("reference", f"the reference values name an unknown loader '{ref.loader}'")
    name = _loader_name(loader)
    launch: Vcpus = (vcpus, vcpu_type)
    if vcpus is None and vcpu_type is None and ref is not None:
        launch = ref.vcpus

    try:
        platform, policy = snp_target(f, VerificationError)
    except VerificationError as exc:
        raise stop("platform", exc.message) from None
    mask = platform.compatibility_mask
    blocks = find_id_blocks(f, mask)
    if not blocks:
        raise stop(
            "missing", f"not signed: no SNP_ID_BLOCK directive for the SEV_SNP platform (mask {mask:#x})"
        )
    if len(blocks) > 1:
        raise stop(
            "duplicate",
            f"{len(blocks)} SNP_ID_BLOCK directives for the SEV_SNP platform (mask {mask:#x}); "
            "a loader uses only one, so the file is ambiguous",
        )
    parsed = parse_igvm_id_block_body(blocks[0].pack_body())
    id_digest = parsed.id_public_key.to_sev().digest()
    author_digest = parsed.author_public_key.to_sev().digest() if parsed.author_key_enabled else None

    # Structure and both signatures, with the policy the loader will use.
    _check_signatures(parsed, policy, ref.policy if ref else None, explain, fail)

    # The signed launch digest against the file's pages, VMSAs and directives.
    measured: dict[str, bytes] = {}

    def measure(loader_name: str) -> bytes | None:
        if loader_name not in measured:
            try:
                measured[loader_name] = _measure(f, loader_name, launch)
            except IgvmError as exc:
                fail("launch-digest", f"cannot recompute the launch digest under loader {loader_name}: {exc}")
                return None
        return measured[loader_name]

    digest = measure(name)
    if digest is not None and parsed.ld != digest:
        fail("launch-digest", _launch_digest_mismatch(f, parsed.ld, digest, name, launch, explain))

    if id_key_digest is not None and id_key_digest != id_digest:
        fail("id-key-digest", f"ID key digest is {id_digest.hex()}, expected {id_key_digest.hex()}")
    if author_key_digest is not None and author_key_digest != author_digest:
        got = author_digest.hex() if author_digest is not None else "none (no author key)"
        fail("author-key-digest", f"author key digest is {got}, expected {author_key_digest.hex()}")

    checked: tuple[str, ...] = ()
    if ref is not None:
        _check_reference(ref, name, policy, id_digest, author_digest, measure, fail)
        assert reference is not None
        checked = ("snp", *_check_other_platforms(f, reference, name, fail))

    uncovered, detail = _uncovered_pages(f, mask, name)
    if failures:
        raise IdBlockVerificationError(failures)
    return VerifyReport(
        compatibility_mask=mask,
        loader=name,
        launch_digest=parsed.ld,
        policy=policy,
        family_id=parsed.family_id,
        image_id=parsed.image_id,
        guest_svn=parsed.guest_svn,
        id_key_digest=id_digest,
        author_key_digest=author_digest,
        reference_checked=ref is not None,
        reference_platforms=checked,
        uncovered_pages=uncovered,
        uncovered_detail=detail,
    )


def _uncovered_pages(f: IgvmFile, snp_mask: int, loader: str) -> tuple[int, str]:
    """How many pages of ``f`` the SEV-SNP launch digest (under ``loader``) does not cover, and
    what they are."""
    other = unmeasured = 0
    not_measured = int(PageDataFlags.UNMEASURED)
    if get_profile(loader).skip_shared:
        not_measured |= int(PageDataFlags.SHARED)
    for h in f.directives.items():
        if not isinstance(h, H.PageData | PageRun):
            continue
        n = h.count if isinstance(h, PageRun) else 1
        if not h.compatibility_mask & snp_mask:
            other += n
        elif h.flags & not_measured or h.data_type != 0:
            unmeasured += n
    parts = []
    if other:
        parts.append(f"{other} page(s) for other platforms only")
    if unmeasured:
        parts.append(f"{unmeasured} SEV-SNP page(s) whose contents are not measured (unmeasured, "
                     f"{'shared, ' if not_measured & int(PageDataFlags.SHARED) else ''}secrets or CPUID)")
    return other + unmeasured, " and ".join(parts)


def _reference_platforms(reference: Mapping[str, Any]) -> tuple[dict[PlatformType, Any], list[str]]:
    """The platforms a reference-values document records (``platforms`` object or list), and the
    names it records that are no platform.  A document in one of the SEV-SNP-only forms
    :func:`_parse_reference` accepts records SEV-SNP only."""
    plats = reference.get("platforms")
    items: list[tuple[str, Any]] = []
    if isinstance(plats, Mapping):
        items = [(str(k), v) for k, v in plats.items()]
    elif isinstance(plats, list):
        items = [(str(v.get("platform", "")), v) for v in plats if isinstance(v, Mapping)]
    by_name = {**{k: v for k, v in PLATFORM_NAMES.items()}, **{t.name.lower(): t for t in PlatformType},
               "sev_snp": PlatformType.SEV_SNP, "sev_es": PlatformType.SEV_ES, "vsm_isolation": PlatformType.VSM_ISOLATION}
    recorded: dict[PlatformType, Any] = {}
    unknown: list[str] = []
    for key, value in items:
        ptype = by_name.get(key.lower())
        if ptype is None:
            unknown.append(key)
        else:
            recorded[ptype] = value
    recorded.setdefault(PlatformType.SEV_SNP, None)  # _parse_reference found an SEV-SNP entry
    return recorded, unknown


def _check_other_platforms(f: IgvmFile, reference: Mapping[str, Any], loader: str,
                           fail: Callable[[str, str], None]) -> list[str]:
    """Check every platform other than SEV-SNP that the reference values record against the
    file, and refuse the file's platforms they do not record.  Returns what was checked."""
    recorded, unknown = _reference_platforms(reference)
    for name in unknown:
        fail("reference", f"the reference values record an unknown platform '{name}'")
    have = {p.platform_type: p for p in f.platforms}
    for ptype in have:
        if ptype not in recorded:
            fail("reference", f"the file has a {ptype.name} platform the reference values do not record "
                              "(it cannot be checked against them)")
    checked: list[str] = []
    for ptype, entry in sorted(recorded.items()):
        if ptype == PlatformType.SEV_SNP:
            continue
        short = PLATFORM_SHORT.get(ptype, ptype.name.lower())
        if ptype not in have:
            fail("reference", f"the reference values record a {ptype.name} platform the file does not have")
            continue
        value = entry.get("digest") if isinstance(entry, Mapping) else entry
        if value is None:
            checked.append(f"{short} (no launch measurement)")
            continue
        if not isinstance(value, str):
            fail("reference", f"reference values: platforms.{short}.digest must be a hex string")
            continue
        try:
            expected = parse_hex(value)
        except ValueError:
            fail("reference", f"reference values: platforms.{short}.digest is not hexadecimal")
            continue
        two_pass = isinstance(entry, Mapping) and entry.get("pass_order") == "two-pass"
        try:
            m = measure_platform(f, ptype, loader=loader, tdx_two_pass=two_pass)
        except IgvmError as exc:
            fail("reference", f"cannot measure the file's {ptype.name} platform: {exc}")
            continue
        if m.digest is None:
            fail("reference", f"the reference values record a {ptype.name} digest, but the platform has no "
                              "launch measurement")
        elif m.digest != expected:
            fail("reference", f"the file's {ptype.name} digest is {m.digest.hex()}, the reference values say "
                              f"{expected.hex()}")
        else:
            checked.append(short)
    return checked


def _check_reference(
    ref: _Reference,
    loader: str,
    policy: int,
    id_digest: bytes,
    author_digest: bytes | None,
    measure: Callable[[str], bytes | None],
    fail: Callable[[str, str], None],
) -> None:
    expected: bytes | None = None
    ref_loader = loader
    if loader in ref.digests:
        expected = ref.digests[loader]
    elif ref.digest is not None:
        ref_loader = ref.loader or loader
        expected = ref.digest
    if expected is not None and ref_loader in PROFILES:  # an unknown loader was reported already
        got = measure(ref_loader)
        if got is not None and got != expected:
            fail(
                "reference",
                f"the file's SEV-SNP digest under loader {ref_loader} is {got.hex()}, the reference "
                f"values say {expected.hex()}",
            )
    if ref.policy is not None and ref.policy != policy:
        fail(
            "policy",
            f"policy mismatch: the file's GUEST_POLICY is {policy:#x}, the reference values say {ref.policy:#x}",
        )
    if ref.id_key_digest is not None and ref.id_key_digest != id_digest:
        fail(
            "id-key-digest",
            f"ID key digest is {id_digest.hex()}, the reference values say {ref.id_key_digest.hex()}",
        )
    if ref.author_key_digest is not None and ref.author_key_digest != author_digest:
        shown = author_digest.hex() if author_digest is not None else "none (no author key)"
        fail(
            "author-key-digest",
            f"author key digest is {shown}, the reference values say {ref.author_key_digest.hex()}",
        )


def _mapping(value: object) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, Mapping) else {}
