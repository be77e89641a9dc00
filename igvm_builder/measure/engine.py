"""One pass over an IGVM file's directives feeding every platform's launch measurement.

Algorithms (``shared/spec/MEASUREMENT.md``):

* SEV-SNP (§1): ``LD = SHA-384(LD ‖ PAGE_INFO)`` per page, PAGE_INFO = contents digest,
  length 0x70, page type, GPA; loader rules from :mod:`~igvm_builder.measure.profiles`.
* TDX MRTD (§8): one running SHA-384 over 128-byte ``MEM.PAGE.ADD`` records and
  ``MR.EXTEND`` records followed by 256 data bytes; single pass (page add then its 16
  extends) or two pass (per region: all adds, then all extends).
* VBS (§9): chained SHA-256 over 0x1020-byte page chunks, then 48-byte register chunks.
* SEV / SEV-ES: SHA-256 over the measured pages with data (and the VMSA pages for SEV-ES),
  the digest sev-snp-measure prints for such launches.

Large files: page data is hashed straight from the file's mmap, platforms run in parallel
threads, the TDX records are hashed in 200 KiB batches (few GIL hand-overs), and pages already
hashed are dropped from the resident set (:class:`~igvm_builder.format.blob.PageReleaser`), so memory does not grow with
the file's data.  ``benchmarks/bench_measure.py`` measures it.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from igvm_builder.errors import MeasurementError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, PageReleaser, as_view
from igvm_builder.format.defs import PAGE_SIZE_4K, Architecture, PageDataFlags, PageDataType, PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.format.pages import PageDigests, PageDigestStream, PageRun
from igvm_builder.measure.profiles import KVM_VMSA_GPA, LoaderProfile, get_profile
from igvm_builder.measure.result import Measurement

ZERO_PAGE = bytes(PAGE_SIZE_4K)
_SHA384_ZERO_PAGE = hashlib.sha384(ZERO_PAGE).digest()
_ZERO48 = bytes(48)

SNP_NORMAL, SNP_VMSA, SNP_ZERO, SNP_UNMEASURED, SNP_SECRETS, SNP_CPUID = 1, 2, 3, 4, 5, 6
SNP_PAGE_TYPE_NAMES = {1: "NORMAL", 2: "VMSA", 3: "ZERO", 4: "UNMEASURED", 5: "SECRETS", 6: "CPUID"}
_PAGE_INFO_TAIL = struct.Struct("<HBBIQ")  # length, page_type, imi_page, vmpl perms (4 x u8), gpa

# Plain ints: ``int & IntFlag`` goes through enum's Python-level operators, which cost
# more than the hashing on a large file.
_UNMEASURED = int(PageDataFlags.UNMEASURED)
_SHARED = int(PageDataFlags.SHARED)
_IS_2MB = int(PageDataFlags.IS_2MB_PAGE)
_PAGES_PER_2MB = 0x200000 // PAGE_SIZE_4K
_DT_NORMAL = int(PageDataType.NORMAL)
_DT_SECRETS = int(PageDataType.SECRETS)
_DT_CPUID = (int(PageDataType.CPUID_DATA), int(PageDataType.CPUID_XF))


# --------------------------------------------------------------------------- page data access


def _page_view(data: H.BlobLike) -> memoryview | bytes:
    """The 4 KiB a page measures: its data, zero-padded (a parsed file already holds 4 KiB)."""
    view = as_view(data)
    n = len(view)
    return view if n == PAGE_SIZE_4K else bytes(view) + ZERO_PAGE[n:]


# --------------------------------------------------------------------------- per-platform state


#: CPU model of reset-state VMSAs when none is given (the config's ``snp.vcpu_type`` default).
DEFAULT_VCPU_TYPE = "EPYC-v4"


class _Snp:
    def __init__(self, profile: LoaderProfile, mask: int, vcpus: int | None = None,
                 vcpu_type: str | int | None = None) -> None:
        self.p = profile
        self.mask = mask
        self.vcpus = vcpus
        self.vcpu_type = DEFAULT_VCPU_TYPE if vcpu_type is None else vcpu_type
        self.contexts: dict[int, bytes] = {}  # KVM loaders: vp_index -> the file's VMSA page
        self.ld = _ZERO48
        self.steps = 0
        self.deferred_vmsa: list[tuple[int, bytes]] = []
        self.sorted_steps: list[tuple[int, int, int, bytes]] = []  # (gpa, seq, type, contents)
        self.notes: list[str] = []
        self.releaser = PageReleaser()
        self.last_slice: FileSlice | None = None

    def step(self, gpa: int, page_type: int, contents: bytes) -> None:
        if self.p.sort_by_gpa:
            self.sorted_steps.append((gpa, len(self.sorted_steps), page_type, contents))
        else:
            self._extend(gpa, page_type, contents)

    def _extend(self, gpa: int, page_type: int, contents: bytes) -> None:
        """One SNP_LAUNCH_UPDATE chain step: LD = SHA-384(LD || PAGE_INFO)."""
        self.ld = hashlib.sha384(self.ld + contents + _PAGE_INFO_TAIL.pack(0x70, page_type, 0, 0, gpa)).digest()
        self.steps += 1

    def page(self, h: H.PageData) -> None:
        self.page_at(h.gpa, h.flags, h.data_type, h.data)

    def run(self, r: PageRun) -> None:
        """Each page of a run (no PageData made)."""
        gpa, flags, dtype = r.gpa, r.flags, r.data_type
        if flags & _SHARED and self.p.skip_shared:
            return
        if r.source is None and not flags & _IS_2MB and len(r.fill) and dtype == _DT_NORMAL and not flags & _UNMEASURED:
            # one page repeated: its contents digest once
            contents = hashlib.sha384(_page_view(r.fill)).digest()
            step = self.step
            for i in range(r.count):
                step(gpa + i * PAGE_SIZE_4K, SNP_NORMAL, contents)
            return
        for i in range(r.count):
            self.page_at(gpa + i * PAGE_SIZE_4K, flags, dtype, r.data_at(i))

    def page_at(self, gpa: int, flags: int, dtype: int, data: H.BlobLike) -> None:
        if flags & _SHARED and self.p.skip_shared:
            return
        if flags & _IS_2MB and self.p.expands_2mb_pages:
            if len(data):
                raise MeasurementError(
                    f"loader '{self.p.name}': the 2 MiB page at GPA {gpa:#x} carries {len(data)} bytes of data; "
                    "igvmmeasure takes none or 2 MiB (it aborts on this file)", gpa=gpa)
            for i in range(_PAGES_PER_2MB):  # each 4 KiB page of it, data-less
                self._page_4k(gpa + i * PAGE_SIZE_4K, flags, dtype, b"")
            return
        self._page_4k(gpa, flags, dtype, data)

    def _page_4k(self, gpa: int, flags: int, dtype: int, data: Any) -> None:
        if dtype == _DT_SECRETS:
            self.step(gpa, SNP_SECRETS, _ZERO48)
        elif dtype in _DT_CPUID:
            self.step(gpa, SNP_CPUID, _ZERO48)
        elif flags & _UNMEASURED:
            self.step(gpa, SNP_UNMEASURED, _ZERO48)
        else:
            if not len(data):
                if self.p.dataless_page_type == SNP_ZERO:
                    self.step(gpa, SNP_ZERO, _ZERO48)
                else:
                    self.step(gpa, SNP_NORMAL, _SHA384_ZERO_PAGE)
                return
            self.step(gpa, SNP_NORMAL, hashlib.sha384(_page_view(data)).digest())
            if type(data) is FileSlice:
                self.releaser.note(data)
                self.last_slice = data

    def insert(self, gpa: int, pages: int) -> None:
        for i in range(pages if self.p.insert_all_pages else 1):
            self.step(gpa + i * PAGE_SIZE_4K, SNP_UNMEASURED, _ZERO48)

    def vmsa(self, h: H.SnpVpContext) -> None:
        if self.p.vmsa_last_at_kvm_gpa:
            if h.gpa != KVM_VMSA_GPA:
                raise MeasurementError(
                    f"loader '{self.p.name}' rejects the VMSA of vp {h.vp_index} at GPA {h.gpa:#x}: KVM measures "
                    f"VMSAs at {KVM_VMSA_GPA:#x} only", gpa=h.gpa)
            if self.p.kvm_vmm:
                if h.vp_index in self.contexts:
                    raise MeasurementError(f"loader '{self.p.name}': two VP contexts for vp {h.vp_index}")
                self.contexts[h.vp_index] = bytes(as_view(h.blob()))
                return
            self.deferred_vmsa.append((KVM_VMSA_GPA, hashlib.sha384(as_view(h.blob())).digest()))
        else:
            self.step(h.gpa, SNP_VMSA, hashlib.sha384(as_view(h.blob())).digest())

    def kvm_vmsas(self) -> None:
        """One measured VMSA per vCPU, in vCPU order (KVM ``snp_launch_update_vmsa``): the VMM's
        transform of the file's VP context, or its reset state for a vCPU without one."""
        pages = _kvm_pages(self.p, self.contexts, self.vcpus, self.vcpu_type)
        for measured in pages:
            self.deferred_vmsa.append((KVM_VMSA_GPA, hashlib.sha384(measured).digest()))
        self.vcpus = len(pages)

    def finish(self) -> bytes:
        self.releaser.release(self.last_slice)
        for gpa, _seq, ptype, contents in sorted(self.sorted_steps):  # GPA-sorting loaders only
            self._extend(gpa, ptype, contents)
        self.sorted_steps = []
        if self.p.kvm_vmm:
            self.kvm_vmsas()
        for gpa, digest in self.deferred_vmsa:
            self._extend(gpa, SNP_VMSA, digest)
        return self.ld


