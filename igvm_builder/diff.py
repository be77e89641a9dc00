"""Semantic diff of two IGVM files: what a loader, a verifier or a person would see change.

:func:`diff_files` compares two :class:`~igvm_builder.format.IgvmFile` models and returns
a :class:`FileDiff` (frozen dataclasses): the fixed header (revision, architecture), the
platform set, every non-page header added / removed / changed field by field (VP registers
by name, policy bits, ID-block fields), the pages that differ as coalesced GPA ranges,
page-order changes and each platform's launch measurement before and after.

Matching:

* platforms by platform type;
* guest / CCA policies, SNP ID blocks, VBS measurements and CoRIM headers by the platforms
  their compatibility mask names (masks are compared as platform sets, so two files that
  number their platforms differently still match);
* VP contexts by (platforms, vp_index);
* every other header by type and position (the n-th ``ParameterInsert`` of A against the
  n-th of B);
* keyed headers left unmatched are paired by type in file order (reported as changed);
* pages platform by platform: for each platform both files declare, the pages that
  platform's loader imports are matched by GPA (the n-th page at a GPA against the n-th),
  and differences found on several platforms at the same GPA are reported once with the
  set of platforms.  A change of a page's compatibility mask therefore shows up as the page
  being added or removed *for the platforms concerned*;
* pages whose compatibility mask names no platform of their file (no loader imports them,
  but they are in the file) are matched the same way among themselves and reported under the
  platform name ``no platform``, so such a page added to a file is a difference.

Page contents are compared as ``memoryview`` windows into the two files (``FileSlice``):
nothing is copied, and the model is walked once per platform, so large files diff in
memory proportional to their header count.  :meth:`FileDiff.as_dict` is the stable JSON
schema (``schema_version`` 1) documented in ``docs/REPRODUCIBLE_RELEASES.md``;
:func:`render_text` is the human rendering.  Nothing here reads files or prints.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from igvm_builder import sev_vmsa
from igvm_builder.errors import MeasurementError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, PageReleaser, as_view, same_bytes
from igvm_builder.format.defs import (
    PAGE_SIZE_4K,
    Architecture,
    PageDataType,
    PlatformType,
    Section,
    decode_snp_policy,
    decode_tdx_policy,
)
from igvm_builder.format.file import IgvmFile
from igvm_builder.recordclass import fields as record_fields

__all__ = [
    "SCHEMA_VERSION",
    "FieldChange",
    "FileDiff",
    "HeaderChange",
    "MeasurementComparison",
    "PageOrderChange",
    "PageRange",
    "diff_files",
    "render_text",
]

SCHEMA_VERSION = 1

_SECTION_NAMES = {Section.PLATFORM: "platform", Section.INITIALIZATION: "initialization",
                  Section.DIRECTIVE: "directive"}
_SECTION_RANK = {"file": 0, "platform": 1, "initialization": 2, "directive": 3}


# =========================================================================== result model


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field that differs; values are JSON-ready (hex strings, names, bools, None = absent)."""

    field: str
    a: Any
    b: Any

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "a": self.a, "b": self.b}


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """A non-page header added (only in B), removed (only in A) or changed."""

    change: str  # "added" | "removed" | "changed"
    section: str  # "platform" | "initialization" | "directive"
    header: str  # model class name: GuestPolicy, SnpVpContext, VpCount, ...
    key: str  # what it was matched by, e.g. "SEV_SNP vp 0", "#1"
    index_a: int | None
    index_b: int | None
    fields: tuple[FieldChange, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"change": self.change, "section": self.section, "header": self.header, "key": self.key,
                "index_a": self.index_a, "index_b": self.index_b,
                "fields": [f.as_dict() for f in self.fields]}


