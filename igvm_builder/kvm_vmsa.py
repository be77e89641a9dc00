"""What a KVM host measures for an IGVM SEV-SNP VMSA: the QEMU and Cloud Hypervisor transforms.

On KVM the page the PSP measures is not the VMSA page of the IGVM file: the VMM copies selected
fields into its vCPU state, KVM rebuilds the VMSA at ``SNP_LAUNCH_FINISH`` from that state
(``sev_es_sync_vmsa``), changing some fields on the way, and measures **one VMSA per vCPU** —
vCPUs without a VP context in the file get the VMM's reset state.  The facts, with source
citations (QEMU 10.2.2, upstream KVM, Cloud Hypervisor @ae44c297), are in
``shared/spec/KVM_VMSA.md`` §2 (QEMU), §5 (Cloud Hypervisor), §7 (reset states) and §9 (what
they refuse).  **None of it was checked on SNP hardware**; §8 of that document says how to
settle it (a dynamic-debug dump of ``sev_es_sync_vmsa`` on the host, diffed against
:func:`measured_vmsa`).  Rows marked *[inference]* there are inferences even from source.

:data:`TRANSFORM_TABLE` is the one table of fields: per VMSA field, the measured value under
``qemu`` and under ``cloud-hypervisor`` as a function of the file's VMSA.  Every field the table
does not name is measured as 0 (QEMU refuses a non-zero value below byte 0x670 and ignores
the rest; Cloud Hypervisor ignores it).  :func:`measured_vmsa` applies it (a pure function of
the file's page, the VMM and vp 0's ``sev_features``), :func:`refusals` lists what the VMM or
KVM would refuse, :func:`changes` what it would change, and :func:`reset_vmsa` is the VMSA of
a vCPU the file gives no context for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from igvm_builder.errors import MeasurementError
from igvm_builder.recordclass import record
from igvm_builder.sev_vmsa import (
    BSP_RESET_EIP,
    QEMU_IGVM_VMSA_FIELDS,
    SAVE_AREA_SIZE,
    SEGMENT_REGISTERS,
    VMSA_FIELDS,
    build_reset_vmsa,
    build_vmsa,
    parse_vmsa,
    vmsa_reserved_nonzero,
)

#: Offsets below 0x670 that no named field covers (reserved bytes QEMU requires to be zero).
_RESERVED = tuple(o for o in vmsa_reserved_nonzero(b"\xff" * SAVE_AREA_SIZE))

__all__ = [
    "KVM_SUPPORTED_SEV_FEATURES",
    "KVM_VMMS",
    "TRANSFORM_TABLE",
    "Change",
    "Refusal",
    "Row",
    "Rule",
    "changes",
    "measured_vmsa",
    "refusals",
    "reset_vmsa",
    "transform_fields",
]

QEMU, CLOUD_HYPERVISOR = "qemu", "cloud-hypervisor"
#: The loader profiles whose VMSAs KVM rebuilds (the VMM names used throughout).
KVM_VMMS = (QEMU, CLOUD_HYPERVISOR)

DEFAULT_PAT = 0x0007040600070406
DR6_RESET, DR7_RESET = 0xFFFF0FF0, 0x400
FCW_RESET, MXCSR_RESET = 0x37F, 0x1F80
CR0_PE, CR0_ET, CR0_NE, CR0_NW, CR0_CD, CR0_PG = 0x1, 0x10, 0x20, 0x20000000, 0x40000000, 0x80000000
CR4_PAE, CR4_MCE = 0x20, 0x40
EFER_LME, EFER_LMA, EFER_SVME = 0x100, 0x400, 0x1000
#: CR4 bits an x86-64 CPU defines (VME..OSXMMEXCPT, UMIP, LA57, FSGSBASE, PCIDE, OSXSAVE, SMEP,
#: SMAP, PKE, CET, PKS, LAM_SUP); KVM_SET_SREGS refuses any other bit (``kvm_is_valid_cr4``).
#: VMXE/SMXE (13, 14) are reserved on the AMD guest models.  Whether a defined bit survives
#: also depends on the guest CPUID (QEMU drops OSFXSR/SMAP/UMIP/PKE/PKS/LAM_SUP without the
#: feature, KVM refuses the others): not modelled, the CPU model's features are not known here.
CR4_DEFINED = 0x7FF | 0x1000 | 0x10000 | 0x20000 | 0x40000 | 0x100000 | 0x200000 | 0x400000 \
    | 0x800000 | 0x1000000 | 0x10000000
#: CR4 bits QEMU keeps only when the guest CPUID has the feature (KVM_VMSA.md §2).
CR4_CPUID_DEPENDENT = {0x200: "OSFXSR", 0x800: "UMIP", 0x200000: "SMAP", 0x400000: "PKE", 0x1000000: "PKS",
                       0x10000000: "LAM_SUP"}
SNP_ACTIVE = 0x1
#: SEV_FEATURES bits upstream KVM accepts in ``KVM_SEV_INIT2.vmsa_features``
#: (``sev_supported_vmsa_features``): SNP, DebugSwap, SecureTSC (KVM_VMSA.md §4).  A host
#: kernel with the posted AllowedSevFeatures / SecureAVIC / BTB-isolation / IBPB-on-entry
#: patches accepts more; RestrictedInjection and VTOM are not supported upstream.
KVM_SUPPORTED_SEV_FEATURES = 0x1 | 0x20 | 0x200
_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rip")
_CODE_DATA = ("es", "cs", "ss", "ds", "fs", "gs")
#: Synthetic key of the context mapping: vp 0's sev_features (applied to every vCPU).
VP0_FEATURES = "vp0.sev_features"


# --------------------------------------------------------------------------- the table


@record
class Rule:
    """One VMM's measured value of a field: ``fn(file value, file fields)``; ``text`` documents it."""

    text: str
    fn: Callable[[int, Mapping[str, int]], int]


