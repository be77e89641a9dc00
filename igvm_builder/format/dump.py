"""Human and JSON dumps of an :class:`~igvm_builder.format.file.IgvmFile`.

:func:`dump_json` returns a plain ``dict`` (JSON-serializable, stable keys) whose layout is
documented in ``docs/DUMP_SCHEMA.md`` (``schema_version`` 1); :func:`dump_text` renders the
same information for people, one line per header.  Both are pure: they take the model (and
optionally the bytes it was parsed from) and return data; printing is the CLI's business.

Conventions (shared with the reference dumps in ``shared/vectors/igvm/*.parse.txt``):
addresses, sizes of GPA ranges, masks, flags, policies and register values are lowercase
``"0x..."`` strings (they can exceed 2**53); counts, indices, lengths and enum values are
JSON numbers.  Data lengths and SHA-256 digests describe the data *as the reference parser
returns it*: a page is 4096 bytes (zero-padded) or 0 bytes when it has no file data, a
parameter area's initial data is ``number_of_bytes`` long or empty.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from igvm_builder import sev_vmsa
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, PageReleaser, as_view, sha256_released
from igvm_builder.format.defs import (
    PAGE_SIZE_4K,
    Architecture,
    HeaderType,
    PageDataType,
    PlatformType,
    Section,
    SevFeatures,
    VbsDigestAlgorithm,
    VbsSigningAlgorithm,
    decode_snp_policy,
    decode_tdx_policy,
)
from igvm_builder.format.file import FixedHeader, IgvmFile

__all__ = [
    "AARCH64_VBS_REGISTER_NAMES",
    "NATIVE_CONTEXT_FIELDS",
    "SCHEMA_VERSION",
    "X64_VBS_REGISTER_NAMES",
    "decode_native_context",
    "decode_vbs_register",
    "dump_json",
    "dump_text",
]

SCHEMA_VERSION = 1

Buffer = bytes | bytearray | memoryview | mmap.mmap

_SECTION_NAMES = {
    Section.PLATFORM: "platform",
    Section.INITIALIZATION: "initialization",
    Section.DIRECTIVE: "directive",
}

# --------------------------------------------------------------------------- register tables

#: Hyper-V ``HV_X64_REGISTER_NAME`` values accepted in an x64 VBS VP context (IGVM_FORMAT.md §11).
X64_VBS_REGISTER_NAMES: dict[int, str] = {
    0x20004: "Rsp",
    0x20005: "Rbp",
    0x20006: "Rsi",
    **{0x20008 + i: f"R{8 + i}" for i in range(5)},
    0x20010: "Rip",
    0x20011: "Rflags",
    0x40000: "Cr0",
    0x40002: "Cr3",
    0x40003: "Cr4",
    0x60000: "Es",
    0x60001: "Cs",
    0x60002: "Ss",
    0x60003: "Ds",
    0x60004: "Fs",
    0x60005: "Gs",
    0x60007: "Tr",
    0x70000: "Idtr",
    0x70001: "Gdtr",
    0x80001: "Efer",
    0x80004: "Pat",
    0x8000E: "MsrMtrrDefType",
    **{0x80010 + i: f"MsrMtrrPhysBase{i}" for i in range(5)},
    **{0x80040 + i: f"MsrMtrrPhysMask{i}" for i in range(5)},
    0x80070: "MsrMtrrFix64k00000",
    0x80071: "MsrMtrrFix16k80000",
    0x80077: "MsrMtrrFix4kE0000",
    0x80078: "MsrMtrrFix4kE8000",
    0x80079: "MsrMtrrFix4kF0000",
    0x8007A: "MsrMtrrFix4kF8000",
}
_X64_SEGMENTS = frozenset(range(0x60000, 0x60008))
_X64_TABLES = frozenset({0x70000, 0x70001})

#: Hyper-V ``HV_ARM64_REGISTER_NAME`` values accepted in an AArch64 VBS VP context.
AARCH64_VBS_REGISTER_NAMES: dict[int, str] = {
    **{0x20000 + i: f"X{i}" for i in range(8)},
    0x20022: "XPc",
    0x20023: "Cpsr",
    0x40002: "SctlrEl1",
    0x40005: "Ttbr0El1",
    0x40006: "Ttbr1El1",
    0x40007: "TcrEl1",
    0x4000B: "MairEl1",
    0x4000C: "VbarEl1",
}

#: ``IgvmNativeVpContextX64`` (232 bytes, IGVM_FORMAT.md Appendix A.1): (name, offset, size).
NATIVE_CONTEXT_FIELDS: tuple[tuple[str, int, int], ...] = H.NATIVE_CONTEXT.table()
#: ``IgvmVpContextAArch64Cca`` (80 bytes).
CCA_CONTEXT_FIELDS: tuple[tuple[str, int, int], ...] = H.CCA_CONTEXT.table()


def decode_native_context(context: bytes | memoryview) -> dict[str, int]:
    """Every field of an ``IgvmNativeVpContextX64`` by name (reserved as ``reserved0/1``)."""
    return {name: int(value) for name, value in H.NATIVE_CONTEXT.decode(context).items()}


def decode_vbs_register(name: int, value: bytes, architecture: Architecture) -> dict[str, Any]:
    """One VBS register record as a JSON-ready dict (name, number, value decoded by kind)."""
    table = X64_VBS_REGISTER_NAMES if architecture == Architecture.X64 else AARCH64_VBS_REGISTER_NAMES
    out: dict[str, Any] = {
        "name": table.get(name, f"Unknown{name:#x}"),
        "number": f"{name:#x}",
        "value_hex": bytes(value).hex(),
    }
    if architecture == Architecture.X64 and name in _X64_SEGMENTS:
        base, limit, selector, attributes = struct.unpack("<QIHH", value)
        out["kind"] = "segment"
        out["segment"] = {"base": f"{base:#x}", "limit": f"{limit:#x}", "selector": f"{selector:#x}",
                          "attributes": f"{attributes:#x}"}
    elif architecture == Architecture.X64 and name in _X64_TABLES:
        _pad0, _pad1, _pad2, limit, base = struct.unpack("<4HQ", value)
        out["kind"] = "table"
        out["table"] = {"base": f"{base:#x}", "limit": f"{limit:#x}"}
    else:
        out["kind"] = "integer"
        out["value"] = f"{int.from_bytes(value, 'little'):#x}"
    return out


# --------------------------------------------------------------------------- small helpers


def _hex(value: int) -> str:
    return f"{value:#x}"


def _sha256(data: bytes | memoryview | FileSlice) -> str:
    return hashlib.sha256(as_view(data)).hexdigest()


def _flag_dict(value: int, bits: type[SevFeatures]) -> dict[str, bool]:
    return {str(b.name).lower(): bool(value & b) for b in bits}


def _page_data_type_name(value: int) -> str:
    try:
        return PageDataType(value).name
    except ValueError:
        return f"UNKNOWN({value})"


class _Ctx:
    """What a header decoder needs to know about the whole file."""

    def __init__(self, f: IgvmFile) -> None:
        self.architecture = Architecture(f.architecture)
        self.platforms = {p.compatibility_mask: p for p in f.platforms}
        # pages hashed for data_sha256 leave the resident set (read-only mmap: unchanged)
        self.releaser = PageReleaser(every=2048)
        self.last_slice: FileSlice | None = None

    def mask_platforms(self, mask: int) -> list[str]:
        return [p.platform_type.name for m, p in sorted(self.platforms.items()) if m & mask]

    def platform_types(self, mask: int) -> set[PlatformType]:
        return {p.platform_type for m, p in self.platforms.items() if m & mask}


# --------------------------------------------------------------------------- per-header decoders


def _fields(h: H.Header, ctx: _Ctx, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The header's own fields, from its description: integers as numbers, or as "0x..." strings
    (addresses, sizes, masks, flags), byte strings as ``<name>_hex``; a masked non-platform
    header also lists the platforms of its mask."""
    out: dict[str, Any] = {}
    for f in h.BODY.values:
        if f.name in skip:
            continue
        value = getattr(h, f.name)
        if f.is_bytes:
            out[f"{f.name}_hex"] = bytes(value).hex()
        else:
            out[f.name] = _hex(value) if f.hex else int(value)
    if h.HAS_MASK and h.SECTION != Section.PLATFORM:
        out["mask_platforms"] = ctx.mask_platforms(getattr(h, "compatibility_mask"))  # noqa: B009
    return out