@dataclass(frozen=True, slots=True)
class PageRange:
    """Consecutive 4 KiB pages that differ the same way on the same platforms.

    ``aspect`` is ``data`` (contents; ``a``/``b`` are ``None``, or ``"empty"``/``"present"``
    when one side has no file data), ``flags`` or ``data_type`` (``a``/``b`` the values),
    ``added`` (only in B) or ``removed`` (only in A).  ``end`` is the last byte (inclusive).
    """

    start: int
    end: int
    aspect: str
    platforms: tuple[str, ...]
    a: Any = None
    b: Any = None

    @property
    def pages(self) -> int:
        return (self.end + 1 - self.start) // PAGE_SIZE_4K

    def as_dict(self) -> dict[str, Any]:
        return {"gpa_start": f"{self.start:#x}", "gpa_end": f"{self.end:#x}", "pages": self.pages,
                "aspect": self.aspect, "platforms": list(self.platforms), "a": self.a, "b": self.b}

    def describe(self) -> str:
        n = self.pages
        where = (f"page {self.start:#x}" if n == 1 else f"pages {self.start:#x}-{self.end:#x}")
        where += f" ({n} page{'s' if n != 1 else ''})"
        verb = "differs" if n == 1 else "differ"
        if self.aspect == "added":
            what = "only in B (added)"
        elif self.aspect == "removed":
            what = "only in A (removed)"
        elif self.aspect == "data" and self.a is not None:
            what = f"{verb} in data ({self.a} -> {self.b})"
        elif self.aspect == "data":
            what = f"{verb} in data"
        else:
            what = f"{verb} in {self.aspect} ({self.a} -> {self.b})"
        return f"{where} {what} [{', '.join(self.platforms)}]"


@dataclass(frozen=True, slots=True)
class PageOrderChange:
    """Pages present in both files but imported in another order by ``platform``."""

    platform: str
    first_gpa: int  # the first page (in B's order) that comes earlier in A than its predecessor
    moved: int  # pages of B that come before their B-predecessor in A's order

    def as_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "first_gpa": f"{self.first_gpa:#x}", "moved": self.moved}


@dataclass(frozen=True, slots=True)
class MeasurementComparison:
    """One platform's launch measurement in A and in B (``None`` where it has none)."""

    platform: str
    algorithm: str | None
    a: str | None
    b: str | None
    error_a: str | None = None
    error_b: str | None = None
    in_a: bool = True
    in_b: bool = True

    @property
    def changed(self) -> bool:
        return self.a != self.b or self.error_a != self.error_b or self.in_a != self.in_b

    def as_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "algorithm": self.algorithm, "a": self.a, "b": self.b,
                "error_a": self.error_a, "error_b": self.error_b, "in_a": self.in_a, "in_b": self.in_b,
                "changed": self.changed}


@dataclass(frozen=True, slots=True)
class FileDiff:
    """The semantic difference between file A and file B."""

    a_name: str
    b_name: str
    platforms_a: tuple[str, ...]
    platforms_b: tuple[str, ...]
    file_changes: tuple[FieldChange, ...] = ()
    headers: tuple[HeaderChange, ...] = ()
    pages: tuple[PageRange, ...] = ()
    page_order: tuple[PageOrderChange, ...] = ()
    measurements: tuple[MeasurementComparison, ...] = ()
    page_counts: tuple[int, int] = (0, 0)
    byte_identical: bool | None = None
    loader: str | None = None

    @property
    def platforms_added(self) -> tuple[str, ...]:
        return tuple(p for p in self.platforms_b if p not in self.platforms_a)

    @property
    def platforms_removed(self) -> tuple[str, ...]:
        return tuple(p for p in self.platforms_a if p not in self.platforms_b)

    @property
    def identical(self) -> bool:
        """No semantic difference (the bytes may still differ: see :attr:`byte_identical`)."""
        if self.byte_identical:
            return True
        return not (self.file_changes or self.platforms_added or self.platforms_removed or self.headers
                    or self.pages or self.page_order or any(m.changed for m in self.measurements))

    @property
    def verdict(self) -> str:
        """``byte-identical``, ``semantically-identical`` or ``different``."""
        if self.byte_identical:
            return "byte-identical"
        return "semantically-identical" if self.identical else "different"

    @property
    def differing_pages(self) -> int:
        """Distinct (GPA) pages named by :attr:`pages`."""
        gpas: set[int] = set()
        for r in self.pages:
            gpas.update(range(r.start, r.end + 1, PAGE_SIZE_4K))
        return len(gpas)

    def with_byte_identity(self, byte_identical: bool | None) -> FileDiff:
        return dataclasses.replace(self, byte_identical=byte_identical)

    def as_dict(self) -> dict[str, Any]:
        """The stable JSON document (``schema_version`` 1, docs/REPRODUCIBLE_RELEASES.md)."""
        kinds: defaultdict[str, int] = defaultdict(int)
        for h in self.headers:
            kinds[h.change] += 1
        return {
            "schema_version": SCHEMA_VERSION,
            "a": self.a_name,
            "b": self.b_name,
            "verdict": self.verdict,
            "identical": self.identical,
            "byte_identical": self.byte_identical,
            "loader": self.loader,
            "summary": {
                "headers_added": kinds["added"],
                "headers_removed": kinds["removed"],
                "headers_changed": kinds["changed"],
                "page_ranges": len(self.pages),
                "pages_differing": self.differing_pages,
                "page_order_changes": len(self.page_order),
                "measurements_changed": sum(1 for m in self.measurements if m.changed),
                "pages_a": self.page_counts[0],
                "pages_b": self.page_counts[1],
            },
            "file": [f.as_dict() for f in self.file_changes],
            "platforms": {
                "a": list(self.platforms_a),
                "b": list(self.platforms_b),
                "added": list(self.platforms_added),
                "removed": list(self.platforms_removed),
            },
            "headers": [h.as_dict() for h in self.headers],
            "pages": [r.as_dict() for r in self.pages],
            "page_order": [o.as_dict() for o in self.page_order],
            "measurements": [m.as_dict() for m in self.measurements],
        }

    def render_text(self, *, max_ranges: int | None = 200) -> str:
        return render_text(self, max_ranges=max_ranges)


