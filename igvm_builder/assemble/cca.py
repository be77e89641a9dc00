"""Arm CCA realm launches: an arm64 Linux Image, its initrd and DTB laid out as a VMM does for a
realm, as an IGVM v2 AArch64 file with the CCA platform.

Where each piece goes is the VMM's choice, reproduced from the models of the
realm-measurements oracle (``shared/spec/CCA.md`` Part A §8, Part B §4); ``base``/``size`` are
the guest RAM:

============  =================================  ==========================================  =====================================
VMM           kernel (+ text_offset)             DTB                                         initrd
============  =================================  ==========================================  =====================================
kvmtool       base                               ``align_up(min(base + size, base + 256M)    ``align_up(D - len - 4, 4)`` (below
                                                 - 2M - 64K, 2M)`` = D                       the DTB, not page aligned)
qemu          base                               ``align_up(initrd_start + len, 2M)``        ``initrd_start = align_up(max(base +
                                                                                             min(size/2, 128M), kernel end), 4K)``
cloud-hyp.    base + 4 MiB                       base                                        ``base + size - align_up(len, 4K)``
============  =================================  ==========================================  =====================================

The realm's IPA width is the VMM's (kvmtool: ``max(ilog2(RAM top - 1), 32) + 1``; QEMU: from its
virt memory map, 41 below 255 GiB; cloud-hypervisor: 48), lowered to ``cca.ipa_bits``.

The file: one SUPPORTED_PLATFORM (CCA, ``shared_gpa_boundary = 1 << (s2sz - 1)``, the unprotected
IPA bit: Part B's suggested convention), a CCA_POLICY (hash algorithm, attributes, LFA policy),
the kernel, initrd and DTB as measured PAGE_DATA in ascending GPA order (the order the oracle's
RMI_DATA_CREATE calls take), and vCPU 0's REC: pc = the kernel entry (its load address), x0 = the
DTB, RUNNABLE.  The DTB is page data, not a DEVICE_TREE parameter: a parameter is imported
unmeasured, and the realm could not trust it (Part B §3).
"""

from __future__ import annotations

import struct

from igvm_builder.assemble.mapped import _Inputs
from igvm_builder.assemble.plan import page_headers
from igvm_builder.cca_config import CcaSpec
from igvm_builder.config import BuildConfig
from igvm_builder.errors import InputError, LayoutError
from igvm_builder.format import headers as H
from igvm_builder.format.defs import Architecture, PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.format.pages import Directives
from igvm_builder.inputs.arm64 import Arm64Image, parse_arm64_image
from igvm_builder.measure.cca import HASH_ALGORITHMS, REC_RUNNABLE, SHA384_NOTE, Realm, RealmParams
from igvm_builder.recordclass import record

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
GRANULE = 4 * KIB
DEFAULT_RAM_BASE = {"kvmtool": 0x80000000, "qemu": 0x40000000, "cloud-hypervisor": 0x40000000}
DEFAULT_HASH = {"kvmtool": "sha256", "qemu": "sha512", "cloud-hypervisor": "sha512"}
CLOUDHV_KERNEL_OFFSET = 4 * MIB
KVMTOOL_FDT_WINDOW = 256 * MIB  # kvmtool keeps the DTB in the first 256 MiB of RAM
KVMTOOL_FDT_SIZE = 64 * KIB
#: CCA_POLICY lfa_policy values.
LFA = {"disallow": 0, "allow": 1}