def _kvm_pages(p: LoaderProfile, contexts: dict[int, bytes], vcpus: int | None, vcpu_type: str | int) -> list[bytes]:
    """The VMSA KVM measures for each vCPU, in vCPU order (``snp_launch_update_vmsa``): the VMM's
    transform of the file's VP context for that vCPU, or its reset state without one."""
    from igvm_builder.kvm_vmsa import measured_vmsa, reset_vmsa

    vmm = p.kvm_vmm
    assert vmm is not None
    n = vcpus
    if n is None:
        n = max(contexts) + 1 if contexts else 0
    beyond = sorted(i for i in contexts if i >= n)
    if beyond:
        raise MeasurementError(f"loader '{p.name}': the file has a VP context for vp {beyond[0]} but the "
                               f"launch has {n} vCPU(s) (the VMM has no such vCPU); give --vcpus "
                               f"{max(contexts) + 1} or more")
    if n and 0 not in contexts:
        raise MeasurementError(f"loader '{p.name}': no VP context for vp 0, whose sev_features KVM "
                               "applies to every vCPU")
    vp0 = int.from_bytes(contexts[0][0x3B0:0x3B8], "little") if n else 0
    out = []
    for i in range(n):
        page = contexts.get(i)
        if page is None:
            out.append(reset_vmsa(vmm, sev_features=vp0, vcpu_signature=vcpu_type))
        else:
            out.append(measured_vmsa(page, vmm, vp_index=i, vp0_features=None if i == 0 else vp0))
    return out