def _keep() -> Rule:
    return Rule("=", lambda v, r: v)


def _const(value: int, why: str = "") -> Rule:
    return Rule(f"{value:#x}, whatever the file says{why}", lambda v, r: value)


def _bits(and_mask: int, or_bits: int, text: str) -> Rule:
    return Rule(text, lambda v, r: (v & and_mask) | or_bits)


def _efer_qemu(v: int, r: Mapping[str, int]) -> int:
    lma = EFER_LMA if v & EFER_LME and r["cr0"] & CR0_PG and r["cr4"] & CR4_PAE else 0
    return v | EFER_SVME | lma


_U64 = (1 << 64) - 1


@record
class Row:
    """A group of fields with the same rule on each VMM, and where the rule comes from."""

    fields: tuple[str, ...]
    qemu: Rule
    cloud_hypervisor: Rule
    source: str

    def rule(self, vmm: str) -> Rule:
        return self.qemu if vmm == QEMU else self.cloud_hypervisor


#: The transform, field by field (KVM_VMSA.md §2 for qemu, §5 for cloud-hypervisor).  Fields
#: not listed are measured as 0 on both.
TRANSFORM_TABLE: tuple[Row, ...] = (
    Row((*(f"{s}.{p}" for s in (*_CODE_DATA, "ldtr") for p in ("selector", "limit", "base")), "tr.selector",
         "tr.limit"),
        _keep(), _keep(), "QEMU cpu_x86_load_seg_cache / CH make_segment -> KVM svm_set_segment"),
    Row(tuple(f"{s}.attrib" for s in (*_CODE_DATA, "ldtr", "tr")),
        _bits(0xFFF, 0, "& 0xfff (bits 12-15 dropped)"), _bits(0xFFF, 0, "& 0xfff (bits 12-15 dropped)"),
        "KVM svm_set_segment keeps type/S/DPL/P/AVL/L/DB/G only"),
    Row(("tr.base",), Rule("= the file's ldtr.base (QEMU passes vmsa.ldtr.base for R_TR)", lambda v, r: r["ldtr.base"]),
        _keep(), "QEMU target/i386/sev.c:455"),
    Row(("gdtr.base", "idtr.base"), _keep(), _keep(), "svm_set_gdt / svm_set_idt"),
    Row(("gdtr.limit", "idtr.limit"), _bits(0xFFFF, 0, "& 0xffff (kvm_dtable.limit is u16)"),
        Rule("= (refused above 0xffff)", lambda v, r: v), "KVM_SET_SREGS dtable"),
    Row(("cpl",), Rule("= ss.attrib DPL (the file's cpl must be 0)", lambda v, r: (r["ss.attrib"] >> 5) & 3),
        Rule("= ss.attrib DPL (the file's cpl is ignored)", lambda v, r: (r["ss.attrib"] >> 5) & 3),
        "svm_set_segment: save.cpl = SS.dpl"),
    Row(("cr0",), _bits(0xFFFFFFFF & ~(CR0_CD | CR0_NW), CR0_ET, "(cr0 & 0xffffffff | ET 0x10) & ~(CD|NW 0x60000000)"),
        _bits(_U64 & ~(CR0_CD | CR0_NW), 0, "& ~(CD|NW 0x60000000); ET not forced"),
        "QEMU cpu_x86_update_cr0 forces ET (u32); KVM svm_set_cr0 clears CD/NW (quirk CD_NW_CLEARED)"),
    Row(("cr3",), _keep(), _keep(), "KVM_SET_SREGS -> sev_post_set_cr3"),
    Row(("cr4",), _bits(0xFFFFFFFF, CR4_MCE, "& 0xffffffff | MCE 0x40"), _bits(_U64, CR4_MCE, "| MCE 0x40"),
        "KVM svm_set_cr4 ORs the host's CR4.MCE; QEMU's cr4 is u32"),
    Row(("efer",), Rule("| SVME 0x1000, | LMA 0x400 when LME, CR0.PG and CR4.PAE", _efer_qemu),
        _bits(_U64, EFER_SVME, "| SVME 0x1000 (no LMA fix-up)"),
        "KVM svm_set_efer; QEMU cpu_x86_update_cr0 sets LMA"),
    Row(("xcr0",), _keep(), _const(1), "KVM_SET_XCRS (qemu); CH sets no XCR0: KVM reset value"),
    Row(("pat",), _keep(), _const(DEFAULT_PAT), "KVM_SET_MSRS (qemu); CH sets no PAT: KVM reset value"),
    Row(("dr6",), _keep(), _const(DR6_RESET), "KVM_SET_DEBUGREGS (qemu); CH: KVM reset value"),
    Row(("dr7",), _keep(), _const(DR7_RESET), "KVM_SET_DEBUGREGS, 0 or 0x400 only (qemu); CH: KVM reset value"),
    Row(_GPRS, _keep(), _keep(), "KVM_SET_REGS -> sev_es_sync_vmsa"),
    Row(("rflags",), _bits(_U64, 0x2, "| 0x2"), _bits(_U64, 0x2, "| 0x2"), "x86.c __set_regs: | X86_EFLAGS_FIXED"),
    Row(("sev_features",), Rule("= vp 0's value (must include SNP 0x1)", lambda v, r: r[VP0_FEATURES]),
        Rule("= vp 0's value | SNP 0x1", lambda v, r: r[VP0_FEATURES] | SNP_ACTIVE),
        "KVM_SEV_INIT2.vmsa_features from vp 0; KVM ORs SNP_ACTIVE back in"),
    Row(("x87_fcw",), _const(FCW_RESET, " [inference]"), _const(FCW_RESET),
        "qemu: XSAVE with xstate_bv=0 leaves KVM's fpstate_init value [inference]; CH: KVM_SET_FPU 0x37f"),
    Row(("mxcsr",), _const(MXCSR_RESET, " [inference]"), _const(MXCSR_RESET),
        "qemu: as x87_fcw [inference]; CH: KVM_SET_FPU 0x1f80"),
)