def _d_platform(h: H.SupportedPlatform, ctx: _Ctx) -> dict[str, Any]:
    return {**_fields(h, ctx), "platform_type_name": PlatformType(h.platform_type).name}


def _d_guest_policy(h: H.GuestPolicy, ctx: _Ctx) -> dict[str, Any]:
    out = _fields(h, ctx)
    types = ctx.platform_types(h.compatibility_mask)
    if types and types <= {PlatformType.SEV_SNP, PlatformType.SEV_ES, PlatformType.SEV}:
        out["policy_decoded"] = {"format": "snp", **decode_snp_policy(h.policy)}
    elif types == {PlatformType.TDX}:
        out["policy_decoded"] = {"format": "tdx", **decode_tdx_policy(h.policy)}
    return out


def _d_reloc(h: H.RelocatableRegion, ctx: _Ctx) -> dict[str, Any]:
    return {**_fields(h, ctx), "is_vtl2": h.is_vtl2, "apply_rip_offset": h.apply_rip_offset,
            "apply_gdtr_offset": h.apply_gdtr_offset}


def _d_pt_reloc(h: H.PageTableRelocation, ctx: _Ctx) -> dict[str, Any]:
    return _fields(h, ctx)


def _cca_attrs(value: int) -> dict[str, bool]:
    return {"debug": bool(value & 1), "mec": bool(value & 2)}


