"""Loader-specific checks: what each IGVM loader rejects or silently ignores.

Facts from ``shared/spec/MEASUREMENT.md`` §3 and §7.3-7.4 (QEMU 10.2.2, Cloud Hypervisor,
microsoft/igvm, COCONUT igvmmeasure) and ``IGVM_FORMAT.md`` §16 (0.4.0 compatibility).
"""

from __future__ import annotations

from dataclasses import dataclass

from igvm_builder.format import headers as H
from igvm_builder.format.defs import IGVM_VHT_OPTIONAL_BIT, PlatformType, SnpPolicyBits, tdx_policy_reserved
from igvm_builder.format.file import IgvmFile
from igvm_builder.measure.profiles import KVM_VMSA_GPA, get_profile


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  # "error" (the loader rejects the file) or "warning" (ignored / measured differently)
    message: str
    header_index: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"severity": self.severity, "message": self.message, "header_index": self.header_index}


def lint(f: IgvmFile, loader: str, *, qemu_guest: str = "any") -> list[Finding]:
    """Findings for ``f`` on ``loader``; for ``qemu``, ``qemu_guest`` is the confidential-guest
    object QEMU runs with (:data:`igvm_builder.qemu_loader.QEMU_GUESTS`, or ``any``)."""
    profile = get_profile(loader)
    out: list[Finding] = [Finding("warning", w) for w in f.warnings]
    base = len(f.platforms) + len(f.initializations)
    # QEMU without an SEV launch (--qemu-guest none or tdx) starts no SEV platform: no VMSA reaches KVM
    no_sev = profile.name == "qemu" and qemu_guest in ("none", "tdx")
    kvm = profile.vmsa_last_at_kvm_gpa and not no_sev
    supported = profile.platforms
    for p in f.platforms:
        if supported is not None and p.platform_type not in supported:
            out.append(Finding("warning", f"{loader} does not load the {p.platform_type.name} platform; it is "
                                          "ignored there"))
    # GUEST_POLICY headers, by the platform they apply to (the same header may serve both)
    masks = {t: [p.compatibility_mask for p in f.platforms if p.platform_type == t]
             for t in (PlatformType.SEV_SNP, PlatformType.TDX)}
    for i, h in enumerate(f.initializations, start=len(f.platforms)):
        if not isinstance(h, H.GuestPolicy):
            continue
        if any(h.compatibility_mask & m for m in masks[PlatformType.SEV_SNP]) \
                and not h.policy & SnpPolicyBits.RESERVED_MUST_BE_ONE:
            out.append(Finding("error", f"SEV-SNP guest policy {h.policy:#x} has bit 17 (0x20000) clear: the SNP "
                                        "ABI reserves it as must-be-one and the firmware refuses the launch", i))
        reserved = tdx_policy_reserved(h.policy)
        if reserved and any(h.compatibility_mask & m for m in masks[PlatformType.TDX]):
            out.append(Finding("warning", f"TDX guest policy {h.policy:#x} sets bits {reserved:#x} that IGVM's "
                                          "TdxPolicy reserves (only 0x1 debug_allowed, 0x2 sept_ve_disable, "
                                          "0x4 migratable are defined)", i))
    # the VMSA-order finding is about the SEV-SNP digest: only SNP pages count (the pages of
    # another platform, e.g. TDX's after the SNP VMSAs of an snp+tdx file, change nothing there)
    snp_mask = 0
    for m in masks[PlatformType.SEV_SNP]:
        snp_mask |= m
    last_page = -1
    first_vmsa = None
    vmsas: list[H.SnpVpContext] = []
    kvm_vmsas: list[tuple[int, H.SnpVpContext]] = []
    features = set()
    for i, h in enumerate(f.directives):
        idx = base + i
        if int(h.TYPE) & IGVM_VHT_OPTIONAL_BIT:
            out.append(Finding("error", "optional-bit header types are not understood by crate-based loaders", idx))
        if isinstance(h, H.PageData):
            if h.compatibility_mask & snp_mask:
                last_page = i
            if h.shared and not profile.skip_shared:
                out.append(Finding("warning", f"page at GPA {h.gpa:#x} is 'shared': {loader} ignores the flag and "
                                              "measures it like any page", idx))
            if h.is_2mb_page:
                out.append(Finding("error" if profile.refuses_2mb_pages else "warning",
                                   f"is_2mb_page at GPA {h.gpa:#x}: not supported by {loader}", idx))
        elif isinstance(h, H.SnpVpContext):
            vmsas.append(h)
            first_vmsa = i if first_vmsa is None else first_vmsa
            if kvm and h.gpa != KVM_VMSA_GPA:
                out.append(Finding("error", f"VMSA of vp {h.vp_index} at GPA {h.gpa:#x}: {loader} (KVM) accepts only "
                                            f"{KVM_VMSA_GPA:#x}", idx))
            from igvm_builder.sev_vmsa import parse_vmsa

            if h.compatibility_mask & snp_mask:  # the KVM SNP rules: not an SEV/SEV-ES platform's VMSA
                regs = parse_vmsa(bytes(h.blob()), nonzero_only=True)
                features.add(regs.get("sev_features", 0))
                kvm_vmsas.append((idx, h))
            if any(bytes(h.blob())[1648:]):
                out.append(Finding("warning", "VMSA bytes beyond 1648 are non-zero: the 0.4.0 igvm crate rejects "
                                              "the file", idx))
        elif isinstance(h, H.ParameterInsert) and not profile.insert_all_pages:
            out.append(Finding("warning", f"{loader} measures one page per PARAMETER_INSERT, other loaders the "
                                          "whole area", idx))
    if kvm and first_vmsa is not None and first_vmsa < last_page:
        out.append(Finding("warning", f"{loader} (KVM) measures VMSAs after every page, but the file has SEV-SNP "
                                      "pages after a VP context: the SEV-SNP digest differs from the reference "
                                      "model's", base + first_vmsa))
    if len(features) > 1:
        out.append(Finding("warning", "VMSAs carry different sev_features; QEMU passes only the BSP's to KVM"))
    if profile.kvm_vmm and kvm_vmsas and not no_sev:
        out += _kvm_vmsa_findings(kvm_vmsas, profile.kvm_vmm)
    if profile.name == "qemu":
        from igvm_builder.qemu_loader import qemu_findings

        out += [Finding(*issue) for issue in qemu_findings(f, qemu_guest)]
    if any(p.platform_type == PlatformType.CCA for p in f.platforms):
        from igvm_builder.lint_cca import cca_findings

        out += [Finding(severity, message, index) for severity, message, index in cca_findings(f)]
    return out


