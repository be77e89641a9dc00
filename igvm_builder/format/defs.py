"""Constants and enums of the IGVM format, mirrored from ``igvm_defs/src/lib.rs``.

Names follow the reference crate (upper-case, spec names); values are checked by
``tests/test_format_structs.py`` against the layouts documented in
``shared/spec/IGVM_FORMAT.md`` Appendix A.
"""

from __future__ import annotations

import enum
from typing import Any

IGVM_MAGIC_VALUE = int.from_bytes(b"IGVM", "little")  # 0x4D564749
if IGVM_MAGIC_VALUE != 0x4D564749:  # import-time check, survives python -O
    raise ImportError("IGVM magic constant is wrong")

PAGE_SIZE_4K = 0x1000
FIXED_HEADER_SIZE_V1 = 24
FIXED_HEADER_SIZE_V2 = 32
IGVM_VHT_OPTIONAL_BIT = 1 << 31
SNP_VMSA_SIZE = 4096
SNP_VMSA_SIZE_0_4_0 = 1648  # the 0.4.0 release rejects non-zero bytes beyond this offset
NATIVE_CONTEXT_SIZE = 232
CCA_CONTEXT_SIZE = 80
VBS_REGISTER_SIZE = 32


class Architecture(enum.IntEnum):
    X64 = 0
    AARCH64 = 1


class PlatformType(enum.IntEnum):
    NATIVE = 0x00
    VSM_ISOLATION = 0x01
    SEV_SNP = 0x02
    TDX = 0x03
    SEV = 0x04
    SEV_ES = 0x05
    CCA = 0x06


#: Short names used by the CLI and the config (``--platform snp``).
PLATFORM_NAMES: dict[str, PlatformType] = {
    "native": PlatformType.NATIVE,
    "vbs": PlatformType.VSM_ISOLATION,
    "snp": PlatformType.SEV_SNP,
    "tdx": PlatformType.TDX,
    "sev": PlatformType.SEV,
    "sev-es": PlatformType.SEV_ES,
    "cca": PlatformType.CCA,
}
PLATFORM_SHORT: dict[PlatformType, str] = {v: k for k, v in PLATFORM_NAMES.items()}


class HeaderType(enum.IntEnum):
    """IGVM_VARIABLE_HEADER_TYPE."""

    INVALID = 0x000
    SUPPORTED_PLATFORM = 0x001
    GUEST_POLICY = 0x101
    RELOCATABLE_REGION = 0x102
    PAGE_TABLE_RELOCATION_REGION = 0x103
    CORIM_DOCUMENT = 0x104
    CORIM_SIGNATURE = 0x105
    CCA_POLICY = 0x106
    PARAMETER_AREA = 0x301
    PAGE_DATA = 0x302
    PARAMETER_INSERT = 0x303
    VP_CONTEXT = 0x304
    REQUIRED_MEMORY = 0x305
    RESERVED_DO_NOT_USE = 0x306
    VP_COUNT_PARAMETER = 0x307
    SRAT = 0x308
    MADT = 0x309
    MMIO_RANGES = 0x30A
    SNP_ID_BLOCK = 0x30B
    MEMORY_MAP = 0x30C
    ERROR_RANGE = 0x30D
    COMMAND_LINE = 0x30E
    SLIT = 0x30F
    PPTT = 0x310
    VBS_MEASUREMENT = 0x311
    DEVICE_TREE = 0x312
    ENVIRONMENT_INFO_PARAMETER = 0x313


PLATFORM_RANGE = range(0x001, 0x101)
INITIALIZATION_RANGE = range(0x101, 0x201)
DIRECTIVE_RANGE = range(0x301, 0x401)


class Section(enum.IntEnum):
    PLATFORM = 0
    INITIALIZATION = 1
    DIRECTIVE = 2


def section_of(typ: int) -> Section | None:
    """Section a raw header type belongs to, or None if it is in no range."""
    if typ in PLATFORM_RANGE:
        return Section.PLATFORM
    if typ in INITIALIZATION_RANGE:
        return Section.INITIALIZATION
    if typ in DIRECTIVE_RANGE:
        return Section.DIRECTIVE
    return None


class PageDataType(enum.IntEnum):
    NORMAL = 0
    SECRETS = 1
    CPUID_DATA = 2
    CPUID_XF = 3


class PageDataFlags(enum.IntFlag):
    IS_2MB_PAGE = 0x1
    UNMEASURED = 0x2
    SHARED = 0x4


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


#: Platforms whose VP context is a 4 KiB SEV VMSA page.
VMSA_PLATFORMS = frozenset({PlatformType.SEV_SNP, PlatformType.SEV_ES})
#: Platforms whose VP context is IgvmNativeVpContextX64.
NATIVE_CONTEXT_PLATFORMS = frozenset({PlatformType.NATIVE, PlatformType.SEV})