_RULES: dict[str, dict[str, Rule]] = {
    vmm: {name: row.rule(vmm) for row in TRANSFORM_TABLE for name in row.fields} for vmm in KVM_VMMS
}


def _check_table() -> None:
    names = {x.name for x in VMSA_FIELDS}
    listed = [n for row in TRANSFORM_TABLE for n in row.fields]
    if len(listed) != len(set(listed)) or not set(listed) <= names:
        raise ImportError("KVM VMSA transform table names a field twice or an unknown field")


_check_table()


def _vmm(name: str) -> str:
    if name not in KVM_VMMS:
        raise MeasurementError(f"no KVM VMSA transform for loader '{name}' (only {', '.join(KVM_VMMS)})")
    return name


def _context(regs: Mapping[str, int], vp0_features: int | None) -> dict[str, int]:
    full = {x.name: 0 for x in VMSA_FIELDS} | dict(regs)
    full[VP0_FEATURES] = full["sev_features"] if vp0_features is None else vp0_features
    return full


def transform_fields(regs: Mapping[str, int], vmm: str, *, vp0_features: int | None = None) -> dict[str, int]:
    """The measured VMSA's non-zero fields, from the file's fields ``regs`` (missing = 0).

    ``vp0_features`` is vp 0's ``sev_features`` (default: this VMSA's own).  No validation:
    :func:`refusals` says whether the VMM accepts the input at all.
    """
    ctx = _context(regs, vp0_features)
    out: dict[str, int] = {}
    for name, rule in _RULES[_vmm(vmm)].items():
        value = rule.fn(ctx[name], ctx)
        if value:
            out[name] = value
    return out


