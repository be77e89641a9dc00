"""Build an IGVM file from a :class:`~igvm_builder.config.BuildConfig`.

The flow is config -> inputs -> one launch plan per platform -> merge -> IgvmFile:

1. Each platform gets its own ordered list of directives (what that platform's loader must
   import, in order), built from the inputs by :class:`_PlatformPlan`.
2. The lists are merged into one directive sequence in which a header identical on several
   platforms is stored once with a multi-bit compatibility mask, and every platform's
   projection is exactly its own list.  Each platform's launch digest is therefore the
   same as that of a single-platform build.
3. The result is measured (reference values) and serialized canonically.

OVMF launches follow ``shared/spec/MEASUREMENT.md`` §7.1 (SNP) and §8.3 (TDX) so that the
SNP digest equals sev-snp-measure's on ZERO-type loaders and the TDX MRTD equals td-shim's.
Kernel launches (ELF with or without a PVH note, bzImage, UKI) boot without firmware:
boot structures live in low memory, and TDX gets a reset-vector trampoline.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import mmap
import operator
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO

from igvm_builder.config import BuildConfig
from igvm_builder.errors import InputError, LayoutError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, as_view, dontneed
from igvm_builder.format.defs import (
    PLATFORM_NAMES,
    PageDataFlags,
    PageDataType,
    PlatformType,
)
from igvm_builder.format.file import IgvmFile
from igvm_builder.platforms.cpu import CpuState, gdt_bytes, identity_page_tables, tdx_reset_trampoline

PAGE = 0x1000
ZERO_PAGE = bytes(PAGE)
KVM_VMSA_GPA = 0xFFFF_FFFF_F000
FOUR_GIB = 1 << 32

# Low-memory layout of kernel launches (no firmware).
GDT_GPA = 0x1000
BOOT_INFO_GPA = 0x2000  # Linux boot_params or PVH hvm_start_info (+ memmap, module list)
CMDLINE_GPA = 0x3000
PAGE_TABLES_GPA = 0x4000  # 6 pages: PML4, PDPT, 4 PDs
SNP_SECRETS_GPA = 0xA000
SNP_CPUID_GPA = 0xB000
SNP_CC_BLOB_GPA = 0xC000  # bzImage/UKI: setup_data node + struct cc_blob_sev_info
STACK_TOP = 0x9F000
LOW_RAM_END = 0xA0000

#: Highest GPA (exclusive) each platform can describe.
GPA_LIMITS = {
    PlatformType.NATIVE: 1 << 52,
    PlatformType.SEV_SNP: 1 << 51,  # below the C-bit
    PlatformType.TDX: 1 << 47,  # GPAW 48: bit 47 is the shared bit
    PlatformType.VSM_ISOLATION: 1 << 52,
    PlatformType.SEV: 1 << 47,
    PlatformType.SEV_ES: 1 << 47,
}
SNP_C_BIT = 51

E820_RAM, E820_RESERVED = 1, 2
PVH_MAGIC = 0x336EC578


@dataclass(frozen=True)
class BuildResult:
    """The built file, its canonical bytes (as chunks) and its reference values."""

    file: IgvmFile
    reference_values: dict[str, Any]
    _chunks: tuple[bytes | memoryview, ...] = field(repr=False)
    size: int
    sha256: str
    #: Where each chunk comes from (an mmap'd input and the offset in it), or None.
    _sources: tuple[_Mapped | None, ...] = field(default=(), repr=False, compare=False)

    @property
    def data(self) -> bytes:
        return b"".join(self._chunks)

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The file's bytes in order: the headers, then runs of input bytes (zero-copy views).

        Runs of an mmap'd input come in windows of at most :data:`WINDOW` bytes, and each
        window's pages leave the resident set when the consumer asks for the next chunk, so
        writing a large file does not keep its inputs resident.
        """
        return _windows(self._chunks, self._sources)


# --------------------------------------------------------------------------- resident-set control

#: Passes over input bytes (hashing, writing) read them in windows of this size.
WINDOW = 8 << 20


@dataclass(frozen=True, slots=True)
class _Mapped:
    """A chunk of the output that is ``buf[offset : offset + len(chunk)]`` of an mmap'd input."""

    buf: mmap.mmap
    offset: int


def _source_of(view: memoryview, start: int) -> _Mapped | None:
    """``view[start:]`` as a place in an mmap, if ``view`` is a whole-file mmap view (:class:`_Inputs`)."""
    obj = view.obj
    if isinstance(obj, mmap.mmap) and view.nbytes == len(obj):
        return _Mapped(obj, start)
    return None


def _windows(chunks: Sequence[bytes | memoryview], sources: Sequence[_Mapped | None]
             ) -> Iterator[bytes | memoryview]:
    """``chunks`` in order; mmap'd runs in windows, each released once the next is requested."""
    for i, chunk in enumerate(chunks):
        src = sources[i] if i < len(sources) else None
        if src is None:
            yield chunk
            continue
        n = len(chunk)
        for off in range(0, n, WINDOW):
            yield chunk[off : off + WINDOW]
            dontneed(src.buf, src.offset + off, min(WINDOW, n - off))


def _coalesce(blobs: Iterable[H.BlobLike]) -> tuple[list[bytes | memoryview], list[_Mapped | None]]:
    """The file data as few large chunks: consecutive windows of one input that follow each other
    in it (the usual case: a kernel or an initrd page after page) become one view."""
    chunks: list[bytes | memoryview] = []
    sources: list[_Mapped | None] = []
    run: memoryview | None = None
    run_start = run_end = 0

    def flush() -> None:
        if run is not None:
            chunks.append(run[run_start:run_end])
            sources.append(_source_of(run, run_start))

    for b in blobs:
        if type(b) is FileSlice:
            buf = b._buf  # the buffer the slice is a window of
            if buf is run and b.start == run_end:
                run_end += b.length
                continue
            flush()
            run, run_start, run_end = buf, b.start, b.start + b.length
        else:
            flush()
            run = None
            chunks.append(as_view(b))
            sources.append(None)
    flush()
    return chunks, sources


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: a build allocates a few acyclic objects per page (hundreds of
    thousands for a large initrd), and the collector would rescan them again and again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: The GIL switch interval during a build.  The layout thread gives up the GIL for every page
#: it hashes (hashlib does on buffers of 2 KiB and more) and must take it back while the
#: writer and measuring threads run Python code; at the default 5 ms a page-sized job can
#: wait a whole interval for it.  0.5 ms measured 3-6% faster on a large build (bench_build).
BUILD_SWITCH_INTERVAL = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def _short_switch_interval() -> Iterator[None]:
    """Lower ``sys.setswitchinterval`` for the duration of a build, restoring the process's
    own value when the last concurrent build (e.g. SCons ``-j`` threads) leaves."""
    import sys

    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, BUILD_SWITCH_INTERVAL))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


# --------------------------------------------------------------------------- input reading