def _d_cca_policy(h: H.CcaPolicy, ctx: _Ctx) -> dict[str, Any]:
    return {
        **_fields(h, ctx),
        "attributes_required_zeroes_decoded": _cca_attrs(h.attributes_required_zeroes),
        "attributes_required_ones_decoded": _cca_attrs(h.attributes_required_ones),
        "hash_algorithm_name": H.CCA_HASH_ALGORITHMS.get(h.hash_algorithm, "UNKNOWN"),
        "lfa_policy_name": H.CCA_LFA_POLICIES.get(h.lfa_policy, "UNKNOWN"),
    }


def _d_corim(h: H.CorimDocument, ctx: _Ctx) -> dict[str, Any]:
    return {**_fields(h, ctx), "data_len": len(h.data), "data_sha256": _sha256(h.data)}


def _d_param_area(h: H.ParameterArea, ctx: _Ctx) -> dict[str, Any]:
    blob = h.blob()
    data = blob if blob is not None else b""
    return {**_fields(h, ctx), "initial_data_len": len(data), "initial_data_sha256": _sha256(data)}


def _d_page(h: H.PageData, ctx: _Ctx) -> dict[str, Any]:
    # (written out rather than _fields(): a file has a quarter million of these)
    blob = h.blob()
    data = blob if blob is not None else b""
    flags = h.flags
    entry = {
        "gpa": _hex(h.gpa),
        "compatibility_mask": _hex(h.compatibility_mask),
        "mask_platforms": ctx.mask_platforms(h.compatibility_mask),
        "flags": _hex(flags),
        "is_2mb_page": bool(flags & 1),
        "unmeasured": bool(flags & 2),
        "shared": bool(flags & 4),
        "reserved_flags": _hex(flags & ~7),
        "data_type": int(h.data_type),
        "data_type_name": _page_data_type_name(int(h.data_type)),
        "data_len": len(data),
        "data_sha256": _sha256(data),
    }
    if type(data) is FileSlice:
        ctx.releaser.note(data)
        ctx.last_slice = data
    return entry


def _d_insert(h: H.ParameterInsert, ctx: _Ctx) -> dict[str, Any]:
    return _fields(h, ctx)


def _d_usage(h: H.ParameterUsage, ctx: _Ctx) -> dict[str, Any]:
    return _fields(h, ctx)


def _d_required(h: H.RequiredMemory, ctx: _Ctx) -> dict[str, Any]:
    return {**_fields(h, ctx), "vtl2_protectable": h.vtl2_protectable}


def _d_error_range(h: H.ErrorRange, ctx: _Ctx) -> dict[str, Any]:
    return _fields(h, ctx)