# --------------------------------------------------------------------------- refusals and changes


@record
class Refusal:
    """A field (or byte offset) the VMM or KVM refuses: the launch fails, nothing is measured."""

    field: str
    message: str


@record
class Change:
    """A field the VMM measures with another value than the file's."""

    field: str
    file_value: int
    measured: int


def _valid_xcr0(x: int) -> str | None:
    if not x & 1:
        return "bit 0 (x87) must be set"
    if x & 0x4 and not x & 0x2:
        return "AVX (bit 2) needs SSE (bit 1)"
    if bool(x & 0x8) != bool(x & 0x10):
        return "BNDREGS and BNDCSR (bits 3, 4) go together"
    if x & 0xE0 and (x & 0xE0 != 0xE0 or not x & 0x4):
        return "the AVX-512 bits (5-7) go together and need AVX"
    return None


def _valid_pat(p: int) -> bool:
    return all((p >> (8 * i)) & 0xFF in (0, 1, 4, 5, 6, 7) for i in range(8))


def _mode_refusals(r: Mapping[str, int], vmm: str) -> list[Refusal]:
    out: list[Refusal] = []
    cr0 = r["cr0"] & 0xFFFFFFFF if vmm == QEMU else r["cr0"]
    cr4 = r["cr4"] & 0xFFFFFFFF if vmm == QEMU else r["cr4"]
    efer = r["efer"]
    if vmm == CLOUD_HYPERVISOR and r["cr0"] >> 32:
        out.append(Refusal("cr0", f"cr0 {r['cr0']:#x} sets bits 32-63: KVM_SET_SREGS refuses it"))
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        out.append(Refusal("cr0", f"cr0 {r['cr0']:#x} sets PG without PE: KVM refuses it (kvm_is_valid_cr0)"))
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        out.append(Refusal("cr0", f"cr0 {r['cr0']:#x} sets NW without CD: KVM refuses it (kvm_is_valid_cr0)"))
    if cr4 & ~CR4_DEFINED:
        out.append(Refusal("cr4", f"cr4 {r['cr4']:#x} sets reserved bits {cr4 & ~CR4_DEFINED:#x}: KVM_SET_SREGS "
                                  "refuses it"))
    if efer & EFER_LME and cr0 & CR0_PG:
        if not cr4 & CR4_PAE:
            why = ("QEMU ignores the CR0 write (cpu_x86_update_cr0) and the vCPU does not start in long mode"
                   if vmm == QEMU else "KVM_SET_SREGS refuses it")
            out.append(Refusal("cr4", f"efer.LME and cr0.PG without cr4.PAE ({r['cr4']:#x}): {why}"))
        elif vmm == CLOUD_HYPERVISOR and not efer & EFER_LMA:
            out.append(Refusal("efer", f"efer {efer:#x} has LME with cr0.PG but not LMA: Cloud Hypervisor does not "
                                       "add LMA and KVM_SET_SREGS refuses it"))
    elif efer & EFER_LMA or r["cs.attrib"] & 0x200:
        what = "efer.LMA" if efer & EFER_LMA else "cs.L (attrib bit 9)"
        out.append(Refusal("efer" if efer & EFER_LMA else "cs.attrib",
                           f"{what} set outside long mode (efer {efer:#x}, cr0 {r['cr0']:#x}): KVM refuses it "
                           "(kvm_is_valid_sregs)"))
    return out


