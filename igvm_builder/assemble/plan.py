"""One platform's launch plan: the memory it claims and the directives its loader imports, in
order; runs of file pages (:class:`_PageRun`) and the PAGE_DATA headers made from them.

Also the low-memory layout of kernel launches (GPAs shared by every platform)."""

from __future__ import annotations

from collections.abc import Sequence

from igvm_builder.errors import LayoutError
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice
from igvm_builder.format.defs import (
    PageDataType,
    PlatformType,
)
from igvm_builder.format.pages import PageRun, new_page_unchecked
from igvm_builder.recordclass import record

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


# --------------------------------------------------------------------------- per-platform plan


@record(frozen=False)
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
    """The pages of ``view[start:start + length]`` at ``gpa`` (:func:`page_items`), or prepared
    :class:`~igvm_builder.format.pages.PageRun` pieces (mask 0), given their final compatibility
    mask only when the merged directive list is made: runs stay runs (no header per page).
    """

    __slots__ = ("flags", "gpa", "length", "mem_size", "prepared", "start", "view", "zero_fill")

    def __init__(self, gpa: int, view: memoryview | None = None, mem_size: int | None = None, *, flags: int = 0,
                 zero_fill: bool = True, start: int = 0, length: int | None = None,
                 prepared: Sequence[PageRun] | None = None) -> None:
        if gpa % PAGE:
            raise LayoutError(f"GPA {gpa:#x} is not 4 KiB aligned", gpa=gpa)
        self.gpa, self.view, self.mem_size, self.flags = gpa, view, mem_size, flags
        self.zero_fill, self.start, self.length, self.prepared = zero_fill, start, length, prepared

    @classmethod
    def of_runs(cls, runs: Sequence[PageRun]) -> _PageRun:
        """Prepared pieces, in GPA order (their masks are replaced)."""
        return cls(runs[0].gpa if runs else 0, prepared=runs)

    def gpa_ranges(self) -> list[tuple[int, int]]:
        """The [start, end) GPA ranges the pages cover, in order."""
        if self.prepared is not None:
            return [(r.gpa, r.end_gpa) for r in self.prepared]
        assert self.view is not None
        n = len(self.view) - self.start if self.length is None else self.length
        size = -(-max(n, self.mem_size or 0) // PAGE) * PAGE
        return [(self.gpa, self.gpa + size)] if size else []

    def items(self, mask: int) -> list[H.Header | PageRun]:
        """The pages as directive items (runs and single pages) with compatibility mask ``mask``."""
        if self.prepared is not None:
            return [r.with_mask(mask) for r in self.prepared]
        assert self.view is not None
        return page_items(self.gpa, self.view, self.mem_size, flags=self.flags, zero_fill=self.zero_fill,
                          start=self.start, length=self.length, mask=mask)

    def headers(self, mask: int) -> list[H.PageData]:
        """The pages as PageData headers, one per page."""
        out: list[H.PageData] = []
        for item in self.items(mask):
            if isinstance(item, PageRun):
                out += item.pages()
            else:
                assert isinstance(item, H.PageData)
                out.append(item)
        return out


def page_items(gpa: int, view: memoryview, mem_size: int | None = None, *, flags: int = 0,
               zero_fill: bool = True, start: int = 0, length: int | None = None,
               mask: int = 0) -> list[H.Header | PageRun]:
    """The pages of :func:`page_headers` as directive items: one run for the whole pages (windows
    of ``view``), a header for a partial last page, one run for the zero-filled (or data-less)
    pages up to ``mem_size``: memory does not grow with the number of pages."""
    if gpa % PAGE:
        raise LayoutError(f"GPA {gpa:#x} is not 4 KiB aligned", gpa=gpa)
    n = len(view) - start if length is None else length
    total = -(-max(n, mem_size or 0) // PAGE) * PAGE
    full = n - n % PAGE
    out: list[H.Header | PageRun] = []
    if full:
        H.PageData(gpa=gpa, compatibility_mask=mask, flags=flags, data=FileSlice(view, start, PAGE))  # checks
        out.append(PageRun(gpa, full // PAGE, mask, flags=flags, source=view, start=start))
    filled = full
    if n % PAGE:
        data = bytes(view[start + full : start + n]) + bytes(PAGE - n % PAGE)
        out.append(H.PageData(gpa=gpa + full, compatibility_mask=mask, flags=flags, data=data))
        filled += PAGE
    if total > filled:
        H.PageData(gpa=gpa + filled, compatibility_mask=mask, flags=flags)  # the same checks
        out.append(PageRun(gpa + filled, (total - filled) // PAGE, mask, flags=flags,
                           fill=ZERO_PAGE if zero_fill else b""))
    return out


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
    out += [new_page_unchecked(gpa + off, mask, flags, normal, FileSlice(view, start + off, PAGE))
            for off in range(PAGE, full, PAGE)]
    page_data = H.PageData
    for off in range(full, total, PAGE):
        if off < n:
            data: bytes = bytes(view[start + off : start + n]) + bytes(PAGE - (n - off))
        else:
            data = ZERO_PAGE if zero_fill else b""
        if off > full and off >= n:  # a page like the one before: the fast constructor
            out.append(new_page_unchecked(gpa + off, mask, flags, normal, data))
        else:
            out.append(page_data(gpa=gpa + off, compatibility_mask=mask, flags=flags, data_type=normal, data=data))
    return out