class _Inputs:
    """Maps each input file once (read-only mmap: no copy of large inputs).

    Each input's SHA-256 (for the reference values) is computed in a background thread from
    the moment it is mapped, while the launch is planned: hashlib releases the GIL on large
    buffers, so this costs no wall time on a machine with a second core.
    """

    def __init__(self) -> None:
        self._maps: dict[str, memoryview] = {}
        self._hashers: dict[str, _Hasher] = {}

    def get(self, path: str, role: str) -> memoryview:
        view = self._maps.get(path)
        if view is None:
            try:
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    buf: bytes | mmap.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except OSError as exc:
                raise InputError(f"cannot read {role}: {exc.strerror}", source=path) from None
            view = memoryview(buf).toreadonly()
            self._maps[path] = view
            self._hashers[path] = _Hasher(view)
        return view

    def sha256(self) -> dict[str, str]:
        """SHA-256 of every input."""
        return {path: hasher.result() for path, hasher in self._hashers.items()}

    def sha256_of(self, path: str) -> bytes:
        """SHA-256 of the input ``path`` (already mapped with :meth:`get`), as bytes."""
        return bytes.fromhex(self._hashers[path].result())

    def cancel(self) -> None:
        """Stop the background hashing (the build failed)."""
        for hasher in self._hashers.values():
            hasher.stop = True