def refusals(page: bytes | bytearray | memoryview, vmm: str, *, vp_index: int = 0,
             vp0_features: int | None = None) -> list[Refusal]:
    """Everything ``vmm`` (with upstream KVM) refuses in this VMSA page (KVM_VMSA.md §9).

    ``vp0_features``: vp 0's ``sev_features`` (for vp 0 itself leave it ``None``); only vp 0's
    value reaches KVM, so only it is checked against what KVM supports.
    """
    _vmm(vmm)
    return _refusals(parse_vmsa(page), page, vmm, vp0_features)


def _refusals(regs: Mapping[str, int], page: bytes | bytearray | memoryview, vmm: str,
              vp0_features: int | None) -> list[Refusal]:
    """:func:`refusals` of ``page``, whose fields ``regs`` are (``parse_vmsa(page)``)."""
    out: list[Refusal] = []
    if vmm == QEMU:
        # check_vmsa_supported: every field outside QEMU's list, and every reserved byte, of the
        # first 0x670 bytes must be 0 (bytes from 0x670 on are not looked at)
        out += [Refusal(x.name, f"{x.name} = {regs[x.name]:#x}: QEMU accepts no non-zero {x.name} "
                                "(check_vmsa_supported)")
                for x in VMSA_FIELDS if regs[x.name] and x.name not in QEMU_IGVM_VMSA_FIELDS]
        view = memoryview(page).cast("B") if isinstance(page, memoryview) else page
        reserved = [o for o in _RESERVED if view[o]]
        if reserved:
            out.append(Refusal(f"offset {reserved[0]:#x}", f"reserved VMSA byte at offset {reserved[0]:#x} is "
                                                           "non-zero: QEMU refuses it (check_vmsa_supported)"))
        if regs["dr7"] not in (0, DR7_RESET):
            out.append(Refusal("dr7", f"dr7 = {regs['dr7']:#x}: KVM launches only with dr7 0 or 0x400 "
                                      "(sev_es_sync_vmsa)"))
        if regs["dr6"] >> 32:
            out.append(Refusal("dr6", f"dr6 = {regs['dr6']:#x} sets bits 32-63: KVM_SET_DEBUGREGS refuses it"))
        why = _valid_xcr0(regs["xcr0"])
        if why:
            out.append(Refusal("xcr0", f"xcr0 = {regs['xcr0']:#x} is not a valid XCR0 ({why}): KVM_SET_XCRS "
                                       "refuses it"))
        if not _valid_pat(regs["pat"]):
            out.append(Refusal("pat", f"pat = {regs['pat']:#x} is not a valid PAT (memory types 0, 1, 4-7 "
                                      "only): KVM_SET_MSRS refuses it"))
    else:
        for name in ("gdtr.limit", "idtr.limit"):
            if regs[name] > 0xFFFF:
                out.append(Refusal(name, f"{name} = {regs[name]:#x} does not fit 16 bits: Cloud Hypervisor "
                                         "refuses it (limit.try_into)"))
    out += _mode_refusals(regs, vmm)
    if vp0_features is None:  # vp 0: its features go to KVM_SEV_INIT2
        f = regs["sev_features"]
        if vmm == QEMU and not f & SNP_ACTIVE:
            out.append(Refusal("sev_features", f"sev_features = {f:#x} lacks SNP (0x1): QEMU refuses it "
                                               "(check_sev_features)"))
        extra = f & ~KVM_SUPPORTED_SEV_FEATURES
        if extra:
            out.append(Refusal("sev_features", f"sev_features = {f:#x} has bits {extra:#x} that upstream KVM does "
                                               "not support (only SNP 0x1, DebugSwap 0x20, SecureTSC 0x200): "
                                               "KVM_SEV_INIT2 refuses them"))
    return out