def _signature(raw: bytes) -> dict[str, Any]:
    sig = H.SNP_ID_BLOCK_SIGNATURE.decode(raw)
    return {"len": len(raw), "sha256": _sha256(raw), "r_comp_hex": bytes(sig["r_comp"]).hex(),
            "s_comp_hex": bytes(sig["s_comp"]).hex()}


def _public_key(raw: bytes) -> dict[str, Any]:
    key = H.SNP_ID_BLOCK_PUBLIC_KEY.decode(raw)
    return {"len": len(raw), "sha256": _sha256(raw), "curve": key["curve"], "reserved": key["reserved"],
            "qx_hex": bytes(key["qx"]).hex(), "qy_hex": bytes(key["qy"]).hex()}


_KEYS = ("id_key_signature", "id_public_key", "author_key_signature", "author_public_key")


def _d_id_block(h: H.SnpIdBlock, ctx: _Ctx) -> dict[str, Any]:
    return {
        **_fields(h, ctx, skip=_KEYS),
        "id_key_signature": _signature(bytes(h.id_key_signature)),
        "id_public_key": _public_key(bytes(h.id_public_key)),
        "author_key_signature": _signature(bytes(h.author_key_signature)),
        "author_public_key": _public_key(bytes(h.author_public_key)),
    }


def _enum_name(enum_cls: type[VbsDigestAlgorithm] | type[VbsSigningAlgorithm], value: int) -> str:
    try:
        return enum_cls(value).name
    except ValueError:
        return "UNKNOWN"


def _d_vbs_measurement(h: H.VbsMeasurement, ctx: _Ctx) -> dict[str, Any]:
    return {
        **_fields(h, ctx, skip=("signature", "public_key")),
        "boot_digest_algo_name": _enum_name(VbsDigestAlgorithm, h.boot_digest_algo),
        "signing_algo_name": _enum_name(VbsSigningAlgorithm, h.signing_algo),
        "signature": {"len": len(h.signature), "sha256": _sha256(bytes(h.signature))},
        "public_key": {"len": len(h.public_key), "sha256": _sha256(bytes(h.public_key))},
    }


def _vp_common(h: H.VpContextBase, ctx: _Ctx) -> dict[str, Any]:
    return _fields(h, ctx)


def _d_snp_vp(h: H.SnpVpContext, ctx: _Ctx) -> dict[str, Any]:
    page = as_view(h.blob())
    fields = sev_vmsa.parse_vmsa(page)
    return {
        **_vp_common(h, ctx),
        "vmsa_len": len(page),
        "vmsa_sha256": _sha256(page),
        "vmsa": {name: _hex(value) for name, value in fields.items()},
        "sev_features_decoded": _flag_dict(fields["sev_features"], SevFeatures),
        "vmsa_reserved_nonzero_count": len(sev_vmsa.vmsa_reserved_nonzero(page)),
    }


def _d_native_vp(h: H.NativeVpContext, ctx: _Ctx) -> dict[str, Any]:
    context = bytes(h.context)
    return {
        **_vp_common(h, ctx),
        "context_len": len(context),
        "context_sha256": _sha256(context),
        "context": {name: _hex(value) for name, value in decode_native_context(context).items()},
    }


def _d_cca_vp(h: H.CcaVpContext, ctx: _Ctx) -> dict[str, Any]:
    context = bytes(h.context)
    return {
        **_vp_common(h, ctx),
        "context_len": len(context),
        "context_sha256": _sha256(context),
        "context": {name: _hex(int(value)) for name, value in H.CCA_CONTEXT.decode(context).items()},
    }


def _d_vbs_vp(h: H.VbsVpContext, ctx: _Ctx) -> dict[str, Any]:
    blob = h.blob()
    return {
        **_vp_common(h, ctx),
        "vtl": h.vtl,
        "register_count": len(h.registers),
        "registers": [decode_vbs_register(r.name, r.value, ctx.architecture) for r in h.registers],
        "context_len": len(blob),
        "context_sha256": _sha256(blob),
    }


_Decoder = Callable[[Any, _Ctx], dict[str, Any]]