class _Hasher:
    """SHA-256 of an input, read in windows that leave the resident set once hashed; in a
    thread for inputs of a window or more."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.stop = False
        self.digest: str | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if len(view) >= WINDOW:
            self.thread = threading.Thread(target=self._run, name="igvm-build-input-sha256", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.digest = self._hash()
        except BaseException as exc:  # re-raised by result()
            self.error = exc

    def _hash(self) -> str:
        view = self.view
        h = hashlib.sha256()
        src = _source_of(view, 0)
        for off in range(0, len(view), WINDOW):
            if self.stop:
                return ""
            h.update(view[off : off + WINDOW])
            if src is not None:
                dontneed(src.buf, off, min(WINDOW, len(view) - off))
        return h.hexdigest()

    def result(self) -> str:
        if self.thread is None:
            return self._hash()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest if self.digest is not None else self._hash()


# --------------------------------------------------------------------------- per-platform plan


@dataclass
class _Region:
    start: int
    end: int
    what: str


class _PlatformPlan:
    """The ordered directives one platform needs, with overlap and GPA-limit checks."""

    def __init__(self, ptype: PlatformType, name: str) -> None:
        self.ptype = ptype
        self.name = name
        self.limit = GPA_LIMITS[ptype]
        self.directives: list[H.Header | _PageRun] = []
        self.tail: list[H.Header] = []  # VP contexts: after every page directive
        self.regions: list[_Region] = []
        self.policy: int | None = None

    def claim(self, start: int, size: int, what: str) -> None:
        end = start + size
        if end > self.limit:
            raise LayoutError(f"{what}: GPA range {start:#x}-{end - 1:#x} is beyond the {self.ptype.name} limit "
                              f"{self.limit:#x}", gpa=max(start, self.limit))
        for r in self.regions:
            if start < r.end and r.start < end:
                raise LayoutError(f"{what} overlaps {r.what} at GPA {max(start, r.start):#x} "
                                  f"({self.ptype.name} layout)", gpa=max(start, r.start))
        self.regions.append(_Region(start, end, what))

    def page(self, gpa: int, data: bytes | FileSlice = b"", *, flags: int = 0,
             data_type: int = PageDataType.NORMAL) -> None:
        self.directives.append(H.PageData(gpa=gpa, compatibility_mask=0, flags=flags, data_type=data_type,
                                          data=data))

    def pages_from(self, gpa: int, view: memoryview, mem_size: int | None = None, *, flags: int = 0,
                   zero_fill: bool = True) -> None:
        """Pages for ``view`` at ``gpa``; see :func:`page_headers`."""
        self.directives.append(_PageRun(gpa, view, mem_size=mem_size, flags=flags, zero_fill=zero_fill))

    def add_pages(self, pages: _PageRun) -> None:
        """A run of pages made once and shared by every platform that needs it.

        The merge treats the run as one item, recognised by identity, so planning and merging a
        256 MiB initrd for three platforms costs per run, not per page.
        """
        self.directives.append(pages)


class _PageRun:
    """PAGE_DATA headers for ``view[start:start + length]`` at ``gpa`` (:func:`page_headers`), or
    for a list of prepared ``(gpa, data)`` pages, made only when the merged directive list is
    expanded: then each header is created once, already carrying its final compatibility mask.
    """

    __slots__ = ("flags", "gpa", "length", "mem_size", "prepared", "start", "view", "zero_fill")

    def __init__(self, gpa: int, view: memoryview | None = None, mem_size: int | None = None, *, flags: int = 0,
                 zero_fill: bool = True, start: int = 0, length: int | None = None,
                 prepared: Sequence[tuple[int, bytes | FileSlice]] | None = None) -> None:
        if gpa % PAGE:
            raise LayoutError(f"GPA {gpa:#x} is not 4 KiB aligned", gpa=gpa)
        self.gpa, self.view, self.mem_size, self.flags = gpa, view, mem_size, flags
        self.zero_fill, self.start, self.length, self.prepared = zero_fill, start, length, prepared

    @classmethod
    def of_pages(cls, pages: Sequence[tuple[int, bytes | FileSlice]], *, flags: int = 0) -> _PageRun:
        return cls(pages[0][0] if pages else 0, flags=flags, prepared=pages)

    def headers(self, mask: int) -> list[H.PageData]:
        if self.prepared is not None:
            return [H.PageData(gpa=gpa, compatibility_mask=mask, flags=self.flags, data=data)
                    for gpa, data in self.prepared]
        assert self.view is not None
        return page_headers(self.gpa, self.view, self.mem_size, flags=self.flags, zero_fill=self.zero_fill,
                            start=self.start, length=self.length, mask=mask)


def page_headers(gpa: int, view: memoryview, mem_size: int | None = None, *, flags: int = 0,
                 zero_fill: bool = True, start: int = 0, length: int | None = None,
                 mask: int = 0) -> list[H.PageData]:
    """PAGE_DATA headers for ``view[start:start + length]`` at ``gpa`` (4 KiB aligned),
    zero-filled up to ``mem_size``.

    Full pages are zero-copy windows into the input (:class:`FileSlice` of ``view`` itself, so
    that pages of one input file share one buffer and carry their offsets in the file); only a
    partial last page is copied.  Zero-filled pages carry explicit zero data (``zero_fill``) so
    every loader measures them the same way; otherwise they are data-less.
    """
    if gpa % PAGE:
        raise LayoutError(f"GPA {gpa:#x} is not 4 KiB aligned", gpa=gpa)
    n = len(view) - start if length is None else length
    total = max(n, mem_size or 0)
    full = n - n % PAGE
    # the first page through the validating constructor, the rest (same flags and type, 4 KiB of
    # data each, aligned GPAs) through the fast one
    out = [H.PageData(gpa=gpa, compatibility_mask=mask, flags=flags, data=FileSlice(view, start, PAGE))] if full else []
    normal = PageDataType.NORMAL
    out += [_new_page(gpa + off, mask, flags, normal, FileSlice(view, start + off, PAGE))
            for off in range(PAGE, full, PAGE)]
    page_data = H.PageData
    for off in range(full, total, PAGE):
        if off < n:
            data: bytes = bytes(view[start + off : start + n]) + bytes(PAGE - (n - off))
        else:
            data = ZERO_PAGE if zero_fill else b""
        out.append(page_data(gpa=gpa + off, compatibility_mask=mask, flags=flags, data_type=PageDataType.NORMAL,
                             data=data))
    return out


# --------------------------------------------------------------------------- the builder


class _Builder:
    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.inputs = _Inputs()
        self.platforms = [PLATFORM_NAMES[p] for p in cfg.platforms]
        self.plans = {p: _PlatformPlan(p, name) for p, name in zip(self.platforms, cfg.platforms, strict=True)}
        self.notes: list[str] = []

    # ---- orchestration

    def run(self) -> IgvmFile:
        cfg = self.cfg
        # Map every input first: each one's SHA-256 is then computed in the background while the
        # launch is planned (a measured direct boot needs the kernel's and initrd's right away).
        for path, role in ((cfg.kernel and cfg.kernel.path, "kernel"), (cfg.kernel and cfg.kernel.initrd, "initrd"),
                           (cfg.firmware, "firmware")):
            if path:
                self.inputs.get(path, role)
        if cfg.firmware:
            self._firmware()
        elif cfg.kernel:
            self._kernel()
        for blob in cfg.blobs:
            view = self.inputs.get(blob.path, "blob")
            pages = _PageRun(blob.gpa, view, flags=0 if blob.measured else PageDataFlags.UNMEASURED)
            for plan in self.plans.values():
                plan.claim(blob.gpa, -(-len(view) // PAGE) * PAGE, f"blob {blob.path}")
                plan.add_pages(pages)
        if not cfg.firmware and not cfg.kernel:
            self._blob_only_contexts()
        return self._merge()

    def _masks(self) -> dict[PlatformType, int]:
        return {p: 1 << i for i, p in enumerate(self.platforms)}

    def _merge(self) -> IgvmFile:
        masks = self._masks()
        platforms = []
        inits: list[H.Header] = []
        for p in self.platforms:
            boundary = 0
            if p == PlatformType.TDX:
                boundary = 1 << 47
            platforms.append(H.SupportedPlatform(compatibility_mask=masks[p], platform_type=p,
                                                 shared_gpa_boundary=boundary))
        for p in self.platforms:
            plan = self.plans[p]
            if plan.policy is not None:
                inits.append(H.GuestPolicy(policy=plan.policy, compatibility_mask=masks[p]))
        lists = [(masks[p], [*self.plans[p].directives, *self.plans[p].tail]) for p in self.platforms]
        directives = merge_directives(lists)
        f = IgvmFile(revision=self.cfg.revision, platforms=tuple(platforms), initializations=tuple(inits),
                     directives=tuple(directives))
        if PlatformType.VSM_ISOLATION in masks:
            f = _with_vbs_measurement(f, masks[PlatformType.VSM_ISOLATION])
        return f

    # ---- firmware (OVMF) launches

    def _firmware(self) -> None:
        from igvm_builder.inputs.ovmf import kernel_hashes_page, parse_ovmf, require_sev, require_tdx

        cfg = self.cfg
        path = cfg.firmware or ""
        view = self.inputs.get(path, "firmware")
        img = parse_ovmf(view, path)
        hashes_page = None
        for p in self.plans:
            if p in (PlatformType.SEV_SNP, PlatformType.SEV_ES, PlatformType.SEV):
                require_sev(img)
            if p == PlatformType.TDX:
                require_tdx(img)
            if p == PlatformType.VSM_ISOLATION:
                raise LayoutError("VBS cannot boot OVMF from the reset vector (VBS starts in a VP context "
                                  "given by registers); use a kernel for VBS", source=path)
        if cfg.kernel and any(p in self.plans for p in (PlatformType.SEV_SNP, PlatformType.SEV_ES, PlatformType.SEV)):
            kernel = self.inputs.get(cfg.kernel.path, "kernel")
            initrd = self.inputs.get(cfg.kernel.initrd, "initrd") if cfg.kernel.initrd else None
            # the hashes are the SHA-256s of the whole files: the ones computed for the reference values
            hashes_page = kernel_hashes_page(
                img, kernel, initrd, cfg.kernel.cmdline or None, kernel_sha256=self.inputs.sha256_of(cfg.kernel.path),
                initrd_sha256=self.inputs.sha256_of(cfg.kernel.initrd) if cfg.kernel.initrd else None)
            self.notes.append("measured direct boot: the VMM must be given exactly this kernel, initrd and "
                              "command line (their hashes are in the kernel-hashes page)")
        base = img.gpa_base
        fw_pages: _PageRun | None = None
        for p, plan in self.plans.items():
            if p == PlatformType.TDX:
                self._ovmf_tdx(plan, img, view)
                continue
            plan.claim(base, img.size, f"firmware {path}")
            if fw_pages is None:
                fw_pages = _PageRun(base, view)  # every page with data, even all-zero ones (§7.1 step 2)
            plan.add_pages(fw_pages)
            params = self._ovmf_igvm_parameters(p, plan, img) if cfg.firmware_igvm_parameters else None
            if p in (PlatformType.SEV_SNP, PlatformType.SEV_ES, PlatformType.SEV):
                self._ovmf_sev_sections(plan, img, hashes_page, skip=params)
            self._ovmf_contexts(p, plan, img)

    def _ovmf_igvm_parameters(self, p: PlatformType, plan: _PlatformPlan, img: Any) -> tuple[int, int] | None:
        """OVMF's IGVM metadata parameter area (edk2 IgvmMetadata.asm): memory map and VP count.

        The loader writes the IGVM memory map and the VP count where OVMF's table says; the
        area is inserted (unmeasured) right after the firmware pages.  Returns the area's GPA
        range so the SEV sections that cover it are not imported twice.
        """
        if p not in (PlatformType.NATIVE, PlatformType.SEV_SNP):
            return None
        by_type = {e.type: e for e in img.igvm_entries}
        area = by_type.get(0x100)
        if area is None:
            raise InputError("firmware.igvm_parameters is set but the firmware has no IGVM metadata parameter "
                             "area (footer GUID 784fa70e-...)", source=self.cfg.firmware)
        size = -(-area.size // PAGE) * PAGE
        plan.directives.append(H.ParameterArea(number_of_bytes=size, parameter_area_index=0))
        if 0x101 in by_type:
            plan.directives.append(H.MemoryMap(parameter_area_index=0, byte_offset=by_type[0x101].start))
        if 0x102 in by_type:
            plan.directives.append(H.VpCount(parameter_area_index=0, byte_offset=by_type[0x102].start))
        plan.directives.append(H.ParameterInsert(gpa=area.start, compatibility_mask=0, parameter_area_index=0))
        if p == PlatformType.NATIVE:
            plan.claim(area.start, size, "IGVM parameter area")
        return (area.start, area.start + size)

    def _ovmf_sev_sections(self, plan: _PlatformPlan, img: Any, hashes_page: bytes | None,
                           skip: tuple[int, int] | None = None) -> None:
        # vmm_type conventions (MEASUREMENT.md §5, sev-snp-measure guest.py): ec2 measures the
        # CPUID page after every other section; gce imports SNP_SEC_MEM as UNMEASURED pages.
        snp = plan.ptype == PlatformType.SEV_SNP
        vmm = self.cfg.snp.vmm_type
        cpuid_last: list[int] = []
        for sec in img.sev_sections:
            if sec.size == 0:
                continue
            what = f"SEV metadata section {sec.type_name} at {sec.base:#x}"
            if sec.type == 2:  # SECRETS
                plan.claim(sec.base, PAGE, what)
                if snp:
                    plan.page(sec.base, data_type=PageDataType.SECRETS)
            elif sec.type == 3:  # CPUID
                plan.claim(sec.base, PAGE, what)
                if snp and vmm == "ec2":
                    cpuid_last.append(sec.base)
                elif snp:
                    plan.page(sec.base, data_type=PageDataType.CPUID_DATA)
            elif sec.type == 0x10 and hashes_page is not None:
                plan.claim(sec.base, PAGE, what)
                plan.page(sec.base, hashes_page)
            else:  # SEC_MEM, SVSM_CAA, KERNEL_HASHES without a kernel: pre-validated zero memory
                size = -(-sec.size // PAGE) * PAGE
                plan.claim(sec.base, size, what)
                if snp:
                    flags = PageDataFlags.UNMEASURED if sec.type == 1 and vmm == "gce" else 0
                    for off in range(0, size, PAGE):
                        if skip and skip[0] <= sec.base + off < skip[1]:
                            continue  # the IGVM parameter area is inserted there instead
                        plan.page(sec.base + off, flags=flags)
        for gpa in cpuid_last:
            plan.page(gpa, data_type=PageDataType.CPUID_DATA)

    def _ovmf_contexts(self, p: PlatformType, plan: _PlatformPlan, img: Any) -> None:
        from igvm_builder.sev_vmsa import BSP_RESET_EIP, build_reset_vmsa, vcpu_signature

        snp = self.cfg.snp
        if p == PlatformType.SEV_SNP:
            plan.policy = snp.policy
        if p in (PlatformType.SEV_SNP, PlatformType.SEV_ES):
            sig = vcpu_signature(snp.vcpu_type)
            features = snp.guest_features if p == PlatformType.SEV_SNP else 0
            for vp in range(snp.vcpus):
                eip = BSP_RESET_EIP if vp == 0 else img.sev_es_reset_eip
                vmsa = build_reset_vmsa(eip, vcpu_signature=sig, sev_features=features, vmm_type=snp.vmm_type,
                                        cr0=snp.cr0)
                plan.tail.append(H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=0, vp_index=vp, vmsa=vmsa))
        elif p in (PlatformType.NATIVE, PlatformType.SEV):
            # Architectural reset state: real mode, CS base 0xffff0000, IP 0xfff0.
            state = CpuState(rip=0xFFF0, cr0=0x10, gdtr_limit=0xFFFF, code_selector=0xF000, code_attributes=0x9B,
                             data_selector=0, data_attributes=0x93)
            ctx = bytearray(state.native_context())
            struct.pack_into("<I", ctx, 172, 0xFFFF0000)  # code_base
            struct.pack_into("<I", ctx, 176, 0xFFFF)  # code_limit
            struct.pack_into("<I", ctx, 188, 0xFFFF)  # data_limit
            plan.tail.append(H.NativeVpContext(compatibility_mask=0, vp_index=0, context=bytes(ctx)))

    def _ovmf_tdx(self, plan: _PlatformPlan, img: Any, view: memoryview) -> None:
        plan.policy = self.cfg.tdx.policy
        for sec in img.tdx_sections:
            if sec.page_aug or sec.mem_size == 0:
                continue
            plan.claim(sec.mem_base, sec.mem_size, f"TDVF section {sec.type_name} at {sec.mem_base:#x}")
            if sec.raw_size:
                data = view[sec.data_offset : sec.data_offset + sec.raw_size]
                flags = 0 if sec.mr_extend else PageDataFlags.UNMEASURED
                plan.pages_from(sec.mem_base, data, sec.mem_size, flags=flags, zero_fill=False)
            else:
                for off in range(0, sec.mem_size, PAGE):
                    plan.page(sec.mem_base + off, flags=PageDataFlags.UNMEASURED)

    # ---- kernel launches

    def _kernel(self) -> None:
        from igvm_builder.inputs.blob import detect_kernel_format

        k = self.cfg.kernel
        assert k is not None
        view = self.inputs.get(k.path, "kernel")
        fmt = k.format if k.format != "auto" else str(detect_kernel_format(view, k.path))
        cmdline = k.cmdline
        initrd: memoryview | None = self.inputs.get(k.initrd, "initrd") if k.initrd else None
        initrd_name = k.initrd or ""
        if fmt == "uki":
            from igvm_builder.inputs.uki import parse_uki

            uki = parse_uki(view, k.path)
            view = memoryview(uki.linux)
            if uki.initrd and initrd is None:
                initrd, initrd_name = memoryview(uki.initrd), f"{k.path} (.initrd)"
            if uki.cmdline and not cmdline:
                cmdline = uki.cmdline
            fmt = "bzimage"
        cmd = cmdline.encode() + b"\0"
        if len(cmd) > PAGE:
            raise LayoutError(f"command line is {len(cmd)} bytes; at most 4095 are supported",
                              source=self.cfg.source, key="kernel.cmdline")
        if fmt == "elf":
            self._elf(view, k.path, cmd, initrd, initrd_name)
        else:
            self._bzimage(view, k.path, cmd, initrd, initrd_name)
        # What this image does not do for a confidential guest (no firmware runs before the
        # kernel); said in the reference values and by the CLI, documented in docs/CONFIG.md.
        if PlatformType.SEV_SNP in self.plans:
            blob = ("" if fmt == "bzimage" else
                    " and, booted as an ELF (no boot_params), finds no SEV CC blob (secrets and CPUID pages)")
            self.notes.append(
                "snp: the kernel starts without firmware: guest RAM outside this image is not validated "
                f"(PVALIDATE){blob}; a Linux guest expects its RAM validated by firmware or a boot shim "
                "(docs/CONFIG.md, 'What a directly booted confidential guest still needs')")
        if PlatformType.TDX in self.plans:
            self.notes.append(
                "tdx: the kernel starts without TDVF or td-shim: private memory outside this image is not "
                "accepted and no TD HOB describes it; a Linux TD expects both from its firmware or boot shim "
                "(docs/CONFIG.md, 'What a directly booted confidential guest still needs')")

    def _common_low(self, plan: _PlatformPlan, cmd: bytes) -> None:
        plan.claim(GDT_GPA, PAGE, "GDT")
        plan.page(GDT_GPA, gdt_bytes())
        plan.claim(CMDLINE_GPA, PAGE, "command line")
        plan.page(CMDLINE_GPA, cmd)
        if plan.ptype == PlatformType.SEV_SNP:
            plan.claim(SNP_SECRETS_GPA, PAGE, "SNP secrets page")
            plan.page(SNP_SECRETS_GPA, data_type=PageDataType.SECRETS)
            plan.claim(SNP_CPUID_GPA, PAGE, "SNP CPUID page")
            plan.page(SNP_CPUID_GPA, data_type=PageDataType.CPUID_DATA)
            plan.policy = self.cfg.snp.policy
        elif plan.ptype == PlatformType.TDX:
            plan.policy = self.cfg.tdx.policy

    def _memory_map(self, *, reserved_end: int = 0) -> list[tuple[int, int, int]]:
        """(address, size, e820 type) of guest memory; with ``reserved_end``, the SNP pages from the
        secrets page up to it are reserved (the secrets page must never become ordinary RAM)."""
        mem = self.cfg.memory_size
        low_top = min(mem, 0xC000_0000)
        if reserved_end:
            first, end = SNP_SECRETS_GPA, reserved_end
            low = [(0, first, E820_RAM), (first, end - first, E820_RESERVED), (end, LOW_RAM_END - end, E820_RAM)]
        else:
            low = [(0, LOW_RAM_END, E820_RAM)]
        out = [*low, (0x100000, low_top - 0x100000, E820_RAM)]
        if mem > low_top:
            out.append((FOUR_GIB, mem - low_top, E820_RAM))
        return out

    def _place_initrd(self, size: int, lowest: int, highest: int) -> int:
        top = min(self.cfg.memory_size, 0xC000_0000, highest)
        addr = (top - size) & ~0x1FFFFF
        if addr < lowest:
            raise LayoutError(f"initrd of {size:#x} bytes does not fit in guest memory of "
                              f"{self.cfg.memory_size:#x} bytes above {lowest:#x}; raise memory.size",
                              source=self.cfg.source, key="memory.size")
        return addr

    def _elf(self, view: memoryview, name: str, cmd: bytes, initrd: memoryview | None, initrd_name: str) -> None:
        from igvm_builder.inputs.elf import load_elf

        elf = load_elf(view, name, machines=("x86_64", "i386"))
        high = max(seg.end for seg in elf.segments)
        initrd_gpa = self._place_initrd(len(initrd), -(-high // PAGE) * PAGE, 1 << 32) if initrd is not None else 0
        info = self._pvh_start_info(cmd, initrd_gpa, len(initrd) if initrd is not None else 0)
        snp_info = (self._pvh_start_info(cmd, initrd_gpa, len(initrd) if initrd is not None else 0, snp=True)
                    if PlatformType.SEV_SNP in self.plans else b"")
        pages = _elf_pages(elf, view)
        elf_headers = _PageRun.of_pages(pages)
        initrd_pages = _PageRun(initrd_gpa, initrd) if initrd is not None else None
        for p, plan in self.plans.items():
            self._common_low(plan, cmd)
            for start, end in _page_runs(pages):
                plan.claim(start, end - start, f"{name} (PT_LOAD segments)")
            plan.add_pages(elf_headers)
            if initrd is not None and initrd_pages is not None:
                plan.claim(initrd_gpa, -(-len(initrd) // PAGE) * PAGE, f"initrd {initrd_name}")
                plan.add_pages(initrd_pages)
            if elf.pvh_entry is not None:
                plan.claim(BOOT_INFO_GPA, PAGE, "PVH start_info")
                plan.page(BOOT_INFO_GPA, snp_info if p == PlatformType.SEV_SNP else info)
                state = CpuState.protected32(rip=elf.pvh_entry, gdt=GDT_GPA, rbx=BOOT_INFO_GPA)
            elif elf.elf_class == 64:
                state = self._long_mode(plan, elf.entry_gpa if elf.entry_gpa is not None else elf.entry, 0)
            else:
                state = CpuState.protected32(rip=elf.entry_gpa if elf.entry_gpa is not None else elf.entry,
                                             gdt=GDT_GPA)
            self._start(p, plan, state)

    def _pvh_start_info(self, cmd: bytes, initrd_gpa: int, initrd_size: int, *, snp: bool = False) -> bytes:
        """``hvm_start_info`` v1 with its module list and memory map; ``snp``: the SNP secrets and
        CPUID pages reserved in the memory map."""
        mm = self._memory_map(reserved_end=SNP_CPUID_GPA + PAGE if snp else 0)
        memmap_off, modlist_off = 0x100, 0x80
        info = struct.pack("<IIIIQQQQII", PVH_MAGIC, 1, 0, 1 if initrd_size else 0,
                           BOOT_INFO_GPA + modlist_off if initrd_size else 0, CMDLINE_GPA, 0,
                           BOOT_INFO_GPA + memmap_off, len(mm), 0)
        page = bytearray(PAGE)
        page[: len(info)] = info
        if initrd_size:
            page[modlist_off : modlist_off + 32] = struct.pack("<QQQQ", initrd_gpa, initrd_size, 0, 0)
        for i, (addr, size, typ) in enumerate(mm):
            page[memmap_off + 24 * i : memmap_off + 24 * (i + 1)] = struct.pack("<QQII", addr, size, typ, 0)
        return bytes(page)

    def _long_mode(self, plan: _PlatformPlan, rip: int, rsi: int) -> CpuState:
        c_bit = SNP_C_BIT if plan.ptype == PlatformType.SEV_SNP else None
        tables = identity_page_tables(PAGE_TABLES_GPA, c_bit=c_bit)
        plan.claim(PAGE_TABLES_GPA, len(tables) * PAGE, "identity page tables")
        for gpa, data in tables:
            plan.page(gpa, data)
        return CpuState.long64(rip=rip, gdt=GDT_GPA, cr3=PAGE_TABLES_GPA, rsi=rsi)

    def _bzimage(self, view: memoryview, name: str, cmd: bytes, initrd: memoryview | None, initrd_name: str) -> None:
        from igvm_builder.inputs.bzimage import (
            CC_BLOB_OFFSET,
            E820Entry,
            build_boot_params,
            parse_bzimage,
            snp_cc_blob_page,
        )

        bz = parse_bzimage(view, name)
        load = bz.default_load_address
        if load % PAGE:
            raise InputError(f"bzImage preferred load address {load:#x} is not page aligned", source=name)
        reserve = bz.memory_footprint
        kernel_end = -(-(load + reserve) // PAGE) * PAGE
        if kernel_end > self.cfg.memory_size:
            raise LayoutError(f"kernel needs memory up to {kernel_end:#x} but memory.size is "
                              f"{self.cfg.memory_size:#x}", source=self.cfg.source, key="memory.size")
        initrd_gpa = 0
        if initrd is not None:
            initrd_gpa = self._place_initrd(len(initrd), kernel_end, (bz.initrd_addr_max or 0x37FFFFFF) + 1)
        e820 = [E820Entry(a, s, t) for a, s, t in self._memory_map()]
        boot = {"cmdline_ptr": CMDLINE_GPA, "cmdline_size": len(cmd) - 1, "initrd_addr": initrd_gpa,
                "initrd_size": len(initrd) if initrd is not None else 0}
        boot_params = build_boot_params(bz, **boot, e820=e820)
        snp_boot_params = cc_blob = b""
        if PlatformType.SEV_SNP in self.plans:
            # SNP: the kernel finds its secrets and CPUID pages through a CC blob (a setup_data node,
            # protocol 2.09+, and cc_blob_address); the e820 map keeps those pages from being reused
            setup = bz.version >= 0x0209
            cc_blob = snp_cc_blob_page(SNP_CC_BLOB_GPA, secrets_gpa=SNP_SECRETS_GPA, cpuid_gpa=SNP_CPUID_GPA,
                                       with_setup_data=setup)
            snp_boot_params = build_boot_params(
                bz, **boot, e820=[E820Entry(a, s, t) for a, s, t in self._memory_map(reserved_end=SNP_CC_BLOB_GPA + PAGE)],
                setup_data=SNP_CC_BLOB_GPA if setup else 0, cc_blob_address=SNP_CC_BLOB_GPA + CC_BLOB_OFFSET)
        kernel_pages = _PageRun(load, view, start=bz.setup_size, length=len(bz.kernel))
        initrd_pages = _PageRun(initrd_gpa, initrd) if initrd is not None else None
        for p, plan in self.plans.items():
            self._common_low(plan, cmd)
            plan.claim(BOOT_INFO_GPA, PAGE, "boot_params (zero page)")
            if p == PlatformType.SEV_SNP:
                plan.page(BOOT_INFO_GPA, snp_boot_params)
                plan.claim(SNP_CC_BLOB_GPA, PAGE, "SEV CC blob")
                plan.page(SNP_CC_BLOB_GPA, cc_blob)
            else:
                plan.page(BOOT_INFO_GPA, boot_params)
            plan.claim(load, kernel_end - load, f"kernel {name} (protected-mode part and init_size)")
            plan.add_pages(kernel_pages)
            if initrd is not None and initrd_pages is not None:
                plan.claim(initrd_gpa, -(-len(initrd) // PAGE) * PAGE, f"initrd {initrd_name}")
                plan.add_pages(initrd_pages)
            if p == PlatformType.TDX or not bz.supports_64bit_entry:
                # 32-bit boot protocol entry (TDX starts in 32-bit mode; old kernels have no 64-bit entry)
                state = CpuState.protected32(rip=load, gdt=GDT_GPA, rsi=BOOT_INFO_GPA)
            else:
                state = self._long_mode(plan, load + 0x200, BOOT_INFO_GPA)
            self._start(p, plan, state)

    def _start(self, p: PlatformType, plan: _PlatformPlan, state: CpuState) -> None:
        """Add the platform's way of starting the BSP with ``state``."""
        state = CpuState(**{**_state_dict(state), "rsp": STACK_TOP})
        if p in (PlatformType.NATIVE, PlatformType.SEV):
            plan.tail.append(H.NativeVpContext(compatibility_mask=0, vp_index=0, context=state.native_context()))
        elif p in (PlatformType.SEV_SNP, PlatformType.SEV_ES):
            features = self.cfg.snp.guest_features if p == PlatformType.SEV_SNP else 0
            plan.tail.append(H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=0, vp_index=0,
                                            vmsa=state.vmsa(sev_features=features)))
        elif p == PlatformType.VSM_ISOLATION:
            plan.tail.append(H.VbsVpContext(compatibility_mask=0, vp_index=0, vtl=self.cfg.vbs.vtl,
                                            registers=state.vbs_registers()))
        elif p == PlatformType.TDX:
            if state.cr0 & 0x80000000:
                raise LayoutError("TDX starts in 32-bit mode at the reset vector; this kernel needs a 64-bit entry")
            plan.claim(0xFFFFF000, PAGE, "TDX reset-vector trampoline")
            plan.page(0xFFFFF000, tdx_reset_trampoline(entry=state.rip, rbx=state.rbx, rsi=state.rsi))

    def _blob_only_contexts(self) -> None:
        for plan in self.plans.values():
            if plan.ptype == PlatformType.SEV_SNP:
                plan.policy = self.cfg.snp.policy
            elif plan.ptype == PlatformType.TDX:
                plan.policy = self.cfg.tdx.policy