def _check_vcpus(vcpus: int | None, vcpu_type: str | int | None) -> None:
    if vcpus is not None and vcpus < 1:
        raise MeasurementError(f"vCPU count must be at least 1, got {vcpus}")
    if vcpu_type is not None:
        from igvm_builder.errors import ConfigError
        from igvm_builder.sev_vmsa import vcpu_signature

        try:
            vcpu_signature(vcpu_type)
        except ConfigError as exc:
            raise MeasurementError(exc.message) from None


def measured_vmsa_pages(f: IgvmFile, *, loader: str | None = None, vcpus: int | None = None,
                        vcpu_type: str | int | None = None) -> list[bytes]:
    """The SEV-SNP VMSA pages ``loader`` measures for ``f``, in measurement order.

    On ``qemu`` / ``cloud-hypervisor``: one per vCPU, as the VMM and KVM rebuild them (what the
    host's ``sev_es_sync_vmsa`` dynamic-debug dump shows, ``shared/spec/KVM_VMSA.md`` §8); on the
    other profiles the file's VMSA pages as they are.  :class:`MeasurementError` as
    :func:`measure_platform` would raise it.
    """
    _check_vcpus(vcpus, vcpu_type)
    p = f.platform(PlatformType.SEV_SNP)
    if p is None:
        raise MeasurementError("the file has no SEV_SNP platform")
    profile = get_profile(loader)
    mask = p.compatibility_mask
    acc = _Snp(profile, mask, vcpus, vcpu_type)
    pages: list[bytes] = []
    for h in _applicable(f, mask):
        if isinstance(h, H.SnpVpContext):
            if profile.kvm_vmm:
                acc.vmsa(h)  # the GPA and duplicate checks
            else:
                pages.append(bytes(as_view(h.blob())))
    if profile.kvm_vmm:
        return _kvm_pages(profile, acc.contexts, vcpus, acc.vcpu_type)
    return pages


_TDX_ADD = b"MEM.PAGE.ADD".ljust(16, b"\0")
_TDX_EXT = b"MR.EXTEND".ljust(16, b"\0")
#: One 128-byte TDH.MEM.PAGE.ADD record.
_TDX_ADD_REC = struct.Struct("<16sQ104x")
#: The 16 TDH.MR.EXTEND records of a page, each followed by its 256 data bytes (6 KiB).
_TDX_EXT_RECS = struct.Struct("<" + "16sQ104x256s" * 16)
#: PAGE.ADD followed by the page's 16 extends: what a single-pass page hashes (6272 bytes).
_TDX_PAGE_RECS = struct.Struct("<16sQ104x" + "16sQ104x256s" * 16)
#: A 4 KiB page as sixteen 256-byte chunks, in one C call.
_TDX_CHUNKS = struct.Struct("256s" * 16)
_TDX_ZERO_CHUNKS = _TDX_CHUNKS.unpack(ZERO_PAGE)


class _Tdx:
    """Records are packed with one precompiled struct per page (argument list reused) into
    a buffer of :data:`BATCH_BYTES`, hashed with one ``update`` per buffer: hashlib then
    releases the GIL for long stretches, so another platform's thread is not slowed down by
    a GIL hand-over per page."""

    BATCH_BYTES = 32 * _TDX_PAGE_RECS.size

    def __init__(self, two_pass: bool) -> None:
        self.h = hashlib.sha384()
        self.buf = bytearray(self.BATCH_BYTES)
        self.used = 0
        self.two_pass = two_pass
        self.steps = 0
        self.releaser = PageReleaser()
        self.last_slice: FileSlice | None = None
        # single pass: [ADD tag, gpa, (EXT tag, chunk gpa, chunk) x 16]
        self._page_args: list[object] = [_TDX_EXT] * 50
        self._page_args[0] = _TDX_ADD
        # extends only: [(EXT tag, chunk gpa, chunk) x 16]
        self._ext_args: list[object] = [_TDX_EXT] * 48
        # two-pass: a region of consecutive pages (same measured flag) -> adds, then extends
        self.region: list[H.BlobLike | None] = []
        self.region_start = 0
        self.region_measured = False

    def _chunks(self, data: H.BlobLike | None) -> tuple[bytes, ...]:
        if data is None or not len(data):
            return _TDX_ZERO_CHUNKS
        chunks = _TDX_CHUNKS.unpack(_page_view(data))
        if type(data) is FileSlice:
            self.releaser.note(data)
            self.last_slice = data
        return chunks

    def _put(self, rec: struct.Struct, args: Sequence[object]) -> None:
        if self.used + rec.size > self.BATCH_BYTES:
            self._drain()
        rec.pack_into(self.buf, self.used, *args)
        self.used += rec.size

    def _drain(self) -> None:
        if self.used:
            with memoryview(self.buf) as view:
                self.h.update(view[: self.used])
            self.used = 0

    def _add(self, gpa: int) -> None:
        self._put(_TDX_ADD_REC, (_TDX_ADD, gpa))
        self.steps += 1

    def _extend(self, gpa: int, data: H.BlobLike | None) -> None:
        args = self._ext_args
        args[1::3] = range(gpa, gpa + PAGE_SIZE_4K, 256)
        args[2::3] = self._chunks(data)
        self._put(_TDX_EXT_RECS, args)
        self.steps += 16

    def page(self, gpa: int, measured: bool, data: H.BlobLike | None) -> None:
        if not self.two_pass:
            if not measured:
                self._add(gpa)
                return
            args = self._page_args
            args[1] = gpa
            args[3::3] = range(gpa, gpa + PAGE_SIZE_4K, 256)
            args[4::3] = self._chunks(data)
            self._put(_TDX_PAGE_RECS, args)
            self.steps += 17
            return
        if self.region and (gpa != self.region_start + len(self.region) * PAGE_SIZE_4K
                            or measured != self.region_measured):
            self.flush()
        if not self.region:
            self.region_start = gpa
            self.region_measured = measured
        self.region.append(data if measured else None)

    def flush(self) -> None:
        if not self.region:
            return
        start = self.region_start
        for i in range(len(self.region)):
            self._add(start + i * PAGE_SIZE_4K)
        if self.region_measured:
            for i, data in enumerate(self.region):
                self._extend(start + i * PAGE_SIZE_4K, data)
        self.region = []

    def finish(self) -> bytes:
        self.flush()
        self._drain()
        self.releaser.release(self.last_slice)
        return self.h.digest()