# =========================================================================== value helpers


def _val(x: Any) -> Any:
    """A JSON-ready rendering of a header field value."""
    if x is None or isinstance(x, bool | str):
        return x
    if isinstance(x, enum.Enum):
        return x.name
    if isinstance(x, int):
        return f"{x:#x}"
    if isinstance(x, bytes | bytearray | memoryview | FileSlice):
        return bytes(as_view(x)).hex()
    return repr(x)


def _blob_summary(data: H.BlobLike | None) -> str | None:
    if data is None or not len(data):
        return None
    view = as_view(data)
    return f"{len(view)} bytes, sha256 {hashlib.sha256(view).hexdigest()}"


def _same(a: H.BlobLike | None, b: H.BlobLike | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return same_bytes(as_view(a), as_view(b))


class _Side:
    """What the diff needs to know about one file: its platforms by mask."""

    def __init__(self, f: IgvmFile) -> None:
        self.f = f
        self.by_mask = {p.compatibility_mask: p.platform_type for p in f.platforms}
        self.mask_of = {p.platform_type: p.compatibility_mask for p in f.platforms}
        self.architecture = Architecture(f.architecture)

    def names(self, mask: int | None) -> tuple[str, ...]:
        if mask is None:
            return ()
        out = [t.name for t in sorted(t for m, t in self.by_mask.items() if m & mask)]
        rest = mask & ~sum(self.by_mask)
        bit = 1
        while rest:
            if rest & bit:
                out.append(f"bit {bit:#x}")
                rest &= ~bit
            bit <<= 1
        return tuple(out)


def _platform_label(names: Sequence[str]) -> str:
    return ",".join(names) if names else "all"


# =========================================================================== header matching

_BY_PLATFORMS = (H.GuestPolicy, H.CcaPolicy, H.SnpIdBlock, H.VbsMeasurement, H.CorimDocument, H.CorimSignature)


def _family(h: H.Header) -> str:
    return "VpContext" if isinstance(h, H.VpContextBase) else type(h).__name__


def _match_key(h: H.Header, side: _Side, occurrence: int) -> tuple[Any, ...]:
    if isinstance(h, H.SupportedPlatform):
        return ("platform", h.platform_type.name, occurrence)
    if isinstance(h, H.VpContextBase):
        return ("vp", side.names(h.compatibility_mask), h.vp_index, occurrence)
    if isinstance(h, _BY_PLATFORMS):
        return ("mask", side.names(h.mask), occurrence)
    return ("pos", occurrence)


def _key_label(key: tuple[Any, ...]) -> str:
    kind = key[0]
    occ = key[-1]
    suffix = f" #{occ + 1}" if occ else ""
    if kind == "platform":
        return f"{key[1]}{suffix}"
    if kind == "vp":
        return f"{_platform_label(key[1])} vp {key[2]}{suffix}"
    if kind == "mask":
        return f"{_platform_label(key[1])}{suffix}"
    return f"#{occ + 1}"


def _indexed(f: IgvmFile) -> Iterator[tuple[int, H.Header]]:
    for i, h in enumerate(f.headers):
        if not isinstance(h, H.PageData):
            yield i, h


def _keyed(f: IgvmFile, side: _Side) -> dict[tuple[Any, ...], tuple[int, H.Header]]:
    out: dict[tuple[Any, ...], tuple[int, H.Header]] = {}
    counts: dict[tuple[Any, ...], int] = defaultdict(int)
    for i, h in _indexed(f):
        fam = _family(h)
        base = _match_key(h, side, 0)[:-1]
        ck = (fam, *base)
        occ = counts[ck]
        counts[ck] += 1
        out[(fam, *base, occ)] = (i, h)
    return out


def _diff_headers(a: IgvmFile, b: IgvmFile, sa: _Side, sb: _Side) -> list[HeaderChange]:
    ka, kb = _keyed(a, sa), _keyed(b, sb)
    changes: list[HeaderChange] = []
    only_a = [k for k in ka if k not in kb]
    only_b = [k for k in kb if k not in ka]
    for k in ka:
        if k in kb:
            (ia, ha), (ib, hb) = ka[k], kb[k]
            fields = _header_fields(ha, hb, sa, sb)
            if fields:
                changes.append(HeaderChange("changed", _SECTION_NAMES[hb.SECTION], type(hb).__name__,
                                            _key_label(k[1:]), ia, ib, tuple(fields)))
    # Second stage: pair what is left by family, in file order (a keyed header whose
    # platforms changed, a VP context renumbered, ...).
    left_b: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for k in only_b:
        left_b[k[0]].append(k)
    for k in only_a:
        ia, ha = ka[k]
        cands = left_b.get(k[0])
        if k[1] != "platform" and cands:
            kb2 = cands.pop(0)
            ib, hb = kb[kb2]
            fields = _header_fields(ha, hb, sa, sb)
            changes.append(HeaderChange("changed", _SECTION_NAMES[hb.SECTION], type(hb).__name__,
                                        f"{_key_label(k[1:])} -> {_key_label(kb2[1:])}", ia, ib,
                                        tuple(fields)))
        else:
            changes.append(HeaderChange("removed", _SECTION_NAMES[ha.SECTION], type(ha).__name__,
                                        _key_label(k[1:]), ia, None, _summary_fields(ha, sa, added=False)))
    for fam_keys in left_b.values():
        for kb2 in fam_keys:
            ib, hb = kb[kb2]
            changes.append(HeaderChange("added", _SECTION_NAMES[hb.SECTION], type(hb).__name__,
                                        _key_label(kb2[1:]), None, ib, _summary_fields(hb, sb, added=True)))
    changes.sort(key=lambda c: (_SECTION_RANK[c.section], c.index_b if c.index_b is not None else c.index_a or 0,
                                c.index_a if c.index_a is not None else -1))
    return changes


# =========================================================================== field-level diffs

_BLOB_FIELDS = frozenset({"data", "initial_data", "vmsa", "context", "registers"})


def _plain_fields(h: H.Header, side: _Side) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in record_fields(h):
        if f.name in _BLOB_FIELDS:
            continue
        value = getattr(h, f.name)
        if f.name == "compatibility_mask":
            out["platforms"] = list(side.names(value))
        out[f.name] = _val(value)
    return out


def _summary_fields(h: H.Header, side: _Side, *, added: bool) -> tuple[FieldChange, ...]:
    """Fields of an added (``a`` None) or removed (``b`` None) header."""
    return tuple(FieldChange(k, None, v) if added else FieldChange(k, v, None)
                 for k, v in _plain_fields(h, side).items())


def _policy_bits(policy: int, names: Sequence[str]) -> dict[str, Any]:
    if "SEV_SNP" in names:
        return decode_snp_policy(policy)
    if "TDX" in names:
        return decode_tdx_policy(policy)
    return {}


def _dict_changes(prefix: str, da: dict[str, Any], db: dict[str, Any]) -> list[FieldChange]:
    out = []
    for name in dict.fromkeys([*da, *db]):
        va, vb = da.get(name), db.get(name)
        if va != vb:
            out.append(FieldChange(f"{prefix}{name}", va, vb))
    return out


def _vp_registers(h: H.Header, side: _Side) -> dict[str, Any]:
    from igvm_builder.format import dump

    if isinstance(h, H.SnpVpContext):
        return {k: f"{v:#x}" for k, v in sev_vmsa.parse_vmsa(as_view(h.blob())).items()}
    if isinstance(h, H.NativeVpContext):
        return {k: f"{v:#x}" for k, v in dump.decode_native_context(bytes(h.context)).items()}
    if isinstance(h, H.CcaVpContext):
        view = memoryview(bytes(h.context))
        return {name: f"{int.from_bytes(view[off:off + size], 'little'):#x}"
                for name, off, size in dump.CCA_CONTEXT_FIELDS}
    if isinstance(h, H.VbsVpContext):
        table = (dump.X64_VBS_REGISTER_NAMES if side.architecture == Architecture.X64
                 else dump.AARCH64_VBS_REGISTER_NAMES)
        out: dict[str, Any] = {}
        for r in h.registers:
            name = table.get(r.name, f"{r.name:#x}")
            out[name] = f"{int.from_bytes(bytes(r.value), 'little'):#x}"
        return out
    return {}


_VP_PREFIX = {H.SnpVpContext: "vmsa.", H.NativeVpContext: "context.", H.CcaVpContext: "context.",
              H.VbsVpContext: "registers."}


def _header_fields(ha: H.Header, hb: H.Header, sa: _Side, sb: _Side) -> list[FieldChange]:
    if type(ha) is not type(hb):
        return [FieldChange("type", type(ha).__name__, type(hb).__name__)]
    fa, fb = _plain_fields(ha, sa), _plain_fields(hb, sb)
    out = _dict_changes("", fa, fb)
    if isinstance(ha, H.GuestPolicy) and isinstance(hb, H.GuestPolicy) and ha.policy != hb.policy:
        out += _dict_changes("policy.", _policy_bits(ha.policy, sa.names(ha.compatibility_mask)),
                             _policy_bits(hb.policy, sb.names(hb.compatibility_mask)))
    if isinstance(ha, H.VpContextBase):
        prefix = _VP_PREFIX.get(type(ha), "context.")
        regs = _dict_changes(prefix, _vp_registers(ha, sa), _vp_registers(hb, sb))
        out += regs
        if isinstance(ha, H.VbsVpContext) and isinstance(hb, H.VbsVpContext):
            order_a = [r.name for r in ha.registers]
            order_b = [r.name for r in hb.registers]
            if not regs and order_a != order_b:
                out.append(FieldChange("registers.order", [f"{n:#x}" for n in order_a],
                                       [f"{n:#x}" for n in order_b]))
        elif not regs and not _same(ha.blob(), hb.blob()):
            out.append(FieldChange(f"{prefix}reserved_bytes", _blob_summary(ha.blob()), _blob_summary(hb.blob())))
    for name in ("data", "initial_data"):
        if hasattr(ha, name):
            da, db = getattr(ha, name), getattr(hb, name)
            if not _same(da, db):
                out.append(FieldChange(name, _blob_summary(da), _blob_summary(db)))
    return out


# =========================================================================== pages


def _pages_for(f: IgvmFile, mask: int) -> Iterator[tuple[int, H.PageData]]:
    """(directive index, page) of the pages of ``mask`` (a run's pages are made one at a time:
    the index, not the object, identifies a page)."""
    for i, h in enumerate(f.directives):
        if isinstance(h, H.PageData) and h.compatibility_mask & mask == mask:
            yield i, h


def _page_aspects(pa: H.PageData, pb: H.PageData) -> Iterator[tuple[str, Any, Any]]:
    if pa.flags != pb.flags:
        yield "flags", f"{pa.flags:#x}", f"{pb.flags:#x}"
    if pa.data_type != pb.data_type:
        yield "data_type", _data_type_name(pa.data_type), _data_type_name(pb.data_type)
    la, lb = len(pa.data), len(pb.data)
    if bool(la) != bool(lb):
        yield "data", "present" if la else "empty", "present" if lb else "empty"
    elif la and not _same(pa.blob(), pb.blob()):
        yield "data", None, None


def _data_type_name(v: int) -> str:
    try:
        return PageDataType(v).name
    except ValueError:
        return str(v)


def _diff_pages(a: IgvmFile, b: IgvmFile, sa: _Side, sb: _Side
                ) -> tuple[list[PageRange], list[PageOrderChange]]:
    # (aspect, a, b, gpa) -> platforms on which the page differs that way
    records: dict[tuple[str, Any, Any, int], set[PlatformType | str]] = defaultdict(set)
    order: list[PageOrderChange] = []
    common = [p for p in sa.mask_of if p in sb.mask_of]
    # A header shared by several platforms is one pair of pages: compared once (a 3-platform
    # file would otherwise read every page three times).  Pages read leave the resident set.
    compared: dict[tuple[int, int], list[tuple[str, Any, Any]]] = {}  # by directive indices
    release_a, release_b = PageReleaser(every=2048), PageReleaser(every=2048)
    last_a: FileSlice | None = None
    last_b: FileSlice | None = None
    for ptype in common:
        index: dict[tuple[int, int], tuple[int, int, H.PageData]] = {}
        occ: dict[int, int] = defaultdict(int)
        for pos, (ia, h) in enumerate(_pages_for(a, sa.mask_of[ptype])):
            n = occ[h.gpa]
            occ[h.gpa] = n + 1
            index[(h.gpa, n)] = (pos, ia, h)
        occ.clear()
        last_pos = -1
        first_moved: int | None = None
        moved = 0
        for ib, hb in _pages_for(b, sb.mask_of[ptype]):
            n = occ[hb.gpa]
            occ[hb.gpa] = n + 1
            hit = index.pop((hb.gpa, n), None)
            if hit is None:
                records[("added", None, None, hb.gpa)].add(ptype)
                continue
            pos, ia, ha = hit
            if pos < last_pos:
                moved += 1
                if first_moved is None:
                    first_moved = hb.gpa
            last_pos = pos
            key = (ia, ib)
            aspects = compared.get(key)
            if aspects is None:
                aspects = compared[key] = list(_page_aspects(ha, hb))
                if type(ha.data) is FileSlice:
                    release_a.note(ha.data)
                    last_a = ha.data
                if type(hb.data) is FileSlice:
                    release_b.note(hb.data)
                    last_b = hb.data
            for aspect, va, vb in aspects:
                records[(aspect, va, vb, hb.gpa)].add(ptype)
        for (gpa, _n), _ in index.items():
            records[("removed", None, None, gpa)].add(ptype)
        if first_moved is not None:
            order.append(PageOrderChange(ptype.name, first_moved, moved))
    _diff_unclaimed_pages(a, b, sa, sb, records)
    release_a.release(last_a)
    release_b.release(last_b)
    return _coalesce(records), order


#: The platform name under which pages whose mask names no platform of their file are reported.
NO_PLATFORM = "no platform"


def _unclaimed(f: IgvmFile, side: _Side) -> Iterator[H.PageData]:
    claimed = 0
    for mask in side.by_mask:
        claimed |= mask
    for h in f.directives:
        if isinstance(h, H.PageData) and not h.compatibility_mask & claimed:
            yield h


def _diff_unclaimed_pages(a: IgvmFile, b: IgvmFile, sa: _Side, sb: _Side,
                          records: dict[tuple[str, Any, Any, int], set[PlatformType | str]]) -> None:
    """Pages no platform of their file claims, matched by GPA (the n-th against the n-th): no
    loader imports them, yet a file that gained one is not the same file."""
    index: dict[tuple[int, int], H.PageData] = {}
    occ: dict[int, int] = defaultdict(int)
    for h in _unclaimed(a, sa):
        n = occ[h.gpa]
        occ[h.gpa] = n + 1
        index[(h.gpa, n)] = h
    occ.clear()
    for hb in _unclaimed(b, sb):
        n = occ[hb.gpa]
        occ[hb.gpa] = n + 1
        ha = index.pop((hb.gpa, n), None)
        if ha is None:
            records[("added", None, None, hb.gpa)].add(NO_PLATFORM)
            continue
        for aspect, va, vb in _page_aspects(ha, hb):
            records[(aspect, va, vb, hb.gpa)].add(NO_PLATFORM)
    for gpa, _n in index:
        records[("removed", None, None, gpa)].add(NO_PLATFORM)


def _coalesce(records: dict[tuple[str, Any, Any, int], set[PlatformType | str]]) -> list[PageRange]:
    groups: dict[tuple[str, Any, Any, tuple[str, ...]], list[int]] = defaultdict(list)
    for (aspect, va, vb, gpa), plats in records.items():
        typed = sorted(p for p in plats if isinstance(p, PlatformType))
        names = tuple([p.name for p in typed] + sorted(p for p in plats if isinstance(p, str)))
        groups[(aspect, va, vb, names)].append(gpa)
    out: list[PageRange] = []
    for (aspect, va, vb, names), gpas in groups.items():
        gpas.sort()
        start = prev = gpas[0]
        for g in gpas[1:]:
            if g == prev + PAGE_SIZE_4K:
                prev = g
                continue
            if g == prev:
                continue
            out.append(PageRange(start, prev + PAGE_SIZE_4K - 1, aspect, names, va, vb))
            start = prev = g
        out.append(PageRange(start, prev + PAGE_SIZE_4K - 1, aspect, names, va, vb))
    out.sort(key=lambda r: (r.start, r.aspect, r.platforms))
    return out


# =========================================================================== measurements


def _measure(f: IgvmFile, ptype: PlatformType, loader: str | None, cca_realm: Any = None
             ) -> tuple[str | None, str | None, str | None]:
    from igvm_builder.measure import measure_platform

    try:
        m = measure_platform(f, ptype, loader=loader, cca_realm=cca_realm)
    except MeasurementError as exc:
        return None, None, str(exc)
    return m.algorithm, m.hex, None


def _diff_measurements(a: IgvmFile, b: IgvmFile, sa: _Side, sb: _Side, loader: str | None,
                       cca_realm: Any = None) -> list[MeasurementComparison]:
    from concurrent.futures import ThreadPoolExecutor

    ptypes = list(dict.fromkeys([*sa.mask_of, *sb.mask_of]))
    jobs = [(f, ptype) for ptype in ptypes for f, side in ((a, sa), (b, sb)) if ptype in side.mask_of]
    # each (file, platform) in a thread: hashing is most of it, and hashlib lets threads run
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(jobs)))) as pool:
        results = dict(zip(((id(f), p) for f, p in jobs),
                           pool.map(lambda job: _measure(job[0], job[1], loader, cca_realm), jobs), strict=True))
    out = []
    none = (None, None, None)
    for ptype in ptypes:
        alg_a, da, ea = results.get((id(a), ptype), none)
        alg_b, db, eb = results.get((id(b), ptype), none)
        out.append(MeasurementComparison(ptype.name, alg_b or alg_a, da, db, ea, eb,
                                         in_a=ptype in sa.mask_of, in_b=ptype in sb.mask_of))
    return out