def _elf_pages(elf: Any, view: memoryview) -> list[tuple[int, bytes | FileSlice]]:
    """Page contents of an ELF's PT_LOAD segments (pages shared by two segments are composed).

    Whole pages are windows of ``view`` (the file) at the segment's file offset.
    """
    covers: dict[int, list[Any]] = {}
    for seg in elf.segments:
        for page in range(seg.gpa & ~0xFFF, seg.end, PAGE):
            covers.setdefault(page, []).append(seg)
    out: list[tuple[int, bytes | FileSlice]] = []
    for page in sorted(covers):
        segs = covers[page]
        seg = segs[0]
        off = page - seg.gpa
        if len(segs) == 1 and off >= 0 and off + PAGE <= len(seg.data):
            out.append((page, FileSlice(view, seg.offset + off, PAGE)))
            continue
        buf = bytearray(PAGE)
        for seg in segs:
            lo, hi = max(page, seg.gpa), min(page + PAGE, seg.gpa + len(seg.data))
            if hi > lo:
                buf[lo - page : hi - page] = seg.data[lo - seg.gpa : hi - seg.gpa]
        out.append((page, bytes(buf)))
    return out


def _page_runs(pages: list[tuple[int, Any]]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for gpa, _ in pages:
        if runs and runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], gpa + PAGE)
        else:
            runs.append((gpa, gpa + PAGE))
    return runs


