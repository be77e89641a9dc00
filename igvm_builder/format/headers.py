"""Every IGVM variable header as a frozen dataclass with exact little-endian packing.

Each class mirrors one ``IGVM_VHS_*`` struct of ``igvm_defs/src/lib.rs`` field for
field.  ``pack_body(file_offset)`` returns the TLV body (without the 8-byte
``IGVM_VHS_VARIABLE_HEADER`` and without padding); ``unpack_body`` is the inverse and
applies the per-header rules the reference parser enforces.  Headers that carry file
data expose it through :meth:`Header.blob` (already padded the way the reference
serializer stores it) so the file writer can place and deduplicate it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format.blob import FileSlice, as_view
from igvm_builder.format.defs import (
    PAGE_SIZE_4K,
    HeaderType,
    PageDataFlags,
    PageDataType,
    PlatformType,
    Section,
)

BlobLike = bytes | FileSlice


def _err(msg: str) -> IgvmFormatError:
    return IgvmFormatError(msg)


def _aligned(value: int, what: str, align: int = PAGE_SIZE_4K) -> None:
    if value % align:
        raise _err(f"{what} {value:#x} is not aligned to {align:#x}")


def _zero(value: int, what: str) -> None:
    if value:
        raise _err(f"{what} must be zero, found {value:#x}")


def _pad(data: BlobLike, size: int, what: str) -> bytes | FileSlice:
    """Zero-pad ``data`` to ``size`` bytes (no copy when already that size)."""
    n = len(data)
    if n == size:
        return data
    if n > size:
        raise _err(f"{what} is {n} bytes, more than the {size} bytes it may hold")
    return bytes(as_view(data)) + bytes(size - n)


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """Base of every variable header."""

    TYPE: ClassVar[HeaderType]
    SECTION: ClassVar[Section]
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    HAS_MASK: ClassVar[bool] = True

    def blob(self) -> BlobLike | None:
        """File data this header stores (padded as the reference serializer pads it)."""
        return None

    def pack_body(self, file_offset: int = 0) -> bytes:
        raise NotImplementedError

    @classmethod
    def unpack_body(cls, body: memoryview) -> Header:
        raise NotImplementedError

    @property
    def mask(self) -> int | None:
        return getattr(self, "compatibility_mask", None) if self.HAS_MASK else None


# --------------------------------------------------------------------------- platform


@dataclass(frozen=True, slots=True, kw_only=True)
class SupportedPlatform(Header):
    """IGVM_VHS_SUPPORTED_PLATFORM (16 bytes)."""

    TYPE = HeaderType.SUPPORTED_PLATFORM
    SECTION = Section.PLATFORM
    STRUCT = struct.Struct("<IBBHQ")
    SIZE = 16

    compatibility_mask: int
    highest_vtl: int = 0
    platform_type: PlatformType
    platform_version: int = 1
    shared_gpa_boundary: int = 0

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, self.highest_vtl, int(self.platform_type),
                                self.platform_version, self.shared_gpa_boundary)

    @classmethod
    def unpack_body(cls, body: memoryview) -> SupportedPlatform:
        mask, vtl, ptype, version, boundary = cls.STRUCT.unpack(body)
        if mask == 0 or mask & (mask - 1):
            raise _err(f"platform compatibility_mask {mask:#x} must have exactly one bit set")
        if vtl not in (0, 2):
            raise _err(f"platform highest_vtl {vtl} is invalid (must be 0 or 2)")
        try:
            ptype = PlatformType(ptype)
        except ValueError:
            raise _err(f"unknown platform_type {ptype:#x}") from None
        if version != 1:
            raise _err(f"platform_version {version} is invalid (must be 1)")
        if ptype in (PlatformType.NATIVE, PlatformType.VSM_ISOLATION) and boundary:
            raise _err(f"shared_gpa_boundary {boundary:#x} must be 0 on a {ptype.name} platform")
        return cls(compatibility_mask=mask, highest_vtl=vtl, platform_type=ptype,
                   platform_version=version, shared_gpa_boundary=boundary)


# --------------------------------------------------------------------------- initialization


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestPolicy(Header):
    """IGVM_VHS_GUEST_POLICY (16 bytes): SNP guest policy or TDX policy."""

    TYPE = HeaderType.GUEST_POLICY
    SECTION = Section.INITIALIZATION
    STRUCT = struct.Struct("<QII")
    SIZE = 16

    policy: int
    compatibility_mask: int

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.policy, self.compatibility_mask, 0)

    @classmethod
    def unpack_body(cls, body: memoryview) -> GuestPolicy:
        policy, mask, reserved = cls.STRUCT.unpack(body)
        _zero(reserved, "GUEST_POLICY reserved")
        return cls(policy=policy, compatibility_mask=mask)


@dataclass(frozen=True, slots=True, kw_only=True)
class RelocatableRegion(Header):
    """IGVM_VHS_RELOCATABLE_REGION (48 bytes)."""

    TYPE = HeaderType.RELOCATABLE_REGION
    SECTION = Section.INITIALIZATION
    STRUCT = struct.Struct("<IHBBQQQQQ")
    SIZE = 48

    compatibility_mask: int
    vp_index: int = 0
    vtl: int = 0
    flags: int = 0
    relocation_alignment: int
    relocation_region_gpa: int
    relocation_region_size: int
    minimum_relocation_gpa: int
    maximum_relocation_gpa: int

    @property
    def is_vtl2(self) -> bool:
        return bool(self.flags & 1)

    @property
    def apply_rip_offset(self) -> bool:
        return bool(self.flags & 2)

    @property
    def apply_gdtr_offset(self) -> bool:
        return bool(self.flags & 4)

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, self.vp_index, self.vtl, self.flags,
                                self.relocation_alignment, self.relocation_region_gpa,
                                self.relocation_region_size, self.minimum_relocation_gpa,
                                self.maximum_relocation_gpa)

    @classmethod
    def unpack_body(cls, body: memoryview) -> RelocatableRegion:
        f = cls.STRUCT.unpack(body)
        hdr = cls(compatibility_mask=f[0], vp_index=f[1], vtl=f[2], flags=f[3], relocation_alignment=f[4],
                  relocation_region_gpa=f[5], relocation_region_size=f[6], minimum_relocation_gpa=f[7],
                  maximum_relocation_gpa=f[8])
        if hdr.relocation_region_size == 0:
            raise _err("relocation_region_size is 0 (an empty relocatable region; the reference crate panics)")
        _aligned(hdr.relocation_region_size, "relocation_region_size")
        if hdr.relocation_alignment == 0:
            raise _err("relocation_alignment is 0 (the reference crate divides by it and panics)")
        _aligned(hdr.relocation_alignment, "relocation_alignment")
        for name in ("relocation_region_gpa", "minimum_relocation_gpa", "maximum_relocation_gpa"):
            _aligned(getattr(hdr, name), name, hdr.relocation_alignment)
        if hdr.vtl not in (0, 1, 2):
            raise _err(f"relocatable region vtl {hdr.vtl} is invalid")
        return hdr


@dataclass(frozen=True, slots=True, kw_only=True)
class PageTableRelocation(Header):
    """IGVM_VHS_PAGE_TABLE_RELOCATION (32 bytes)."""

    TYPE = HeaderType.PAGE_TABLE_RELOCATION_REGION
    SECTION = Section.INITIALIZATION
    STRUCT = struct.Struct("<IHBBQQQ")
    SIZE = 32

    compatibility_mask: int
    vp_index: int = 0
    vtl: int = 0
    gpa: int
    size: int
    used_size: int

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, self.vp_index, self.vtl, 0, self.gpa, self.size,
                                self.used_size)

    @classmethod
    def unpack_body(cls, body: memoryview) -> PageTableRelocation:
        mask, vp, vtl, reserved, gpa, size, used = cls.STRUCT.unpack(body)
        _zero(reserved, "PAGE_TABLE_RELOCATION reserved")
        _aligned(gpa, "page table region gpa")
        _aligned(size, "page table region size")
        _aligned(used, "page table region used_size")
        if size == 0:
            raise _err("page table region size is 0 (the reference crate panics)")
        if used > size:
            raise _err(f"page table region used_size {used:#x} exceeds size {size:#x}")
        if vtl not in (0, 1, 2):
            raise _err(f"page table region vtl {vtl} is invalid")
        return cls(compatibility_mask=mask, vp_index=vp, vtl=vtl, gpa=gpa, size=size, used_size=used)


@dataclass(frozen=True, slots=True, kw_only=True)
class _CorimData(Header):
    """IGVM_VHS_CORIM_DATA (16 bytes) + an opaque payload in file data."""

    SECTION = Section.INITIALIZATION
    STRUCT = struct.Struct("<IIII")
    SIZE = 16

    compatibility_mask: int
    data: BlobLike = b""

    def blob(self) -> BlobLike | None:
        return self.data if len(self.data) else None

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, file_offset, len(self.data), 0)

    @classmethod
    def unpack_body(cls, body: memoryview) -> _CorimData:  # data attached by the file parser
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class CorimDocument(_CorimData):
    """CORIM_DOCUMENT (0x104): a CBOR CoRIM document, kept opaque."""

    TYPE = HeaderType.CORIM_DOCUMENT


@dataclass(frozen=True, slots=True, kw_only=True)
class CorimSignature(_CorimData):
    """CORIM_SIGNATURE (0x105): a COSE_Sign1 over the document, kept opaque."""

    TYPE = HeaderType.CORIM_SIGNATURE


@dataclass(frozen=True, slots=True, kw_only=True)
class CcaPolicy(Header):
    """IGVM_VHS_CCA_POLICY (32 bytes)."""

    TYPE = HeaderType.CCA_POLICY
    SECTION = Section.INITIALIZATION
    STRUCT = struct.Struct("<IIQQBB6s")
    SIZE = 32

    compatibility_mask: int
    attributes_required_zeroes: int = 0
    attributes_required_ones: int = 0
    hash_algorithm: int = 0
    lfa_policy: int = 0

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, 0, self.attributes_required_zeroes,
                                self.attributes_required_ones, self.hash_algorithm, self.lfa_policy, bytes(6))

    @classmethod
    def unpack_body(cls, body: memoryview) -> CcaPolicy:
        mask, res, zeroes, ones, halg, lfa, res2 = cls.STRUCT.unpack(body)
        _zero(res, "CCA_POLICY reserved")
        if any(res2):
            raise _err("CCA_POLICY reserved2 must be zero")
        if zeroes & ones:
            raise _err(f"CCA_POLICY attributes_required_zeroes {zeroes:#x} and attributes_required_ones "
                       f"{ones:#x} overlap")
        if halg > 2 or lfa > 1:
            raise _err(f"CCA_POLICY hash_algorithm {halg} / lfa_policy {lfa} is invalid")
        return cls(compatibility_mask=mask, attributes_required_zeroes=zeroes, attributes_required_ones=ones,
                   hash_algorithm=halg, lfa_policy=lfa)


# --------------------------------------------------------------------------- directives


@dataclass(frozen=True, slots=True, kw_only=True)
class ParameterArea(Header):
    """IGVM_VHS_PARAMETER_AREA (16 bytes) + optional initial contents."""

    TYPE = HeaderType.PARAMETER_AREA
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<QII")
    SIZE = 16
    HAS_MASK = False

    number_of_bytes: int
    parameter_area_index: int
    initial_data: BlobLike = b""

    def __post_init__(self) -> None:
        _aligned(self.number_of_bytes, "parameter area number_of_bytes")
        if len(self.initial_data) > self.number_of_bytes:
            raise _err(f"parameter area {self.parameter_area_index} initial data ({len(self.initial_data)} "
                       f"bytes) exceeds its size {self.number_of_bytes:#x}")

    def blob(self) -> BlobLike | None:
        if not len(self.initial_data):
            return None
        return _pad(self.initial_data, self.number_of_bytes, "parameter area initial data")

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.number_of_bytes, self.parameter_area_index, file_offset)


@dataclass(frozen=True, slots=True, kw_only=True)
class PageData(Header):
    """IGVM_VHS_PAGE_DATA (24 bytes) + at most one 4 KiB page of data."""

    TYPE = HeaderType.PAGE_DATA
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<QIIIHH")
    SIZE = 24

    gpa: int
    compatibility_mask: int
    flags: int = 0
    data_type: int = PageDataType.NORMAL
    data: BlobLike = b""

    def __post_init__(self) -> None:
        if self.gpa & 0xFFF:
            raise _err(f"PAGE_DATA gpa {self.gpa:#x} is not 4 KiB aligned")
        if len(self.data) > PAGE_SIZE_4K:
            raise _err(f"PAGE_DATA at GPA {self.gpa:#x} has {len(self.data)} bytes of data (at most 4096)")

    @property
    def unmeasured(self) -> bool:
        return bool(self.flags & PageDataFlags.UNMEASURED)

    @property
    def shared(self) -> bool:
        return bool(self.flags & PageDataFlags.SHARED)

    @property
    def is_2mb_page(self) -> bool:
        return bool(self.flags & PageDataFlags.IS_2MB_PAGE)

    def blob(self) -> BlobLike | None:
        if not len(self.data):
            return None
        return _pad(self.data, PAGE_SIZE_4K, "page data")

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.gpa, self.compatibility_mask, file_offset, self.flags, int(self.data_type), 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParameterInsert(Header):
    """IGVM_VHS_PARAMETER_INSERT (16 bytes)."""

    TYPE = HeaderType.PARAMETER_INSERT
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<QII")
    SIZE = 16

    gpa: int
    compatibility_mask: int
    parameter_area_index: int

    def __post_init__(self) -> None:
        if self.gpa & 0xFFF:
            raise _err(f"PARAMETER_INSERT gpa {self.gpa:#x} is not 4 KiB aligned")

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.gpa, self.compatibility_mask, self.parameter_area_index)

    @classmethod
    def unpack_body(cls, body: memoryview) -> ParameterInsert:
        gpa, mask, index = cls.STRUCT.unpack(body)
        return cls(gpa=gpa, compatibility_mask=mask, parameter_area_index=index)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequiredMemory(Header):
    """IGVM_VHS_REQUIRED_MEMORY (24 bytes)."""

    TYPE = HeaderType.REQUIRED_MEMORY
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<QIIII")
    SIZE = 24

    gpa: int
    compatibility_mask: int
    number_of_bytes: int
    flags: int = 0

    @property
    def vtl2_protectable(self) -> bool:
        return bool(self.flags & 1)

    def __post_init__(self) -> None:
        _aligned(self.gpa, "REQUIRED_MEMORY gpa")
        _aligned(self.number_of_bytes, "REQUIRED_MEMORY number_of_bytes")

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.gpa, self.compatibility_mask, self.number_of_bytes, self.flags, 0)

    @classmethod
    def unpack_body(cls, body: memoryview) -> RequiredMemory:
        gpa, mask, size, flags, reserved = cls.STRUCT.unpack(body)
        _zero(reserved, "REQUIRED_MEMORY reserved")
        return cls(gpa=gpa, compatibility_mask=mask, number_of_bytes=size, flags=flags)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParameterUsage(Header):
    """IGVM_VHS_PARAMETER (8 bytes): where in a parameter area the loader writes something."""

    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<II")
    SIZE = 8
    HAS_MASK = False

    parameter_area_index: int
    byte_offset: int = 0

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.parameter_area_index, self.byte_offset)

    @classmethod
    def unpack_body(cls, body: memoryview) -> ParameterUsage:
        index, offset = cls.STRUCT.unpack(body)
        return cls(parameter_area_index=index, byte_offset=offset)


def _usage(name: str, typ: HeaderType, doc: str) -> type[ParameterUsage]:
    ns = {"TYPE": typ, "__doc__": doc, "__qualname__": name, "__module__": __name__}
    cls = type(name, (ParameterUsage,), ns)
    return dataclass(frozen=True, slots=True, kw_only=True)(cls)


VpCount = _usage("VpCount", HeaderType.VP_COUNT_PARAMETER, "VP_COUNT_PARAMETER: loader writes a u32 VP count.")
Srat = _usage("Srat", HeaderType.SRAT, "SRAT: loader writes the ACPI SRAT.")
Madt = _usage("Madt", HeaderType.MADT, "MADT: loader writes the ACPI MADT.")
MmioRanges = _usage("MmioRanges", HeaderType.MMIO_RANGES, "MMIO_RANGES: loader writes IGVM_VHS_MMIO_RANGES.")
MemoryMap = _usage("MemoryMap", HeaderType.MEMORY_MAP, "MEMORY_MAP: loader writes IGVM memory-map entries.")
CommandLine = _usage("CommandLine", HeaderType.COMMAND_LINE, "COMMAND_LINE: loader writes a NUL-terminated string.")
Slit = _usage("Slit", HeaderType.SLIT, "SLIT: loader writes the ACPI SLIT.")
Pptt = _usage("Pptt", HeaderType.PPTT, "PPTT: loader writes the ACPI PPTT.")
DeviceTree = _usage("DeviceTree", HeaderType.DEVICE_TREE, "DEVICE_TREE: loader writes a flattened DTB.")
EnvironmentInfo = _usage("EnvironmentInfo", HeaderType.ENVIRONMENT_INFO_PARAMETER,
                         "ENVIRONMENT_INFO_PARAMETER: loader writes IgvmEnvironmentInfo (u32).")

PARAMETER_USAGES: dict[HeaderType, type[ParameterUsage]] = {
    c.TYPE: c for c in (VpCount, Srat, Madt, MmioRanges, MemoryMap, CommandLine, Slit, Pptt, DeviceTree,
                        EnvironmentInfo)
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorRange(Header):
    """IGVM_VHS_ERROR_RANGE (16 bytes)."""

    TYPE = HeaderType.ERROR_RANGE
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<QII")
    SIZE = 16

    gpa: int
    compatibility_mask: int
    size_bytes: int

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.gpa, self.compatibility_mask, self.size_bytes)

    @classmethod
    def unpack_body(cls, body: memoryview) -> ErrorRange:
        gpa, mask, size = cls.STRUCT.unpack(body)
        return cls(gpa=gpa, compatibility_mask=mask, size_bytes=size)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpIdBlock(Header):
    """IGVM_VHS_SNP_ID_BLOCK (696 bytes).

    Signatures are ``IGVM_VHS_SNP_ID_BLOCK_SIGNATURE`` (144 bytes: r[72] s[72], little-endian)
    and public keys ``IGVM_VHS_SNP_ID_BLOCK_PUBLIC_KEY`` (152 bytes: curve, reserved, qx[72], qy[72]).
    """

    TYPE = HeaderType.SNP_ID_BLOCK
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<IB3s48s16s16sIIII144s152s144s152s")
    SIZE = 696

    compatibility_mask: int
    author_key_enabled: int = 0
    reserved: bytes = bytes(3)
    ld: bytes
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    version: int = 1
    guest_svn: int = 0
    id_key_algorithm: int = 1
    author_key_algorithm: int = 0
    id_key_signature: bytes = bytes(144)
    id_public_key: bytes = bytes(152)
    author_key_signature: bytes = bytes(144)
    author_public_key: bytes = bytes(152)

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, self.author_key_enabled, self.reserved, self.ld,
                                self.family_id, self.image_id, self.version, self.guest_svn,
                                self.id_key_algorithm, self.author_key_algorithm, self.id_key_signature,
                                self.id_public_key, self.author_key_signature, self.author_public_key)

    @classmethod
    def unpack_body(cls, body: memoryview) -> SnpIdBlock:
        f = cls.STRUCT.unpack(body)
        return cls(compatibility_mask=f[0], author_key_enabled=f[1], reserved=f[2], ld=f[3], family_id=f[4],
                   image_id=f[5], version=f[6], guest_svn=f[7], id_key_algorithm=f[8],
                   author_key_algorithm=f[9], id_key_signature=f[10], id_public_key=f[11],
                   author_key_signature=f[12], author_public_key=f[13])


@dataclass(frozen=True, slots=True, kw_only=True)
class VbsMeasurement(Header):
    """IGVM_VHS_VBS_MEASUREMENT (864 bytes); signature and key are opaque blobs."""

    TYPE = HeaderType.VBS_MEASUREMENT
    SECTION = Section.DIRECTIVE
    STRUCT = struct.Struct("<8I64s256s512s")
    SIZE = 864

    compatibility_mask: int
    version: int = 1
    product_id: int = 0
    module_id: int = 0
    security_version: int = 0
    policy_flags: int = 0
    boot_digest_algo: int = 1
    signing_algo: int = 1
    boot_measurement_digest: bytes = bytes(64)
    signature: bytes = bytes(256)
    public_key: bytes = bytes(512)

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.compatibility_mask, self.version, self.product_id, self.module_id,
                                self.security_version, self.policy_flags, self.boot_digest_algo,
                                self.signing_algo, self.boot_measurement_digest, self.signature, self.public_key)

    @classmethod
    def unpack_body(cls, body: memoryview) -> VbsMeasurement:
        f = cls.STRUCT.unpack(body)
        return cls(compatibility_mask=f[0], version=f[1], product_id=f[2], module_id=f[3],
                   security_version=f[4], policy_flags=f[5], boot_digest_algo=f[6], signing_algo=f[7],
                   boot_measurement_digest=f[8], signature=f[9], public_key=f[10])


# --------------------------------------------------------------------------- VP contexts

VP_CONTEXT_STRUCT = struct.Struct("<QIIHH")  # IGVM_VHS_VP_CONTEXT, 20 bytes (+4 pad in the file)


@dataclass(frozen=True, slots=True, kw_only=True)
class VpContextBase(Header):
    """IGVM_VHS_VP_CONTEXT (20 bytes + 4 pad); the payload depends on the platform."""

    TYPE = HeaderType.VP_CONTEXT
    SECTION = Section.DIRECTIVE
    STRUCT = VP_CONTEXT_STRUCT
    SIZE = 20

    gpa: int = 0
    compatibility_mask: int
    vp_index: int = 0

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.STRUCT.pack(self.gpa, self.compatibility_mask, file_offset, self.vp_index, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpVpContext(VpContextBase):
    """An SEV-SNP / SEV-ES VMSA page (4096 bytes, ``SevVmsa``)."""

    vmsa: BlobLike

    def __post_init__(self) -> None:
        if self.gpa & 0xFFF:
            raise _err(f"SNP VP_CONTEXT gpa {self.gpa:#x} is not 4 KiB aligned")
        if len(self.vmsa) > PAGE_SIZE_4K:
            raise _err(f"VMSA is {len(self.vmsa)} bytes (at most 4096)")

    def blob(self) -> BlobLike:
        return _pad(self.vmsa, PAGE_SIZE_4K, "VMSA")


@dataclass(frozen=True, slots=True, kw_only=True)
class NativeVpContext(VpContextBase):
    """IgvmNativeVpContextX64 (232 bytes, stored zero-padded to 4096)."""

    context: bytes

    def __post_init__(self) -> None:
        if len(self.context) != 232:
            raise _err(f"native x64 VP context must be 232 bytes, got {len(self.context)}")

    def blob(self) -> bytes:
        return bytes(self.context) + bytes(PAGE_SIZE_4K - 232)


@dataclass(frozen=True, slots=True, kw_only=True)
class CcaVpContext(VpContextBase):
    """IgvmVpContextAArch64Cca (80 bytes, stored zero-padded to 4096)."""

    context: bytes

    def __post_init__(self) -> None:
        if len(self.context) != 80:
            raise _err(f"CCA VP context must be 80 bytes, got {len(self.context)}")

    def blob(self) -> bytes:
        return bytes(self.context) + bytes(PAGE_SIZE_4K - 80)


VBS_REGISTER_STRUCT = struct.Struct("<BI11s16s")  # VbsVpContextRegister, 32 bytes


@dataclass(frozen=True, slots=True)
class VbsRegister:
    """One VbsVpContextRegister: a Hyper-V register name and its 16-byte value."""

    name: int
    value: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class VbsVpContext(VpContextBase):
    """A VSM (VBS) VP context: ``u32 count`` + 32-byte register records, one VTL, BSP only."""

    vtl: int
    registers: tuple[VbsRegister, ...] = field(default_factory=tuple)

    def blob(self) -> bytes:
        out = [struct.pack("<I", len(self.registers))]
        out += [VBS_REGISTER_STRUCT.pack(self.vtl, r.name, bytes(11), r.value) for r in self.registers]
        return b"".join(out)


#: Header classes decoded straight from their TLV body, by type.
_SIMPLE: tuple[type[Header], ...] = (
    SupportedPlatform, GuestPolicy, RelocatableRegion, PageTableRelocation, CcaPolicy, ParameterInsert,
    RequiredMemory, ErrorRange, SnpIdBlock, VbsMeasurement, *PARAMETER_USAGES.values())
SIMPLE_HEADERS: dict[int, type[Header]] = {c.TYPE: c for c in _SIMPLE}

#: Body size for every type the parser knows.
BODY_SIZES: dict[int, int] = {
    **{t: c.SIZE for t, c in SIMPLE_HEADERS.items()},
    HeaderType.PARAMETER_AREA: 16,
    HeaderType.PAGE_DATA: 24,
    HeaderType.VP_CONTEXT: 20,
    HeaderType.CORIM_DOCUMENT: 16,
    HeaderType.CORIM_SIGNATURE: 16,
}

_ALL: tuple[type[Header], ...] = (*SIMPLE_HEADERS.values(), ParameterArea, PageData, VpContextBase, CorimDocument)
for _cls in _ALL:
    if _cls.STRUCT.size != _cls.SIZE:  # import-time layout check (survives python -O)
        raise ImportError(f"{_cls.__name__} layout is {_cls.STRUCT.size} bytes, spec says {_cls.SIZE}")
if VBS_REGISTER_STRUCT.size != 32:
    raise ImportError("VbsVpContextRegister layout is wrong")
