"""SEV-ES / SEV-SNP VMSA pages: a named-field table, build/parse, and the OVMF reset VMSA.

Layout: AMD APM vol. 2 table B-4, offsets as in ``shared/spec/IGVM_FORMAT.md`` Appendix A.2
(microsoft/igvm ``SevVmsa``).  Field names follow A.2; segment and table registers
(``es cs ss ds fs gs gdtr ldtr idtr tr``) are 16-byte ``{u16 selector, u16 attrib, u32 limit,
u64 base}`` records exposed as four fields each: ``"cs.selector"``, ``"cs.attrib"``,
``"cs.limit"``, ``"cs.base"``.  The x87/SSE register file is split into ``st0..st7`` (10 bytes),
``xmm0..xmm15`` and ``ymm0_high..ymm15_high`` (16 bytes each).  Every byte of the page not
covered by a named field is reserved (or padding beyond 1648) and must be zero.

The reset VMSA is what KVM/QEMU hand to the PSP for an OVMF launch without IGVM, exactly as
sev-snp-measure 0.0.13 models it (``shared/spec/MEASUREMENT.md`` §5.1, vmm types qemu / ec2 /
gce).  All integers are little-endian.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from igvm_builder.errors import ConfigError, IgvmFormatError
from igvm_builder.recordclass import record

__all__ = [
    "BSP_RESET_EIP",
    "QEMU_IGVM_VMSA_FIELDS",
    "SAVE_AREA_SIZE",
    "SEGMENT_REGISTERS",
    "VCPU_SIGNATURES",
    "VMSA_FIELDS",
    "VMSA_SIZE",
    "VmmType",
    "VmsaField",
    "build_reset_vmsa",
    "build_vmsa",
    "cpuid_signature",
    "parse_vmsa",
    "reset_vmsa_fields",
    "resolve_vmm_type",
    "vcpu_signature",
    "vmsa_reserved_nonzero",
]

VMSA_SIZE = 4096
#: Architected part of the page; bytes from here to 4096 are padding (must be zero).
SAVE_AREA_SIZE = 1648
#: The BSP starts at the architectural reset vector.
BSP_RESET_EIP = 0xFFFFFFF0


@record
class VmsaField:
    """A named little-endian unsigned integer at ``offset`` spanning ``size`` bytes."""

    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


SEGMENT_REGISTERS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")


def _field_table() -> tuple[VmsaField, ...]:
    f: list[VmsaField] = []
    for i, seg in enumerate(SEGMENT_REGISTERS):
        base = 16 * i
        f += [
            VmsaField(f"{seg}.selector", base, 2),
            VmsaField(f"{seg}.attrib", base + 2, 2),
            VmsaField(f"{seg}.limit", base + 4, 4),
            VmsaField(f"{seg}.base", base + 8, 8),
        ]

    def q(name: str, offset: int, size: int = 8) -> None:
        f.append(VmsaField(name, offset, size))

    for i in range(4):
        q(f"pl{i}_ssp", 160 + 8 * i)
    q("u_cet", 192)
    q("vmpl", 202, 1)
    q("cpl", 203, 1)
    q("efer", 208)
    for i, name in enumerate(("xss", "cr4", "cr3", "cr0", "dr7", "dr6", "rflags", "rip")):
        q(name, 320 + 8 * i)
    for i in range(4):
        q(f"dr{i}", 384 + 8 * i)
    for i in range(4):
        q(f"dr{i}_addr_mask", 416 + 8 * i)
    names = (
        "rsp s_cet ssp interrupt_ssp_table_addr rax star lstar cstar sfmask kernel_gs_base "
        "sysenter_cs sysenter_esp sysenter_eip cr2"
    ).split()
    for i, name in enumerate(names):
        q(name, 472 + 8 * i)
    names = "pat dbgctl last_branch_from_ip last_branch_to_ip last_excp_from_ip last_excp_to_ip".split()
    for i, name in enumerate(names):
        q(name, 616 + 8 * i)
    q("spec_ctrl", 736)
    q("pkru", 744, 4)  # APM table B-4 / Linux sev_es_save_area; reserved in IGVM_FORMAT.md A.2
    q("tsc_aux", 748, 4)
    q("rcx", 776)
    q("rdx", 784)
    q("rbx", 792)
    for i, name in enumerate("rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()):
        q(name, 808 + 8 * i)
    names = (
        "exit_info1 exit_info2 exit_int_info next_rip sev_features v_intr_cntrl guest_error_code "
        "virtual_tom tlb_id pcpu_id event_inject xcr0"
    ).split()
    for i, name in enumerate(names):
        q(name, 912 + 8 * i)
    q("xsave_valid_bitmap", 1008, 16)
    q("x87dp", 1024)
    q("mxcsr", 1032, 4)
    for i, name in enumerate(("x87_ftw", "x87_fsw", "x87_fcw", "x87_op", "x87_ds", "x87_cs")):
        q(name, 1036 + 2 * i, 2)
    q("x87_rip", 1048)
    for i in range(8):
        q(f"st{i}", 1056 + 10 * i, 10)
    for i in range(16):
        q(f"xmm{i}", 1136 + 16 * i, 16)
    for i in range(16):
        q(f"ymm{i}_high", 1392 + 16 * i, 16)
    return tuple(sorted(f, key=lambda x: x.offset))


#: Every named VMSA field, in offset order.
VMSA_FIELDS: tuple[VmsaField, ...] = _field_table()
_BY_NAME: Mapping[str, VmsaField] = MappingProxyType({x.name: x for x in VMSA_FIELDS})


def _check_table() -> None:
    end = 0
    for x in VMSA_FIELDS:
        if x.offset < end or x.end > SAVE_AREA_SIZE:
            raise ImportError(f"VMSA field table overlaps or overflows at {x.name}")
        end = x.end
    anchors = {
        "cs.selector": 16,
        "rip": 376,
        "rdx": 784,
        "sev_features": 944,
        "xcr0": 1000,
        "mxcsr": 1032,
        "x87_fcw": 1040,
        "pat": 616,
        "cr0": 344,
        "efer": 208,
        "ymm15_high": 1632,
    }
    if len(_BY_NAME) != len(VMSA_FIELDS) or any(_BY_NAME[k].offset != v for k, v in anchors.items()):
        raise ImportError("VMSA field table does not match IGVM_FORMAT.md Appendix A.2")


_check_table()  # import-time layout check (survives python -O)

#: Fields QEMU accepts non-zero in an IGVM SNP VMSA (MEASUREMENT.md §7.4); anything else
#: non-zero makes QEMU reject the file.
QEMU_IGVM_VMSA_FIELDS: frozenset[str] = frozenset(
    "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15 rip cr0 cr3 cr4 xcr0 efer pat "
    "dr6 dr7 rflags x87_fcw mxcsr sev_features".split()
    + [f"{seg}.{part}" for seg in SEGMENT_REGISTERS for part in ("selector", "attrib", "limit", "base")]
)


# --- generic build / parse ---------------------------------------------------------------------


def build_vmsa(fields: Mapping[str, int]) -> bytes:
    """A 4096-byte VMSA page with the named ``fields`` set and every other byte zero.

    Raises :class:`ConfigError` (``key`` = the field name) for an unknown field or a value that
    is negative or does not fit the field.
    """
    page = bytearray(VMSA_SIZE)
    for name, value in fields.items():
        field = _BY_NAME.get(name)
        if field is None:
            raise ConfigError(f"unknown VMSA field {name!r}", key=name)
        if not isinstance(value, int) or value < 0 or value >> (8 * field.size):
            raise ConfigError(
                f"VMSA field {name!r} value {value!r} does not fit an unsigned {8 * field.size}-bit field",
                key=name,
            )
        page[field.offset : field.end] = value.to_bytes(field.size, "little")
    return bytes(page)


def _check_page(page: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(page)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if not SAVE_AREA_SIZE <= len(view) <= VMSA_SIZE:
        raise IgvmFormatError(f"a VMSA is {SAVE_AREA_SIZE}..{VMSA_SIZE} bytes, got {len(view)}")
    return view


def parse_vmsa(page: bytes | bytearray | memoryview, *, nonzero_only: bool = False) -> dict[str, int]:
    """Decode every named field of a VMSA page (offset order); ``nonzero_only`` drops zeros.

    Accepts the 1648-byte save area or a page of up to 4096 bytes; raises
    :class:`IgvmFormatError` otherwise.  Reserved bytes are not reported here: see
    :func:`vmsa_reserved_nonzero`.
    """
    view = _check_page(page)
    out: dict[str, int] = {}
    for x in VMSA_FIELDS:
        value = int.from_bytes(view[x.offset : x.end], "little")
        if value or not nonzero_only:
            out[x.name] = value
    return out


def _gaps() -> tuple[tuple[int, int], ...]:
    """(start, end) of each run of page bytes that no named field covers (the fields are in
    offset order and do not overlap: :func:`_check_table`), the padding after the save area last."""
    out, end = [], 0
    for x in VMSA_FIELDS:
        if x.offset > end:
            out.append((end, x.offset))
        end = x.end
    out.append((end, VMSA_SIZE))
    return tuple(out)


_GAPS = _gaps()


def vmsa_reserved_nonzero(page: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """Offsets of non-zero bytes outside every named field (reserved areas and padding)."""
    view = _check_page(page)
    out: list[int] = []
    for start, end in _GAPS:
        chunk = bytes(view[start:end])
        if any(chunk):  # most pages have none: looked at byte by byte only where one is
            out += [start + i for i, b in enumerate(chunk) if b]
    return tuple(out)


# --- vCPU signatures ---------------------------------------------------------------------------


def cpuid_signature(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001_EAX for an AMD family/model/stepping (AMD CPUID spec #25481)."""
    if not (0 <= family <= 0xFF + 0xF and 0 <= model <= 0xFF and 0 <= stepping <= 0xF):
        raise ConfigError(f"vCPU family/model/stepping {family}/{model}/{stepping} out of range")
    base_family, ext_family = (0xF, family - 0xF) if family > 0xF else (family, 0)
    return (ext_family << 20) | ((model >> 4) << 16) | (base_family << 8) | ((model & 0xF) << 4) | stepping