def _state_dict(state: CpuState) -> dict[str, Any]:
    return {k: getattr(state, k) for k in CpuState.__dataclass_fields__}


def _with_vbs_measurement(f: IgvmFile, mask: int) -> IgvmFile:
    """Append a VBS_MEASUREMENT directive carrying the computed boot digest (signature left empty)."""
    from igvm_builder.measure import measure_platform

    digest = measure_platform(f, PlatformType.VSM_ISOLATION).digest or b""
    hdr = H.VbsMeasurement(compatibility_mask=mask, boot_measurement_digest=digest.ljust(64, b"\0"))
    return IgvmFile(revision=f.revision, architecture=f.architecture, platforms=f.platforms,
                    initializations=f.initializations, directives=(*f.directives, hdr))


# --------------------------------------------------------------------------- merging


def _key(h: H.Header) -> tuple[Any, ...]:
    """Identity of a directive apart from its compatibility mask.

    Page data in a file window is identified by the exact view object, offset and length
    (equal keys mean equal bytes; offsets are relative to that view, so the view object,
    not the file it maps, must be part of the key); copied data by the bytes themselves.
    """
    if isinstance(h, H.PageData):
        d = h.data
        if isinstance(d, FileSlice):
            dk: tuple[Any, ...] = ("s", id(d._buf), d.start, d.length)
        else:
            dk = ("b", bytes(d))
        return (H.PageData, h.gpa, h.flags, int(h.data_type), dk)
    if isinstance(h, H.SnpVpContext):
        return (H.SnpVpContext, h.gpa, h.vp_index, hashlib.sha256(as_view(h.vmsa)).digest())
    if h.HAS_MASK:
        return (type(h), h.pack_body(0), repr(h))
    return (type(h), repr(h))