def _align_up(v: int, a: int) -> int:
    return -(-v // a) * a


def vmm_ipa_bits(vmm: str, base: int, size: int) -> int:
    """The IPA width the VMM gives a realm with RAM ``[base, base + size)`` (oracle ``kvmtool.rs``,
    ``qemu.rs update_memmap``, ``cloud_hypervisor.rs``)."""
    if vmm == "kvmtool":
        return max((base + size - 1).bit_length() - 1, 32) + 1
    if vmm == "qemu":
        # virt: RAM, hotplug RAM (none), then the high GIC redistributors (>= 256 GiB), the high
        # PCIe ECAM (256 MiB) and MMIO (512 GiB) regions; twice that for the realm's shared half.
        addr = max(_align_up(base + size, GIB), 256 * GIB)
        addr += 64 * MIB + 256 * MIB + 512 * GIB
        return addr.bit_length() - 1 + 2
    return 48


def realm_params(cfg: BuildConfig) -> RealmParams:
    spec = _spec(cfg)
    base = spec.ram_base if spec.ram_base is not None else DEFAULT_RAM_BASE[spec.vmm]
    s2sz = vmm_ipa_bits(spec.vmm, base, spec.ram_size)
    if spec.ipa_bits is not None:
        s2sz = min(s2sz, spec.ipa_bits)
    return RealmParams(s2sz=s2sz, num_bps=spec.breakpoints, num_wps=spec.watchpoints,
                       hash_algorithm=spec.hash or DEFAULT_HASH[spec.vmm], sve_vl=spec.sve_vl, pmu=spec.pmu,
                       pmu_num_ctrs=spec.pmu_counters if spec.pmu else 0, lpa2=spec.lpa2)


def realm_of(cfg: BuildConfig) -> Realm:
    """The realm a CCA config describes: what its RIM needs beyond the file."""
    spec = _spec(cfg)
    params = realm_params(cfg)
    base = spec.ram_base if spec.ram_base is not None else DEFAULT_RAM_BASE[spec.vmm]
    top = base + spec.ram_size
    if top > 1 << (params.s2sz - 1):
        lowered = spec.ipa_bits is not None and spec.ipa_bits < vmm_ipa_bits(spec.vmm, base, spec.ram_size)
        why = "cca.ipa_bits" if lowered else f"{spec.vmm}'s IPA width for this RAM"
        raise LayoutError(f"a realm with {params.s2sz}-bit IPAs ({why}) has protected addresses below "
                          f"{1 << (params.s2sz - 1):#x}; RAM {base:#x}..{top:#x} does not fit", source=cfg.source,
                          key="cca.ipa_bits" if lowered else "cca.ram_size", gpa=base)
    return Realm(params, ((base, spec.ram_size),))


def realm_reference(cfg: BuildConfig) -> dict[str, object]:
    """The realm in reference values: what a verifier needs besides the file to recompute the RIM."""
    spec = _spec(cfg)
    return {"realm": realm_of(cfg).to_json(), "vmm": spec.vmm, "rmm": "1.0"}


def _spec(cfg: BuildConfig) -> CcaSpec:
    if cfg.cca is None:
        raise LayoutError("not a CCA config (no [cca] table)", source=cfg.source)
    return cfg.cca


@record
class CcaLayout:
    """Where a VMM puts a realm's pieces."""

    ram_base: int
    ram_size: int
    kernel: int
    kernel_end: int  # load address + image_size
    dtb: int
    initrd: int | None


def cca_layout(spec: CcaSpec, image: Arm64Image, initrd_size: int | None) -> CcaLayout:
    base = spec.ram_base if spec.ram_base is not None else DEFAULT_RAM_BASE[spec.vmm]
    size = spec.ram_size
    top = base + size
    if spec.vmm == "kvmtool":
        kernel = base + image.text_offset
        dtb = _align_up(min(top, base + KVMTOOL_FDT_WINDOW) - 2 * MIB - KVMTOOL_FDT_SIZE, 2 * MIB)
        initrd = _align_up(dtb - initrd_size - 4, 4) if initrd_size is not None else None
    elif spec.vmm == "qemu":
        kernel = base + image.text_offset
        start = _align_up(max(base + min(size // 2, 128 * MIB), kernel + image.load_size), 4 * KIB)
        initrd = start if initrd_size is not None else None
        dtb = _align_up(start + (initrd_size or 0), 2 * MIB)
    else:
        kernel = base + CLOUDHV_KERNEL_OFFSET + image.text_offset
        dtb = base
        initrd = top - _align_up(initrd_size, GRANULE) if initrd_size is not None else None
    return CcaLayout(ram_base=base, ram_size=size, kernel=kernel, kernel_end=kernel + image.load_size, dtb=dtb,
                     initrd=initrd)


def _blob_pages(gpa: int, view: memoryview) -> list[H.PageData]:
    """Measured PAGE_DATA for ``view`` at ``gpa``: the granules ``align_down(gpa)..align_up(end)``,
    the first with ``gpa % 4096`` zero bytes in front (a kvmtool initrd), the last zero-padded."""
    pad = gpa % GRANULE
    if not pad:
        return page_headers(gpa, view, mask=1)
    first = bytes(pad) + bytes(view[: GRANULE - pad])
    pages = [H.PageData(gpa=gpa - pad, compatibility_mask=1, data=first + bytes(GRANULE - len(first)))]
    if len(view) > GRANULE - pad:
        pages += page_headers(gpa - pad + GRANULE, view, start=GRANULE - pad, mask=1)
    return pages


class CcaBuilder:
    """A CCA config -> IgvmFile (the interface of :class:`igvm_builder.assemble.launch._Builder`)."""

    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.spec = _spec(cfg)
        self.inputs = _Inputs()
        self.notes: list[str] = []
        #: the DTB the file carries (generated or given)
        self.dtb: bytes | memoryview = b""
        self.layout: CcaLayout | None = None

    def run(self) -> IgvmFile:
        from igvm_builder.inputs.dtb import generate_dtb, read_dtb

        cfg, spec = self.cfg, self.spec
        if cfg.kernel is None:
            raise LayoutError("a CCA realm needs a kernel", source=cfg.source, key="kernel.path")
        if cfg.blobs:
            raise LayoutError("[[blob]] is not supported for CCA realms", source=cfg.source, key="blob")
        kpath, ipath = cfg.kernel.path, cfg.kernel.initrd
        kview = self.inputs.get(kpath, "kernel")
        iview = self.inputs.get(ipath, "initrd") if ipath else None
        dview = self.inputs.get(spec.dtb, "DTB") if spec.dtb else None
        realm = realm_of(cfg)
        image = parse_arm64_image(kview, kpath)
        if image.gzip:
            self.notes.append(f"cca: the kernel is gzip-compressed; the file carries the decompressed Image "
                              f"({len(image.data)} bytes), as the VMM loads and measures it")
        if image.big_endian:
            self.notes.append("cca: the Image header says big-endian kernel")
        lay = cca_layout(spec, image, len(iview) if iview is not None else None)
        self.layout = lay
        if dview is not None:
            info = read_dtb(dview, spec.dtb)
            self.dtb = dview[: info.size]
            self._check_given_dtb(info, lay, len(iview) if iview is not None else 0)
        else:
            initrd = (lay.initrd, lay.initrd + len(iview)) if lay.initrd is not None and iview is not None else None
            self.dtb = generate_dtb([(lay.ram_base, lay.ram_size)], spec.vcpus, bootargs=cfg.kernel.cmdline,
                                    initrd=initrd)
        self._check_layout(lay, image, iview)
        if realm.params.hash_algorithm == "sha384":
            self.notes.append(f"cca: {SHA384_NOTE}")
        if spec.ram_base is not None and spec.ram_base != DEFAULT_RAM_BASE[spec.vmm]:
            self.notes.append(f"cca: RAM at {spec.ram_base:#x}, not where {spec.vmm} puts it "
                              f"({DEFAULT_RAM_BASE[spec.vmm]:#x}); the layout follows the VMM's rules relative to it")
        pages = _blob_pages(lay.kernel, memoryview(image.data) if image.gzip else kview)
        if iview is not None and lay.initrd is not None:
            pages += _blob_pages(lay.initrd, iview)
        pages += _blob_pages(lay.dtb, memoryview(self.dtb))
        pages.sort(key=lambda p: p.gpa)
        ctx = struct.pack("<8QQQ", lay.dtb, 0, 0, 0, 0, 0, 0, 0, lay.kernel, REC_RUNNABLE)
        platform = H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.CCA, platform_version=1,
                                       highest_vtl=0, shared_gpa_boundary=1 << (realm.params.s2sz - 1))
        policy = H.CcaPolicy(compatibility_mask=1, attributes_required_zeroes=spec.attributes_required_zeroes,
                             attributes_required_ones=spec.attributes_required_ones,
                             hash_algorithm=HASH_ALGORITHMS[realm.params.hash_algorithm], lfa_policy=LFA[spec.lfa])
        return IgvmFile(revision=2, architecture=Architecture.AARCH64, platforms=(platform,),
                        initializations=(policy,),
                        directives=Directives((*pages, H.CcaVpContext(compatibility_mask=1, vp_index=0, context=ctx))))

    def _check_given_dtb(self, info: object, lay: CcaLayout, initrd_size: int) -> None:
        from igvm_builder.inputs.dtb import DtbInfo

        assert isinstance(info, DtbInfo)
        spec, name = self.spec, self.spec.dtb
        if lay.initrd is not None:
            want = (lay.initrd, lay.initrd + initrd_size)
            if info.initrd != want:
                have = f"{info.initrd[0]:#x}..{info.initrd[1]:#x}" if info.initrd else "none"
                raise InputError(f"its /chosen initrd range ({have}) is not where {spec.vmm} puts the initrd "
                                 f"({want[0]:#x}..{want[1]:#x}); the kernel would not find it", source=name)
        if info.memory and info.memory != ((lay.ram_base, lay.ram_size),):
            mem = ", ".join(f"{b:#x}+{s:#x}" for b, s in info.memory)
            self.notes.append(f"cca: the DTB's memory ({mem}) is not the realm's RAM "
                              f"({lay.ram_base:#x}+{lay.ram_size:#x})")
        if info.cpus and info.cpus != spec.vcpus:
            self.notes.append(f"cca: the DTB describes {info.cpus} CPUs, cca.vcpus is {spec.vcpus}")

    def _check_layout(self, lay: CcaLayout, image: Arm64Image, iview: memoryview | None) -> None:
        cfg = self.cfg
        top = lay.ram_base + lay.ram_size
        if lay.ram_size % GRANULE or lay.ram_base % GRANULE:
            raise LayoutError(f"RAM {lay.ram_base:#x}+{lay.ram_size:#x} is not 4 KiB aligned", source=cfg.source,
                              key="cca.ram_size")
        if self.spec.vmm == "kvmtool" and lay.ram_size % (2 * MIB):
            raise LayoutError(f"kvmtool takes RAM in multiples of 2 MiB, not {lay.ram_size:#x}", source=cfg.source,
                              key="cca.ram_size")
        regions = [("kernel", lay.kernel, lay.kernel_end), ("DTB", lay.dtb, lay.dtb + len(self.dtb))]
        if lay.initrd is not None and iview is not None:
            regions.append(("initrd", lay.initrd, lay.initrd + len(iview)))
        for what, start, end in regions:
            if start < lay.ram_base or end > top:
                raise LayoutError(f"RAM too small: {self.spec.vmm} puts the {what} at {start:#x}..{end:#x}, outside "
                                  f"RAM {lay.ram_base:#x}..{top:#x}", source=cfg.source, key="cca.ram_size", gpa=start)
        for i, (a, a0, a1) in enumerate(regions):
            for b, b0, b1 in regions[i + 1:]:
                # the kernel by image_size (BSS included); the others by their granules
                g0 = a0 - a0 % GRANULE if a != "kernel" else a0
                h0 = b0 - b0 % GRANULE
                if g0 < _align_up(b1, GRANULE) and h0 < (_align_up(a1, GRANULE) if a != "kernel" else a1):
                    what = (f"the Image's image_size {image.load_size:#x} (kernel {a0:#x}..{a1:#x}) overlaps"
                            if a == "kernel" else f"the {a} ({a0:#x}..{a1:#x}) overlaps")
                    raise LayoutError(f"{what} the {b} at {b0:#x}..{b1:#x} in the {self.spec.vmm} layout; "
                                      "more RAM moves them apart", source=cfg.kernel.path if cfg.kernel else None,
                                      gpa=b0)