# Order matters for isinstance: subclasses before their bases.
_DECODERS: tuple[tuple[type[H.Header], str | None, _Decoder], ...] = (
    (H.SupportedPlatform, "SupportedPlatform", _d_platform),
    (H.GuestPolicy, "GuestPolicy", _d_guest_policy),
    (H.RelocatableRegion, "RelocatableRegion", _d_reloc),
    (H.PageTableRelocation, "PageTableRelocationRegion", _d_pt_reloc),
    (H.CcaPolicy, "CcaPolicy", _d_cca_policy),
    (H.CorimDocument, "CorimDocument", _d_corim),
    (H.CorimSignature, "CorimSignature", _d_corim),
    (H.ParameterArea, "ParameterArea", _d_param_area),
    (H.PageData, "PageData", _d_page),
    (H.ParameterInsert, "ParameterInsert", _d_insert),
    (H.ParameterUsage, None, _d_usage),  # kind = class name (VpCount, MemoryMap, ...)
    (H.RequiredMemory, "RequiredMemory", _d_required),
    (H.ErrorRange, "ErrorRange", _d_error_range),
    (H.SnpIdBlock, "SnpIdBlock", _d_id_block),
    (H.VbsMeasurement, "VbsMeasurement", _d_vbs_measurement),
    (H.SnpVpContext, "SnpVpContext", _d_snp_vp),
    (H.NativeVpContext, "X64NativeVpContext", _d_native_vp),
    (H.CcaVpContext, "AArch64CcaVpContext", _d_cca_vp),
    (H.VbsVpContext, None, _d_vbs_vp),  # X64VbsVpContext / AArch64VbsVpContext
)


def _decode_header(h: H.Header, ctx: _Ctx) -> tuple[str, dict[str, Any]]:
    for cls, kind, decoder in _DECODERS:
        if isinstance(h, cls):
            if kind is None:
                if isinstance(h, H.VbsVpContext):
                    kind = "X64VbsVpContext" if ctx.architecture == Architecture.X64 else "AArch64VbsVpContext"
                else:
                    kind = type(h).__name__
            return kind, decoder(h, ctx)
    return type(h).__name__, {}


# --------------------------------------------------------------------------- raw TLV records

def _attach_records(f: IgvmFile, buf: memoryview) -> Iterator[tuple[int, int, int | None] | None]:
    """For every model header, its (tlv offset, tlv length, file_offset) in ``buf``, or None
    when ``buf`` has no record of that header's type where the parser found it."""
    head = FixedHeader.read(buf)
    records = list(head.records(buf)) if head is not None else []
    indices = f.header_indices or range(len(records))
    for index, h in zip(indices, f.headers, strict=False):
        if index >= len(records):
            yield None
            continue
        pos, typ, length = records[index]
        if typ != h.TYPE or length != h.SIZE or pos + 8 + length > len(buf):
            yield None
            continue
        where = h.BODY.by_name.get("file_offset")
        foff = struct.unpack_from("<I", buf, pos + 8 + where.offset)[0] if where is not None else None
        yield pos, length, foff


def _fixed_header(buf: memoryview) -> dict[str, Any] | None:
    head = FixedHeader.read(buf)
    if head is None:
        return None
    out: dict[str, Any] = {
        "magic": _hex(head.magic),
        "format_version": head.format_version,
        "variable_header_offset": head.variable_header_offset,
        "variable_header_size": head.variable_header_size,
        "total_file_size": head.total_file_size,
        "checksum": f"{head.checksum:#010x}",
    }
    if head.architecture is not None:
        out["architecture"] = head.architecture
        out["page_size"] = head.page_size
    return out


# --------------------------------------------------------------------------- JSON


def _entries(f: IgvmFile, buf: memoryview | None) -> Iterator[dict[str, Any]]:
    """The ``headers`` elements, produced one at a time (a 1 GiB file has 262,144 of them)."""
    ctx = _Ctx(f)
    hdrs = f.headers
    records = _attach_records(f, buf) if buf is not None else itertools.repeat(None)
    for index, (h, rec) in enumerate(zip(hdrs, records, strict=False)):
        kind, fields = _decode_header(h, ctx)
        entry: dict[str, Any] = {
            "index": index,
            "section": _SECTION_NAMES[h.SECTION],
            "type": h.TYPE.name,
            "type_id": _hex(int(h.TYPE)),
            "kind": kind,
            **fields,
        }
        if rec is not None:
            pos, length, foff = rec
            entry["tlv"] = {"offset": pos, "length": length}
            if foff is not None:
                entry["file_offset"] = _hex(foff)
        yield entry
    ctx.releaser.release(ctx.last_slice)