_EPYC = cpuid_signature(23, 1, 2)  # 0x800f12
_ROME = cpuid_signature(23, 49, 0)  # 0x830f10
_MILAN = cpuid_signature(25, 1, 1)  # 0xa00f11
_GENOA = cpuid_signature(25, 17, 0)  # 0xa10f10
_TURIN = cpuid_signature(26, 0, 0)  # 0xb00f00

#: QEMU CPU model name -> CPUID(1).EAX: exactly the names sev-snp-measure 0.0.13 accepts
#: (``--vcpu-type``), which are QEMU's builtin x86 EPYC models and versions.
VCPU_SIGNATURES: Mapping[str, int] = MappingProxyType(
    {
        "EPYC": _EPYC,
        "EPYC-v1": _EPYC,
        "EPYC-v2": _EPYC,
        "EPYC-IBPB": _EPYC,
        "EPYC-v3": _EPYC,
        "EPYC-v4": _EPYC,
        "EPYC-Rome": _ROME,
        "EPYC-Rome-v1": _ROME,
        "EPYC-Rome-v2": _ROME,
        "EPYC-Rome-v3": _ROME,
        "EPYC-Milan": _MILAN,
        "EPYC-Milan-v1": _MILAN,
        "EPYC-Milan-v2": _MILAN,
        "EPYC-Genoa": _GENOA,
        "EPYC-Genoa-v1": _GENOA,
        "EPYC-Turin": _TURIN,
    }
)
_SIG_BY_LOWER = {k.lower(): v for k, v in VCPU_SIGNATURES.items()}


