"""Initial x86 CPU state, and its encodings for every platform.

One :class:`CpuState` describes where a vCPU starts; it converts to the native x64 VP
context (``IgvmNativeVpContextX64``), an SEV VMSA page, or a VBS register list.  TDX
has no VP context: :func:`tdx_reset_trampoline` puts code at the reset vector instead.
"""

from __future__ import annotations

import struct

from igvm_builder.errors import LayoutError
from igvm_builder.format.headers import NATIVE_CONTEXT, VbsRegister
from igvm_builder.recordclass import record

# Descriptor "access + flags" words (bits 40..55 of a GDT entry, limit 19:16 zero).
CODE32_ATTR = 0xC09B
CODE64_ATTR = 0xA09B
DATA_ATTR = 0xC093
CODE32_SEL, CODE64_SEL, DATA_SEL = 0x08, 0x10, 0x18

CR0_PE, CR0_ET, CR0_NE, CR0_PG = 0x1, 0x10, 0x20, 0x80000000
CR4_PAE = 0x20
EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 0x100, 0x400, 0x800, 0x1000

def gdt_bytes() -> bytes:
    """Flat GDT: null, 0x08 32-bit code, 0x10 64-bit code (__BOOT_CS), 0x18 data (__BOOT_DS)."""
    return struct.pack("<4Q", 0, 0x00CF9B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


GDT_LIMIT = 4 * 8 - 1


@record(kw_only=True)
class CpuState:
    rip: int
    rsp: int = 0
    rbx: int = 0
    rsi: int = 0
    rflags: int = 0x2
    cr0: int = CR0_PE | CR0_ET
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    gdtr_base: int = 0
    gdtr_limit: int = GDT_LIMIT
    code_selector: int = CODE32_SEL
    code_attributes: int = CODE32_ATTR
    data_selector: int = DATA_SEL
    data_attributes: int = DATA_ATTR

    @classmethod
    def protected32(cls, *, rip: int, gdt: int, rbx: int = 0, rsi: int = 0) -> CpuState:
        """Flat 32-bit protected mode, paging off (PVH and Linux 32-bit entries).

        CR0 = PE | ET | NE (0x31), as COCONUT's igvmbuilder writes it: a fixed point of the QEMU
        and Cloud Hypervisor KVM transforms (``shared/spec/KVM_VMSA.md`` §3) that COCONUT
        ``igvmmeasure --check-kvm`` also accepts.
        """
        return cls(rip=rip, rbx=rbx, rsi=rsi, gdtr_base=gdt, cr0=CR0_PE | CR0_ET | CR0_NE)

    @classmethod
    def long64(cls, *, rip: int, gdt: int, cr3: int, rsi: int = 0) -> CpuState:
        """64-bit long mode with paging on identity tables at ``cr3`` (Linux 64-bit entry)."""
        return cls(rip=rip, rsi=rsi, cr0=CR0_PE | CR0_ET | CR0_PG, cr3=cr3, cr4=CR4_PAE,
                   efer=EFER_LME | EFER_LMA, gdtr_base=gdt, code_selector=CODE64_SEL,
                   code_attributes=CODE64_ATTR)

    # ------------------------------------------------------------------ encodings

    def native_context(self, **fields: int) -> bytes:
        """This state as an ``IgvmNativeVpContextX64``; ``fields`` set others by name (e.g. ``code_base``)."""
        unknown = fields.keys() - NATIVE_CONTEXT.by_name.keys()
        if unknown:
            raise TypeError(f"IgvmNativeVpContextX64 has no field {', '.join(sorted(unknown))}")
        return NATIVE_CONTEXT.pack({
            "rbx": self.rbx, "rsp": self.rsp, "rsi": self.rsi, "rip": self.rip, "rflags": self.rflags,
            "gdtr_limit": self.gdtr_limit, "gdtr_base": self.gdtr_base,
            "code_selector": self.code_selector, "code_attributes": self.code_attributes, "code_limit": 0xFFFFFFFF,
            "data_selector": self.data_selector, "data_attributes": self.data_attributes, "data_limit": 0xFFFFFFFF,
            "cr0": self.cr0, "cr3": self.cr3, "cr4": self.cr4, "efer": self.efer, **fields,
        })

    def vmsa(self, *, sev_features: int) -> bytes:
        """The SEV VMSA page: every field a fixed point of the QEMU and Cloud Hypervisor KVM
        transforms (:mod:`igvm_builder.kvm_vmsa`; ``shared/spec/KVM_VMSA.md`` §9 builder table)."""
        from igvm_builder.sev_vmsa import build_vmsa

        fields: dict[str, int] = {
            "cs.selector": self.code_selector, "cs.attrib": _vmsa_attr(self.code_attributes),
            "cs.limit": 0xFFFFFFFF,
            "gdtr.base": self.gdtr_base, "gdtr.limit": self.gdtr_limit,
            "idtr.limit": 0xFFFF, "ldtr.attrib": 0x82, "ldtr.limit": 0xFFFF,
            "tr.attrib": 0x8B, "tr.limit": 0xFFFF,
            "efer": self.efer | EFER_SVME, "cr0": self.cr0, "cr3": self.cr3, "cr4": self.cr4 | 0x40,
            "dr7": 0x400, "dr6": 0xFFFF0FF0, "rflags": self.rflags, "rip": self.rip, "rsp": self.rsp,
            "rbx": self.rbx, "rsi": self.rsi, "pat": 0x0007040600070406, "xcr0": 0x1,
            "mxcsr": 0x1F80, "x87_fcw": 0x37F, "sev_features": sev_features,
        }
        for seg in ("es", "ss", "ds", "fs", "gs"):
            fields |= {f"{seg}.selector": self.data_selector, f"{seg}.attrib": _vmsa_attr(self.data_attributes),
                       f"{seg}.limit": 0xFFFFFFFF}
        return build_vmsa({k: v for k, v in fields.items() if v})

    def vbs_registers(self) -> tuple[VbsRegister, ...]:
        if self.rbx:
            raise LayoutError("a VBS VP context cannot set RBX (the reference crate accepts no RBX register); "
                              "the PVH entry needs it: boot a bzImage or an ELF without a PVH note for VBS")

        def u64(v: int) -> bytes:
            return v.to_bytes(8, "little") + bytes(8)

        def seg(sel: int, attr: int) -> bytes:
            return struct.pack("<QIHH", 0, 0xFFFFFFFF, sel, attr)

        regs = [
            (0x20010, u64(self.rip)), (0x20004, u64(self.rsp)), (0x20006, u64(self.rsi)),
            (0x20011, u64(self.rflags)), (0x40000, u64(self.cr0)), (0x40002, u64(self.cr3)),
            (0x40003, u64(self.cr4)), (0x80001, u64(self.efer)),
            (0x60001, seg(self.code_selector, self.code_attributes)),
            *[(0x60000 + i, seg(self.data_selector, self.data_attributes)) for i in (0, 2, 3, 4, 5)],
            (0x70001, struct.pack("<6xHQ", self.gdtr_limit, self.gdtr_base)),
        ]
        return tuple(VbsRegister(name=n, value=v) for n, v in regs)


def _vmsa_attr(attr: int) -> int:
    """Descriptor access+flags word -> the 12-bit VMCB/VMSA segment attribute."""
    return (attr & 0xFF) | ((attr >> 4) & 0xF00)


def identity_page_tables(base: int, *, c_bit: int | None = None, gib: int = 4) -> list[tuple[int, bytes]]:
    """Identity map of the first ``gib`` GiB with 2 MiB pages: PML4, PDPT, then one PD per GiB.

    ``c_bit`` sets the SEV encryption bit in every entry (pages are private).
    """
    enc = (1 << c_bit) if c_bit is not None else 0
    pml4 = (base + 0x1000 | enc | 0x3).to_bytes(8, "little") + bytes(4088)
    pdpt = b"".join((base + 0x2000 + i * 0x1000 | enc | 0x3).to_bytes(8, "little") for i in range(gib))
    pages = [(base, pml4), (base + 0x1000, pdpt.ljust(4096, b"\0"))]
    for g in range(gib):
        pd = b"".join(((g << 30) + (i << 21) | enc | 0x83).to_bytes(8, "little") for i in range(512))
        pages.append((base + 0x2000 + g * 0x1000, pd))
    return pages


def tdx_reset_trampoline(*, entry: int, rbx: int = 0, rsi: int = 0) -> bytes:
    """The 4 KiB page at 0xFFFFF000 for a TDX guest booted without firmware.

    A TD vCPU starts in flat 32-bit protected mode at 0xFFFFFFF0; the 12 bytes there load
    EBX and ESI (PVH start_info / Linux boot_params) and jump to the 32-bit entry point:
    ``mov ebx, imm32; mov esi, imm32; mov eax, imm32; jmp eax``.
    """
    for v, what in ((entry, "entry"), (rbx, "rbx"), (rsi, "rsi")):
        if not 0 <= v <= 0xFFFFFFFF:
            raise LayoutError(f"TDX reset trampoline: {what} {v:#x} does not fit 32 bits")
    code = b"\xbb" + struct.pack("<I", rbx) + b"\xbe" + struct.pack("<I", rsi) + b"\xb8" + \
        struct.pack("<I", entry) + b"\xff\xe0"
    page = bytearray(4096)
    # 17 bytes do not fit in the 16 before 4 GiB: put the body below and jump back to it.
    body_off = 0xF00
    page[body_off : body_off + len(code)] = code
    rel = body_off - (0xFF0 + 5)
    page[0xFF0 : 0xFF5] = b"\xe9" + struct.pack("<i", rel)
    return bytes(page)
