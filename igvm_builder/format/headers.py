"""Every IGVM variable header as a frozen record class (:mod:`igvm_builder.recordclass`), described once.

Each class mirrors one ``IGVM_VHS_*`` struct of ``igvm_defs/src/lib.rs`` field for field:
its :attr:`Header.BODY` (a :class:`~igvm_builder.format.record.Record`) lists the fields in
layout order with the rules the reference parser enforces on them (alignment, allowed
values, reserved-must-be-zero), and :meth:`Header.rule` adds the rules that span fields.
That one description drives :meth:`~Header.pack_body` (the TLV body, without the 8-byte
``IGVM_VHS_VARIABLE_HEADER`` and without padding), :meth:`~Header.unpack_body`, the
writer's :meth:`~Header.check` (run by ``IgvmFile.validate()`` before anything is written)
and the dumps, so a header the writer accepts is one the reader accepts.  Headers that
carry file data expose it through :meth:`Header.blob` (already padded the way the reference
serializer stores it) so the file writer can place and deduplicate it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, ClassVar, Self

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
from igvm_builder.format.record import (
    Record,
    data_length,
    file_offset,
    pad,
    raw,
    reserved,
    u8,
    u16,
    u32,
    u64,
)
from igvm_builder.recordclass import field, record

BlobLike = bytes | FileSlice


def _err(msg: str) -> IgvmFormatError:
    return IgvmFormatError(msg)


def _pad(data: BlobLike, size: int, what: str) -> bytes | FileSlice:
    """Zero-pad ``data`` to ``size`` bytes (no copy when already that size)."""
    n = len(data)
    if n == size:
        return data
    if n > size:
        raise _err(f"{what} is {n} bytes, more than the {size} bytes it may hold")
    return bytes(as_view(data)) + bytes(size - n)


def _mask() -> Any:
    return u32("compatibility_mask", hex=True)


def _page_gpa() -> Any:
    return u64("gpa", hex=True, align=PAGE_SIZE_4K)


_VTL = (0, 1, 2)


def _unaligned_gpa(gpa: object) -> bool:
    return not isinstance(gpa, int) or bool(gpa & 0xFFF)


@record(kw_only=True)
class Header:
    """Base of every variable header."""

    TYPE: ClassVar[HeaderType]
    SECTION: ClassVar[Section]
    #: The wire layout of the TLV body and the rules of each field.
    BODY: ClassVar[Record]
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    HAS_MASK: ClassVar[bool] = True

    def __init_subclass__(cls) -> None:
        # (no zero-argument super() here: @record replaces the class it names)
        body = cls.__dict__.get("BODY")
        if body is not None:
            cls.STRUCT, cls.SIZE = body.struct, body.size

    def blob(self) -> BlobLike | None:
        """File data this header stores (padded as the reference serializer pads it)."""
        return None

    def data_length(self) -> int:
        """The value of a LENGTH field (headers whose body records their data's size)."""
        return 0

    def pack_body(self, file_offset: int = 0) -> bytes:
        return self.BODY.pack(self, file_offset=file_offset, length=self.data_length())

    @classmethod
    def unpack_body(cls, body: memoryview) -> Self:
        """The header of a TLV body (headers without file data), with every reader rule applied."""
        hdr = cls(**cls.BODY.unpack(body))
        message = hdr.rule()
        if message is not None:
            raise _err(f"{cls.TYPE.name} {message}")
        return hdr

    def rule(self) -> str | None:
        """The first rule spanning several fields that this header breaks (None if none)."""
        return None

    def problems(self) -> Iterator[str]:
        """Why a writer cannot store this header as it is (what a reader would reject)."""
        name = self.TYPE.name
        found = False
        for _field, message in self.BODY.problems(self):
            found = True
            yield f"{name} {message}"
        if not found:  # the cross-field rules assume in-range fields
            broken = self.rule()
            if broken is not None:
                yield f"{name} {broken}"

    def _refuse_broken(self, what: str) -> None:
        """Raise now if :meth:`rule` is broken (for headers whose rules guard what they hold)."""
        message = self.rule()
        if message is not None:
            raise _err(f"{what} {message}")

    def check(self) -> None:
        """Raise IgvmFormatError (naming the field) if the reader would reject this header."""
        for message in self.problems():
            raise _err(message)

    @property
    def mask(self) -> int | None:
        return getattr(self, "compatibility_mask", None) if self.HAS_MASK else None


# --------------------------------------------------------------------------- platform


@record(kw_only=True)
class SupportedPlatform(Header):
    """IGVM_VHS_SUPPORTED_PLATFORM (16 bytes)."""

    TYPE = HeaderType.SUPPORTED_PLATFORM
    SECTION = Section.PLATFORM
    BODY = Record(
        "SUPPORTED_PLATFORM",
        u32("compatibility_mask", hex=True, one_bit=True),
        u8("highest_vtl", choices=(0, 2)),
        u8("platform_type", enum=PlatformType),
        u16("platform_version", choices=(1,)),
        u64("shared_gpa_boundary", hex=True),
        size=16,
    )

    compatibility_mask: int
    highest_vtl: int = 0
    platform_type: PlatformType
    platform_version: int = 1
    shared_gpa_boundary: int = 0

    def __post_init__(self) -> None:
        ptype = self.platform_type
        if type(ptype) is not PlatformType and ptype in PlatformType._value2member_map_:
            object.__setattr__(self, "platform_type", PlatformType(ptype))  # as the parser gives it

    def rule(self) -> str | None:
        if self.platform_type in (PlatformType.NATIVE, PlatformType.VSM_ISOLATION) and self.shared_gpa_boundary:
            return (f"shared_gpa_boundary {self.shared_gpa_boundary:#x} must be 0 on a "
                    f"{PlatformType(self.platform_type).name} platform")
        return None


# --------------------------------------------------------------------------- initialization


@record(kw_only=True)
class GuestPolicy(Header):
    """IGVM_VHS_GUEST_POLICY (16 bytes): SNP guest policy or TDX policy."""

    TYPE = HeaderType.GUEST_POLICY
    SECTION = Section.INITIALIZATION
    BODY = Record("GUEST_POLICY", u64("policy", hex=True), _mask(), reserved("I"), size=16)

    policy: int
    compatibility_mask: int


@record(kw_only=True)
class RelocatableRegion(Header):
    """IGVM_VHS_RELOCATABLE_REGION (48 bytes)."""

    TYPE = HeaderType.RELOCATABLE_REGION
    SECTION = Section.INITIALIZATION
    BODY = Record(
        "RELOCATABLE_REGION",
        _mask(),
        u16("vp_index"),
        u8("vtl", choices=_VTL),
        u8("flags", hex=True),
        u64("relocation_alignment", hex=True, align=PAGE_SIZE_4K,
            nonzero="the reference crate divides by it and panics"),
        u64("relocation_region_gpa", hex=True),
        u64("relocation_region_size", hex=True, align=PAGE_SIZE_4K,
            nonzero="an empty relocatable region; the reference crate panics"),
        u64("minimum_relocation_gpa", hex=True),
        u64("maximum_relocation_gpa", hex=True),
        size=48,
    )

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

    def rule(self) -> str | None:
        if self.flags & ~0x7:
            return (f"flags {self.flags:#x} set bits other than IS_VTL2, APPLY_RIP and APPLY_GDTR (0x7), which the "
                    "reference parser drops")
        align = self.relocation_alignment
        for name in ("relocation_region_gpa", "minimum_relocation_gpa", "maximum_relocation_gpa"):
            value = getattr(self, name)
            if value % align:
                return f"{name} {value:#x} is not aligned to relocation_alignment {align:#x}"
        return None


@record(kw_only=True)
class PageTableRelocation(Header):
    """IGVM_VHS_PAGE_TABLE_RELOCATION (32 bytes)."""

    TYPE = HeaderType.PAGE_TABLE_RELOCATION_REGION
    SECTION = Section.INITIALIZATION
    BODY = Record(
        "PAGE_TABLE_RELOCATION",
        _mask(),
        u16("vp_index"),
        u8("vtl", choices=_VTL),
        reserved("B"),
        _page_gpa(),
        u64("size", hex=True, align=PAGE_SIZE_4K, nonzero="the reference crate panics"),
        u64("used_size", hex=True, align=PAGE_SIZE_4K),
        size=32,
    )

    compatibility_mask: int
    vp_index: int = 0
    vtl: int = 0
    gpa: int
    size: int
    used_size: int

    def rule(self) -> str | None:
        if self.used_size > self.size:
            return f"used_size {self.used_size:#x} exceeds size {self.size:#x}"
        return None


@record(kw_only=True)
class _CorimData(Header):
    """IGVM_VHS_CORIM_DATA (16 bytes) + an opaque payload in file data."""

    SECTION = Section.INITIALIZATION
    BODY = Record("CORIM", _mask(), file_offset(), data_length("size_bytes"), reserved("I"), size=16)

    compatibility_mask: int
    data: BlobLike = b""

    def blob(self) -> BlobLike | None:
        return self.data if len(self.data) else None

    def data_length(self) -> int:
        return len(self.data)

    def rule(self) -> str | None:
        if len(self.data) > 0xFFFF_FFFF:
            return f"data is {len(self.data)} bytes (size_bytes is 32-bit)"
        return None

    @classmethod
    def unpack_body(cls, body: memoryview) -> Self:  # data attached by the file parser
        raise NotImplementedError


class CorimDocument(_CorimData):  # adds no field: no record processing of its own (see _usage)
    """CORIM_DOCUMENT (0x104): a CBOR CoRIM document, kept opaque."""

    __slots__ = ()
    TYPE = HeaderType.CORIM_DOCUMENT


class CorimSignature(_CorimData):
    """CORIM_SIGNATURE (0x105): a COSE_Sign1 over the document, kept opaque."""

    __slots__ = ()
    TYPE = HeaderType.CORIM_SIGNATURE


#: CCA_POLICY hash_algorithm and lfa_policy values (IGVM_FORMAT.md).
CCA_HASH_ALGORITHMS = {0: "SHA256", 1: "SHA512", 2: "SHA384"}
CCA_LFA_POLICIES = {0: "DISALLOW", 1: "ALLOW"}


@record(kw_only=True)
class CcaPolicy(Header):
    """IGVM_VHS_CCA_POLICY (32 bytes)."""

    TYPE = HeaderType.CCA_POLICY
    SECTION = Section.INITIALIZATION
    BODY = Record(
        "CCA_POLICY",
        _mask(),
        reserved("I"),
        u64("attributes_required_zeroes", hex=True),
        u64("attributes_required_ones", hex=True),
        u8("hash_algorithm", choices=tuple(CCA_HASH_ALGORITHMS)),
        u8("lfa_policy", choices=tuple(CCA_LFA_POLICIES)),
        reserved("6s", "reserved2"),
        size=32,
    )

    compatibility_mask: int
    attributes_required_zeroes: int = 0
    attributes_required_ones: int = 0
    hash_algorithm: int = 0
    lfa_policy: int = 0

    def rule(self) -> str | None:
        zeroes, ones = self.attributes_required_zeroes, self.attributes_required_ones
        if zeroes & ones:
            return f"attributes_required_zeroes {zeroes:#x} and attributes_required_ones {ones:#x} overlap"
        return None


# --------------------------------------------------------------------------- directives


@record(kw_only=True)
class ParameterArea(Header):
    """IGVM_VHS_PARAMETER_AREA (16 bytes) + optional initial contents."""

    TYPE = HeaderType.PARAMETER_AREA
    SECTION = Section.DIRECTIVE
    BODY = Record(
        "PARAMETER_AREA",
        u64("number_of_bytes", hex=True, align=PAGE_SIZE_4K),
        u32("parameter_area_index"),
        file_offset(),
        size=16,
    )
    HAS_MASK = False

    number_of_bytes: int
    parameter_area_index: int
    initial_data: BlobLike = b""

    def __post_init__(self) -> None:
        self._refuse_broken("PARAMETER_AREA")

    def rule(self) -> str | None:
        if not isinstance(self.number_of_bytes, int) or self.number_of_bytes % PAGE_SIZE_4K:
            return f"number_of_bytes {self.number_of_bytes!r} is not a multiple of 4 KiB"
        if len(self.initial_data) > self.number_of_bytes:
            return (f"{self.parameter_area_index}: initial data ({len(self.initial_data)} bytes) exceeds the "
                    f"area's number_of_bytes {self.number_of_bytes:#x}")
        if len(self.initial_data) and self.number_of_bytes > 0xFFFF_FFFF:
            return (f"{self.parameter_area_index}: an area of {self.number_of_bytes:#x} bytes with initial data "
                    "cannot be stored (file offsets and sizes are 32-bit)")
        return None

    def blob(self) -> BlobLike | None:
        if not len(self.initial_data):
            return None
        return _pad(self.initial_data, self.number_of_bytes, "parameter area initial data")


@record(kw_only=True)
class PageData(Header):
    """IGVM_VHS_PAGE_DATA (24 bytes) + at most one 4 KiB page of data."""

    TYPE = HeaderType.PAGE_DATA
    SECTION = Section.DIRECTIVE
    BODY = Record(
        "PAGE_DATA",
        _page_gpa(),
        _mask(),
        file_offset(),
        u32("flags", hex=True),
        u16("data_type", choices=tuple(int(t) for t in PageDataType)),
        reserved("H"),
        size=24,
    )

    gpa: int
    compatibility_mask: int
    flags: int = 0
    data_type: int = PageDataType.NORMAL
    data: BlobLike = b""

    def __post_init__(self) -> None:
        self._refuse_broken("PAGE_DATA")

    def rule(self) -> str | None:
        if _unaligned_gpa(self.gpa):
            return f"gpa {self.gpa!r} is not 4 KiB aligned"
        if len(self.data) > PAGE_SIZE_4K:
            return f"at GPA {self.gpa:#x} has {len(self.data)} bytes of data (at most 4096)"
        return None

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


@record(kw_only=True)
class ParameterInsert(Header):
    """IGVM_VHS_PARAMETER_INSERT (16 bytes)."""

    TYPE = HeaderType.PARAMETER_INSERT
    SECTION = Section.DIRECTIVE
    BODY = Record("PARAMETER_INSERT", _page_gpa(), _mask(), u32("parameter_area_index"), size=16)

    gpa: int
    compatibility_mask: int
    parameter_area_index: int

    def __post_init__(self) -> None:
        if not isinstance(self.gpa, int) or self.gpa & 0xFFF:
            raise _err(f"PARAMETER_INSERT gpa {self.gpa!r} is not 4 KiB aligned")


@record(kw_only=True)
class RequiredMemory(Header):
    """IGVM_VHS_REQUIRED_MEMORY (24 bytes)."""

    TYPE = HeaderType.REQUIRED_MEMORY
    SECTION = Section.DIRECTIVE
    BODY = Record(
        "REQUIRED_MEMORY",
        _page_gpa(),
        _mask(),
        u32("number_of_bytes", hex=True, align=PAGE_SIZE_4K),
        u32("flags", hex=True),
        reserved("I"),
        size=24,
    )

    gpa: int
    compatibility_mask: int
    number_of_bytes: int
    flags: int = 0

    @property
    def vtl2_protectable(self) -> bool:
        return bool(self.flags & 1)

    def rule(self) -> str | None:
        if self.flags & ~0x1:
            return f"flags {self.flags:#x} set bits other than vtl2_protectable (0x1), which the reference parser drops"
        return None

    def __post_init__(self) -> None:
        for name in ("gpa", "number_of_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value % PAGE_SIZE_4K:
                raise _err(f"REQUIRED_MEMORY {name} {value!r} is not aligned to 0x1000")


@record(kw_only=True)
class ParameterUsage(Header):
    """IGVM_VHS_PARAMETER (8 bytes): where in a parameter area the loader writes something."""

    SECTION = Section.DIRECTIVE
    BODY = Record("PARAMETER", u32("parameter_area_index"), u32("byte_offset"), size=8)
    HAS_MASK = False

    parameter_area_index: int
    byte_offset: int = 0


def _usage(name: str, typ: HeaderType, doc: str) -> type[ParameterUsage]:
    # A subclass that adds no field needs no record processing of its own (the import stays
    # cheap): it inherits __init__, __eq__ (which compares classes), __repr__ (which names it).
    ns = {"TYPE": typ, "__doc__": doc, "__qualname__": name, "__module__": __name__, "__slots__": ()}
    return type(name, (ParameterUsage,), ns)


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


@record(kw_only=True)
class ErrorRange(Header):
    """IGVM_VHS_ERROR_RANGE (16 bytes)."""

    TYPE = HeaderType.ERROR_RANGE
    SECTION = Section.DIRECTIVE
    # The reference crate refuses an unaligned gpa (UnalignedAddress), as for PAGE_DATA.
    BODY = Record("ERROR_RANGE", _page_gpa(), _mask(), u32("size_bytes", hex=True), size=16)

    gpa: int
    compatibility_mask: int
    size_bytes: int


#: ``IGVM_VHS_SNP_ID_BLOCK_SIGNATURE`` (144 bytes): r and s, 72 bytes each, little-endian.
SNP_ID_BLOCK_SIGNATURE = Record("SNP_ID_BLOCK_SIGNATURE", raw("r_comp", 72), raw("s_comp", 72), size=144)
#: ``IGVM_VHS_SNP_ID_BLOCK_PUBLIC_KEY`` (152 bytes): curve, reserved, qx and qy (72 bytes each).
SNP_ID_BLOCK_PUBLIC_KEY = Record("SNP_ID_BLOCK_PUBLIC_KEY", u32("curve"), u32("reserved"), raw("qx", 72),
                                 raw("qy", 72), size=152)


#: The SEV ``PUBLIC_KEY`` structure (0x404 bytes) a loader rebuilds from an IGVM public key (the
#: IGVM ``reserved`` word is dropped); what ``ID_KEY_DIGEST`` / ``AUTHOR_KEY_DIGEST`` hash.
SEV_PUBLIC_KEY = Record("SEV_PUBLIC_KEY", u32("curve"), raw("qx", 72), raw("qy", 72), pad("880s"), size=0x404)


def key_digest(public_key: bytes | bytearray | memoryview | object) -> bytes:
    """SHA-384 of the SEV ``PUBLIC_KEY`` form of ``public_key`` (48 bytes), as the attestation
    report's ``ID_KEY_DIGEST`` / ``AUTHOR_KEY_DIGEST``: ``public_key`` is a 152-byte
    :data:`SNP_ID_BLOCK_PUBLIC_KEY` (as stored in :class:`SnpIdBlock`), a 0x404-byte SEV
    structure, or an object with ``curve``, ``qx`` and ``qy``."""
    import hashlib

    if isinstance(public_key, bytes | bytearray | memoryview):
        if len(public_key) == SNP_ID_BLOCK_PUBLIC_KEY.size:
            source: Any = SNP_ID_BLOCK_PUBLIC_KEY.decode(public_key)
        elif len(public_key) == SEV_PUBLIC_KEY.size:
            source = SEV_PUBLIC_KEY.decode(public_key)
        else:
            raise _err(f"a public key is {SNP_ID_BLOCK_PUBLIC_KEY.size} (IGVM) or {SEV_PUBLIC_KEY.size} (SEV) "
                       f"bytes, not {len(public_key)}")
    else:
        source = public_key
    return hashlib.sha384(SEV_PUBLIC_KEY.pack(source)).digest()


@record(kw_only=True)
class SnpIdBlock(Header):
    """IGVM_VHS_SNP_ID_BLOCK (696 bytes).

    Signatures are :data:`SNP_ID_BLOCK_SIGNATURE` records and public keys
    :data:`SNP_ID_BLOCK_PUBLIC_KEY` records, kept here as their raw bytes.
    """

    TYPE = HeaderType.SNP_ID_BLOCK
    SECTION = Section.DIRECTIVE
    BODY = Record(
        "SNP_ID_BLOCK",
        _mask(),
        u8("author_key_enabled"),
        raw("reserved", 3),
        raw("ld", 48),
        raw("family_id", 16),
        raw("image_id", 16),
        u32("version"),
        u32("guest_svn"),
        u32("id_key_algorithm"),
        u32("author_key_algorithm"),
        raw("id_key_signature", SNP_ID_BLOCK_SIGNATURE.size),
        raw("id_public_key", SNP_ID_BLOCK_PUBLIC_KEY.size),
        raw("author_key_signature", SNP_ID_BLOCK_SIGNATURE.size),
        raw("author_public_key", SNP_ID_BLOCK_PUBLIC_KEY.size),
        size=696,
    )

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


@record(kw_only=True)
class VbsMeasurement(Header):
    """IGVM_VHS_VBS_MEASUREMENT (864 bytes); signature and key are opaque blobs."""

    TYPE = HeaderType.VBS_MEASUREMENT
    SECTION = Section.DIRECTIVE
    BODY = Record(
        "VBS_MEASUREMENT",
        _mask(),
        u32("version"),
        u32("product_id"),
        u32("module_id"),
        u32("security_version"),
        u32("policy_flags", hex=True),
        u32("boot_digest_algo"),
        u32("signing_algo"),
        raw("boot_measurement_digest", 64),
        raw("signature", 256),
        raw("public_key", 512),
        size=864,
    )

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


# --------------------------------------------------------------------------- VP contexts

#: IGVM_VHS_VP_CONTEXT, 20 bytes (+4 pad in the file); the reference parser reads no reserved field.
VP_CONTEXT = Record("VP_CONTEXT", u64("gpa", hex=True), _mask(), file_offset(), u16("vp_index"), pad("H"), size=20)
VP_CONTEXT_STRUCT = VP_CONTEXT.struct

#: ``IgvmNativeVpContextX64`` (232 bytes, IGVM_FORMAT.md Appendix A.1).
NATIVE_CONTEXT = Record(
    "IgvmNativeVpContextX64",
    *(u64(name, hex=True) for name in
      "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15 rip rflags idtr_base".split()),
    u16("idtr_limit", hex=True),
    u16("reserved0", hex=True),
    u16("reserved1", hex=True),
    u16("gdtr_limit", hex=True),
    u64("gdtr_base", hex=True),
    u16("code_selector", hex=True),
    u16("code_attributes", hex=True),
    u32("code_base", hex=True),
    u32("code_limit", hex=True),
    u16("data_selector", hex=True),
    u16("data_attributes", hex=True),
    u32("data_base", hex=True),
    u32("data_limit", hex=True),
    u64("gs_base", hex=True),
    u64("cr0", hex=True),
    u64("cr3", hex=True),
    u64("cr4", hex=True),
    u64("efer", hex=True),
    size=232,
)
#: ``IgvmVpContextAArch64Cca`` (80 bytes).
CCA_CONTEXT = Record("IgvmVpContextAArch64Cca", *(u64(name, hex=True) for name in
                                                   "x0 x1 x2 x3 x4 x5 x6 x7 pc flags".split()), size=80)


@record(kw_only=True)
class VpContextBase(Header):
    """IGVM_VHS_VP_CONTEXT (20 bytes + 4 pad); the payload depends on the platform."""

    TYPE = HeaderType.VP_CONTEXT
    SECTION = Section.DIRECTIVE
    BODY = VP_CONTEXT

    gpa: int = 0
    compatibility_mask: int
    vp_index: int = 0


@record(kw_only=True)
class SnpVpContext(VpContextBase):
    """An SEV-SNP / SEV-ES VMSA page (4096 bytes, ``SevVmsa``)."""

    vmsa: BlobLike

    def __post_init__(self) -> None:
        self._refuse_broken("SNP VP_CONTEXT")

    def rule(self) -> str | None:
        if _unaligned_gpa(self.gpa):
            return f"gpa {self.gpa!r} is not 4 KiB aligned"
        if len(self.vmsa) > PAGE_SIZE_4K:
            return f"VMSA is {len(self.vmsa)} bytes (at most 4096)"
        return None

    def blob(self) -> BlobLike:
        return _pad(self.vmsa, PAGE_SIZE_4K, "VMSA")


#: A VP context whose reference model has no gpa (the parser reads a non-zero one as 0).
_NO_GPA = "gpa {gpa:#x} must be 0: the reference parser keeps no gpa for a {what} VP context (it reads it as 0)"


@record(kw_only=True)
class NativeVpContext(VpContextBase):
    """IgvmNativeVpContextX64 (232 bytes, stored zero-padded to 4096)."""

    context: bytes

    def __post_init__(self) -> None:
        if len(self.context) != NATIVE_CONTEXT.size:
            raise _err(f"native x64 VP context must be {NATIVE_CONTEXT.size} bytes, got {len(self.context)}")

    def rule(self) -> str | None:
        if self.gpa:
            return _NO_GPA.format(gpa=self.gpa, what="native")
        return None

    def blob(self) -> bytes:
        return bytes(self.context) + bytes(PAGE_SIZE_4K - NATIVE_CONTEXT.size)


@record(kw_only=True)
class CcaVpContext(VpContextBase):
    """IgvmVpContextAArch64Cca (80 bytes, stored zero-padded to 4096)."""

    context: bytes

    def __post_init__(self) -> None:
        if len(self.context) != CCA_CONTEXT.size:
            raise _err(f"CCA VP context must be {CCA_CONTEXT.size} bytes, got {len(self.context)}")

    def blob(self) -> bytes:
        return bytes(self.context) + bytes(PAGE_SIZE_4K - CCA_CONTEXT.size)


#: ``VbsVpContextRegister`` (32 bytes).
VBS_REGISTER = Record("VbsVpContextRegister", u8("vtl", choices=_VTL), u32("register_name", hex=True),
                      reserved("11s"), raw("value", 16), size=32)
VBS_REGISTER_STRUCT = VBS_REGISTER.struct


@record
class VbsRegister:
    """One VbsVpContextRegister: a Hyper-V register name and its 16-byte value."""

    name: int
    value: bytes


#: x64 VBS registers whose 16-byte value is all meaningful (segment: u64 base, u32 limit, u16
#: selector, u16 attributes) and the table registers (GDTR, IDTR: u16 pad[3], u16 limit, u64 base).
VBS_SEGMENT_REGISTERS = frozenset([*range(0x60000, 0x60006), 0x60007])
VBS_TABLE_REGISTERS = frozenset([0x70000, 0x70001])


def vbs_register_value(name: int, value: bytes, x64: bool) -> bytes:
    """``value`` as the reference crate holds it: it reads each register as its typed value and
    writes (and hashes) that value re-encoded, so bytes the encoding has no place for (an
    integer register's bytes 8..15, a table register's pad) become zeros."""
    value = bytes(value)
    if x64 and name in VBS_SEGMENT_REGISTERS:
        return value
    if x64 and name in VBS_TABLE_REGISTERS:
        return bytes(6) + value[6:]
    return value[:8] + bytes(8)


@record(kw_only=True)
class VbsVpContext(VpContextBase):
    """A VSM (VBS) VP context: ``u32 count`` + 32-byte register records, one VTL, BSP only."""

    vtl: int
    registers: tuple[VbsRegister, ...] = field(default_factory=tuple)

    def rule(self) -> str | None:
        if self.gpa:
            return _NO_GPA.format(gpa=self.gpa, what="VBS")
        for i, r in enumerate(self.registers):
            message = VBS_REGISTER.by_name["vtl"].problem(self.vtl) \
                or VBS_REGISTER.by_name["register_name"].problem(r.name) \
                or VBS_REGISTER.by_name["value"].problem(r.value)
            if message is not None:
                return f"register {i}: {message}"
        return None

    def blob(self) -> bytes:
        out = [struct.pack("<I", len(self.registers))]
        out += [VBS_REGISTER_STRUCT.pack(self.vtl, r.name, bytes(11), bytes(r.value)) for r in self.registers]
        return b"".join(out)


_SIMPLE: tuple[type[Header], ...] = (
    SupportedPlatform, GuestPolicy, RelocatableRegion, PageTableRelocation, CcaPolicy, ParameterInsert,
    RequiredMemory, ErrorRange, SnpIdBlock, VbsMeasurement, *PARAMETER_USAGES.values())
#: Header classes decoded straight from their TLV body, by type.
SIMPLE_HEADERS: dict[int, type[Header]] = {c.TYPE: c for c in _SIMPLE}

#: Body size for every type the parser knows.
BODY_SIZES: dict[int, int] = {
    **{t: c.SIZE for t, c in SIMPLE_HEADERS.items()},
    HeaderType.PARAMETER_AREA: ParameterArea.SIZE,
    HeaderType.PAGE_DATA: PageData.SIZE,
    HeaderType.VP_CONTEXT: VpContextBase.SIZE,
    HeaderType.CORIM_DOCUMENT: CorimDocument.SIZE,
    HeaderType.CORIM_SIGNATURE: CorimSignature.SIZE,
}