class _TdxRuns:
    """The TDX records of runs of consecutive pages, built with numpy in a few vectorized copies.

    A run is ``n`` measured 4 KiB pages that are consecutive both in guest memory and in one
    buffer (an initrd or a kernel, page after page: nearly all the bytes of a large file).
    Their single-pass records (PAGE.ADD, then 16 x (MR.EXTEND + 256 bytes)) are laid out with
    strided copies of up to :data:`PAGES` pages at a time instead of one ``struct`` call per
    page, so the thread holds the GIL for a few microseconds per batch and spends the rest of
    its time in hashlib, which releases it: another platform measured in a second thread is
    not held up.  The bytes hashed are exactly those of :class:`_Tdx`'s page path.
    """

    PAGES = 64

    def __init__(self, np: Any) -> None:
        self.np = np
        rows = np.zeros((self.PAGES, _TDX_PAGE_RECS.size), np.uint8)
        rows[:, :16] = np.frombuffer(_TDX_ADD, np.uint8)
        self.ext = rows[:, 128:].reshape(self.PAGES, 16, 384)  # 16 x (record, 256 data bytes)
        self.ext[:, :, :16] = np.frombuffer(_TDX_EXT, np.uint8)
        self.rows = rows
        self.words = rows.view("<u8")  # GPA fields: word 2 (PAGE.ADD), 18 + 48k (extend k)
        self.chunk_offsets = np.arange(0, PAGE_SIZE_4K, 256, dtype=np.uint64)[None, :]

    def hash_run(self, h: Any, buf: memoryview, start: int, gpa: int, n: int) -> None:
        np = self.np
        for first in range(0, n, self.PAGES):
            b = min(self.PAGES, n - first)
            pages = np.frombuffer(buf, np.uint8, count=b * PAGE_SIZE_4K, offset=start + first * PAGE_SIZE_4K)
            base = gpa + first * PAGE_SIZE_4K
            gpas = np.arange(base, base + b * PAGE_SIZE_4K, PAGE_SIZE_4K, dtype=np.uint64)
            self.words[:b, 2] = gpas
            self.words[:b, 18::48] = gpas[:, None] + self.chunk_offsets
            self.ext[:b, :, 128:] = pages.reshape(b, 16, 256)
            h.update(self.rows[:b])