def _document(f: IgvmFile, buf: memoryview | None, platform: PlatformType | None) -> dict[str, Any]:
    """Everything of the JSON view except ``headers``."""
    file_info: dict[str, Any] = {
        "revision": f.revision,
        "architecture": Architecture(f.architecture).name,
        "page_size": PAGE_SIZE_4K,
    }
    if buf is not None:
        file_info["size"] = len(buf)
        file_info["sha256"] = sha256_released(buf)  # the mapped file never resident whole
        file_info["fixed_header"] = _fixed_header(buf)
    by_type = Counter(h.TYPE.name for h in f.headers)
    with_data = sum(1 for h in f.directives if isinstance(h, H.PageData) and len(h.data))
    return {
        "schema_version": SCHEMA_VERSION,
        "file": file_info,
        "platform_filter": PlatformType(platform).name if platform is not None else None,
        "platforms": [
            {"index": i, "compatibility_mask": _hex(p.compatibility_mask), "platform_type": int(p.platform_type),
             "platform_type_name": PlatformType(p.platform_type).name}
            for i, p in enumerate(f.platforms)
        ],
        "counts": {
            "platform": len(f.platforms),
            "initialization": len(f.initializations),
            "directive": len(f.directives),
            "total": len(f.headers),
            "by_type": dict(sorted(by_type.items())),
            "pages_with_data": with_data,
            "pages_without_data": by_type.get(HeaderType.PAGE_DATA.name, 0) - with_data,
        },
        "warnings": list(f.warnings),
    }


def _buffer(source_bytes: Buffer | None) -> memoryview | None:
    return memoryview(source_bytes).cast("B") if source_bytes is not None else None


def dump_json(f: IgvmFile, *, source_bytes: Buffer | None = None,
              platform: PlatformType | None = None) -> dict[str, Any]:
    """The documented JSON view of ``f`` (``docs/DUMP_SCHEMA.md``, ``schema_version`` 1).

    ``source_bytes``: the bytes ``f`` was parsed from; adds the file size and SHA-256, the
    fixed header and each header's TLV offset/length and absolute ``file_offset``.
    ``platform``: the platform filter ``f`` was parsed with (recorded as ``platform_filter``).
    """
    buf = _buffer(source_bytes)
    doc = _document(f, buf, platform)
    doc["headers"] = list(_entries(f, buf))
    return doc


def iter_dump_json(f: IgvmFile, *, source_bytes: Buffer | None = None,
                   platform: PlatformType | None = None) -> Iterator[str]:
    """:func:`dump_json` as text, ``json.dumps(..., indent=2, sort_keys=True)`` byte for byte,
    in pieces made one header at a time: memory stays flat however many headers the file has
    (the whole document of a 283 MB file takes 350 MB of Python objects)."""
    import json

    buf = _buffer(source_bytes)
    doc = _document(f, buf, platform)
    doc["headers"] = []
    text = json.dumps(doc, indent=2, sort_keys=True)
    # the top-level key, at its indentation (a quote inside a string value is escaped)
    marker = '\n  "headers": []'
    at = text.index(marker) + len(marker) - 1  # at the "]"
    yield text[:at]
    first = True
    for entry in _entries(f, buf):
        body = json.dumps(entry, indent=2, sort_keys=True).replace("\n", "\n    ")
        yield ("\n    " if first else ",\n    ") + body
        first = False
    yield text[at:] if first else "\n  " + text[at:]


# --------------------------------------------------------------------------- text

_SECTION_SHORT = {"platform": "platform", "initialization": "init", "directive": "directive"}
_SKIP_IN_SUMMARY = frozenset({"index", "section", "type", "type_id", "kind", "tlv", "mask_platforms"})


def _short_sha(digest: str) -> str:
    return digest[:12] + "…"