# =========================================================================== entry point


def diff_files(a: IgvmFile, b: IgvmFile, *, a_name: str = "A", b_name: str = "B", loader: str | None = None,
               measure: bool = True, byte_identical: bool | None = None, cca_realm: Any = None) -> FileDiff:
    """The semantic difference between ``a`` and ``b`` (see the module docstring for matching).

    ``loader`` selects the SEV-SNP loader profile of the measurements (default: the
    library default); ``measure=False`` skips them.  ``byte_identical`` is recorded as
    given (the caller knows the bytes; the model does not).  ``cca_realm`` (an
    :class:`igvm_builder.measure.cca.Realm`) measures both files' CCA platforms as that realm.
    """
    sa, sb = _Side(a), _Side(b)
    file_changes = []
    if a.revision != b.revision:
        file_changes.append(FieldChange("revision", a.revision, b.revision))
    if a.architecture != b.architecture:
        file_changes.append(FieldChange("architecture", Architecture(a.architecture).name,
                                        Architecture(b.architecture).name))
    headers = _diff_headers(a, b, sa, sb)
    pages, order = _diff_pages(a, b, sa, sb)
    measurements = _diff_measurements(a, b, sa, sb, loader, cca_realm) if measure else []
    counts = (sum(1 for h in a.directives if isinstance(h, H.PageData)),
              sum(1 for h in b.directives if isinstance(h, H.PageData)))
    return FileDiff(
        a_name=a_name, b_name=b_name,
        platforms_a=tuple(p.platform_type.name for p in a.platforms),
        platforms_b=tuple(p.platform_type.name for p in b.platforms),
        file_changes=tuple(file_changes), headers=tuple(headers), pages=tuple(pages), page_order=tuple(order),
        measurements=tuple(measurements), page_counts=counts, byte_identical=byte_identical, loader=loader,
    )