def _numpy() -> Any:
    """numpy, or None where it is missing (then every page goes through the ``struct`` path)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


#: Runs shorter than this (4 MiB) go through the per-page path: for small files (firmware),
#: importing numpy would cost more than it saves.
_TDX_MIN_RUN = 1024
#: A run's pages are dropped from the resident set every this many pages (1 MiB).
_TDX_RELEASE_PAGES = 256


_VBS_PAGE_HDR = struct.Struct("<IIQQQ")
_VBS_REG = struct.Struct("<IIQIBBHII16s")


class _Vbs:
    def __init__(self) -> None:
        self.d = bytes(32)
        self.steps = 0
        self.registers: list[tuple[int, int, bytes]] = []

    def page(self, gpa: int, data: H.BlobLike | None, unmeasured: bool, acceptance: int = 0) -> None:
        metadata = acceptance | (4 if unmeasured else 0)
        body = ZERO_PAGE if unmeasured or data is None or not len(data) else as_view(data)
        h = hashlib.sha256(self.d)
        h.update(_VBS_PAGE_HDR.pack(0x1020, 2, 0, metadata, gpa // PAGE_SIZE_4K))
        h.update(body)
        if len(body) < PAGE_SIZE_4K:  # data shorter than a page is measured zero-padded
            h.update(ZERO_PAGE[len(body) :])
        self.d = h.digest()
        self.steps += 1

    def finish(self) -> bytes:
        for vtl, name, value in self.registers:
            self.d = hashlib.sha256(self.d + _VBS_REG.pack(48, 0, 0, 0, vtl, 0, 0, 0, name, value)).digest()
            self.steps += 1
        return self.d


class _Sev:
    def __init__(self, es: bool) -> None:
        self.h = hashlib.sha256()
        self.es = es
        self.steps = 0

    def page(self, h: H.PageData) -> None:
        if h.flags & (_UNMEASURED | _SHARED) or h.data_type != _DT_NORMAL:
            return
        blob = h.blob()
        if blob is not None:
            self.h.update(as_view(blob))
            self.steps += 1

    def page_at(self, flags: int, dtype: int, data: H.BlobLike) -> None:
        """A page of a run (its data 4 KiB or none)."""
        if flags & (_UNMEASURED | _SHARED) or dtype != _DT_NORMAL or not len(data):
            return
        self.h.update(as_view(data))
        self.steps += 1

    def finish(self) -> bytes:
        return self.h.digest()


# --------------------------------------------------------------------------- driver


def _applicable(f: IgvmFile, mask: int) -> Iterator[H.Header | PageRun]:
    """Directives measured for the platform bit ``mask``: mask-less ones and those containing it
    (runs of pages as runs)."""
    for h in f.directives.items():
        m = h.mask
        if m is None or m & mask == mask:
            yield h


#: Most data-less pages one platform's measurement may imply: parameter insertions (every page
#: of the area inserted) and, for VBS, error ranges.  These cost a launch step per page and
#: nothing in the file (a 36-byte header can name 4 GiB), so without a bound a 10 KB file could
#: take hours to measure.  262,144 pages is 1 GiB of guest address space, seconds of
#: work; override with the environment variable :data:`IMPLIED_PAGES_ENV` (docs/MEASUREMENT.md).
MAX_IMPLIED_PAGES = 1 << 18
IMPLIED_PAGES_ENV = "IGVM_BUILDER_MAX_IMPLIED_PAGES"


def implied_pages_limit() -> int:
    """:data:`MAX_IMPLIED_PAGES`, or the value of :data:`IMPLIED_PAGES_ENV` when set."""
    import os

    text = os.environ.get(IMPLIED_PAGES_ENV, "").strip()
    if not text:
        return MAX_IMPLIED_PAGES
    try:
        value = int(text, 0) if len(text) <= 32 else -1
    except ValueError:
        value = -1
    if value < 0:
        raise MeasurementError(f"{IMPLIED_PAGES_ENV}={text[:32]!r} is not a page count")
    return value


def _check_implied_pages(f: IgvmFile, ptype: PlatformType, mask: int, areas: _Areas, profile: LoaderProfile
                         ) -> None:
    """Refuse, before any hashing, a file whose data-less pages (parameter insertions, VBS error
    ranges) for this platform exceed :func:`implied_pages_limit`.  (An area over
    :data:`MAX_AREA_BYTES` is left to :meth:`_Areas.pages`, which names the insert's GPA.)"""
    inserted = errors = 0
    one_per_insert = ptype == PlatformType.SEV_SNP and not profile.insert_all_pages
    for h in _applicable(f, mask):
        if isinstance(h, H.ParameterInsert):
            n = areas.get(h.parameter_area_index, 0)
            if n * PAGE_SIZE_4K <= MAX_AREA_BYTES:
                inserted += min(n, 1) if one_per_insert else n
        elif isinstance(h, H.ErrorRange) and ptype == PlatformType.VSM_ISOLATION:
            errors += -(-h.size_bytes // PAGE_SIZE_4K)
            if h.gpa + -(-h.size_bytes // PAGE_SIZE_4K) * PAGE_SIZE_4K > 1 << 64:
                raise MeasurementError(f"error range of {h.size_bytes:#x} bytes runs past the top of the 64-bit "
                                       "address space", gpa=h.gpa)
    limit = implied_pages_limit()
    if inserted + errors > limit:
        what = " and ".join(x for x in ((f"{inserted} parameter-area page(s) inserted" if inserted else ""),
                                        (f"{errors} error-range page(s)" if errors else "")) if x)
        raise MeasurementError(f"the {ptype.name} measurement would step through {inserted + errors} data-less "
                               f"pages ({what}); the limit is {limit} pages (set {IMPLIED_PAGES_ENV} to raise it)")


#: Largest parameter area measured (4 GiB).  The format allows a zero-filled area of up to 2^64
#: bytes; every loader holds an area in host memory, and measuring one page at a time an area of
#: terabytes would not end in a useful time, so larger areas are refused.
MAX_AREA_BYTES = 1 << 32


class _Areas(dict[int, int]):
    """Parameter area index -> its size in pages; :meth:`pages` checks an insert's area."""

    def pages(self, h: H.ParameterInsert) -> int:
        n = self.get(h.parameter_area_index, 0)
        if n * PAGE_SIZE_4K > MAX_AREA_BYTES:
            raise MeasurementError(f"parameter area {h.parameter_area_index} inserted here is "
                                   f"{n * PAGE_SIZE_4K:#x} bytes; areas over {MAX_AREA_BYTES:#x} bytes are not "
                                   "measured (no loader can hold one)", gpa=h.gpa)
        if h.gpa + n * PAGE_SIZE_4K > 1 << 64:  # found by the fuzz campaign: struct.error in TDX
            raise MeasurementError(f"parameter area {h.parameter_area_index} ({n * PAGE_SIZE_4K:#x} bytes) inserted "
                                   "here runs past the top of the 64-bit address space", gpa=h.gpa)
        return n


def _area_pages(f: IgvmFile) -> _Areas:
    return _Areas({h.parameter_area_index: h.number_of_bytes // PAGE_SIZE_4K
                   for h in f.directives.items() if isinstance(h, H.ParameterArea)})


def _run(f: IgvmFile, ptype: PlatformType, mask: int, profile: LoaderProfile, two_pass: bool,
         digests: Sequence[bytes | None] | PageDigestStream | None = None, vcpus: int | None = None,
         vcpu_type: str | int | None = None) -> Measurement:
    areas = _area_pages(f)
    _check_implied_pages(f, ptype, mask, areas, profile)
    if ptype == PlatformType.SEV_SNP:
        return _measure_snp(f, mask, areas, profile, digests, vcpus, vcpu_type)
    if ptype == PlatformType.TDX:
        return _measure_tdx(f, mask, areas, two_pass)
    if ptype == PlatformType.VSM_ISOLATION:
        return _measure_vbs(f, mask, areas)
    if ptype in (PlatformType.SEV, PlatformType.SEV_ES):
        return _measure_sev(f, ptype, mask)
    return Measurement(ptype, mask, None, None, notes=(f"{ptype.name} launches have no measurement",))


def _measure_snp(f: IgvmFile, mask: int, areas: _Areas, profile: LoaderProfile,
                 digests: Sequence[bytes | None] | PageDigestStream | None, vcpus: int | None, vcpu_type: str | int | None
                 ) -> Measurement:
    """The SEV-SNP launch digest of ``mask`` under ``profile``; ``digests``: page digests the
    serializer computed (``IgvmFile.layout(page_digests=True)``), by directive."""
    ptype = PlatformType.SEV_SNP
    if profile.requires_policy and not any(isinstance(h, H.GuestPolicy) and h.compatibility_mask & mask == mask
                                           for h in f.initializations):
        raise MeasurementError(f"no GUEST_POLICY for the SEV_SNP platform (mask {mask:#x}); the loader "
                               "cannot launch it")
    acc = _Snp(profile, mask, vcpus, vcpu_type)
    page_data, file_slice, sha384 = H.PageData, FileSlice, hashlib.sha384
    normal_tail = _PAGE_INFO_TAIL.pack(0x70, SNP_NORMAL, 0, 0, 0)[:-8]  # + the page's GPA
    fast = not profile.sort_by_gpa
    any_mask_vmsa = profile.vmsa_any_mask
    note = acc.releaser.note
    ld = acc.ld  # the chain, kept in a local on the fast path (acc.ld when acc works)
    steps = 0
    if digests is not None and len(digests) != len(f.directives):
        raise ValueError(f"{len(digests)} page digests for {len(f.directives)} directives")
    page_run = PageRun
    dpos = -1  # flat index of the directive h (of a run: its first page)
    for h in f.directives.items():
        dpos += 1
        if type(h) is page_run:
            assert isinstance(h, PageRun)
            n = h.count
            dpos += n - 1
            if h.compatibility_mask & mask != mask:
                continue
            source = h.source
            if fast and not h.flags and not h.data_type and source is not None:
                # the page fast path below, for each page of a run of file data
                gpa, start = h.gpa, h.start
                first = dpos - n + 1
                view = digests.run(first, n) if isinstance(digests, PageDigests) else None
                if view is not None:  # the serializer's digests of the run, read in place
                    known: Iterable[bytes | memoryview | None] = (view[k : k + 48] for k in range(0, 48 * n, 48))
                elif isinstance(digests, PageDigestStream):  # as the layout beside us makes them
                    known = digests.iter_run(first, n)
                elif digests is not None:
                    known = (digests[k] for k in range(first, dpos + 1))
                else:
                    known = itertools.repeat(None, n)
                for contents in known:
                    if contents is None:
                        contents = sha384(source[start : start + 4096]).digest()
                        acc.last_slice = page = file_slice(source, start, 4096)
                        note(page)
                    ld = sha384(ld + contents + normal_tail + gpa.to_bytes(8, "little")).digest()
                    gpa += 4096
                    start += 4096
                steps += n
            else:
                acc.ld = ld
                acc.run(h)
                ld = acc.ld
            continue
        contents = digests[dpos] if digests is not None else None
        if type(h) is page_data:
            if h.compatibility_mask & mask != mask:
                continue
            data = h.data
            # Fast path for the common page (a full 4 KiB of file data, no flags): the same
            # step as _Snp.page, inlined.
            if fast and not h.flags and not h.data_type and type(data) is file_slice and data.length == 4096:
                # the page's contents digest: the serializer's, when it computed them
                if contents is None:  # hashed here: the page is touched, release it later
                    contents = sha384(data.view()).digest()
                    note(data)
                    acc.last_slice = data
                ld = sha384(ld + contents + normal_tail + h.gpa.to_bytes(8, "little")).digest()
                steps += 1
            else:
                acc.ld = ld
                acc.page(h)
                ld = acc.ld
            continue
        m = h.mask
        if m is not None and m & mask != mask and not (any_mask_vmsa and isinstance(h, H.SnpVpContext)):
            continue
        acc.ld = ld
        if isinstance(h, H.PageData):
            acc.page(h)
        elif isinstance(h, H.ParameterInsert):
            acc.insert(h.gpa, areas.pages(h))
        elif isinstance(h, H.SnpVpContext):
            acc.vmsa(h)
        ld = acc.ld
    acc.ld = ld
    acc.steps += steps
    digest = acc.finish()
    if not profile.kvm_vmm:
        return Measurement(ptype, mask, "sha384", digest, loader=profile.name, steps=acc.steps)
    return Measurement(ptype, mask, "sha384", digest, loader=profile.name, steps=acc.steps, vcpus=acc.vcpus,
                       vcpu_type=str(acc.vcpu_type), vp_contexts=len(acc.contexts),
                       vcpus_source="file" if vcpus is None else "given", notes=_kvm_notes(acc))


def _vbs_value(r: H.VbsRegister, x64: bool) -> bytes:
    """The value a loader measures: the crate reads each register as its typed value and hashes
    that value re-encoded (:func:`igvm_builder.format.headers.vbs_register_value`)."""
    return H.vbs_register_value(r.name, r.value, x64)


def _measure_vbs(f: IgvmFile, mask: int, areas: _Areas) -> Measurement:
    ptype = PlatformType.VSM_ISOLATION
    vbs = _Vbs()
    for h in _applicable(f, mask):
        if isinstance(h, H.PageData | PageRun):
            if h.flags & _SHARED:
                continue
            if h.data_type != _DT_NORMAL:
                raise MeasurementError(f"VBS cannot measure a {PageDataType(h.data_type).name} page",
                                       gpa=h.gpa)
            if isinstance(h, PageRun):
                for i in range(h.count):
                    vbs.page(h.gpa + i * PAGE_SIZE_4K, h.data_at(i), bool(h.flags & _UNMEASURED))
            else:
                vbs.page(h.gpa, h.data, bool(h.flags & _UNMEASURED))
        elif isinstance(h, H.ParameterInsert):
            for i in range(areas.pages(h)):
                vbs.page(h.gpa + i * PAGE_SIZE_4K, None, True)
        elif isinstance(h, H.ErrorRange):
            for i in range(-(-h.size_bytes // PAGE_SIZE_4K)):
                vbs.page(h.gpa + i * PAGE_SIZE_4K, None, True, acceptance=3)
        elif isinstance(h, H.VbsVpContext):
            x64 = f.architecture == Architecture.X64
            vbs.registers += [(h.vtl, r.name, _vbs_value(r, x64)) for r in h.registers]
    return Measurement(ptype, mask, "sha256", vbs.finish(), steps=vbs.steps)


def _measure_sev(f: IgvmFile, ptype: PlatformType, mask: int) -> Measurement:
    sev = _Sev(ptype == PlatformType.SEV_ES)
    vmsas: list[H.SnpVpContext] = []
    for h in _applicable(f, mask):
        if isinstance(h, H.PageData):
            sev.page(h)
        elif isinstance(h, PageRun):
            for i in range(h.count):
                sev.page_at(h.flags, h.data_type, h.data_at(i))
        elif isinstance(h, H.SnpVpContext):
            vmsas.append(h)
    for v in vmsas:
        sev.h.update(as_view(v.blob()))
        sev.steps += 1
    return Measurement(ptype, mask, "sha256", sev.finish(), steps=sev.steps)


def _kvm_notes(acc: _Snp) -> tuple[str, ...]:
    n, k = acc.vcpus or 0, len(acc.contexts)
    notes = []
    if n > k:
        flavour = (f"QEMU's reset state, CPU model {acc.vcpu_type}" if acc.p.kvm_vmm == "qemu"
                   else "KVM's reset state")
        notes.append(f"{n} vCPUs: {n - k} reset-state VMSA(s) ({flavour}) measured after the file's {k} VP "
                     "context(s)")
    notes.append("VMSAs measured as the VMM and KVM rebuild them (shared/spec/KVM_VMSA.md; read from source, "
                 "not checked on SNP hardware)")
    return tuple(notes)


def _measure_tdx(f: IgvmFile, mask: int, areas: _Areas, two_pass: bool, *, vectorize: bool = True
                 ) -> Measurement:
    """MRTD of the TDX platform ``mask``.  In single-pass order, runs of consecutive whole pages
    of one buffer are hashed by :class:`_TdxRuns` (``vectorize`` and numpy available), every
    other page by :class:`_Tdx` page by page; both produce the same bytes, in file order."""
    tdx = _Tdx(two_pass)
    vectorize = vectorize and not two_pass
    runs: _TdxRuns | None = None  # made (and numpy imported) at the first run long enough
    page_data, file_slice = H.PageData, FileSlice
    note = tdx.releaser.note
    # the pending run: buffer, its first page (slice), buffer offset and GPA, page count
    run_buf: memoryview | None = None
    run_start = run_gpa = run_n = 0

    def flush() -> None:
        nonlocal run_buf, run_n, runs, vectorize
        if not run_n:
            return
        assert run_buf is not None
        if vectorize and runs is None and run_n >= _TDX_MIN_RUN:
            np = _numpy()
            runs = _TdxRuns(np) if np is not None else None
            vectorize = runs is not None
        if runs is not None and run_n >= _TDX_MIN_RUN:
            tdx._drain()  # keep the order of the records in the hash
            release = tdx.releaser.release
            for first in range(0, run_n, _TDX_RELEASE_PAGES):  # hashed pages leave the resident set
                n = min(_TDX_RELEASE_PAGES, run_n - first)
                start = run_start + first * PAGE_SIZE_4K
                runs.hash_run(tdx.h, run_buf, start, run_gpa + first * PAGE_SIZE_4K, n)
                note(FileSlice(run_buf, start, PAGE_SIZE_4K))
                release(FileSlice(run_buf, start + (n - 1) * PAGE_SIZE_4K, PAGE_SIZE_4K))
            tdx.steps += 17 * run_n
        else:
            for i in range(run_n):
                gpa = run_gpa + i * PAGE_SIZE_4K
                tdx.page(gpa, True, FileSlice(run_buf, run_start + i * PAGE_SIZE_4K, PAGE_SIZE_4K))
        run_buf, run_n = None, 0

    page_run = PageRun
    for h in f.directives.items():
        if type(h) is page_run:
            assert isinstance(h, PageRun)
            if h.compatibility_mask & mask != mask:
                continue
            flags = h.flags
            source = h.source
            if not two_pass and not flags and source is not None:
                # a run of file pages: joins the pending run, or starts one
                if run_n and source is run_buf and h.start == run_start + run_n * PAGE_SIZE_4K \
                        and h.gpa == run_gpa + run_n * PAGE_SIZE_4K:
                    run_n += h.count
                    continue
                flush()
                run_buf = source
                run_start, run_gpa, run_n = h.start, h.gpa, h.count
                continue
            flush()
            if flags & _SHARED:
                continue
            measured = not flags & _UNMEASURED
            for i in range(h.count):
                tdx.page(h.gpa + i * PAGE_SIZE_4K, measured, h.data_at(i))
            continue
        if type(h) is page_data:
            if h.compatibility_mask & mask != mask:
                continue
            flags = h.flags
            data = h.data
            if not two_pass and not flags and type(data) is file_slice and data.length == PAGE_SIZE_4K:
                if (run_n and data._buf is run_buf and data.start == run_start + run_n * PAGE_SIZE_4K
                        and h.gpa == run_gpa + run_n * PAGE_SIZE_4K):
                    run_n += 1
                    continue
                flush()
                run_buf = data._buf
                run_start, run_gpa, run_n = data.start, h.gpa, 1
                continue
            flush()
            if flags & _SHARED:
                continue
            tdx.page(h.gpa, not flags & _UNMEASURED, data)
            continue
        m = h.mask
        if m is not None and m & mask != mask:
            continue
        if isinstance(h, H.PageData):  # a PageData subclass: not seen in practice
            flush()
            if h.flags & _SHARED:
                continue
            tdx.page(h.gpa, not h.flags & _UNMEASURED, h.data)
        elif isinstance(h, H.ParameterInsert):
            flush()
            for i in range(areas.pages(h)):
                tdx.page(h.gpa + i * PAGE_SIZE_4K, False, None)
    flush()
    digest = tdx.finish()
    return Measurement(PlatformType.TDX, mask, "sha384", digest, variant="two-pass" if two_pass else "single-pass",
                       steps=tdx.steps)


def measure_platform(f: IgvmFile, platform: PlatformType, *, loader: str | None = None,
                     tdx_two_pass: bool = False, page_digests: Sequence[bytes | None] | PageDigestStream | None = None,
                     vcpus: int | None = None, vcpu_type: str | int | None = None,
                     cca_realm: Any = None) -> Measurement:
    """Measure one platform of ``f``; :class:`MeasurementError` if the file lacks it.

    ``page_digests`` (for each directive, the SHA-384 of its 4 KiB page or None:
    ``IgvmFile.layout(page_digests=True).page_digests``) spares SEV-SNP hashing those pages again; a
    :class:`~igvm_builder.format.pages.PageDigestStream` the layout fills in another thread is read
    as it is filled (and detached when this returns or fails).  ``vcpus`` (the VMM's
    ``-smp``; default: the file's VP contexts) and ``vcpu_type`` (the ``-cpu`` model of the
    reset-state VMSAs; default EPYC-v4) matter for SEV-SNP on the KVM loaders only.
    ``cca_realm`` (a :class:`igvm_builder.measure.cca.Realm`: realm parameters and RAM ranges,
    which a CCA file does not carry) is what the CCA RIM needs; without it CCA has no digest.
    """
    if isinstance(page_digests, PageDigestStream):
        try:
            return _measure_platform(f, platform, loader, tdx_two_pass, page_digests, vcpus, vcpu_type, cca_realm)
        finally:
            page_digests.detach()  # read to the end, or failed: the layout must not wait for this thread
    return _measure_platform(f, platform, loader, tdx_two_pass, page_digests, vcpus, vcpu_type, cca_realm)


def _measure_platform(f: IgvmFile, platform: PlatformType, loader: str | None, tdx_two_pass: bool,
                      page_digests: Sequence[bytes | None] | PageDigestStream | None, vcpus: int | None,
                      vcpu_type: str | int | None, cca_realm: Any) -> Measurement:
    _check_vcpus(vcpus, vcpu_type)
    p = f.platform(platform)
    if p is None:
        have = ", ".join(x.platform_type.name for x in f.platforms)
        raise MeasurementError(f"the file has no {platform.name} platform (it has: {have})")
    if platform == PlatformType.CCA:
        from igvm_builder.measure.cca import cca_measurement

        return cca_measurement(f, p.compatibility_mask, cca_realm)
    return _run(f, platform, p.compatibility_mask, get_profile(loader), tdx_two_pass, page_digests, vcpus, vcpu_type)


def measure_file(f: IgvmFile, *, platforms: Sequence[PlatformType] | None = None, loader: str | None = None,
                 tdx_two_pass: bool = False, parallel: bool = True, vcpus: int | None = None,
                 vcpu_type: str | int | None = None, cca_realm: Any = None) -> tuple[Measurement, ...]:
    """Measure every (or the given) platform; platforms are hashed in parallel threads.

    hashlib releases the GIL while it hashes, so an SNP+TDX file measures in roughly the
    time of its slower platform on a machine with two cores.
    """
    targets = list(platforms) if platforms is not None else [p.platform_type for p in f.platforms]
    if not parallel or len(targets) < 2:
        return tuple(measure_platform(f, t, loader=loader, tdx_two_pass=tdx_two_pass, vcpus=vcpus,
                                      vcpu_type=vcpu_type, cca_realm=cca_realm) for t in targets)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(targets), thread_name_prefix="igvm-measure") as pool:
        jobs = [pool.submit(measure_platform, f, t, loader=loader, tdx_two_pass=tdx_two_pass, vcpus=vcpus,
                            vcpu_type=vcpu_type, cca_realm=cca_realm) for t in targets]
        return tuple(job.result() for job in jobs)  # the first platform's error, if any


def all_loader_digests(f: IgvmFile, loaders: Iterable[str], *, vcpus: int | None = None,
                       vcpu_type: str | int | None = None) -> dict[str, bytes | MeasurementError]:
    """SNP digest under each loader profile (or the error that loader would give)."""
    out: dict[str, bytes | MeasurementError] = {}
    for name in loaders:
        try:
            out[name] = measure_platform(f, PlatformType.SEV_SNP, loader=name, vcpus=vcpus,
                                         vcpu_type=vcpu_type).digest or b""
        except MeasurementError as exc:
            out[name] = exc
    return out