def _page_flags(e: dict[str, Any]) -> str:
    names = [n for n in ("is_2mb_page", "unmeasured", "shared") if e[n]]
    if e["reserved_flags"] != "0x0":
        names.append(e["reserved_flags"])
    return "|".join(names) if names else "0"


def _data_token(length: int, digest: str) -> str:
    return f"data={length}B sha256={_short_sha(digest)}" if length else "data=none"


def _summary(e: dict[str, Any]) -> str:
    kind = e["kind"]
    mask = f"mask={e['compatibility_mask']}" if "compatibility_mask" in e else ""
    if kind == "SupportedPlatform":
        return (f"{mask} type={e['platform_type_name']} vtl={e['highest_vtl']} version={e['platform_version']} "
                f"shared_gpa_boundary={e['shared_gpa_boundary']}")
    if kind == "GuestPolicy":
        text = f"{mask} policy={e['policy']}"
        dec = e.get("policy_decoded")
        if dec:
            bits = [k for k, v in dec.items() if v is True]
            if dec["format"] == "snp":
                bits.insert(0, f"abi={dec['abi_major']}.{dec['abi_minor']}")
            text += f" ({dec['format']}: {' '.join(bits) or '-'})"
        return text
    if kind == "RelocatableRegion":
        applies = [n for n in ("is_vtl2", "apply_rip_offset", "apply_gdtr_offset") if e[n]]
        return (f"{mask} vp={e['vp_index']} vtl={e['vtl']} gpa={e['relocation_region_gpa']} "
                f"size={e['relocation_region_size']} align={e['relocation_alignment']} "
                f"range={e['minimum_relocation_gpa']}..{e['maximum_relocation_gpa']} "
                f"flags={'|'.join(applies) or '0'}")
    if kind == "PageTableRelocationRegion":
        return (f"{mask} vp={e['vp_index']} vtl={e['vtl']} gpa={e['gpa']} size={e['size']} "
                f"used_size={e['used_size']}")
    if kind == "CcaPolicy":
        return (f"{mask} required_zeroes={e['attributes_required_zeroes']} "
                f"required_ones={e['attributes_required_ones']} hash={e['hash_algorithm_name']} "
                f"lfa={e['lfa_policy_name']}")
    if kind == "ErrorRange":
        return f"gpa={e['gpa']} {mask} size={e['size_bytes']}"
    if kind == "PageData":
        return (f"gpa={e['gpa']} {mask} flags={_page_flags(e)} type={e['data_type_name']} "
                f"{_data_token(e['data_len'], e['data_sha256'])}")
    if kind == "ParameterArea":
        return (f"index={e['parameter_area_index']} size={e['number_of_bytes']} "
                f"{_data_token(e['initial_data_len'], e['initial_data_sha256'])}")
    if kind == "ParameterInsert":
        return f"gpa={e['gpa']} {mask} index={e['parameter_area_index']}"
    if "byte_offset" in e:
        return f"index={e['parameter_area_index']} byte_offset={e['byte_offset']:#x}"
    if kind == "RequiredMemory":
        vtl2 = " vtl2_protectable" if e["vtl2_protectable"] else ""
        return f"gpa={e['gpa']} {mask} size={e['number_of_bytes']} flags={e['flags']}{vtl2}"
    if kind == "SnpVpContext":
        return (f"gpa={e['gpa']} {mask} vp={e['vp_index']} VMSA {_data_token(e['vmsa_len'], e['vmsa_sha256'])}")
    if kind in ("X64NativeVpContext", "AArch64CcaVpContext"):
        return (f"gpa={e['gpa']} {mask} vp={e['vp_index']} {kind} "
                f"{_data_token(e['context_len'], e['context_sha256'])}")
    if kind.endswith("VbsVpContext"):
        return f"{mask} vp={e['vp_index']} vtl={e['vtl']} registers={e['register_count']}"
    if kind == "SnpIdBlock":
        return (f"{mask} version={e['version']} guest_svn={e['guest_svn']} ld={_short_sha(e['ld_hex'])} "
                f"family_id={e['family_id_hex']} image_id={e['image_id_hex']} "
                f"author_key_enabled={e['author_key_enabled']} curve={e['id_public_key']['curve']}")
    if kind == "VbsMeasurement":
        return (f"{mask} version={e['version']} product_id={e['product_id']} module_id={e['module_id']} "
                f"svn={e['security_version']} policy_flags={e['policy_flags']} "
                f"digest={_short_sha(e['boot_measurement_digest_hex'])}")
    if kind in ("CorimDocument", "CorimSignature"):
        return f"{mask} {_data_token(e['data_len'], e['data_sha256'])}"
    tokens = []
    for key, value in e.items():
        if key in _SKIP_IN_SUMMARY or isinstance(value, dict | list):
            continue
        tokens.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(tokens)


