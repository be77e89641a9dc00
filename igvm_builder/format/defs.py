"""Constants and enums of the IGVM format, mirrored from ``igvm_defs/src/lib.rs``.

Names follow the reference crate (upper-case, spec names); values are checked by
``tests/test_format_structs.py`` against the layouts documented in
``shared/spec/IGVM_FORMAT.md`` Appendix A.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

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


#: Platforms whose VP context is a 4 KiB SEV VMSA page.
VMSA_PLATFORMS = frozenset({PlatformType.SEV_SNP, PlatformType.SEV_ES})
#: Platforms whose VP context is IgvmNativeVpContextX64.
NATIVE_CONTEXT_PLATFORMS = frozenset({PlatformType.NATIVE, PlatformType.SEV})


#: Flag and value enums no start-up-bound command needs (guest policies, SEV features, the memory
#: map, VBS and CCA algorithm numbers): defined in :mod:`igvm_builder.format.policy`, which is
#: imported when one of them is first asked for here (enum classes cost ~70 us each to make).
_POLICY_NAMES = frozenset({
    "RelocationFlags", "MemoryMapEntryType", "CcaHashAlgorithm", "SnpPolicyBits", "TdxPolicyBits",
    "decode_snp_policy", "decode_tdx_policy", "tdx_policy_reserved", "SevFeatures", "VbsDigestAlgorithm",
    "VbsSigningAlgorithm",
})


def __getattr__(name: str) -> Any:
    if name not in _POLICY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from igvm_builder.format import policy

    value = getattr(policy, name)
    globals()[name] = value  # looked up once
    return value


if TYPE_CHECKING:  # re-exported (the "X as X" form): what __getattr__ gives
    from igvm_builder.format.policy import (  # noqa: I001  (one statement, not eleven)
        CcaHashAlgorithm as CcaHashAlgorithm,
        MemoryMapEntryType as MemoryMapEntryType,
        RelocationFlags as RelocationFlags,
        SevFeatures as SevFeatures,
        SnpPolicyBits as SnpPolicyBits,
        TdxPolicyBits as TdxPolicyBits,
        VbsDigestAlgorithm as VbsDigestAlgorithm,
        VbsSigningAlgorithm as VbsSigningAlgorithm,
        decode_snp_policy as decode_snp_policy,
        decode_tdx_policy as decode_tdx_policy,
        tdx_policy_reserved as tdx_policy_reserved,
    )
