"""Reference values: what a verifier needs to check a launch of an IGVM file, per platform.

:func:`reference_values` is pure: it takes the parsed (or built) :class:`IgvmFile` and the
SHA-256 of its bytes, and returns a JSON-able ``dict`` (schema_version 1, keys sorted at
every level) documented in ``docs/MEASUREMENT.md``.  ``igvm-builder measure
--reference-values`` and ``igvm-builder build`` both write it.

Conventions (shared with ``dump --json``): digests, key digests and IDs are lowercase hex
without ``0x``; masks, policies and feature words are ``"0x..."`` strings (a u64 can exceed
2**53); counts are JSON numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from igvm_builder.errors import MeasurementError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import as_view
from igvm_builder.format.defs import (
    PLATFORM_SHORT,
    PlatformType,
    SevFeatures,
    decode_snp_policy,
    decode_tdx_policy,
)
from igvm_builder.format.file import IgvmFile
from igvm_builder.measure.engine import measure_file
from igvm_builder.measure.profiles import get_profile
from igvm_builder.measure.result import Measurement

__all__ = ["SCHEMA_VERSION", "decode_sev_features", "decode_snp_policy", "decode_tdx_policy", "reference_values"]

SCHEMA_VERSION = 1

#: Offset of SEV_FEATURES (u64) in the VMSA page (APM vol. 2 table B-4; IGVM_FORMAT.md A.2).
_VMSA_SEV_FEATURES = 0x3B0


#: shared/spec/KVM_VMSA.md §8: how to settle the predicted KVM VMSAs on an SNP host.
_HOW_TO_CHECK = ("on the SNP host run `echo 'func sev_es_sync_vmsa +p' > /sys/kernel/debug/dynamic_debug/control` "
                 "before the launch: KVM then hex-dumps every VMSA before SNP_LAUNCH_UPDATE; compare the dumps with "
                 "the predicted pages (igvm-builder measure --loader L --vcpus N --dump-vmsas DIR), offsets 0x408 "
                 "(MXCSR) and 0x410 (x87 FCW) first")


def _hex(value: int) -> str:
    return f"{value:#x}"


def decode_sev_features(value: int) -> list[str]:
    """Names of the SEV_FEATURES bits set in ``value`` (unknown bits as ``bitN``)."""
    names = []
    for bit in range(64):
        if value >> bit & 1:
            try:
                names.append(SevFeatures(1 << bit).name or f"bit{bit}")
            except ValueError:
                names.append(f"bit{bit}")
    return names


def _applies(h: H.Header, mask: int) -> bool:
    m = h.mask
    return m is None or m & mask == mask


def _guest_policy(f: IgvmFile, mask: int) -> int | None:
    for h in f.initializations:
        if isinstance(h, H.GuestPolicy) and h.compatibility_mask & mask == mask:
            return h.policy
    return None


def _policy_entry(policy: int | None, ptype: PlatformType) -> dict[str, Any] | None:
    if policy is None:
        return None
    decode = decode_snp_policy if ptype == PlatformType.SEV_SNP else decode_tdx_policy
    return {"value": _hex(policy), "bits": decode(policy)}


def _guest_features(vmsas: Sequence[H.SnpVpContext]) -> dict[str, Any]:
    per_vp = {}
    for h in vmsas:
        page = as_view(h.blob())
        per_vp[str(h.vp_index)] = int.from_bytes(page[_VMSA_SEV_FEATURES : _VMSA_SEV_FEATURES + 8], "little")
    values = set(per_vp.values())
    uniform = len(values) <= 1
    value = next(iter(values)) if len(values) == 1 else None
    return {
        "value": _hex(value) if value is not None else None,
        "names": decode_sev_features(value) if value is not None else [],
        "uniform": uniform,
        "per_vp": {vp: _hex(v) for vp, v in per_vp.items()},
    }


def _key_digest(igvm_public_key: bytes) -> str:
    """SHA-384 of the SEV-format 0x404-byte public key (ID_KEY_DIGEST / AUTHOR_KEY_DIGEST)."""
    return H.key_digest(igvm_public_key).hex()


def _id_block(f: IgvmFile, mask: int, digest: bytes | None) -> dict[str, Any]:
    blocks = [h for h in f.directives.items() if isinstance(h, H.SnpIdBlock) and _applies(h, mask)]
    if not blocks:
        return {"present": False}
    b = blocks[-1]
    author = bool(b.author_key_enabled)
    return {
        "present": True,
        "ld": bytes(b.ld).hex(),
        "ld_matches_digest": digest is not None and bytes(b.ld) == digest,
        "family_id": bytes(b.family_id).hex(),
        "image_id": bytes(b.image_id).hex(),
        "version": b.version,
        "guest_svn": b.guest_svn,
        "id_key_algorithm": b.id_key_algorithm,
        "author_key_enabled": author,
        "author_key_algorithm": b.author_key_algorithm,
        "id_key_digest": _key_digest(b.id_public_key),
        "author_key_digest": _key_digest(b.author_public_key) if author else None,
    }


def _platform_entry(f: IgvmFile, p: H.SupportedPlatform, m: Measurement, loader: str | None) -> dict[str, Any]:
    ptype, mask = p.platform_type, p.compatibility_mask
    entry: dict[str, Any] = {
        "platform": ptype.name,
        "compatibility_mask": _hex(mask),
        "algorithm": m.algorithm,
        "digest": m.hex,
    }
    if ptype == PlatformType.SEV_SNP:
        vmsas = [h for h in f.directives.items() if isinstance(h, H.SnpVpContext) and _applies(h, mask)]
        idb = _id_block(f, mask, m.digest)
        entry |= {
            "loader": get_profile(loader).name,
            "policy": _policy_entry(_guest_policy(f, mask), ptype),
            "guest_features": _guest_features(vmsas),
            "vcpus": len(vmsas) if m.vcpus is None else m.vcpus,
            "id_block": idb,
            # Also at this level, where verifiers look for them (sign/image.py reads both).
            "id_key_digest": idb.get("id_key_digest"),
            "author_key_digest": idb.get("author_key_digest"),
        }
        if m.vcpus is not None:  # KVM loaders: one VMSA per vCPU, reset state without a VP context
            reset = m.vcpus - (m.vp_contexts or 0)
            entry["kvm_vmsas"] = {
                "vp_contexts": m.vp_contexts,
                "reset_state_vcpus": reset,
                "vcpus_source": m.vcpus_source,
                "vcpu_type": m.vcpu_type if m.loader == "qemu" and reset else None,
                "checked_on_hardware": False,
                "how_to_check": _HOW_TO_CHECK,
            }
    elif ptype == PlatformType.TDX:
        entry |= {
            "pass_order": m.variant,
            "policy": _policy_entry(_guest_policy(f, mask), ptype),
        }
    if m.notes:
        entry["notes"] = list(m.notes)
    return entry


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def _canonical_size(f: IgvmFile) -> int:
    return sum(len(chunk) for chunk in f.iter_chunks())


def reference_values(
    f: IgvmFile,
    file_bytes_sha256: str | bytes,
    *,
    loader: str | None,
    tdx_two_pass: bool,
    file_size: int | None = None,
    measurements: Sequence[Measurement] | None = None,
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> dict[str, Any]:
    """The reference values of ``f`` for every platform it declares (schema_version 1).

    ``file_bytes_sha256`` is the SHA-256 of the file's bytes (hex string or 32 bytes);
    ``file_size`` its length (default: the length of ``f``'s canonical serialization).
    ``loader`` is the SEV-SNP loader profile (``None`` = :data:`DEFAULT_LOADER`) and
    ``tdx_two_pass`` the TDX page order.  ``measurements``, when the caller already has
    them for this loader and page order, are used instead of measuring again.  ``vcpus`` and
    ``vcpu_type``: the launch's vCPU count and CPU model on the KVM loaders (``measure_file``).  Raises
    :class:`MeasurementError` when a platform cannot be measured (e.g. no SNP
    GUEST_POLICY, or the loader rejects the file).
    """
    if isinstance(file_bytes_sha256, bytes | bytearray):
        sha256 = bytes(file_bytes_sha256).hex()
    else:
        sha256 = str(file_bytes_sha256).lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise MeasurementError(f"file SHA-256 must be 32 bytes or 64 hex digits, got {file_bytes_sha256!r}")
    profile = get_profile(loader)
    if measurements is None:
        measurements = measure_file(f, loader=profile.name, tdx_two_pass=tdx_two_pass, vcpus=vcpus,
                                    vcpu_type=vcpu_type)
    by_type = {m.platform: m for m in measurements}
    platforms: dict[str, Any] = {}
    for p in f.platforms:
        m = by_type.get(p.platform_type)
        if m is None:
            raise MeasurementError(f"no measurement given for the {p.platform_type.name} platform")
        if p.platform_type == PlatformType.SEV_SNP and m.loader not in (None, profile.name):
            raise MeasurementError(f"the SEV_SNP measurement given is for loader '{m.loader}', not "
                                   f"'{profile.name}'")
        if p.platform_type == PlatformType.TDX and m.variant != ("two-pass" if tdx_two_pass else "single-pass"):
            raise MeasurementError(f"the TDX measurement given is {m.variant}, not the page order asked for")
        platforms[PLATFORM_SHORT[p.platform_type]] = _platform_entry(f, p, m, profile.name)
    doc: dict[str, Any] = _sorted({
        "schema_version": SCHEMA_VERSION,
        "file": {"sha256": sha256, "size": _canonical_size(f) if file_size is None else file_size},
        "platforms": platforms,
    })
    return doc