def _columns(items: Sequence[str], indent: str, per_line: int = 4) -> list[str]:
    if not items:
        return []
    width = max(len(s) for s in items)
    return [indent + "  ".join(s.ljust(width) for s in items[i : i + per_line]).rstrip()
            for i in range(0, len(items), per_line)]


def _register_lines(e: dict[str, Any], indent: str) -> list[str]:
    kind = e["kind"]
    if kind == "SnpVpContext":
        items = [f"{k}={v}" for k, v in e["vmsa"].items() if v != "0x0"]
        lines = _columns(items, indent)
        if e["vmsa_reserved_nonzero_count"]:
            lines.append(f"{indent}({e['vmsa_reserved_nonzero_count']} non-zero reserved/padding bytes)")
        return lines or [f"{indent}(all VMSA fields zero)"]
    if kind in ("X64NativeVpContext", "AArch64CcaVpContext"):
        items = [f"{k}={v}" for k, v in e["context"].items() if v != "0x0"]
        return _columns(items, indent) or [f"{indent}(all registers zero)"]
    if kind.endswith("VbsVpContext"):
        lines = []
        width = max((len(r["name"]) for r in e["registers"]), default=0)
        for r in e["registers"]:
            if r["kind"] == "segment":
                s = r["segment"]
                value = (f"selector={s['selector']} attributes={s['attributes']} base={s['base']} "
                         f"limit={s['limit']}")
            elif r["kind"] == "table":
                value = f"base={r['table']['base']} limit={r['table']['limit']}"
            else:
                value = r["value"]
            lines.append(f"{indent}{r['name'].ljust(width)} ({r['number']}) = {value}")
        return lines
    return []


def dump_text(f: IgvmFile, *, source_bytes: Buffer | None = None,
              platform: PlatformType | None = None) -> str:
    """A readable listing: one aligned line per header, VP registers indented below."""
    return "".join(iter_dump_text(f, source_bytes=source_bytes, platform=platform))


def iter_dump_text(f: IgvmFile, *, source_bytes: Buffer | None = None,
                   platform: PlatformType | None = None) -> Iterator[str]:
    """:func:`dump_text`, line by line (each with its newline), one header at a time."""
    buf = _buffer(source_bytes)
    doc = _document(f, buf, platform)
    info = doc["file"]
    head = f"IGVM v{info['revision']} {info['architecture']}"
    if "size" in info:
        head += f", {info['size']} bytes, sha256 {info['sha256']}"
    yield head + "\n"
    plats = ", ".join(f"{p['platform_type_name']} (mask {p['compatibility_mask']})" for p in doc["platforms"])
    yield f"platforms: {plats}\n"
    if doc["platform_filter"]:
        yield f"platform filter: {doc['platform_filter']}\n"
    iw = len(str(max(len(f.headers) - 1, 0)))
    tw = max(len(h.TYPE.name) for h in f.headers)
    indent = " " * (iw + 3 + 10 + tw + 1) + "  "
    for e in _entries(f, buf):
        section = _SECTION_SHORT[e["section"]]
        summary = " ".join(_summary(e).split())
        yield f"[{e['index']:>{iw}}] {section:<9} {e['type']:<{tw}} {summary}".rstrip() + "\n"
        for line in _register_lines(e, indent):
            yield line + "\n"
    c = doc["counts"]
    by_type = ", ".join(f"{n} {t}" for t, n in c["by_type"].items())
    yield (f"counts: {c['platform']} platform, {c['initialization']} initialization, {c['directive']} "
           f"directive ({by_type})\n")
    if doc["warnings"]:
        yield "warnings:\n"
        for w in doc["warnings"]:
            yield f"  {w}\n"