#: PAGE_DATA fields, in order; checked at import so that the fast copy below cannot miss one.
_PAGE_FIELDS = ("gpa", "compatibility_mask", "flags", "data_type", "data")
if tuple(f.name for f in fields(H.PageData)) != _PAGE_FIELDS:
    raise ImportError("H.PageData fields changed: update _with_mask in build.py")


def _new_page(gpa: int, mask: int, flags: int, data_type: int, data: bytes | FileSlice) -> H.PageData:
    """A PageData made without re-running its checks, for values known to pass them (a page
    like one already validated: 4 KiB-aligned GPA, same flags and type, at most 4 KiB of data).
    dataclasses.replace or the constructor cost several times more, once per page of the file."""
    page = _object_new(H.PageData)
    _set_gpa(page, gpa)
    _set_mask(page, mask)
    _set_flags(page, flags)
    _set_type(page, data_type)
    _set_data(page, data)
    return page


_object_new = object.__new__
# the slot descriptors' setters: what the generated __init__ of a frozen slots dataclass uses
_set_gpa, _set_mask, _set_flags, _set_type, _set_data = (getattr(H.PageData, f).__set__ for f in _PAGE_FIELDS)


def _with_mask(h: H.Header, mask: int) -> H.Header:
    if type(h) is H.PageData:  # the common case, one per page of the file
        return _new_page(h.gpa, mask, h.flags, h.data_type, h.data)
    if not h.HAS_MASK:
        return h
    from dataclasses import replace

    return replace(h, compatibility_mask=mask)


