"""OVMF (edk2) flash images: footer GUID table, SEV / TDX / IGVM metadata, kernel-hash page.

Reference: ``shared/spec/MEASUREMENT.md`` §4 (footer table and metadata) and §6 (kernel
hashes); edk2 ``OvmfPkg/ResetVector`` (``ResetVectorVtf0.asm``, ``OvmfSevMetadata.asm``,
``IntelTdxMetadata.asm``, ``IgvmMetadata.asm``); QEMU ``hw/i386/pc_sysfw_ovmf.c`` and
``target/i386/sev.c``.

An OVMF image is mapped so that it **ends at 4 GiB**.  Its last 0x20 bytes hold the reset
vector; just before them ends a table of GUID-tagged entries that is read backwards from a
footer entry ``[u16 total length][GUID 96b582de-…]``.  Each entry is ``[data][u16 length][GUID]``
where ``length`` counts the data, the length field and the GUID.

Division of labour:

* :func:`parse_ovmf` checks **structure** only: the footer table and every metadata table it
  points to must be readable, correctly tagged and inside the image.  It does not decide
  whether the firmware is usable for a platform, so an image without SEV or TDX metadata (or
  a split ``OVMF_CODE`` file whose TDVF offsets refer to the unified layout) still parses.
* :func:`require_sev` / :func:`require_tdx` check that the metadata is present and usable for
  an SEV-SNP / TDX launch.
* :func:`kernel_hashes_page` builds the measured-direct-boot hash page (QEMU layout).

The parser never copies the image: it reads through a ``memoryview`` and copies only the
small table entries it returns.  Callers keep the image bytes themselves.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from enum import IntEnum
from typing import ClassVar

from igvm_builder.errors import InputError
from igvm_builder.recordclass import record

__all__ = [
    "FOOTER_GUID_NAMES",
    "FOUR_GIB",
    "IGVM_METADATA_GUID",
    "KERNEL_HASHES_TABLE_LENGTH",
    "KERNEL_HASHES_TABLE_SIZE",
    "OVMF_TABLE_FOOTER_GUID",
    "PAGE_SIZE",
    "SEV_CMDLINE_ENTRY_GUID",
    "SEV_ES_RESET_BLOCK_GUID",
    "SEV_HASH_TABLE_GUID",
    "SEV_HASH_TABLE_HEADER_GUID",
    "SEV_INITRD_ENTRY_GUID",
    "SEV_KERNEL_ENTRY_GUID",
    "SEV_METADATA_GUID",
    "SEV_SECRET_BLOCK_GUID",
    "TDVF_ATTR_MR_EXTEND",
    "TDVF_ATTR_PAGE_AUG",
    "TDX_METADATA_GUID",
    "TDX_METADATA_TABLE_GUID",
    "IgvmMetaEntry",
    "IgvmMetaType",
    "OvmfImage",
    "SevSection",
    "SevSectionType",
    "TdvfSection",
    "TdvfSectionType",
    "kernel_hashes_page",
    "kernel_hashes_table",
    "parse_ovmf",
    "require_sev",
    "require_tdx",
]

FOUR_GIB = 1 << 32
PAGE_SIZE = 0x1000

# --- GUIDs (canonical string form; on disk they use the mixed-endian EFI_GUID layout) ---------

OVMF_TABLE_FOOTER_GUID = "96b582de-1fb2-45f7-baea-a366c55a082d"
SEV_ES_RESET_BLOCK_GUID = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
SEV_SECRET_BLOCK_GUID = "4c2eb361-7d9b-4cc3-8081-127c90d3d294"
SEV_HASH_TABLE_GUID = "7255371f-3a3b-4b04-927b-1da6efa8d454"
SEV_METADATA_GUID = "dc886566-984a-4798-a75e-5585a7bf67cc"
TDX_METADATA_GUID = "e47a6535-984a-4798-865e-4685a7bf8ec2"
IGVM_METADATA_GUID = "784fa70e-3176-4677-8a20-04b68699e374"
#: The GUID stored in the 16 bytes just before the ``TDVF`` table.
TDX_METADATA_TABLE_GUID = "e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae"

#: Kernel-hash table (QEMU ``target/i386/sev.c``, MEASUREMENT.md §6).
SEV_HASH_TABLE_HEADER_GUID = "9438d606-4f22-4cc9-b479-a793d411fd21"
SEV_CMDLINE_ENTRY_GUID = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a"
SEV_INITRD_ENTRY_GUID = "44baf731-3a2f-4bd7-9af1-41e29169781d"
SEV_KERNEL_ENTRY_GUID = "4de79437-abd2-427f-b835-d5b172d2045b"

#: Display names of the footer-table entries this module knows.
FOOTER_GUID_NAMES: Mapping[str, str] = {
    SEV_ES_RESET_BLOCK_GUID: "SEV-ES reset block",
    SEV_SECRET_BLOCK_GUID: "SEV secret block",
    SEV_HASH_TABLE_GUID: "SEV hash table",
    SEV_METADATA_GUID: "SEV metadata",
    TDX_METADATA_GUID: "TDX metadata",
    IGVM_METADATA_GUID: "IGVM metadata",
}


def _efi_order(raw: bytes) -> bytes:
    """An EFI_GUID's 16 bytes from (or to) the canonical big-endian order: its first three
    fields (u32, u16, u16) are little-endian on disk, the last eight bytes as written."""
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


def _guid_bytes(guid: str) -> bytes:
    """The on-disk (mixed-endian) bytes of a GUID in canonical form (``8-4-4-4-12`` hex digits).
    (What ``uuid.UUID(guid).bytes_le`` gives, without importing uuid and platform at start-up.)"""
    return _efi_order(bytes.fromhex(guid.replace("-", "")))


def _guid_str(raw: bytes) -> str:
    """The canonical lowercase form of a GUID's 16 on-disk bytes (``str(uuid.UUID(bytes_le=raw))``)."""
    h = _efi_order(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_FOOTER_GUID_LE = _guid_bytes(OVMF_TABLE_FOOTER_GUID)
_TDX_TABLE_GUID_LE = _guid_bytes(TDX_METADATA_TABLE_GUID)

# --- little-endian layouts -------------------------------------------------------------------

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")
#: ``{char[4] signature, u32 length, u32 version, u32 count}``: ASEV, TDVF and IGVM headers.
_META_HEADER = struct.Struct("<4sIII")
#: ASEV section ``{u32 base, u32 size, u32 type}``.
_SEV_SECTION = struct.Struct("<III")
#: TDVF section ``{u32 data_offset, u32 raw_size, u64 mem_base, u64 mem_size, u32 type, u32 attributes}``.
_TDVF_SECTION = struct.Struct("<IIQQII")
#: IGVM metadata entry ``{u32 start, u32 size, u32 type}``.
_IGVM_ENTRY = struct.Struct("<III")
#: Kernel-hash table header ``{GUID, u16 length}`` and entry ``{GUID, u16 length, u8 sha256[32]}``.
_HASH_HEADER = struct.Struct("<16sH")
_HASH_ENTRY = struct.Struct("<16sH32s")

_FOOTER_TAIL = 0x20  # reset vector bytes after the table
_ENTRY_TRAILER = 18  # u16 length + GUID

#: Size of the kernel-hash table without padding (0xa8) and padded to 16 bytes (0xb0).
KERNEL_HASHES_TABLE_LENGTH = _HASH_HEADER.size + 3 * _HASH_ENTRY.size
KERNEL_HASHES_TABLE_SIZE = (KERNEL_HASHES_TABLE_LENGTH + 15) & ~15

# Import-time layout checks (survive ``python -O``).
if (
    _META_HEADER.size != 16
    or _SEV_SECTION.size != 12
    or _TDVF_SECTION.size != 32
    or _IGVM_ENTRY.size != 12
    or KERNEL_HASHES_TABLE_LENGTH != 0xA8
    or KERNEL_HASHES_TABLE_SIZE != 0xB0
):
    raise ImportError("OVMF metadata struct layouts do not match MEASUREMENT.md §4/§6")


# --- data model --------------------------------------------------------------------------------


class SevSectionType(IntEnum):
    """ASEV section types (edk2 ``OvmfSevMetadata.asm``; MEASUREMENT.md §4.2)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


class TdvfSectionType(IntEnum):
    """TDVF section types (TDVF design guide; MEASUREMENT.md §4.3)."""

    BFV = 0
    CFV = 1
    TD_HOB = 2
    TEMP_MEM = 3
    PERM_MEM = 4
    PAYLOAD = 5
    PAYLOAD_PARAM = 6
    TD_INFO = 7
    TD_PARAMS = 8


TDVF_ATTR_MR_EXTEND = 0x1
TDVF_ATTR_PAGE_AUG = 0x2


class IgvmMetaType(IntEnum):
    """IGVM metadata entry types (edk2 ``IgvmMetadata.asm``; MEASUREMENT.md §4.4)."""

    PARAMETER_AREA = 0x100
    MEMORY_MAP = 0x101
    VP_COUNT = 0x102
    HOB_AREA = 0x200


def _enum_or_int(enum: type[IntEnum], value: int) -> int:
    try:
        return enum(value)
    except ValueError:
        return value


@record
class SevSection:
    """One ASEV section ``{u32 base, u32 size, u32 type}``.

    ``type`` is a :class:`SevSectionType` when known, else the raw integer
    (:func:`require_sev` rejects unknown types).
    """

    base: int
    size: int
    type: SevSectionType | int

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def type_name(self) -> str:
        return self.type.name if isinstance(self.type, SevSectionType) else f"UNKNOWN({self.type:#x})"


@record
class TdvfSection:
    """One TDVF section (32 bytes); ``data_offset`` refers to the unified image layout."""

    data_offset: int
    raw_size: int
    mem_base: int
    mem_size: int
    type: TdvfSectionType | int
    attributes: int

    @property
    def mr_extend(self) -> bool:
        """Attribute bit 0: the section's contents are measured (TDH.MR.EXTEND)."""
        return bool(self.attributes & TDVF_ATTR_MR_EXTEND)

    @property
    def page_aug(self) -> bool:
        """Attribute bit 1: the pages are added after launch (not measured)."""
        return bool(self.attributes & TDVF_ATTR_PAGE_AUG)

    @property
    def type_name(self) -> str:
        return self.type.name if isinstance(self.type, TdvfSectionType) else f"UNKNOWN({self.type:#x})"


@record
class IgvmMetaEntry:
    """One IGVM metadata entry ``{u32 start, u32 size, u32 type}``.

    For PARAMETER_AREA and HOB_AREA ``start`` is a GPA; for MEMORY_MAP and VP_COUNT it is an
    offset inside the parameter area.
    """

    start: int
    size: int
    type: IgvmMetaType | int


@record(kw_only=True)
class OvmfImage:
    """What :func:`parse_ovmf` found in an OVMF image (metadata only, not the image bytes).

    ``footer_entries`` lists the footer GUID table in the order it is read, i.e. walking
    backwards from the footer (the entry nearest the reset vector first), as QEMU and
    sev-snp-measure read it.  A GUID that occurs twice is kept once, at its first position
    (QEMU's lookup returns the first match).  ``*_metadata_offset`` are file offsets of the
    ASEV / TDVF / IGVM tables, ``None`` when the footer table has no such entry.
    """

    name: str
    size: int
    gpa_base: int
    footer_entries: tuple[tuple[str, bytes], ...]
    sev_es_reset_eip: int | None
    sev_secret: tuple[int, int] | None
    sev_hash_table: tuple[int, int] | None
    sev_metadata_offset: int | None
    sev_sections: tuple[SevSection, ...]
    tdx_metadata_offset: int | None
    tdx_sections: tuple[TdvfSection, ...]
    igvm_metadata_offset: int | None
    igvm_entries: tuple[IgvmMetaEntry, ...]

    END_GPA: ClassVar[int] = FOUR_GIB

    @property
    def footer_table(self) -> dict[str, bytes]:
        """The footer entries as a ``{GUID string: data bytes}`` dict (insertion = table order)."""
        return dict(self.footer_entries)

    def footer_entry(self, guid: str) -> bytes | None:
        """Data of the footer entry with this GUID, or ``None``."""
        guid = guid.lower()
        for g, data in self.footer_entries:
            if g == guid:
                return data
        return None

    @property
    def has_sev_metadata(self) -> bool:
        return self.sev_metadata_offset is not None

    @property
    def has_tdx_metadata(self) -> bool:
        return self.tdx_metadata_offset is not None

    @property
    def has_igvm_metadata(self) -> bool:
        return self.igvm_metadata_offset is not None

    @property
    def kernel_hashes_section(self) -> SevSection | None:
        """The first non-empty SNP_KERNEL_HASHES section, if any."""
        for s in self.sev_sections:
            if s.type == SevSectionType.SNP_KERNEL_HASHES and s.size:
                return s
        return None

    def gpa_of(self, offset: int) -> int:
        """GPA of the byte at file ``offset``."""
        return self.gpa_base + offset


# --- parsing -----------------------------------------------------------------------------------


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _err(name: str, message: str, offset: int | None = None) -> InputError:
    return InputError(message, source=name, offset=offset)


def _read_footer_table(view: memoryview, name: str) -> list[tuple[str, bytes]]:
    size = len(view)
    footer_guid_at = size - _FOOTER_TAIL - 16
    if view[footer_guid_at : footer_guid_at + 16] != _FOOTER_GUID_LE:
        raise _err(
            name,
            f"no OVMF footer GUID table (GUID {OVMF_TABLE_FOOTER_GUID} not found 0x30 bytes before "
            "the end); not an OVMF/edk2 firmware image",
        )
    (total,) = _U16.unpack_from(view, footer_guid_at - 2)
    table_end = footer_guid_at - 2  # entries end where the footer entry's length field starts
    table_len = total - _ENTRY_TRAILER
    if table_len < 0 or table_len > table_end:
        raise _err(
            name,
            f"OVMF footer table length {total} is invalid (must be 18..{table_end + _ENTRY_TRAILER})",
            offset=table_end,
        )
    table_start = table_end - table_len
    entries: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    pos = table_end
    while pos > table_start:
        if pos - table_start < _ENTRY_TRAILER:
            raise _err(
                name,
                f"OVMF footer table has {pos - table_start} stray bytes before its first entry",
                offset=table_start,
            )
        guid = _guid_str(bytes(view[pos - 16 : pos]))
        (length,) = _U16.unpack_from(view, pos - _ENTRY_TRAILER)
        if length < _ENTRY_TRAILER or length > pos - table_start:
            raise _err(
                name,
                f"OVMF footer table entry {guid} has invalid length {length} "
                f"(must be 18..{pos - table_start})",
                offset=pos - _ENTRY_TRAILER,
            )
        if guid not in seen:
            seen.add(guid)
            entries.append((guid, bytes(view[pos - length : pos - _ENTRY_TRAILER])))
        pos -= length
    return entries


def _entry_u32s(table: dict[str, bytes], guid: str, count: int, name: str) -> tuple[int, ...] | None:
    data = table.get(guid)
    if data is None:
        return None
    need = 4 * count
    if len(data) < need:
        raise _err(
            name,
            f"OVMF footer entry {FOOTER_GUID_NAMES.get(guid, guid)} ({guid}) has {len(data)} data "
            f"bytes, expected at least {need}",
        )
    return struct.unpack_from(f"<{count}I", data)


def _read_meta_table(
    view: memoryview,
    name: str,
    offset_from_end: int,
    signature: bytes,
    what: str,
    entry: struct.Struct,
    *,
    guid_before: bytes | None = None,
) -> tuple[int, list[tuple[int, ...]]]:
    """Read a ``{sig, length, version, count}`` table located ``offset_from_end`` before the end."""
    size = len(view)
    start = size - offset_from_end
    if offset_from_end == 0 or start < 0 or start + _META_HEADER.size > size:
        raise _err(
            name,
            f"{what} offset {offset_from_end:#x} from the end of the image points outside the "
            f"{size}-byte image",
        )
    if guid_before is not None:
        if start < 16 or view[start - 16 : start] != guid_before:
            raise _err(
                name,
                f"{what} table is not preceded by the GUID {TDX_METADATA_TABLE_GUID}",
                offset=max(start - 16, 0),
            )
    sig, length, version, count = _META_HEADER.unpack_from(view, start)
    if sig != signature:
        raise _err(
            name,
            f"{what} table has signature {sig!r}, expected {signature!r}",
            offset=start,
        )
    if version != 1:
        raise _err(name, f"{what} table version {version} is not supported (expected 1)", offset=start)
    need = _META_HEADER.size + count * entry.size
    if length < need:
        raise _err(
            name,
            f"{what} table length {length} is too small for {count} entries ({need} bytes needed)",
            offset=start,
        )
    if start + length > size:
        raise _err(
            name,
            f"{what} table ({length} bytes) runs past the end of the image",
            offset=start,
        )
    rows = [entry.unpack_from(view, start + _META_HEADER.size + i * entry.size) for i in range(count)]
    return start, rows


def parse_ovmf(data: bytes | bytearray | memoryview, name: str = "OVMF") -> OvmfImage:
    """Parse an OVMF flash image (unified ``OVMF.fd`` or a ``OVMF_CODE*.fd``).

    ``name`` is used in error messages (the file name).  Raises :class:`InputError` when the
    image size is not a non-zero multiple of 4 KiB (at most 4 GiB), when there is no footer
    GUID table, or when the footer table or a metadata table it points to is malformed or lies
    outside the image.
    """
    view = _as_view(data)
    size = len(view)
    if size == 0:
        raise _err(name, "firmware image is empty")
    if size % PAGE_SIZE:
        raise _err(name, f"firmware image size {size} ({size:#x}) is not a multiple of 4 KiB")
    if size > FOUR_GIB:
        raise _err(name, f"firmware image size {size:#x} exceeds 4 GiB; it cannot end at 4 GiB")

    entries = _read_footer_table(view, name)
    table = dict(entries)

    reset = _entry_u32s(table, SEV_ES_RESET_BLOCK_GUID, 1, name)
    secret = _entry_u32s(table, SEV_SECRET_BLOCK_GUID, 2, name)
    hashes = _entry_u32s(table, SEV_HASH_TABLE_GUID, 2, name)

    sev_offset: int | None = None
    sev_sections: tuple[SevSection, ...] = ()
    sev_meta = _entry_u32s(table, SEV_METADATA_GUID, 1, name)
    if sev_meta is not None:
        sev_offset, rows = _read_meta_table(
            view, name, sev_meta[0], b"ASEV", "SEV metadata (ASEV)", _SEV_SECTION
        )
        sev_sections = tuple(SevSection(b, s, _enum_or_int(SevSectionType, t)) for b, s, t in rows)

    tdx_offset: int | None = None
    tdx_sections: tuple[TdvfSection, ...] = ()
    tdx_meta = _entry_u32s(table, TDX_METADATA_GUID, 1, name)
    if tdx_meta is not None:
        tdx_offset, rows = _read_meta_table(
            view,
            name,
            tdx_meta[0],
            b"TDVF",
            "TDX metadata (TDVF)",
            _TDVF_SECTION,
            guid_before=_TDX_TABLE_GUID_LE,
        )
        tdx_sections = tuple(
            TdvfSection(d, r, mb, ms, _enum_or_int(TdvfSectionType, t), a) for d, r, mb, ms, t, a in rows
        )

    igvm_offset: int | None = None
    igvm_entries: tuple[IgvmMetaEntry, ...] = ()
    igvm_meta = _entry_u32s(table, IGVM_METADATA_GUID, 1, name)
    if igvm_meta is not None:
        igvm_offset, rows = _read_meta_table(view, name, igvm_meta[0], b"IGVM", "IGVM metadata", _IGVM_ENTRY)
        igvm_entries = tuple(IgvmMetaEntry(s, z, _enum_or_int(IgvmMetaType, t)) for s, z, t in rows)

    return OvmfImage(
        name=name,
        size=size,
        gpa_base=FOUR_GIB - size,
        footer_entries=tuple(entries),
        sev_es_reset_eip=reset[0] if reset is not None else None,
        sev_secret=(secret[0], secret[1]) if secret is not None and secret != (0, 0) else None,
        sev_hash_table=(hashes[0], hashes[1]) if hashes is not None and hashes != (0, 0) else None,
        sev_metadata_offset=sev_offset,
        sev_sections=sev_sections,
        tdx_metadata_offset=tdx_offset,
        tdx_sections=tdx_sections,
        igvm_metadata_offset=igvm_offset,
        igvm_entries=igvm_entries,
    )


# --- platform checks ---------------------------------------------------------------------------


def require_sev(img: OvmfImage) -> OvmfImage:
    """Check that ``img`` can launch an SEV-SNP guest; return it unchanged.

    Requires the ASEV table, the SEV-ES reset block (AP entry point), known section types and
    page-aligned sections.  Raises :class:`InputError` naming the file otherwise.
    """
    if not img.has_sev_metadata:
        raise _err(
            img.name,
            "no SEV metadata (ASEV table) in the OVMF footer table; "
            "this firmware cannot launch an SEV-SNP guest",
        )
    if img.sev_es_reset_eip is None:
        raise _err(
            img.name,
            f"no SEV-ES reset block ({SEV_ES_RESET_BLOCK_GUID}) in the OVMF footer table; "
            "this firmware cannot start application processors under SEV-ES/SEV-SNP",
        )
    for i, s in enumerate(img.sev_sections):
        if not isinstance(s.type, SevSectionType):
            raise _err(
                img.name,
                f"SEV metadata section {i} has unknown type {s.type:#x} "
                f"(base {s.base:#x}, size {s.size:#x}); cannot measure it",
            )
        if s.size and (s.base % PAGE_SIZE or s.size % PAGE_SIZE):
            raise _err(
                img.name,
                f"SEV metadata section {i} ({s.type_name}) at {s.base:#x}+{s.size:#x} is not 4 KiB aligned",
            )
        if s.end > FOUR_GIB:
            raise _err(
                img.name,
                f"SEV metadata section {i} ({s.type_name}) at {s.base:#x}+{s.size:#x} ends above 4 GiB",
            )
    return img


def require_tdx(img: OvmfImage) -> OvmfImage:
    """Check that ``img`` can launch a TDX guest; return it unchanged.

    Requires the TDVF table with a BFV section, page-aligned sections, and every section's file
    data inside the image.  A split ``OVMF_CODE*.fd`` fails the last check because TDVF
    ``data_offset`` values refer to the unified image layout (MEASUREMENT.md §4.3).
    """
    if not img.has_tdx_metadata:
        raise _err(
            img.name,
            "no TDX metadata (TDVF table) in the OVMF footer table; this firmware cannot launch a TDX guest",
        )
    if not any(s.type == TdvfSectionType.BFV for s in img.tdx_sections):
        raise _err(
            img.name, "TDX metadata (TDVF) has no BFV section; this firmware cannot launch a TDX guest"
        )
    for i, s in enumerate(img.tdx_sections):
        if s.mem_base % PAGE_SIZE or s.mem_size % PAGE_SIZE:
            raise _err(
                img.name,
                f"TDVF section {i} ({s.type_name}) memory {s.mem_base:#x}+{s.mem_size:#x} is not "
                "4 KiB aligned",
            )
        if s.raw_size and s.data_offset + s.raw_size > img.size:
            raise _err(
                img.name,
                f"TDVF section {i} ({s.type_name}) file range {s.data_offset:#x}+{s.raw_size:#x} lies "
                f"outside the {img.size}-byte image (TDVF offsets refer to the unified OVMF.fd layout; "
                "a split OVMF_CODE file cannot launch a TDX guest)",
            )
        if s.mr_extend and s.raw_size < s.mem_size:
            raise _err(
                img.name,
                f"TDVF section {i} ({s.type_name}) is measured (MR.EXTEND) but has {s.raw_size:#x} "
                f"bytes of data for {s.mem_size:#x} bytes of memory",
            )
    return img


# --- kernel hashes (measured direct boot) -------------------------------------------------------


def _sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(_as_view(data)).digest()


def _cmdline_bytes(cmdline: str | bytes | None) -> bytes:
    raw = b"" if cmdline is None else cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\x00" in raw:
        raise InputError("kernel command line contains a NUL byte (QEMU would cut it there)", key="cmdline")
    return raw + b"\x00"


def kernel_hashes_table(
    kernel: bytes | bytearray | memoryview,
    initrd: bytes | bytearray | memoryview | None,
    cmdline: str | bytes | None,
    *,
    kernel_sha256: bytes | None = None,
    initrd_sha256: bytes | None = None,
) -> bytes:
    """The 0xb0-byte kernel-hash table as QEMU writes it (MEASUREMENT.md §6).

    ``GUID ‖ u16 0xa8`` then three ``GUID ‖ u16 0x32 ‖ SHA-256`` entries: command line
    (UTF-8, with its terminating NUL; a single NUL when ``None``), initrd (SHA-256 of empty
    input when ``None``) and the kernel file exactly as given; zero-padded to 16 bytes.  This
    is also what SEV and SEV-ES launches measure after the firmware.  A caller that already
    has the SHA-256 of the kernel or initrd file passes it (``kernel_sha256``, ``initrd_sha256``)
    instead of having it computed again.
    """
    if initrd_sha256 is None:
        initrd_sha256 = _sha256(initrd if initrd is not None else b"")
    entries = [
        (SEV_CMDLINE_ENTRY_GUID, _sha256(_cmdline_bytes(cmdline))),
        (SEV_INITRD_ENTRY_GUID, initrd_sha256),
        (SEV_KERNEL_ENTRY_GUID, kernel_sha256 if kernel_sha256 is not None else _sha256(kernel)),
    ]
    out = bytearray(KERNEL_HASHES_TABLE_SIZE)
    _HASH_HEADER.pack_into(out, 0, _guid_bytes(SEV_HASH_TABLE_HEADER_GUID), KERNEL_HASHES_TABLE_LENGTH)
    for i, (guid, digest) in enumerate(entries):
        _HASH_ENTRY.pack_into(
            out, _HASH_HEADER.size + i * _HASH_ENTRY.size, _guid_bytes(guid), _HASH_ENTRY.size, digest
        )
    return bytes(out)


def kernel_hashes_page(
    img: OvmfImage,
    kernel: bytes | bytearray | memoryview,
    initrd: bytes | bytearray | memoryview | None,
    cmdline: str | bytes | None,
    *,
    kernel_sha256: bytes | None = None,
    initrd_sha256: bytes | None = None,
) -> bytes:
    """The 4096-byte SNP_KERNEL_HASHES page: :func:`kernel_hashes_table` at ``hash_table_base & 0xfff``.

    This page is measured as one NORMAL page at the SNP_KERNEL_HASHES section base (QEMU,
    sev-snp-measure).  Raises :class:`InputError` when the firmware has no SNP_KERNEL_HASHES
    section or no SEV hash table entry, or when the two do not describe the same page.
    """
    section = img.kernel_hashes_section
    if section is None:
        raise _err(
            img.name,
            "no SNP_KERNEL_HASHES section in the SEV metadata; this firmware does not support "
            "measured direct boot (kernel/initrd/cmdline hashes)",
        )
    if img.sev_hash_table is None:
        raise _err(
            img.name,
            f"no SEV hash table ({SEV_HASH_TABLE_GUID}) in the OVMF footer table, or it is 0/0; "
            "this firmware does not support measured direct boot (kernel/initrd/cmdline hashes)",
        )
    base, size = img.sev_hash_table
    if size < KERNEL_HASHES_TABLE_SIZE:
        raise _err(
            img.name,
            f"SEV hash table area {base:#x}+{size:#x} is smaller than the {KERNEL_HASHES_TABLE_SIZE:#x}-byte "
            "hash table",
        )
    if section.size != PAGE_SIZE:
        raise _err(
            img.name,
            f"SNP_KERNEL_HASHES section {section.base:#x}+{section.size:#x} is not exactly one 4 KiB page",
        )
    offset = base & (PAGE_SIZE - 1)
    if base - offset != section.base or offset + KERNEL_HASHES_TABLE_SIZE > PAGE_SIZE:
        raise _err(
            img.name,
            f"SEV hash table at {base:#x} does not lie inside the SNP_KERNEL_HASHES page "
            f"{section.base:#x}+{section.size:#x}",
        )
    page = bytearray(PAGE_SIZE)
    page[offset : offset + KERNEL_HASHES_TABLE_SIZE] = kernel_hashes_table(
        kernel, initrd, cmdline, kernel_sha256=kernel_sha256, initrd_sha256=initrd_sha256)
    return bytes(page)