# =========================================================================== text rendering


def _fmt(v: Any) -> str:
    if v is None:
        return "(absent)"
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    s = str(v)
    return s if len(s) <= 40 else f"{s[:16]}…{s[-8:]} ({len(s) // 2} bytes)" if _is_hex(s) else s


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def _short(d: str | None) -> str:
    return "(none)" if d is None else d


def render_text(d: FileDiff, *, max_ranges: int | None = 200) -> str:
    """The human rendering of a :class:`FileDiff` (one fact per line)."""
    lines: list[str] = []
    if d.byte_identical:
        return f"{d.a_name} and {d.b_name} are byte-identical\n"
    if d.identical:
        how = "bytes differ" if d.byte_identical is False else "bytes not compared"
        return (f"{d.a_name} and {d.b_name} are semantically identical ({how}: same headers, pages and "
                "measurements; the layout of the file data differs)\n")
    s = d.as_dict()["summary"]
    lines.append(f"{d.a_name} and {d.b_name} differ: {s['headers_added']} header(s) added, "
                 f"{s['headers_removed']} removed, {s['headers_changed']} changed; {s['pages_differing']} page(s) "
                 f"differ in {s['page_ranges']} range(s); {s['measurements_changed']} measurement(s) changed")
    for fc in d.file_changes:
        lines.append(f"  file: {fc.field} {_fmt(fc.a)} -> {_fmt(fc.b)}")
    if d.platforms_added or d.platforms_removed:
        lines.append(f"  platforms: {', '.join(d.platforms_a)} -> {', '.join(d.platforms_b)}"
                     + "".join(f" (+{p})" for p in d.platforms_added)
                     + "".join(f" (-{p})" for p in d.platforms_removed))
    for h in d.headers:
        idx = f"header {h.index_a if h.index_a is not None else '-'}/{h.index_b if h.index_b is not None else '-'}"
        if h.change == "changed":
            lines.append(f"  {h.section} {h.header} [{h.key}] changed ({idx})")
            lines += [f"      {fc.field}: {_fmt(fc.a)} -> {_fmt(fc.b)}" for fc in h.fields]
        else:
            values = ", ".join(f"{fc.field}={_fmt(fc.b if h.change == 'added' else fc.a)}" for fc in h.fields)
            lines.append(f"  {h.section} {h.header} [{h.key}] {h.change} ({idx}){': ' + values if values else ''}")
    ranges: Iterable[PageRange] = d.pages
    if max_ranges is not None and len(d.pages) > max_ranges:
        ranges = d.pages[:max_ranges]
    for r in ranges:
        lines.append(f"  {r.describe()}")
    if max_ranges is not None and len(d.pages) > max_ranges:
        lines.append(f"  ... {len(d.pages) - max_ranges} more page range(s) (use --json for all)")
    for o in d.page_order:
        lines.append(f"  page order differs for {o.platform}: {o.moved} page(s) moved, first at GPA {o.first_gpa:#x}")
    for m in d.measurements:
        if not m.in_a:
            lines.append(f"  measurement {m.platform}: (platform only in B) {_short(m.b or m.error_b)}")
        elif not m.in_b:
            lines.append(f"  measurement {m.platform}: {_short(m.a or m.error_a)} (platform only in A)")
        elif m.changed:
            lines.append(f"  measurement {m.platform}: {_short(m.a or m.error_a)} -> {_short(m.b or m.error_b)}")
        elif m.a is not None:
            lines.append(f"  measurement {m.platform}: unchanged {m.a}")
    return "\n".join(lines) + "\n"