def changes(page: bytes | bytearray | memoryview, vmm: str, *, vp0_features: int | None = None) -> list[Change]:
    """Every field whose measured value differs from the file's, in offset order.

    Bytes from 0x670 on (not named fields) are reported as one change named ``bytes >= 0x670``.
    """
    regs = parse_vmsa(page)
    measured = transform_fields(regs, vmm, vp0_features=vp0_features)
    out = [Change(x.name, regs[x.name], measured.get(x.name, 0)) for x in VMSA_FIELDS
           if regs[x.name] != measured.get(x.name, 0)]
    if any(bytes(page)[SAVE_AREA_SIZE:]):
        out.append(Change(f"bytes >= {SAVE_AREA_SIZE:#x}", 1, 0))
    return out


def measured_vmsa(page: bytes | bytearray | memoryview, vmm: str, *, vp_index: int = 0,
                  vp0_features: int | None = None, where: str = "") -> bytes:
    """The 4096-byte VMSA ``vmm`` + KVM measure for the file's ``page`` (a pure function).

    Raises :class:`MeasurementError` naming the field when the VMM or KVM would refuse it.
    """
    _vmm(vmm)
    regs = parse_vmsa(page)  # once, for the checks and the transform
    refused = _refusals(regs, page, vmm, vp0_features)
    if refused:
        more = f" (and {len(refused) - 1} more; `igvm-builder lint --loader {vmm}` lists them)" if len(refused) > 1 \
            else ""
        raise MeasurementError(f"loader '{vmm}' refuses the VMSA of vp {vp_index}{where}: field {refused[0].field}: "
                               f"{refused[0].message}{more}")
    return build_vmsa(transform_fields(regs, vmm, vp0_features=vp0_features))


# --------------------------------------------------------------------------- reset-state APs


def reset_vmsa(vmm: str, *, sev_features: int, vcpu_signature: int | str) -> bytes:
    """The VMSA KVM measures for a vCPU the file gives no VP context for (KVM_VMSA.md §2, §5).

    ``qemu``: QEMU's reset state pushed through KVM — sev-snp-measure's QEMU model at the reset
    vector 0xFFFFFFF0 with RDX = ``vcpu_signature`` (CPUID(1).EAX of the ``-cpu`` model).
    ``cloud-hypervisor``: KVM's own reset state (``init_vmcb``): CS attrib 0x9a, data 0x92,
    TR 0x83, RDX 0x600 (the signature is not used).  ``sev_features`` = vp 0's.
    """
    if _vmm(vmm) == QEMU:
        return build_reset_vmsa(BSP_RESET_EIP, vcpu_signature=vcpu_signature, sev_features=sev_features,
                                vmm_type="qemu")
    fields = {f"{s}.attrib": 0x92 for s in ("es", "ss", "ds", "fs", "gs")}
    fields |= {f"{s}.limit": 0xFFFF for s in SEGMENT_REGISTERS}
    fields |= {
        "cs.selector": 0xF000, "cs.attrib": 0x9A, "cs.base": 0xFFFF0000, "ldtr.attrib": 0x82, "tr.attrib": 0x83,
        "efer": EFER_SVME, "cr4": CR4_MCE, "cr0": CR0_ET, "dr7": DR7_RESET, "dr6": DR6_RESET, "rflags": 0x2,
        "rip": 0xFFF0, "pat": DEFAULT_PAT, "rdx": 0x600, "sev_features": sev_features | SNP_ACTIVE, "xcr0": 0x1,
        "mxcsr": MXCSR_RESET, "x87_fcw": FCW_RESET,
    }
    return build_vmsa(fields)