def vcpu_signature(name_or_int: str | int) -> int:
    """Resolve a vCPU model name (case-insensitive), a number, or a numeric string to CPUID(1).EAX.

    Raises :class:`ConfigError` for an unknown name or an out-of-range number.
    """
    if isinstance(name_or_int, int) and not isinstance(name_or_int, bool):
        value = name_or_int
    elif isinstance(name_or_int, str):
        text = name_or_int.strip()
        sig = _SIG_BY_LOWER.get(text.lower())
        if sig is not None:
            return sig
        try:
            value = int(text, 0)
        except ValueError:
            known = ", ".join(VCPU_SIGNATURES)
            raise ConfigError(
                f"unknown vCPU type {name_or_int!r}; known types: {known}; "
                "or give the CPUID(1).EAX signature as a number (e.g. 0xa10f10)"
            ) from None
    else:
        raise ConfigError(f"vCPU type must be a name or an integer, got {type(name_or_int).__name__}")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ConfigError(f"vCPU signature {value:#x} does not fit 32 bits")
    return value


_resolve_vcpu_signature = vcpu_signature  # the keyword arguments below shadow the function name


# --- VMM types and the reset VMSA ----------------------------------------------------------------


class VmmType(enum.StrEnum):
    """Host VMM whose initial register state the VMSA reproduces (sev-snp-measure ``--vmm-type``)."""

    QEMU = "qemu"
    EC2 = "ec2"
    GCE = "gce"


