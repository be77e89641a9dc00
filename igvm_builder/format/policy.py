"""IGVM flag and value enums beyond the file's structure: SEV-SNP and TDX guest policy bits, SEV
features, relocation flags, memory-map entry types, the VBS and CCA algorithm numbers, and the
policy decoders (mirrored from ``igvm_defs/src/lib.rs``, like :mod:`igvm_builder.format.defs`).

Also reachable as ``igvm_builder.format.defs.<name>`` (imported from here when first asked for):
parsing, checking and measuring a file need none of them, so they are not made at every start-up.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "CcaHashAlgorithm", "MemoryMapEntryType", "RelocationFlags", "SevFeatures", "SnpPolicyBits",
    "TdxPolicyBits", "VbsDigestAlgorithm", "VbsSigningAlgorithm", "decode_snp_policy", "decode_tdx_policy",
    "tdx_policy_reserved",
]


class RelocationFlags(enum.IntFlag):
    IS_VTL2 = 0x1
    APPLY_RIP = 0x2
    APPLY_GDTR = 0x4


class MemoryMapEntryType(enum.IntEnum):
    MEMORY = 0
    PLATFORM_RESERVED = 1
    PERSISTENT = 2
    VTL2_PROTECTABLE = 3
    SPECIFIC_PURPOSE = 4
    HIDDEN = 5


class CcaHashAlgorithm(enum.IntEnum):
    SHA256 = 0
    SHA512 = 1
    SHA384 = 2


class SnpPolicyBits(enum.IntFlag):
    SMT = 0x10000
    RESERVED_MUST_BE_ONE = 0x20000
    MIGRATE_MA = 0x40000
    DEBUG = 0x80000
    SINGLE_SOCKET = 0x100000


class TdxPolicyBits(enum.IntFlag):
    DEBUG_ALLOWED = 0x1
    SEPT_VE_DISABLE = 0x2
    MIGRATABLE = 0x4


def decode_snp_policy(policy: int) -> dict[str, Any]:
    """SEV-SNP guest policy bits (SNP ABI; IGVM ``SnpPolicy``): ABI version and flags."""
    return {"abi_minor": policy & 0xFF, "abi_major": (policy >> 8) & 0xFF,
            **_policy_flags(policy, SnpPolicyBits, also_known=0xFFFF)}


def decode_tdx_policy(policy: int) -> dict[str, Any]:
    """IGVM ``TdxPolicy`` bits."""
    return _policy_flags(policy, TdxPolicyBits)


def tdx_policy_reserved(policy: int) -> int:
    """The bits of an IGVM ``TdxPolicy`` that it does not define (a valid policy has none)."""
    return policy & ~_defined(TdxPolicyBits)


def _defined(flags: type[enum.IntFlag]) -> int:
    return sum(flag.value for flag in flags)


def _policy_flags(policy: int, flags: type[enum.IntFlag], also_known: int = 0) -> dict[str, Any]:
    """Each of ``flags`` by lower-case name (set or not), then ``reserved``: the bits that are neither
    a flag nor in ``also_known`` (decoded by the caller), as hex."""
    out: dict[str, Any] = {str(flag.name).lower(): bool(policy & flag) for flag in flags}
    out["reserved"] = f"{policy & ~(also_known | _defined(flags)):#x}"
    return out


class SevFeatures(enum.IntFlag):
    SNP = 0x1
    VTOM = 0x2
    REFLECT_VC = 0x4
    RESTRICT_INJECTION = 0x8
    ALTERNATE_INJECTION = 0x10
    DEBUG_SWAP = 0x20
    PREVENT_HOST_IBS = 0x40
    SNP_BTB_ISOLATION = 0x80
    VMPL_SSS = 0x100
    SECURE_TSC = 0x200
    VMSA_REG_PROTECTION = 0x4000
    SMT_PROTECTION = 0x8000


class VbsDigestAlgorithm(enum.IntEnum):
    INVALID = 0
    SHA256 = 1


class VbsSigningAlgorithm(enum.IntEnum):
    INVALID = 0
    ECDSA_P384 = 1