def _kvm_vmsa_findings(vmsas: list[tuple[int, H.SnpVpContext]], vmm: str) -> list[Finding]:
    """What QEMU / Cloud Hypervisor on KVM refuse or change in each VMSA, and the vCPU count
    (``shared/spec/KVM_VMSA.md`` §2, §5, §9; read from source, not checked on SNP hardware)."""
    from igvm_builder.format.blob import as_view
    from igvm_builder.kvm_vmsa import changes, refusals
    from igvm_builder.sev_vmsa import parse_vmsa

    out: list[Finding] = []
    by_vp = {h.vp_index: (idx, bytes(as_view(h.blob()))) for idx, h in vmsas}
    vp0 = int.from_bytes(by_vp[0][1][0x3B0:0x3B8], "little") if 0 in by_vp else None
    for vp, (idx, page) in sorted(by_vp.items()):
        feats = None if vp == 0 else vp0
        for r in refusals(page, vmm, vp_index=vp, vp0_features=feats):
            out.append(Finding("error", f"VMSA of vp {vp}: {r.message}: {vmm} refuses the file", idx))
        for c in changes(page, vmm, vp0_features=feats):
            if c.field.startswith("bytes"):
                out.append(Finding("warning", f"VMSA of vp {vp}: bytes from 0x670 on are non-zero; {vmm} measures "
                                              "them as 0", idx))
            else:
                out.append(Finding("warning", f"VMSA of vp {vp}: {c.field} {c.file_value:#x} is measured as "
                                              f"{c.measured:#x} on {vmm}", idx))
        cr0 = parse_vmsa(page)["cr0"]
        # the rule QEMU + KVM really apply: ET set, CD and NW clear (KVM_VMSA.md §3)
        if cr0 not in (0x30, 0x31) and cr0 & 0x10 and not cr0 & 0x60000000 and not cr0 >> 32:
            out.append(Finding("warning", f"VMSA of vp {vp}: COCONUT igvmmeasure --check-kvm refuses cr0 {cr0:#x} (it "
                                          "demands 0x31 or 0x30), although QEMU and Cloud Hypervisor on KVM measure "
                                          "it unchanged (ET set, CD and NW clear; NE and PG are left alone): that "
                                          "rule is over-strict (shared/spec/KVM_VMSA.md §3, §4)", idx))
    if 0 not in by_vp:
        out.append(Finding("error", f"no VP context for vp 0: {vmm} gives KVM vp 0's sev_features for every vCPU"))
    n = max(by_vp) + 1
    out.append(Finding("warning", f"the SEV-SNP digest on {vmm} depends on the vCPU count: KVM measures one VMSA per "
                                  f"vCPU, so the file's {len(by_vp)} VP context(s) give its digest only for -smp {n}; "
                                  "every further vCPU adds a reset-state VMSA"
                                  + (" (its RDX is the -cpu model's signature)" if vmm == "qemu" else "")
                                  + ": `measure --vcpus N` gives the digest of -smp N"))
    return out