def resolve_vmm_type(name: str | VmmType) -> VmmType:
    """Resolve ``qemu`` / ``ec2`` / ``gce`` (case-insensitive); :class:`ConfigError` otherwise."""
    try:
        return VmmType(str(name).lower())
    except ValueError:
        raise ConfigError(
            f"unknown VMM type {name!r}; known: {', '.join(v.value for v in VmmType)}"
        ) from None


_SEG_DATA_ATTRIB = 0x93  # present, S, read/write, accessed
_DEFAULT_PAT = 0x0007040600070406


def reset_vmsa_fields(
    eip: int,
    *,
    vcpu_signature: int | str | None = None,
    sev_features: int,
    vmm_type: str | VmmType = VmmType.QEMU,
    cr0: int = 0x10,
) -> dict[str, int]:
    """The non-zero fields of a vCPU's reset VMSA (MEASUREMENT.md §5.1), by name.

    ``eip`` is the vCPU's first instruction: :data:`BSP_RESET_EIP` for vCPU 0, the OVMF SEV-ES
    reset block address for the others (CS base = eip & 0xffff0000, RIP = eip & 0xffff).
    ``vcpu_signature`` (CPUID(1).EAX, put in RDX; an int or a name for :func:`vcpu_signature`)
    is required for qemu; ec2 and gce put 0x600 there and ignore it.  ``sev_features`` is the SEV_FEATURES word (0x1 = SNPActive; 0 for SEV-ES).
    ``cr0`` is 0x10 as sev-snp-measure measures it; 0x30 is the other candidate (§7.3).
    """
    vmm = resolve_vmm_type(vmm_type)
    if not 0 <= eip <= 0xFFFFFFFF:
        raise ConfigError(f"reset EIP {eip:#x} does not fit 32 bits")
    cs_attrib, ss_attrib, tr_attrib = 0x9B, _SEG_DATA_ATTRIB, 0x8B
    pat = _DEFAULT_PAT
    mxcsr, fcw = 0x1F80, 0x37F  # KVM >= 6.9 reset values (QEMU)
    if vmm is VmmType.QEMU:
        if vcpu_signature is None:
            raise ConfigError("vmm type qemu needs a vCPU signature (CPUID(1).EAX, e.g. EPYC-v4 = 0x800f12)")
        rdx = _resolve_vcpu_signature(vcpu_signature)
    else:
        rdx = 0x600
        mxcsr = fcw = 0
        if vmm is VmmType.EC2:
            ss_attrib, tr_attrib = 0x92, 0x83
            if eip == BSP_RESET_EIP:
                cs_attrib = 0x9A
        else:  # gce
            pat = 0x00070106
    fields = {f"{seg}.attrib": _SEG_DATA_ATTRIB for seg in ("es", "ds", "fs", "gs")}
    fields |= {f"{seg}.limit": 0xFFFF for seg in SEGMENT_REGISTERS}
    fields |= {
        "cs.selector": 0xF000,
        "cs.attrib": cs_attrib,
        "cs.base": eip & 0xFFFF0000,
        "ss.attrib": ss_attrib,
        "ldtr.attrib": 0x82,
        "tr.attrib": tr_attrib,
        "efer": 0x1000,  # SVME
        "cr4": 0x40,  # MCE
        "cr0": cr0,
        "dr7": 0x400,
        "dr6": 0xFFFF0FF0,
        "rflags": 0x2,
        "rip": eip & 0xFFFF,
        "pat": pat,
        "rdx": rdx,
        "sev_features": sev_features,
        "xcr0": 0x1,
        "mxcsr": mxcsr,
        "x87_fcw": fcw,
    }
    return {x.name: fields[x.name] for x in VMSA_FIELDS if fields.get(x.name)}


def build_reset_vmsa(
    eip: int,
    *,
    vcpu_signature: int | str | None = None,
    sev_features: int,
    vmm_type: str | VmmType = VmmType.QEMU,
    cr0: int = 0x10,
) -> bytes:
    """The 4096-byte reset VMSA page for an OVMF launch; see :func:`reset_vmsa_fields`."""
    return build_vmsa(
        reset_vmsa_fields(
            eip, vcpu_signature=vcpu_signature, sev_features=sev_features, vmm_type=vmm_type, cr0=cr0
        )
    )
