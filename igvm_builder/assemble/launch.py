"""The launch plans of a config: OVMF firmware (SEV metadata, TDVF, IGVM parameters, measured
direct boot) and kernels booted without firmware (ELF/PVH, bzImage, UKI), one plan per platform,
merged into an :class:`~igvm_builder.format.file.IgvmFile`."""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Sequence
from typing import Any

from igvm_builder.assemble.mapped import _Inputs
from igvm_builder.assemble.merge import merge_directives
from igvm_builder.assemble.plan import (
    BOOT_INFO_GPA,
    CMDLINE_GPA,
    E820_RAM,
    E820_RESERVED,
    FOUR_GIB,
    GDT_GPA,
    KVM_VMSA_GPA,
    LOW_RAM_END,
    PAGE,
    PAGE_TABLES_GPA,
    PVH_MAGIC,
    SNP_C_BIT,
    SNP_CC_BLOB_GPA,
    SNP_CPUID_GPA,
    SNP_SECRETS_GPA,
    STACK_TOP,
    ZERO_PAGE,
    _PageRun,
    _PlatformPlan,
)
from igvm_builder.config import BuildConfig
from igvm_builder.errors import InputError, LayoutError
from igvm_builder.format import headers as H
from igvm_builder.format.defs import (
    PLATFORM_NAMES,
    PageDataFlags,
    PageDataType,
    PlatformType,
)
from igvm_builder.format.file import IgvmFile
from igvm_builder.format.pages import Directives, PageRun
from igvm_builder.platforms.cpu import CpuState, gdt_bytes, identity_page_tables, tdx_reset_trampoline
from igvm_builder.recordclass import fields

_SEE = "(docs/CONFIG.md, 'What a directly booted confidential guest still needs')"
_ELF_NO_CC_BLOB = "; booted as an ELF (no boot_params), it finds no SEV CC blob (secrets and CPUID pages)"
#: Build notes of SNP and TDX kernel launches, by (platform, memory.prevalidate).
_DIRECT_BOOT_NOTES = {
    (PlatformType.SEV_SNP, False): "snp: the kernel starts without firmware: guest RAM outside this image is not "
                                   "validated (PVALIDATE){blob}; a Linux guest expects its RAM validated by "
                                   f"firmware, a boot shim or memory.prevalidate {_SEE}",
    (PlatformType.SEV_SNP, True): "snp: guest RAM outside this image is imported unmeasured, so the loader "
                                  f"validates it at launch (memory.prevalidate; not tried on hardware){{blob}} {_SEE}",
    (PlatformType.TDX, False): "tdx: the kernel starts without TDVF or td-shim: private memory outside this image "
                               "is not accepted; a Linux TD expects its RAM accepted (or listed as unaccepted by "
                               f"EFI) by its firmware, a boot shim or memory.prevalidate {_SEE}",
    (PlatformType.TDX, True): "tdx: guest RAM outside this image is added unmeasured (PAGE.ADD), so it is accepted "
                              f"at launch (memory.prevalidate; not tried on hardware) {_SEE}",
}

