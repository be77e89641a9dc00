"""Arm CCA: the Realm Initial Measurement (RIM) of a realm, and of an IGVM file's CCA platform.

The RIM model is ``shared/spec/CCA.md`` Part A (RMM 1.0, as veraison/cca-realm-measurements
implements it): ``RMI_REALM_CREATE`` starts the chain from the measured ``RmiRealmParams``
fields, each ``RMI_RTT_INIT_RIPAS`` RTT entry, each ``RMI_DATA_CREATE`` granule and each
runnable ``RMI_REC_CREATE`` extends it with a 256-byte measurement descriptor:
``RIM = H(descriptor)``, kept zero-extended to 64 bytes and reported as its first 32 (SHA-256),
48 (SHA-384) or 64 (SHA-512) bytes.

How an IGVM file maps onto those calls is **derived** (``CCA.md`` Part B; no IGVM loader with
CCA support exists to check it against), and :func:`measure_cca` follows that derivation:

1. REALM_CREATE: the hash algorithm from the file's CCA_POLICY; IPA width, SVE, PMU,
   breakpoints, watchpoints and LPA2 are not in the file (:class:`RealmParams`).
2. INIT_RIPAS over the guest RAM ranges (not in the file either), ascending.
3. In directive order: each PAGE_DATA of the CCA platform that is not shared is one
   DATA_CREATE at its GPA, measured (content = H(page)) unless flagged unmeasured; a
   data-less PAGE_DATA is a measured page of zeros (*choice*, as the SNP NORMAL page);
   each page of a PARAMETER_INSERT is an unmeasured DATA_CREATE (its contents are the loader's).
4. RMI_REC_CREATE per VP context, by vp_index, after all page data (vCPUs are created after
   memory); only a context with the RUNNABLE flag extends the RIM.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from igvm_builder.errors import MeasurementError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, PageReleaser, as_view
from igvm_builder.format.defs import PAGE_SIZE_4K, PageDataFlags, PageDataType, PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.measure.result import Measurement
from igvm_builder.recordclass import field, record, replace

GRANULE = PAGE_SIZE_4K
#: RmiHashAlgorithm / IGVM CcaHashAlgorithm by name, and the size of each digest.
HASH_ALGORITHMS: dict[str, int] = {"sha256": 0, "sha512": 1, "sha384": 2}
HASH_NAMES: dict[int, str] = {v: k for k, v in HASH_ALGORITHMS.items()}
_DIGEST_SIZE = {"sha256": 32, "sha384": 48, "sha512": 64}

#: RmiRealmParams.flags (flags0) bits.
FLAG_LPA2, FLAG_SVE, FLAG_PMU = 1 << 0, 1 << 1, 1 << 2
#: RmiRecParams.flags / IgvmVpContextAArch64Cca.flags bit 0.
REC_RUNNABLE = 1

DESC_DATA, DESC_REC, DESC_RIPAS = 0, 1, 2
DESC_LEN = 0x100
RMI_MEASURE_CONTENT = 1

_IPA_FLAGS = struct.Struct("<QQ")
#: IgvmVpContextAArch64Cca: x0..x7, pc, flags (80 bytes).
CCA_CONTEXT = struct.Struct("<8QQQ")

SHA384_NOTE = ("SHA-384 realms (RmiHashAlgorithm 2) exist only in the RMM 2.0 ABI (TF-RMM 787b3558); "
               "realm-measurements cannot check this RIM")


@record
class RealmParams:
    """The measured ``RmiRealmParams`` fields: what the host chooses at RMI_REALM_CREATE.

    Counts are as a person writes them (``num_bps = 6`` breakpoints; the RMM stores 5);
    ``sve_vl`` is the SVE vector length in bits, 0 when SVE is off.
    """

    s2sz: int
    num_bps: int
    num_wps: int
    hash_algorithm: str = "sha256"
    sve_vl: int = 0
    pmu: bool = False
    pmu_num_ctrs: int = 0
    lpa2: bool = False

    def __post_init__(self) -> None:
        if self.hash_algorithm not in HASH_ALGORITHMS:
            raise MeasurementError(f"unknown CCA hash algorithm '{self.hash_algorithm}' "
                                   f"(choose from {', '.join(HASH_ALGORITHMS)})")
        hi = 52 if self.lpa2 else 48
        if not 20 <= self.s2sz <= hi:  # TF-RMM: at least 3 levels' worth, at most 48 (52 with LPA2)
            raise MeasurementError(f"IPA width {self.s2sz} bits is out of range (20..{hi}"
                                   f"{'' if self.lpa2 else '; up to 52 with LPA2'})")
        for name, value in (("breakpoints", self.num_bps), ("watchpoints", self.num_wps)):
            if not 2 <= value <= 64:
                raise MeasurementError(f"{value} {name}: the architecture has 2..64")
        if self.sve_vl and (self.sve_vl % 128 or not 128 <= self.sve_vl <= 2048):
            raise MeasurementError(f"SVE vector length {self.sve_vl} bits is not a multiple of 128 in 128..2048")
        if not 0 <= self.pmu_num_ctrs <= 31:
            raise MeasurementError(f"{self.pmu_num_ctrs} PMU counters: the architecture has 0..31")

    @property
    def flags(self) -> int:
        return (FLAG_LPA2 if self.lpa2 else 0) | (FLAG_SVE if self.sve_vl else 0) | (FLAG_PMU if self.pmu else 0)

    @property
    def digest_size(self) -> int:
        return _DIGEST_SIZE[self.hash_algorithm]

    def page(self) -> bytes:
        """The 4096-byte ``RmiRealmParams`` as measured: only flags, s2sz, sve_vl (VQ), num_bps - 1,
        num_wps - 1, pmu_num_ctrs and hash_algo (RPV, VMID, RTT fields are not measured)."""
        vq = self.sve_vl // 128 - 1 if self.sve_vl else 0
        head = struct.pack("<QQQQQQQ", self.flags, self.s2sz, vq, self.num_bps - 1, self.num_wps - 1,
                           self.pmu_num_ctrs if self.pmu else 0, HASH_ALGORITHMS[self.hash_algorithm])
        return head + bytes(GRANULE - len(head))

    def to_json(self) -> dict[str, Any]:
        return {"ipa_bits": self.s2sz, "breakpoints": self.num_bps, "watchpoints": self.num_wps,
                "hash": self.hash_algorithm, "sve_vl": self.sve_vl, "pmu": self.pmu,
                "pmu_counters": self.pmu_num_ctrs if self.pmu else 0, "lpa2": self.lpa2}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RealmParams:
        try:
            return cls(s2sz=int(d["ipa_bits"]), num_bps=int(d["breakpoints"]), num_wps=int(d["watchpoints"]),
                       hash_algorithm=str(d.get("hash", "sha256")), sve_vl=int(d.get("sve_vl", 0)),
                       pmu=bool(d.get("pmu", False)), pmu_num_ctrs=int(d.get("pmu_counters", 0)),
                       lpa2=bool(d.get("lpa2", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MeasurementError(f"realm parameters: missing or invalid {exc}") from None


@record
class Realm:
    """What the RIM of an IGVM file needs from outside it: realm parameters (without the hash,
    which the file's CCA_POLICY names) and the guest RAM ranges ``(base, size)``."""

    params: RealmParams
    ram: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.ram:
            raise MeasurementError("a CCA realm needs at least one guest RAM range")
        limit = 1 << (self.params.s2sz - 1)
        for base, size in self.ram:
            if size <= 0:
                raise MeasurementError(f"guest RAM range at {base:#x} has size {size:#x}")
            if base + size > limit:
                raise MeasurementError(
                    f"guest RAM {base:#x}..{base + size:#x} does not fit in the protected IPA space of a "
                    f"{self.params.s2sz}-bit realm (below {limit:#x}); raise the IPA width", gpa=base)

    def to_json(self) -> dict[str, Any]:
        return {**self.params.to_json(), "ram": [{"base": f"{b:#x}", "size": f"{s:#x}"} for b, s in self.ram]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Realm:
        try:
            ram = tuple((_int(r["base"]), _int(r["size"])) for r in d["ram"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MeasurementError(f"realm RAM ranges: missing or invalid {exc}") from None
        return cls(RealmParams.from_json(d), ram)


def _int(v: Any) -> int:
    return v if isinstance(v, int) else int(str(v), 0)


# --------------------------------------------------------------------------- RTT block sizes (Part A §5)


def block_sizes(s2sz: int) -> tuple[int, ...]:
    """RTT entry sizes available to a realm of ``s2sz`` IPA bits, largest first: the starting level
    uses concatenated tables when it would resolve 4 bits or fewer (as KVM does)."""
    table_bits = s2sz - 12
    levels = -(-table_bits // 9)
    if table_bits - 9 * (levels - 1) <= 4:
        levels -= 1
    return tuple(GRANULE << (9 * (3 - level)) for level in range(4 - levels, 4))


def ripas_entries(base: int, top: int, s2sz: int) -> Iterator[tuple[int, int]]:
    """The RTT entries RMI_RTT_INIT_RIPAS covers over ``[base, top)``: at each address the largest
    block that is aligned there and ends at or below ``top``."""
    sizes = block_sizes(s2sz)
    a = base
    while a < top:
        for s in sizes:
            if a % s == 0 and a + s <= top:
                break
        else:  # pragma: no cover - granule alignment is checked by the caller
            raise MeasurementError(f"RIPAS range {base:#x}..{top:#x} is not granule aligned", gpa=a)
        yield a, a + s
        a += s


def ram_ripas_range(base: int, size: int) -> tuple[int, int]:
    """The INIT_RIPAS range of a RAM range: granule-aligned outwards (``realm_config.rs``)."""
    lo = base - base % GRANULE
    hi = base + size - 1
    return lo, hi - hi % GRANULE + GRANULE


# --------------------------------------------------------------------------- the chain


@record(frozen=False)
class RimChain:
    """The RIM as the RMM extends it.  ``trace`` (when asked for) records every step as the
    shared vectors' ``trace_*.jsonl`` do."""

    params: RealmParams
    record: bool = False
    trace: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    _h: Callable[[bytes | bytearray | memoryview], Any] = field(init=False, repr=False)
    _rim: bytes = field(init=False, repr=False)
    _pad: bytes = field(init=False, repr=False)
    _data_desc: bytearray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._h = getattr(hashlib, self.params.hash_algorithm)
        self._pad = bytes(64 - self.params.digest_size)
        self._data_desc = bytearray(DESC_LEN)
        struct.pack_into("<B7xQ", self._data_desc, 0, DESC_DATA, DESC_LEN)
        self._rim = self._m(self.params.page())
        self._log(op="REALM_CREATE", params_head=self.params.page()[:0x38].hex())

    def _m(self, data: bytes | memoryview) -> bytes:
        """H(data) zero-extended to 64 bytes (the RMM's RmmRealmMeasurement)."""
        d: bytes = self._h(data).digest()
        return d + bytes(64 - len(d))

    def _log(self, **step: Any) -> None:
        self.steps += 1
        if self.record:
            self.trace.append({**step, "rim": self.rim.hex()})

    @property
    def rim(self) -> bytes:
        return self._rim[:self.params.digest_size]

    def _extend(self, desc_type: int, body: bytes) -> None:
        desc = struct.pack("<B7xQ", desc_type, DESC_LEN) + self._rim + body
        self._rim = self._m(desc + bytes(DESC_LEN - len(desc)))

    def init_ripas(self, base: int, top: int) -> int:
        """RMI_RTT_INIT_RIPAS over ``[base, top)``: one descriptor per RTT entry; returns how many."""
        n = 0
        for a, b in ripas_entries(base, top, self.params.s2sz):
            self._extend(DESC_RIPAS, struct.pack("<QQ", a, b))
            self._log(op="INIT_RIPAS", base=f"{a:#x}", top=f"{b:#x}")
            n += 1
        return n

    def data(self, ipa: int, page: bytes | memoryview | None) -> None:
        """RMI_DATA_CREATE of one granule: measured content (``page``, 4096 bytes) or, with
        ``None``, RMI_NO_MEASURE_CONTENT."""
        if page is None:
            self._extend(DESC_DATA, struct.pack("<QQ", ipa, 0) + bytes(64))
            self._log(op="DATA_CREATE", ipa=f"{ipa:#x}", flags=0)
            return
        # the hot path (one per page): the descriptor is a reused buffer whose zero tail stays zero
        h, n, desc = self._h, self.params.digest_size, self._data_desc
        content = h(page).digest()
        desc[0x10:0x10 + n] = self._rim[:n]
        _IPA_FLAGS.pack_into(desc, 0x50, ipa, RMI_MEASURE_CONTENT)
        desc[0x60:0x60 + n] = content
        self._rim = h(desc).digest() + self._pad
        if self.record:
            self._log(op="DATA_CREATE", ipa=f"{ipa:#x}", flags=1, content=content.hex())
        else:
            self.steps += 1

    def rec(self, flags: int, pc: int, gprs: Sequence[int]) -> bool:
        """RMI_REC_CREATE: extends the RIM only for a RUNNABLE REC; returns whether it did."""
        if not flags & REC_RUNNABLE:
            return False
        if len(gprs) != 8:
            raise MeasurementError(f"a REC has 8 argument registers x0..x7, got {len(gprs)}")
        page = bytearray(GRANULE)
        struct.pack_into("<Q", page, 0x000, flags)
        struct.pack_into("<Q", page, 0x200, pc)
        struct.pack_into("<8Q", page, 0x300, *gprs)
        content = self._m(bytes(page))
        self._extend(DESC_REC, content)
        self._log(op="REC_CREATE", flags=flags, pc=f"{pc:#x}", gprs=[f"{g:#x}" for g in gprs],
                  content=content[:self.params.digest_size].hex())
        return True


def compute_rim(params: RealmParams, ram: Sequence[tuple[int, int]],
                data: Sequence[tuple[int, bytes | memoryview | None]],
                recs: Sequence[tuple[int, int, Sequence[int]]], *, record: bool = False) -> RimChain:
    """The RIM of an explicit call list: REALM_CREATE, INIT_RIPAS over each RAM range (ascending),
    DATA_CREATE per ``(ipa, page or None)`` in the order given, REC_CREATE per ``(flags, pc, x0..x7)``."""
    chain = RimChain(params, record=record)
    for base, size in sorted(ram):
        chain.init_ripas(*ram_ripas_range(base, size))
    for ipa, page in data:
        chain.data(ipa, page)
    for flags, pc, gprs in recs:
        chain.rec(flags, pc, gprs)
    return chain


# --------------------------------------------------------------------------- an IGVM file (Part B)


def cca_policy(f: IgvmFile, mask: int) -> H.CcaPolicy | None:
    for h in f.initializations:
        if isinstance(h, H.CcaPolicy) and h.compatibility_mask & mask:
            return h
    return None


def file_hash_algorithm(f: IgvmFile, mask: int) -> str:
    """The realm's hash algorithm: the CCA_POLICY's ``hash_algorithm`` (same encoding as RMM's)."""
    pol = cca_policy(f, mask)
    if pol is None:
        raise MeasurementError(f"no CCA_POLICY for the CCA platform (mask {mask:#x}): the realm's hash "
                               "algorithm is not known")
    return HASH_NAMES[pol.hash_algorithm]


def file_ipa_bits(f: IgvmFile, mask: int) -> int | None:
    """The IPA width the file suggests: ``shared_gpa_boundary = 1 << (s2sz - 1)`` (CCA.md Part B §2's
    suggested convention, which this builder follows), or None when the boundary is not a power of two."""
    p = f.platform_for_mask(mask)
    b = p.shared_gpa_boundary if p is not None else 0
    if b and not b & (b - 1) and 19 <= b.bit_length() <= 52:
        return b.bit_length()
    return None


def cca_context_fields(h: H.CcaVpContext) -> tuple[list[int], int, int]:
    """(x0..x7, pc, flags) of a CCA VP context."""
    *gprs, pc, flags = CCA_CONTEXT.unpack(bytes(h.context))
    return list(gprs), pc, flags


@record
class RimResult:
    rim: bytes
    hash_algorithm: str
    steps: int
    ripas: int
    data_measured: int
    data_unmeasured: int
    recs: int
    notes: tuple[str, ...]
    trace: tuple[dict[str, Any], ...] = ()


def measure_cca(f: IgvmFile, realm: Realm, *, mask: int | None = None, record: bool = False) -> RimResult:
    """The RIM of ``f``'s CCA platform launched as ``realm`` (the hash algorithm is the file's: a
    ``realm.params.hash_algorithm`` that differs is an error)."""
    if mask is None:
        p = f.platform(PlatformType.CCA)
        if p is None:
            raise MeasurementError("the file has no CCA platform")
        mask = p.compatibility_mask
    alg = file_hash_algorithm(f, mask)
    params = realm.params
    if params.hash_algorithm != alg:
        params = replace(params, hash_algorithm=alg)
    notes: list[str] = []
    if alg == "sha384":
        notes.append(SHA384_NOTE)
    limit = 1 << (params.s2sz - 1)
    chain = RimChain(params, record=record)
    ripas = 0
    for base, size in sorted(realm.ram):
        ripas += chain.init_ripas(*ram_ripas_range(base, size))
    areas = {h.parameter_area_index: h.number_of_bytes for h in f.directives if isinstance(h, H.ParameterArea)}
    measured = unmeasured = 0
    contexts: dict[int, H.CcaVpContext] = {}
    seen: set[int] = set()
    last_gpa = -1
    unsorted = False
    skipped_types = 0
    shared = 0

    def check_ipa(gpa: int) -> None:
        if gpa + GRANULE > limit:
            raise MeasurementError(f"page at {gpa:#x} is outside the protected IPA space of a {params.s2sz}-bit "
                                   f"realm (below {limit:#x})", gpa=gpa)
        if gpa in seen:
            raise MeasurementError("two pages at the same GPA: RMI_DATA_CREATE fails on a granule already "
                                   "assigned", gpa=gpa)
        seen.add(gpa)

    for h in f.initializations:
        if isinstance(h, H.RelocatableRegion | H.PageTableRelocation) and h.compatibility_mask & mask:
            raise MeasurementError("a relocatable region for the CCA platform: relocation changes the IPAs and so "
                                   "the RIM; a CCA loader must not relocate")
    unmeasured_flag, shared_flag = int(PageDataFlags.UNMEASURED), int(PageDataFlags.SHARED)
    releaser = PageReleaser()
    last_slice: FileSlice | None = None
    for h in f.directives:
        m = h.mask
        if m is not None and m & mask != mask:
            continue
        if isinstance(h, H.PageData):
            if h.flags & shared_flag:
                shared += 1  # unprotected IPA space: host memory, not realm data
                continue
            if h.data_type != PageDataType.NORMAL:
                skipped_types += 1
                continue
            check_ipa(h.gpa)
            if h.gpa < last_gpa:
                unsorted = True
            last_gpa = h.gpa
            if h.flags & unmeasured_flag:
                chain.data(h.gpa, None)
                unmeasured += 1
                continue
            data = h.data
            view = as_view(data)
            page = view if len(view) == GRANULE else bytes(view) + bytes(GRANULE - len(view))
            chain.data(h.gpa, page)
            measured += 1
            if type(data) is FileSlice:  # hashed: let the page leave the resident set
                releaser.note(data)
                last_slice = data
        elif isinstance(h, H.ParameterInsert):
            for i in range(-(-areas.get(h.parameter_area_index, 0) // GRANULE)):
                gpa = h.gpa + i * GRANULE
                check_ipa(gpa)
                chain.data(gpa, None)
                unmeasured += 1
        elif isinstance(h, H.CcaVpContext):
            if h.vp_index in contexts:
                raise MeasurementError(f"two VP contexts for vCPU {h.vp_index}")
            contexts[h.vp_index] = h
    releaser.release(last_slice)
    recs = 0
    for vp in sorted(contexts):
        gprs, pc, flags = cca_context_fields(contexts[vp])
        recs += chain.rec(flags, pc, gprs)
    if 0 not in contexts or not recs:
        notes.append("no runnable VP context: no REC is measured (the realm has no runnable vCPU)")
    if unsorted:
        notes.append("page data is not in ascending GPA order: the RIM is that of a loader creating the "
                     "granules in file order")
    if unmeasured:
        notes.append(f"{unmeasured} page(s) are created unmeasured (flags 0): their addresses are in the RIM, "
                     "their contents are not")
    if skipped_types:
        notes.append(f"{skipped_types} SECRETS/CPUID page(s) (SEV-SNP concepts) are not created in a realm")
    if shared:
        notes.append(f"{shared} shared page(s) are host memory (unprotected IPA space), not in the RIM")
    return RimResult(rim=chain.rim, hash_algorithm=alg, steps=chain.steps, ripas=ripas, data_measured=measured,
                     data_unmeasured=unmeasured, recs=recs, notes=tuple(notes), trace=tuple(chain.trace))


#: Why a CCA file has no digest without realm parameters.
NO_REALM_NOTE = ("the CCA RIM needs the realm parameters (IPA width, breakpoints, watchpoints, SVE, PMU, "
                 "LPA2) and guest RAM ranges, which are not in the file: give them to measure (--cca-realm "
                 "REF.json, or --cca-ram, --cca-breakpoints, --cca-watchpoints)")


def cca_measurement(f: IgvmFile, mask: int, realm: Realm | None) -> Measurement:
    """The CCA platform ``mask`` of ``f`` as an engine :class:`Measurement` (``variant`` names the
    RMM model; no digest without ``realm``)."""
    if realm is None:
        return Measurement(PlatformType.CCA, mask, None, None, notes=(NO_REALM_NOTE,))
    res = measure_cca(f, realm, mask=mask)
    return Measurement(PlatformType.CCA, mask, res.hash_algorithm, res.rim, steps=res.steps, notes=res.notes)