def merge_directives(lists: Sequence[tuple[int, Sequence[H.Header]]]) -> list[H.Header]:
    """Merge per-platform directive lists into one; equal headers share one multi-bit mask.

    Guarantees: for every (mask, list) input, the headers whose mask contains ``mask`` are
    exactly ``list``, in order.  Sharing is greedy: when two lists disagree, the header
    that the other list does not need next is emitted alone.  A :class:`_PageRun` in the lists
    is one item (equal only to itself) and is expanded into its pages in the result.
    """
    keys: list[Any] = []
    hdrs: list[H.Header] = []
    masks: list[int] = []
    key_of: dict[int, Any] = {}  # id(header) -> key: headers shared by platforms are keyed once
    alive: list[list[H.Header]] = []  # keeps every header alive while its id() is a cache key
    for mask, items in lists:
        items = list(items)
        alive.append(items)
        # key each header once (those shared with an earlier list are found by identity)
        known = list(map(key_of.get, map(id, items)))
        bkeys = [k if k is not None else _directive_key(h, mask) for k, h in zip(known, items, strict=True)]
        key_of.update(zip(map(id, items), bkeys, strict=True))
        keys, hdrs, masks = _merge_two(keys, hdrs, masks, bkeys, items, mask)
    out: list[H.Header] = []
    for h, m in zip(hdrs, masks, strict=True):
        if type(h) is _PageRun:
            out += h.headers(m)
        else:
            out.append(_with_mask(h, m))
    return out


def _directive_key(h: H.Header | _PageRun, mask: int) -> Any:
    if type(h) is _PageRun:
        return (_PageRun, id(h))  # kept alive by merge_directives while keys are compared
    if isinstance(h, H.VpContextBase):
        # A VP context must carry exactly one platform's mask (IGVM_FORMAT.md; the reference
        # parser rejects anything else), so identical contexts of two platforms stay apart.
        return (_key(h), mask)
    return _key(h)


def _positions(keys: list[Any]) -> dict[Any, int | list[int]]:
    """key -> its index, or the ascending list of its indices when it occurs more than once."""
    unique: dict[Any, int | list[int]] = dict(zip(keys, range(len(keys)), strict=True))
    if len(unique) == len(keys):  # the usual case, built at C speed
        return unique
    pos: dict[Any, int | list[int]] = {}
    for i, k in enumerate(keys):
        prev = pos.setdefault(k, i)
        if prev != i:
            if isinstance(prev, int):
                pos[k] = [prev, i]
            else:
                prev.append(i)
    return pos


def _next_at(keys: list[Any], pos: dict[Any, int | list[int]] | None, key: Any, start: int
             ) -> tuple[int | None, dict[Any, int | list[int]] | None]:
    """The first index of ``key`` in ``keys`` at or after ``start`` (and the position index).

    A short scan at C speed answers the usual case (the lists differ by a few headers); the
    position index of the whole list is built only when the key is not close by.
    """
    near = 256
    try:
        return keys.index(key, start, start + near), pos
    except ValueError:
        pass
    if start + near >= len(keys):
        return None, pos
    if pos is None:
        pos = _positions(keys)
    return _lookup(pos, key, start), pos


def _lookup(pos: dict[Any, int | list[int]], key: Any, start: int) -> int | None:
    found = pos.get(key)
    if found is None:
        return None
    if isinstance(found, int):
        return found if found >= start else None
    i = bisect.bisect_left(found, start)
    return found[i] if i < len(found) else None


def _merge_two(a_keys: list[Any], a_hdrs: list[H.Header], a_masks: list[int], b_keys: list[Any],
               b_hdrs: list[H.Header], b_mask: int) -> tuple[list[Any], list[H.Header], list[int]]:
    """Merge list ``b`` (all with mask ``b_mask``) into the merged list ``a``.

    Runs of equal keys (the bulk of any multi-platform build) are found by comparing windows
    of the two key lists at C speed; the greedy choice of :func:`merge_directives` is made
    only where the lists disagree.
    """
    if not a_keys:
        return list(b_keys), list(b_hdrs), [b_mask] * len(b_keys)
    na, nb = len(a_keys), len(b_keys)
    out_k: list[Any] = []
    out_h: list[H.Header] = []
    out_m: list[int] = []
    pos_a: dict[Any, int | list[int]] | None = None
    pos_b: dict[Any, int | list[int]] | None = None
    i = j = 0
    while i < na and j < nb:
        window = 16
        while i < na and j < nb:  # copy the run of equal keys starting at (i, j)
            n = min(window, na - i, nb - j)
            same = list(map(operator.eq, a_keys[i : i + n], b_keys[j : j + n]))
            run = same.index(False) if False in same else n
            if run:
                out_k += a_keys[i : i + run]
                out_h += a_hdrs[i : i + run]
                out_m += [m | b_mask for m in a_masks[i : i + run]]
                i += run
                j += run
            if run < n:
                break
            window = min(window * 4, 1 << 16)
        if i >= na or j >= nb:
            break
        next_in_b, pos_b = _next_at(b_keys, pos_b, a_keys[i], j)
        next_in_a, pos_a = _next_at(a_keys, pos_a, b_keys[j], i)
        if next_in_b is None or (next_in_a is not None and next_in_a - i <= next_in_b - j):
            out_k.append(a_keys[i])
            out_h.append(a_hdrs[i])
            out_m.append(a_masks[i])
            i += 1
        else:
            out_k.append(b_keys[j])
            out_h.append(b_hdrs[j])
            out_m.append(b_mask)
            j += 1
    out_k += a_keys[i:]
    out_h += a_hdrs[i:]
    out_m += a_masks[i:]
    out_k += b_keys[j:]
    out_h += b_hdrs[j:]
    out_m += [b_mask] * (nb - j)
    return out_k, out_h, out_m