#: PAGE_DATA flag of pages the loader imports without measuring them (a plain int: IntFlag's ``&``
#: is a Python call, and the measurements test the flags of every page).
_UNMEASURED = int(PageDataFlags.UNMEASURED)


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
            pages = _PageRun(blob.gpa, view, flags=0 if blob.measured else _UNMEASURED)
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
                     directives=Directives(directives))
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
            try:
                hashes_page = kernel_hashes_page(
                    img, kernel, initrd, cfg.kernel.cmdline or None,
                    kernel_sha256=self.inputs.sha256_of(cfg.kernel.path),
                    initrd_sha256=self.inputs.sha256_of(cfg.kernel.initrd) if cfg.kernel.initrd else None)
            except InputError as exc:
                if "does not support measured direct boot" not in exc.message:
                    raise
                raise InputError(
                    f"firmware {path}: {exc.message}. A [kernel] booted by OVMF on SEV-SNP/SEV is measured "
                    "through that page: set firmware.path to a firmware built for it, such as OVMF.amdsev.fd "
                    "(Debian package ovmf-amdsev, /usr/share/ovmf/OVMF.amdsev.fd), or drop the [kernel] table "
                    "and let the firmware boot from disk", source=cfg.source, key="firmware.path") from None
            self.notes.append("measured direct boot: the VMM must be given exactly this kernel, initrd and "
                              "command line (their hashes are in the kernel-hashes page)")
        if cfg.kernel and PlatformType.TDX in self.plans:
            self.notes.append("tdx: OVMF measures the kernel, initrd and command line of this launch into RTMRs at "
                              "run time, not into MRTD: the TDX digest here does not change with them; check "
                              "them in the TD quote's RTMR event log")
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
                    flags = _UNMEASURED if sec.type == 1 and vmm == "gce" else 0
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
                if p == PlatformType.SEV_SNP and snp.vmm_type == "qemu":  # ec2/gce reproduce other hosts
                    _check_kvm_fixed_point(vmsa, vp, features)
                plan.tail.append(H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=0, vp_index=vp, vmsa=vmsa))
        elif p in (PlatformType.NATIVE, PlatformType.SEV):
            # Architectural reset state: real mode, CS base 0xffff0000, IP 0xfff0.
            state = CpuState(rip=0xFFF0, cr0=0x10, gdtr_limit=0xFFFF, code_selector=0xF000, code_attributes=0x9B,
                             data_selector=0, data_attributes=0x93)
            ctx = state.native_context(code_base=0xFFFF0000, code_limit=0xFFFF, data_limit=0xFFFF)
            plan.tail.append(H.NativeVpContext(compatibility_mask=0, vp_index=0, context=ctx))

    def _ovmf_tdx(self, plan: _PlatformPlan, img: Any, view: memoryview) -> None:
        plan.policy = self.cfg.tdx.policy
        for sec in img.tdx_sections:
            if sec.page_aug or sec.mem_size == 0:
                continue
            plan.claim(sec.mem_base, sec.mem_size, f"TDVF section {sec.type_name} at {sec.mem_base:#x}")
            if sec.raw_size:
                data = view[sec.data_offset : sec.data_offset + sec.raw_size]
                flags = 0 if sec.mr_extend else _UNMEASURED
                plan.pages_from(sec.mem_base, data, sec.mem_size, flags=flags, zero_fill=False)
            else:
                for off in range(0, sec.mem_size, PAGE):
                    plan.page(sec.mem_base + off, flags=_UNMEASURED)

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
        early = b""
        if fmt == "uki":
            from igvm_builder.inputs.uki import parse_uki

            uki = parse_uki(view, k.path)
            view = memoryview(uki.linux)
            if uki.initrd and initrd is None:
                initrd, initrd_name = memoryview(uki.initrd), f"{k.path} (.initrd)"
            if uki.cmdline and not cmdline:
                cmdline = uki.cmdline
            early = uki.ucode or b""  # systemd-stub passes it in front of every other initrd
            fmt = "bzimage"
        cmd = cmdline.encode() + b"\0"
        if len(cmd) > PAGE:
            raise LayoutError(f"command line is {len(cmd)} bytes; at most 4095 are supported",
                              source=self.cfg.source, key="kernel.cmdline")
        if fmt == "elf":
            self._elf(view, k.path, cmd, initrd, initrd_name)
        else:
            self._bzimage(view, k.path, cmd, initrd, initrd_name, early=early)
        if self.cfg.memory_prevalidate:
            self._prevalidate()
        # What this image does not do for a confidential guest (no firmware runs before the
        # kernel); said in the reference values and by the CLI, documented in docs/CONFIG.md.
        blob = "" if fmt == "bzimage" else _ELF_NO_CC_BLOB
        for p in (PlatformType.SEV_SNP, PlatformType.TDX):
            if p in self.plans:
                self.notes.append(_DIRECT_BOOT_NOTES[p, self.cfg.memory_prevalidate].format(blob=blob))

    def _prevalidate(self) -> None:
        """``memory.prevalidate``: on SNP and TDX, every page of guest RAM (the memory map's RAM
        entries) that the plan does not import becomes a data-less, unmeasured PAGE_DATA, which
        the loader imports like the rest of the image: validated (SNP_LAUNCH_UPDATE, page type
        UNMEASURED) or added (TDH.MEM.PAGE.ADD without MR.EXTEND) before the guest runs.  Runs
        of such pages that are the same on both platforms are one run, stored once in the file."""
        runs: dict[tuple[int, int], _PageRun] = {}
        ram = [(start, start + size) for start, size, kind in self._memory_map() if kind == E820_RAM]
        pages = sum(end - start for start, end in ram) // PAGE
        limit = fill_pages_limit()
        if pages > limit:
            raise LayoutError(f"memory.prevalidate with memory.size {self.cfg.memory_size:#x} adds up to {pages} "
                              f"page headers; the limit is {limit} pages ({limit * PAGE >> 30} GiB; set "
                              f"{FILL_PAGES_ENV} to raise it)", source=self.cfg.source, key="memory.prevalidate")
        for p, plan in self.plans.items():
            if p not in (PlatformType.SEV_SNP, PlatformType.TDX):
                continue
            # the pages imported, as sorted, merged GPA ranges (not a set of pages: RAM is large)
            imported: list[tuple[int, int]] = []
            for lo, hi in sorted(r for d in plan.directives for r in _page_ranges(d)):
                if imported and lo <= imported[-1][1]:
                    imported[-1] = (imported[-1][0], max(imported[-1][1], hi))
                else:
                    imported.append((lo, hi))
            for start, end in ram:
                # the gaps of ``imported`` inside [start, end), page-aligned as the pages are
                gpa = start
                k = max(0, bisect.bisect_right(imported, (gpa, 1 << 64)) - 1)  # the range at or before gpa
                while gpa < end:
                    if k < len(imported) and imported[k][0] <= gpa < imported[k][1]:
                        gpa = min(end, imported[k][1])
                        k += 1
                        continue
                    while k < len(imported) and imported[k][1] <= gpa:
                        k += 1
                    first = gpa
                    gpa = min(end, imported[k][0]) if k < len(imported) else end
                    if gpa <= first:
                        continue
                    key = (first, gpa - first)
                    run = runs.get(key)
                    if run is None:
                        run = runs[key] = _PageRun(first, memoryview(b""), mem_size=gpa - first,
                                                   flags=_UNMEASURED, zero_fill=False)
                    plan.add_pages(run)

    def _check_elf(self, elf: Any, name: str) -> None:
        """Segments must lie in guest RAM (memory.size) and the entry point in a segment's file
        bytes: else the guest would start in memory that is not there, or in zeros."""
        fill = sum(max(0, -(-seg.end // PAGE) - -(-(seg.gpa + len(seg.data)) // PAGE)) for seg in elf.segments)
        limit = fill_pages_limit()
        if fill > limit:
            raise LayoutError(f"{name}: its BSS (zero-filled PT_LOAD memory) needs {fill} page headers; the limit is "
                              f"{limit} pages (set {FILL_PAGES_ENV} to raise it)", source=self.cfg.source)
        mem = self.cfg.memory_size
        low_top = min(mem, 0xC000_0000)
        high_end = FOUR_GIB + (mem - low_top) if mem > low_top else 0
        for seg in elf.segments:
            if not (seg.end <= low_top or (seg.gpa >= FOUR_GIB and seg.end <= high_end)):
                raise LayoutError(f"{name}: a PT_LOAD segment at {seg.gpa:#x}-{seg.end - 1:#x} is outside guest RAM "
                                  f"(memory.size {mem:#x}); raise memory.size or fix the link address",
                                  source=self.cfg.source, key="memory.size", gpa=seg.gpa)
        entry = elf.pvh_entry if elf.pvh_entry is not None else (
            elf.entry_gpa if elf.entry_gpa is not None else elf.entry)
        if not any(seg.gpa <= entry < seg.gpa + len(seg.data) for seg in elf.segments):
            what = "PVH entry point" if elf.pvh_entry is not None else "entry point"
            raise InputError(f"the {what} {entry:#x} is outside the file bytes of every PT_LOAD segment",
                             source=name)

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
        if low_top <= 0x100000 + PAGE:
            raise LayoutError(f"memory.size {mem:#x} is too small for a kernel launch: the kernel is loaded at "
                              "1 MiB; give at least 2M", source=self.cfg.source, key="memory.size")
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
        self._check_elf(elf, name)
        high = max(seg.end for seg in elf.segments)
        initrd_gpa = self._place_initrd(len(initrd), -(-high // PAGE) * PAGE, 1 << 32) if initrd is not None else 0
        info = self._pvh_start_info(cmd, initrd_gpa, len(initrd) if initrd is not None else 0)
        snp_info = (self._pvh_start_info(cmd, initrd_gpa, len(initrd) if initrd is not None else 0, snp=True)
                    if PlatformType.SEV_SNP in self.plans else b"")
        pages = _elf_runs(elf, view)
        elf_headers = _PageRun.of_runs(pages)
        initrd_pages = _PageRun(initrd_gpa, initrd) if initrd is not None else None
        for p, plan in self.plans.items():
            self._common_low(plan, cmd)
            for start, end in _ranges_of(pages):
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

    def _bzimage(self, view: memoryview, name: str, cmd: bytes, initrd: memoryview | None, initrd_name: str,
                 *, early: bytes = b"") -> None:
        """``early``: a cpio archive loaded in front of the initrd (a UKI's ``.ucode``), padded with
        zeros to whole pages (the kernel's initramfs unpacker skips NUL bytes between archives), so
        the initrd itself stays page-aligned and is never copied."""
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
        early = early + bytes(-len(early) % PAGE)
        ramdisk_size = len(early) + (len(initrd) if initrd is not None else 0)
        ramdisk_gpa = 0
        if ramdisk_size:
            ramdisk_gpa = self._place_initrd(ramdisk_size, kernel_end, (bz.initrd_addr_max or 0x37FFFFFF) + 1)
        initrd_gpa = ramdisk_gpa + len(early)
        e820 = [E820Entry(a, s, t) for a, s, t in self._memory_map()]
        boot = {"cmdline_ptr": CMDLINE_GPA, "cmdline_size": len(cmd) - 1, "initrd_addr": ramdisk_gpa,
                "initrd_size": ramdisk_size}
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
        early_pages = _PageRun(ramdisk_gpa, memoryview(early)) if early else None
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
            if early_pages is not None:
                plan.claim(ramdisk_gpa, len(early), f"{name} (.ucode)")
                plan.add_pages(early_pages)
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
            vmsa = state.vmsa(sev_features=features)
            if p == PlatformType.SEV_SNP:
                _check_kvm_fixed_point(vmsa, 0, features)
                n = self.cfg.snp.vcpus
                if n > 1:
                    self.notes.append(
                        f"snp: {n} vCPUs: the image has a VP context for vCPU 0 only; on qemu and cloud-hypervisor "
                        f"KVM measures {n - 1} reset-state AP VMSA(s) after it (CPU model {self.cfg.snp.vcpu_type} "
                        "on qemu), which the reference values' digest includes for those loaders; launch with "
                        f"-smp {n} (docs/MEASUREMENT.md, 'vCPUs')")
            plan.tail.append(H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=0, vp_index=0, vmsa=vmsa))
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


#: Most page headers a build may make without input data: the zero-filled BSS of an ELF kernel,
#: and the RAM pages ``memory.prevalidate`` adds.  The pages are runs in the model (memory does
#: not grow with them), but each is a 32-byte header in the file and a launch step: 4,194,304
#: pages is 16 GiB of guest RAM, 128 MiB of headers; override with :data:`FILL_PAGES_ENV` (up to
#: the 4 GiB a file may hold).
MAX_FILL_PAGES = 1 << 22
FILL_PAGES_ENV = "IGVM_BUILDER_MAX_FILL_PAGES"


def fill_pages_limit() -> int:
    """:data:`MAX_FILL_PAGES`, or the value of :data:`FILL_PAGES_ENV` when set."""
    import os

    text = os.environ.get(FILL_PAGES_ENV, "").strip()
    if not text:
        return MAX_FILL_PAGES
    try:
        value = int(text, 0) if len(text) <= 32 else -1
    except ValueError:
        value = -1
    if value < 0:
        raise LayoutError(f"{FILL_PAGES_ENV}={text[:32]!r} is not a page count")
    return value


def _page_ranges(d: H.Header | _PageRun) -> list[tuple[int, int]]:
    """The [start, end) GPA ranges of the 4 KiB pages a planned directive imports."""
    if isinstance(d, _PageRun):
        return d.gpa_ranges()
    if isinstance(d, H.PageData):
        return [(d.gpa, d.gpa + PAGE)]
    return []


def _elf_runs(elf: Any, view: memoryview) -> list[PageRun]:
    """Page contents of an ELF's PT_LOAD segments, in GPA order, as page runs (mask 0): whole
    pages of one segment's file bytes are one run of windows of ``view`` (the file, at the
    segment's file offset), zero-filled pages (BSS) one run of the shared zero page, and a page
    that several segments share or that a segment's file bytes end in is composed (a copy).
    The work and memory are per segment, not per page: a BSS of any size is one run.
    """
    # every segment's pages: [floor(gpa), the page holding its last byte]
    spans = [(seg.gpa & ~0xFFF, seg.gpa + -(-(seg.end - (seg.gpa & ~0xFFF)) // PAGE) * PAGE - (seg.gpa & 0xFFF),
              seg) for seg in elf.segments]
    spans = [(lo, hi, seg) for lo, hi, seg in spans if hi > lo]
    cuts = sorted({x for lo, hi, _ in spans for x in (lo, hi)})
    out: list[PageRun] = []

    def composed(page: int, segs: list[Any]) -> None:
        buf = bytearray(PAGE)
        for seg in segs:
            lo, hi = max(page, seg.gpa), min(page + PAGE, seg.gpa + len(seg.data))
            if hi > lo:
                buf[lo - page : hi - page] = seg.data[lo - seg.gpa : hi - seg.gpa]
        out.append(PageRun(page, 1, 0, fill=bytes(buf)))

    def zeros(start: int, end: int) -> None:
        if end > start:
            out.append(PageRun(start, (end - start) // PAGE, 0, fill=ZERO_PAGE))  # one shared zero page

    for a, b in itertools.pairwise(cuts):  # pieces covered by the same segments
        segs = [seg for lo, hi, seg in spans if lo <= a and b <= hi]
        if not segs:
            continue
        # the pages from ``quiet`` on hold no file byte of any segment: zero-filled
        ends = [seg.gpa + len(seg.data) for seg in segs if len(seg.data)]
        quiet = min(b, max(a, -(-max(ends) // PAGE) * PAGE)) if ends else a
        if len(segs) == 1 and ends:
            seg = segs[0]
            first = max(a, -(-seg.gpa // PAGE) * PAGE)  # whole pages of file bytes: [first, last)
            last = min(quiet, (seg.gpa + len(seg.data)) & ~0xFFF)
            page = a
            while page < quiet:
                if first <= page < last:
                    out.append(PageRun(page, (last - page) // PAGE, 0, source=view, start=seg.offset + page - seg.gpa))
                    page = last
                else:
                    composed(page, segs)
                    page += PAGE
        else:
            for page in range(a, quiet, PAGE):
                composed(page, segs)
        zeros(quiet, b)
    return out


def _ranges_of(runs: Sequence[PageRun]) -> list[tuple[int, int]]:
    """Contiguous [start, end) GPA ranges of ``runs`` (in GPA order)."""
    ranges: list[tuple[int, int]] = []
    for r in runs:
        if ranges and ranges[-1][1] == r.gpa:
            ranges[-1] = (ranges[-1][0], r.end_gpa)
        else:
            ranges.append((r.gpa, r.end_gpa))
    return ranges


def _check_kvm_fixed_point(vmsa: bytes, vp: int, features: int) -> None:
    """Every SNP VMSA the builder writes is what QEMU/KVM and Cloud Hypervisor/KVM measure for it
    (shared/spec/KVM_VMSA.md §9): a guard against a change that breaks it, not a user error."""
    from igvm_builder.kvm_vmsa import KVM_VMMS, changes, refusals

    for vmm in KVM_VMMS:
        vp0 = None if vp == 0 else features
        bad = [r.field for r in refusals(vmsa, vmm, vp_index=vp, vp0_features=vp0)] + \
              [c.field for c in changes(vmsa, vmm, vp0_features=vp0)]
        if bad:
            raise LayoutError(f"internal error: the VMSA of vCPU {vp} is not what {vmm}/KVM measures "
                              f"(fields {', '.join(bad)})")


def _state_dict(state: CpuState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in fields(CpuState)}


def _with_vbs_measurement(f: IgvmFile, mask: int) -> IgvmFile:
    """Append a VBS_MEASUREMENT directive carrying the computed boot digest (signature left empty)."""
    from igvm_builder.measure import measure_platform

    digest = measure_platform(f, PlatformType.VSM_ISOLATION).digest or b""
    hdr = H.VbsMeasurement(compatibility_mask=mask, boot_measurement_digest=digest.ljust(64, b"\0"))
    return IgvmFile(revision=f.revision, architecture=f.architecture, platforms=f.platforms,
                    initializations=f.initializations, directives=Directives((*f.directives.items(), hdr)))