# --------------------------------------------------------------------------- public API


def build_file(cfg: BuildConfig) -> tuple[IgvmFile, dict[str, str], list[str]]:
    """Build the :class:`IgvmFile` for ``cfg``; also return input SHA-256s and notes."""
    f, inputs, notes = _build_model(cfg)
    return f, inputs.sha256(), notes


def _build_model(cfg: BuildConfig) -> tuple[IgvmFile, _Inputs, list[str]]:
    """The validated file model; the inputs' SHA-256s may still be being computed."""
    b = _Builder(cfg)
    try:
        with _gc_paused():
            f = b.run().validate()
    except BaseException:
        b.inputs.cancel()
        raise
    return f, b.inputs, b.notes


def build(cfg: BuildConfig, *, platforms: Sequence[str] | None = None, loader: str | None = None,
          output: BinaryIO | None = None) -> BuildResult:
    """Build, serialize and measure ``cfg`` (optionally overriding platforms/loader).

    With ``output`` (a seekable binary file opened for writing, e.g.
    :class:`igvm_builder.io.AtomicFile`) the file's bytes are written to it during the build;
    the caller commits or discards it.  The work is spread over threads so that the hashing,
    which is most of a large build, keeps both cores of a small machine busy (hashlib releases
    the GIL on page-sized and larger buffers, and so do file writes):

    1. every platform but SEV-SNP (TDX, the longest) is measured in a thread as soon as the
       file model exists;
    2. meanwhile this thread lays the file out; with SEV-SNP, identical pages are found by
       each page's SHA-384, which is kept for step 3.  The data section goes to a
       writer thread batch by batch as it is laid out, the headers (which precede it) last;
    3. this thread chains the SEV-SNP digest from the kept page hashes while the writer
       thread computes the file's SHA-256.
    """
    cfg = cfg.with_overrides(platforms=tuple(platforms) if platforms else None, loader=loader)
    with _short_switch_interval():
        return _build(cfg, output)


def _build(cfg: BuildConfig, output: BinaryIO | None) -> BuildResult:
    f, inputs, notes = _build_model(cfg)  # the inputs' SHA-256s are computed meanwhile
    from igvm_builder.measure import measure_file, measure_platform

    ptypes = [p.platform_type for p in f.platforms]
    snp = PlatformType.SEV_SNP in ptypes
    others = [t for t in ptypes if t != PlatformType.SEV_SNP]
    measure_others = _Task("igvm-build-measure", lambda: measure_file(
        f, platforms=others, loader=cfg.loader, tdx_two_pass=cfg.tdx.two_pass)) if others else None
    writer = _Writer(output)
    digests: dict[int, bytes] | None = {} if snp else None
    try:
        with _gc_paused():
            head, blobs = f._layout(validate=False, page_digests=digests,  # _build_model() validated it
                                    on_data=writer.put if output is not None else None)
        data, data_sources = _coalesce(blobs)
        del blobs
        chunks = (head, *data)
        sources = (None, *data_sources)
        writer.finish(head, chunks, sources)
        snp_result = (measure_platform(f, PlatformType.SEV_SNP, loader=cfg.loader, tdx_two_pass=cfg.tdx.two_pass,
                                       page_digests=digests),) if snp else ()
    except BaseException:
        writer.cancel()
        inputs.cancel()
        for task in (measure_others, writer.task):  # leave no thread working on a failed build
            if task is not None:
                task.join()
        raise
    other_results = measure_others.result() if measure_others is not None else ()
    sha256 = writer.task.result()
    input_hashes = inputs.sha256()
    by_type = {m.platform: m for m in (*snp_result, *other_results)}
    measurements = tuple(by_type[t] for t in ptypes)
    size = sum(len(c) for c in chunks)
    refs = reference_values_for(cfg, f, sha256, size, input_hashes, notes, measurements=measurements)
    return BuildResult(file=f, reference_values=refs, _chunks=chunks, size=size, sha256=sha256,
                       _sources=sources)


class _Task:
    """``fn()`` in a thread; :meth:`result` joins it and returns its value or raises its error."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # re-raised by result() in the caller's thread
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _Writer:
    """The thread that writes the data section to ``output`` as the layout hands it over
    (:meth:`put`), then the headers at the start of the file, then computes the SHA-256 of
    the whole file (headers first) from the same views."""

    def __init__(self, output: BinaryIO | None) -> None:
        import queue

        self.output = output
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stop = False
        self.task = _Task("igvm-build-write", self._run)

    def put(self, offset: int, blobs: list[H.BlobLike]) -> None:
        self.queue.put((offset, blobs))

    def finish(self, head: bytes, chunks: Sequence[bytes | memoryview], sources: Sequence[_Mapped | None]) -> None:
        self.queue.put((head, chunks, sources))

    def cancel(self) -> None:
        self.stop = True
        self.queue.put(None)

    def _run(self) -> str:
        out = self.output
        while True:
            item = self.queue.get()
            if item is None or self.stop:
                return ""
            if len(item) == 2 and out is not None:  # a batch of the data section
                offset, blobs = item
                out.seek(offset)
                data, sources = _coalesce(blobs)
                for c in _windows(data, sources):
                    out.write(c)
                continue
            head, chunks, sources = item
            if out is not None:
                out.seek(0)
                out.write(head)
                out.seek(0, os.SEEK_END)
            h = hashlib.sha256()
            for c in _windows(chunks, sources):
                if self.stop:
                    return ""
                h.update(c)
            return h.hexdigest()


def reference_values_for(cfg: BuildConfig, f: IgvmFile, sha256: str, size: int, input_hashes: dict[str, str],
                         notes: Iterable[str], *, measurements: Sequence[Any] | None = None) -> dict[str, Any]:
    from igvm_builder.measure.report import reference_values

    refs = reference_values(f, sha256, loader=cfg.loader, tdx_two_pass=cfg.tdx.two_pass, file_size=size,
                            measurements=measurements)
    refs["file"] = {**refs.get("file", {}), "sha256": sha256, "size": size}
    with open(cfg.source, "rb") as fh:
        config_sha = hashlib.sha256(fh.read()).hexdigest()
    includes = {}
    for p in cfg.includes:  # included configs: a changed include is then named as such
        with open(p, "rb") as fh:
            includes[p] = hashlib.sha256(fh.read()).hexdigest()
    refs["inputs"] = {
        "config": {"path": os.path.basename(cfg.source), "sha256": config_sha},
        **{cfg.input_name(p): {"path": cfg.input_name(p), "sha256": d}
           for p, d in sorted({**includes, **input_hashes}.items())},
    }
    refs["build"] = {"platforms": list(cfg.platforms), "loader": cfg.loader, "notes": list(notes)}
    return refs
