"""The QEMU and Cloud Hypervisor KVM transforms of SEV-SNP VMSAs, and the vCPU count.

Expectations, none taken from igvm_builder's own output:

* ``shared/spec/KVM_VMSA.md`` §2 (QEMU 10.2.2 + KVM), §5 (Cloud Hypervisor + KVM) and §3 (CR0
  values), written out row by row below, and §9 (what they refuse);
* an independent, byte-level re-implementation of both transforms here (offsets from AMD APM
  table B-4 / ``IGVM_FORMAT.md`` A.2, formulas from the spec), run on random VMSAs;
* sev-snp-measure 0.0.13 (its Python API): its QEMU VMSAs of OVMF launches are fixed points, its
  reset VMSA is QEMU's AP for ``-smp N``;
* the SNP launch chain (MEASUREMENT.md §1.1) extended by hand;
* COCONUT ``igvmmeasure --check-kvm`` (``shared/tools/oracles/igvmmeasure``) on our builds.

None of this was checked on SNP hardware (KVM_VMSA.md §8 says how to).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import struct
import subprocess
from pathlib import Path

import pytest
from test_build_helpers import (
    GRUB,
    IPXE,
    MEMTEST,
    OVMF_BOOKWORM,
    OVMF_SID,
    OVMF_TRIXIE,
    UBOOT,
    build_igvm,
    config,
    q,
)

from igvm_builder.assemble import build
from igvm_builder.errors import MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.blob import as_view
from igvm_builder.format.defs import PlatformType
from igvm_builder.inputs.ovmf import parse_ovmf
from igvm_builder.kvm_vmsa import TRANSFORM_TABLE, changes, measured_vmsa, refusals, reset_vmsa
from igvm_builder.measure import measure_platform
from igvm_builder.sev_vmsa import build_vmsa, parse_vmsa, reset_vmsa_fields

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IGVMMEASURE = SHARED / "tools" / "oracles" / "igvmmeasure"
SNP = PlatformType.SEV_SNP
KVM_GPA = 0xFFFF_FFFF_F000
DEFAULT_PAT = 0x0007040600070406

# --------------------------------------------------------------------------- test-side VMSA model

# AMD APM vol. 2 table B-4 offsets (IGVM_FORMAT.md A.2), written out independently
SEG = {n: 16 * i for i, n in enumerate(("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr"))}
Q = {"efer": 0xD0, "cr4": 0x148, "cr3": 0x150, "cr0": 0x158, "dr7": 0x160, "dr6": 0x168, "rflags": 0x170,
     "rip": 0x178, "rsp": 0x1D8, "rax": 0x1F8, "pat": 0x268, "rcx": 0x308, "rdx": 0x310, "rbx": 0x318,
     "sev_features": 0x3B0, "xcr0": 0x3E8, "xss": 0x140, "star": 0x200}
Q |= {n: 0x328 + 8 * i for i, n in enumerate("rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split())}
CPL, VMPL, MXCSR, FCW, PKRU = 0xCB, 0xCA, 0x408, 0x410, 0x2E8
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip")


def u(page: bytes | bytearray, off: int, size: int = 8) -> int:
    return int.from_bytes(page[off : off + size], "little")


def put(page: bytearray, off: int, value: int, size: int = 8) -> None:
    page[off : off + size] = value.to_bytes(size, "little")


def naive(page: bytes, vmm: str, vp0_features: int | None = None) -> bytes:
    """KVM_VMSA.md §2 (qemu) / §5 (cloud-hypervisor) applied byte by byte to a zeroed page."""
    out = bytearray(4096)
    for s in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr"):
        o = SEG[s]
        put(out, o, u(page, o, 2), 2)
        put(out, o + 2, u(page, o + 2, 2) & 0xFFF, 2)
        put(out, o + 4, u(page, o + 4, 4), 4)
        put(out, o + 8, u(page, o + 8))
    if vmm == "qemu":
        put(out, SEG["tr"] + 8, u(page, SEG["ldtr"] + 8))  # TR.base <- LDTR.base
    for s in ("gdtr", "idtr"):  # selector and attrib dropped
        o = SEG[s]
        limit = u(page, o + 4, 4)
        put(out, o + 4, limit & 0xFFFF if vmm == "qemu" else limit, 4)
        put(out, o + 8, u(page, o + 8))
    out[CPL] = (u(page, SEG["ss"] + 2, 2) >> 5) & 3
    for r in (*GPRS, "cr3"):
        put(out, Q[r], u(page, Q[r]))
    put(out, Q["rflags"], u(page, Q["rflags"]) | 2)
    cr0, cr4, efer = u(page, Q["cr0"]), u(page, Q["cr4"]), u(page, Q["efer"])
    vp0 = u(page, Q["sev_features"]) if vp0_features is None else vp0_features
    if vmm == "qemu":
        put(out, Q["cr0"], ((cr0 & 0xFFFFFFFF) | 0x10) & ~0x60000000)
        put(out, Q["cr4"], (cr4 & 0xFFFFFFFF) | 0x40)
        lma = 0x400 if efer & 0x100 and cr0 & 0x80000000 and cr4 & 0x20 else 0
        put(out, Q["efer"], efer | 0x1000 | lma)
        for r in ("xcr0", "pat", "dr6", "dr7"):
            put(out, Q[r], u(page, Q[r]))
        put(out, Q["sev_features"], vp0)
    else:
        put(out, Q["cr0"], cr0 & ~0x60000000)
        put(out, Q["cr4"], cr4 | 0x40)
        put(out, Q["efer"], efer | 0x1000)
        put(out, Q["xcr0"], 1)
        put(out, Q["pat"], DEFAULT_PAT)
        put(out, Q["dr6"], 0xFFFF0FF0)
        put(out, Q["dr7"], 0x400)
        put(out, Q["sev_features"], vp0 | 1)
    put(out, MXCSR, 0x1F80, 4)
    put(out, FCW, 0x37F, 2)
    return bytes(out)


def base_page(**fields: int) -> bytes:
    """The QEMU reset-state VMSA (sev-snp-measure's model) with ``fields`` changed."""
    return build_vmsa(reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1)
                      | {k.replace("__", "."): v for k, v in fields.items()})


def measured(page: bytes, vmm: str) -> dict[str, int]:
    return parse_vmsa(measured_vmsa(page, vmm))


# --------------------------------------------------------------------------- the spec's tables, row by row

# (field, file value, measured on qemu, measured on cloud-hypervisor); None = refused
ROWS = [
    # KVM_VMSA.md §3 CR0 list and §5 CR0 row
    ("cr0", 0x10, 0x10, 0x10), ("cr0", 0x11, 0x11, 0x11), ("cr0", 0x30, 0x30, 0x30), ("cr0", 0x31, 0x31, 0x31),
    ("cr0", 0x1, 0x11, 0x1), ("cr0", 0x60000011, 0x11, 0x11), ("cr0", 0x40000011, 0x11, 0x11),
    ("cr0", 0x100000011, 0x11, None), ("cr0", 0x80000010, None, None), ("cr0", 0x20000011, None, None),
    ("cr4", 0x0, 0x40, 0x40), ("cr4", 0x40, 0x40, 0x40), ("cr4", 0x10000, 0x10040, 0x10040),
    ("cr4", 0x2000, None, None), ("cr4", 0x100000000, 0x40, None),
    ("efer", 0x0, 0x1000, 0x1000), ("efer", 0x800, 0x1800, 0x1800), ("efer", 0x400, None, None),
    ("rflags", 0x0, 0x2, 0x2), ("rflags", 0x246, 0x246, 0x246),
    ("x87_fcw", 0x0, 0x37F, 0x37F), ("x87_fcw", 0x27F, 0x37F, 0x37F),
    ("mxcsr", 0x0, 0x1F80, 0x1F80), ("mxcsr", 0x9FC0, 0x1F80, 0x1F80),
    ("xcr0", 0x7, 0x7, 0x1), ("xcr0", 0x0, None, 0x1), ("xcr0", 0x5, None, 0x1),
    ("pat", 0x0606060606060606, 0x0606060606060606, DEFAULT_PAT), ("pat", 0x0, 0x0, DEFAULT_PAT),
    ("pat", 0x0007040600070402, None, DEFAULT_PAT),
    ("dr6", 0x0, 0x0, 0xFFFF0FF0), ("dr6", 1 << 32, None, 0xFFFF0FF0),
    ("dr7", 0x0, 0x0, 0x400), ("dr7", 0x401, None, 0x400),
    ("cs.attrib", 0xF09B, 0x09B, 0x09B), ("ss.attrib", 0x8093, 0x093, 0x093), ("tr.attrib", 0x108B, 0x08B, 0x08B),
    ("gdtr.selector", 0x10, 0x0, 0x0), ("idtr.attrib", 0x82, 0x0, 0x0),
    ("gdtr.limit", 0x1FFFF, 0xFFFF, None), ("idtr.limit", 0xFFF, 0xFFF, 0xFFF),
    ("cs.base", 0x12345000, 0x12345000, 0x12345000), ("ds.limit", 0xFFFFF, 0xFFFFF, 0xFFFFF),
    ("rip", 0x1234567, 0x1234567, 0x1234567), ("r15", 1 << 63, 1 << 63, 1 << 63), ("cr3", 0x9000, 0x9000, 0x9000),
    ("sev_features", 0x21, 0x21, 0x21), ("sev_features", 0x201, 0x201, 0x201), ("sev_features", 0x20, None, 0x21),
    ("sev_features", 0x9, None, None), ("sev_features", 0x3, None, None),
    ("cpl", 0x3, None, 0x0), ("vmpl", 0x1, None, 0x0), ("pkru", 0x5, None, 0x0), ("xss", 0x1, None, 0x0),
    ("star", 0x1, None, 0x0),
]


@pytest.mark.parametrize("vmm", ["qemu", "cloud-hypervisor"])
@pytest.mark.parametrize(("field", "value", "on_qemu", "on_ch"), ROWS, ids=[f"{r[0]}={r[1]:#x}" for r in ROWS])
def test_spec_rows(vmm: str, field: str, value: int, on_qemu: int | None, on_ch: int | None) -> None:
    page = base_page(**{field.replace(".", "__"): value})
    want = on_qemu if vmm == "qemu" else on_ch
    if want is None:
        with pytest.raises(MeasurementError, match=f"field {field}: ") as exc:
            measured_vmsa(page, vmm)
        assert f"loader '{vmm}' refuses the VMSA of vp 0" in str(exc.value)
        return
    got = measured(page, vmm)
    assert got.get(field, 0) == want
    assert measured_vmsa(page, vmm) == naive(page, vmm)  # and every other field as the re-implementation says


def test_tr_base_cpl_and_long_mode() -> None:
    page = base_page(ldtr__base=0x5000, tr__base=0x7000, ss__attrib=0xF3)
    q, ch = measured(page, "qemu"), measured(page, "cloud-hypervisor")
    assert q["tr.base"] == 0x5000 and ch["tr.base"] == 0x7000  # QEMU passes ldtr.base for TR (§2)
    assert q["cpl"] == ch["cpl"] == 3  # CPL = SS.DPL
    # §3: 0x80000011 with LME, PAE, CS.L is measured unchanged; QEMU adds LMA, CH needs it in the file
    lm = dict(cr0=0x80000011, cr4=0x60, efer=0x1100, cs__attrib=0xA9B, cr3=0x9000)
    assert measured(base_page(**lm), "qemu")["cr0"] == 0x80000011
    assert measured(base_page(**lm), "qemu")["efer"] == 0x1500
    with pytest.raises(MeasurementError, match=r"field efer: .*not LMA"):
        measured_vmsa(base_page(**lm), "cloud-hypervisor")
    lm["efer"] = 0x1D00
    assert measured_vmsa(base_page(**lm), "cloud-hypervisor") == base_page(**lm)  # a fixed point of both
    assert measured_vmsa(base_page(**lm), "qemu") == base_page(**lm)
    for vmm in ("qemu", "cloud-hypervisor"):  # PG + LME without PAE; CS.L outside long mode
        with pytest.raises(MeasurementError, match=r"field cr4: .*without cr4\.PAE"):
            measured_vmsa(base_page(cr0=0x80000011, efer=0x1500), vmm)
        with pytest.raises(MeasurementError, match=r"field cs\.attrib: cs\.L"):
            measured_vmsa(base_page(cs__attrib=0x29B), vmm)


def test_bytes_beyond_the_save_area_and_reserved_bytes() -> None:
    page = bytearray(base_page())
    page[0x700] = 0x5A  # QEMU checks only the first 0x670 bytes; CH copies nothing from there
    for vmm in ("qemu", "cloud-hypervisor"):
        assert measured_vmsa(page, vmm) == base_page()
        assert [c.field for c in changes(page, vmm)] == ["bytes >= 0x670"]
    page[0x700] = 0
    page[0xC8] = 1  # reserved, before vmpl
    with pytest.raises(MeasurementError, match="reserved VMSA byte at offset 0xc8"):
        measured_vmsa(page, "qemu")
    assert measured_vmsa(page, "cloud-hypervisor") == base_page()


def test_every_refusal_is_listed_and_the_error_points_to_lint() -> None:
    page = base_page(dr7=0x401, pkru=1, xcr0=0)
    assert [r.field for r in refusals(page, "qemu")] == ["pkru", "dr7", "xcr0"]
    with pytest.raises(MeasurementError, match=r"field pkru: .*\(and 2 more; `igvm-builder lint --loader qemu`"):
        measured_vmsa(page, "qemu")


def test_the_table_documents_every_field_it_transforms() -> None:
    names = [n for row in TRANSFORM_TABLE for n in row.fields]
    assert len(names) == len(set(names))
    for row in TRANSFORM_TABLE:
        assert row.qemu.text and row.cloud_hypervisor.text and row.source
    # fields the spec lists as carried (§2): all in the table
    carried = {"cr0", "cr3", "cr4", "efer", "xcr0", "pat", "dr6", "dr7", "rflags", "sev_features", "x87_fcw",
               "mxcsr", "cpl", "tr.base", *GPRS}
    assert carried <= set(names)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "MEASUREMENT.md").read_text()
    for row in TRANSFORM_TABLE:
        for name in row.fields:
            if "." not in name and name not in GPRS:
                assert f"`{name}`" in doc, name


# --------------------------------------------------------------------------- random VMSAs vs the re-implementation


def random_vmsa(rng: random.Random, vmm: str) -> bytes:
    page = bytearray(4096)
    for s in ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr"):
        o = SEG[s]
        put(page, o, rng.getrandbits(16), 2)
        put(page, o + 2, rng.getrandbits(16) & ~0x200, 2)  # no CS.L outside long mode
        put(page, o + 4, rng.getrandbits(16 if s in ("gdtr", "idtr") and vmm != "qemu" else 32), 4)
        put(page, o + 8, rng.getrandbits(64))
    for r in (*GPRS, "cr3", "rflags"):
        put(page, Q[r], rng.getrandbits(64))
    long_mode = rng.random() < 0.4
    if long_mode:
        put(page, Q["cr0"], rng.choice((0x80000011, 0x80000031, 0x80000001, 0xE0000031)))
        put(page, Q["cr4"], 0x20 | rng.choice((0, 0x40, 0x600, 0x10000)))
        put(page, Q["efer"], 0x100 | (0x400 if vmm != "qemu" or rng.random() < 0.5 else 0) | rng.choice((0, 0x800)))
        put(page, SEG["cs"] + 2, 0xA9B, 2)
    else:
        put(page, Q["cr0"], rng.choice((0x0, 0x1, 0x10, 0x11, 0x31, 0x60000011, 0x40000001)))
        put(page, Q["cr4"], rng.choice((0, 0x40, 0x640, 0x20)))
        put(page, Q["efer"], rng.choice((0, 0x1000, 0x800, 0x100)))
    put(page, Q["xcr0"], rng.choice((1, 3, 7, 0xE7)))
    put(page, Q["pat"], int.from_bytes(bytes(rng.choice((0, 1, 4, 5, 6, 7)) for _ in range(8)), "little"))
    put(page, Q["dr6"], rng.getrandbits(32))
    put(page, Q["dr7"], rng.choice((0, 0x400)))
    put(page, Q["sev_features"], rng.choice((0x1, 0x21, 0x201, 0x221)))
    put(page, MXCSR, rng.getrandbits(32), 4)
    put(page, FCW, rng.getrandbits(16), 2)
    if vmm != "qemu":  # fields QEMU refuses, CH ignores
        put(page, Q["xss"], rng.getrandbits(64))
        put(page, PKRU, rng.getrandbits(32), 4)
        page[CPL] = rng.getrandbits(2)
    page[0x670 + rng.randrange(0x990)] = rng.getrandbits(8) | 1
    return bytes(page)


@pytest.mark.parametrize("vmm", ["qemu", "cloud-hypervisor"])
def test_random_vmsas_match_the_reimplementation(vmm: str) -> None:
    rng = random.Random(13)
    for _ in range(400):
        page = random_vmsa(rng, vmm)
        vp0 = rng.choice((None, 0x1, 0x21))
        assert measured_vmsa(page, vmm, vp_index=0 if vp0 is None else 1, vp0_features=vp0) == naive(page, vmm, vp0)
        if not u(page, SEG["ss"] + 2, 2) & 0x60:  # SS.DPL 0: the measured page is a fixed point
            assert measured_vmsa(measured_vmsa(page, vmm), vmm) == measured_vmsa(page, vmm)
        elif vmm == "qemu":  # otherwise KVM measures cpl = DPL, which QEMU refuses in a file: no fixed point
            with pytest.raises(MeasurementError, match="field cpl"):
                measured_vmsa(measured_vmsa(page, vmm), vmm)


# --------------------------------------------------------------------------- sev-snp-measure's VMSAs: fixed points


def ssm_pages(ap_eip: int, vcpu_type: str, features: int, vmm: str, vcpus: int) -> list[bytes]:
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType
    from sevsnpmeasure.vmsa import VMSA

    return list(VMSA(SevMode.SEV_SNP, ap_eip, CPU_SIGS[vcpu_type], features, VMMType[vmm]).pages(vcpus))


FIXED_POINT_CASES = [(fw, n, vmm, gf, t) for fw in (OVMF_BOOKWORM, OVMF_TRIXIE, OVMF_SID) for n in (1, 2, 3, 4)
                     for vmm in ("QEMU", "ec2") for gf, t in ((0x1, "EPYC-v4"), (0x21, "EPYC-Milan"))]


@pytest.mark.parametrize(("firmware", "vcpus", "vmm", "features", "vcpu_type"), FIXED_POINT_CASES,
                         ids=[f"{c[0].name}-{c[1]}cpu-{c[2]}-gf{c[3]:#x}" for c in FIXED_POINT_CASES])
def test_sev_snp_measure_vmsas_are_fixed_points(firmware: Path, vcpus: int, vmm: str, features: int,
                                                vcpu_type: str) -> None:
    ap_eip = parse_ovmf(firmware.read_bytes(), firmware.name).sev_es_reset_eip
    pages = ssm_pages(ap_eip, vcpu_type, features, vmm, vcpus)
    assert len(pages) == vcpus
    for i, page in enumerate(pages):
        for kvm in ("qemu", "cloud-hypervisor"):
            vp0 = None if i == 0 else features
            assert refusals(page, kvm, vp_index=i, vp0_features=vp0) == []
            got = {c.field: (c.file_value, c.measured) for c in changes(page, kvm, vp0_features=vp0)}
            if vmm == "QEMU":
                assert got == {}, (kvm, i)
            else:  # sev-snp-measure's ec2 model leaves the FPU at 0 (MEASUREMENT.md §5.1); KVM does not
                assert got == {"mxcsr": (0, 0x1F80), "x87_fcw": (0, 0x37F)}, (kvm, i)


# --------------------------------------------------------------------------- digests


def extend(ld: bytes, page: bytes, page_type: int = 2, gpa: int = KVM_GPA) -> bytes:
    """One SNP_LAUNCH_UPDATE step (MEASUREMENT.md §1.1)."""
    info = ld + hashlib.sha384(page).digest() + struct.pack("<HBB", 0x70, page_type, 0) + bytes(4) \
        + struct.pack("<Q", gpa)
    return hashlib.sha384(info).digest()


def small_file(*vmsas: bytes) -> IgvmFile:
    data = bytes(range(256)) * 16
    return IgvmFile(
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=SNP),),
        initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),),
        directives=(H.PageData(gpa=0x10000, compatibility_mask=1, data=data),
                    *(H.SnpVpContext(gpa=KVM_GPA, compatibility_mask=1, vp_index=i, vmsa=v)
                      for i, v in enumerate(vmsas))),
    )


def test_fcw0_cr0_1_predicted_digests() -> None:
    """A VMSA another producer might write (FCW/MXCSR 0 as COCONUT's, CR0 0x1 without ET)."""
    page = build_vmsa(reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1)
                      | {"cr0": 0x1, "x87_fcw": 0, "mxcsr": 0, "cs.selector": 0x8, "cs.base": 0, "rip": 0x100000})
    f = small_file(page)
    ld = extend(bytes(48), bytes(range(256)) * 16, 1, 0x10000)
    file_bytes = bytearray(page)
    want_qemu = bytearray(page)
    put(want_qemu, Q["cr0"], 0x11)  # §3: 0x01 -> 0x11
    put(want_qemu, FCW, 0x37F, 2)
    put(want_qemu, MXCSR, 0x1F80, 4)
    want_ch = bytearray(want_qemu)
    put(want_ch, Q["cr0"], 0x1)  # §5: ET not forced
    assert measure_platform(f, SNP, loader="qemu").digest == extend(ld, bytes(want_qemu))
    assert measure_platform(f, SNP, loader="cloud-hypervisor").digest == extend(ld, bytes(want_ch))
    # hyperv and igvmmeasure keep hashing the bytes as they are
    assert measure_platform(f, SNP, loader="igvmmeasure").digest == extend(ld, bytes(file_bytes))
    assert measure_platform(f, SNP, loader="hyperv").digest == extend(ld, bytes(file_bytes), gpa=KVM_GPA)


@pytest.mark.parametrize("vcpu_type", ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa"])
def test_smp4_of_a_one_context_image(tmp_path: Path, vcpu_type: str) -> None:
    """-smp 4: the one-context digest, then three reset-state VMSAs (sev-snp-measure's QEMU VMSA
    at the reset vector for the same -cpu model on qemu; KVM's reset state on Cloud Hypervisor)."""
    f = build_igvm(config(tmp_path, ovmf_config(OVMF_BOOKWORM, vcpus=1, features=0x21)))
    one = {vmm: measure_platform(f, SNP, loader=vmm).digest for vmm in ("qemu", "cloud-hypervisor")}
    assert one["qemu"] == measure_platform(f, SNP, loader="qemu", vcpus=1, vcpu_type=vcpu_type).digest
    aps = ssm_pages(0xFFFFFFF0, vcpu_type, 0x21, "QEMU", 4)[1:]
    ld = one["qemu"] or b""
    for ap in aps:
        ld = extend(ld, ap)
    m = measure_platform(f, SNP, loader="qemu", vcpus=4, vcpu_type=vcpu_type)
    assert m.digest == ld and (m.vcpus, m.vp_contexts, m.vcpu_type, m.vcpus_source) == (4, 1, vcpu_type, "given")
    assert any("3 reset-state VMSA(s)" in n for n in m.notes)
    assert all(reset_vmsa("qemu", sev_features=0x21, vcpu_signature=vcpu_type) == ap for ap in aps)
    # Cloud Hypervisor: KVM's own reset state (§5): sev-snp-measure's ec2 flavour at the reset vector,
    # except that KVM's init_seg gives every data segment 0x92 and its FPU state is 0x37f / 0x1f80
    ec2 = bytearray(ssm_pages(0xFFFFFFF0, vcpu_type, 0x21, "ec2", 1)[0])
    for s in ("es", "ds", "fs", "gs"):
        assert u(ec2, SEG[s] + 2, 2) == 0x93
        put(ec2, SEG[s] + 2, 0x92, 2)
    put(ec2, FCW, 0x37F, 2)
    put(ec2, MXCSR, 0x1F80, 4)
    kvm_reset = reset_vmsa("cloud-hypervisor", sev_features=0x21, vcpu_signature=vcpu_type)
    assert kvm_reset == bytes(ec2)
    ld = one["cloud-hypervisor"] or b""
    for _ in range(3):
        ld = extend(ld, bytes(ec2))
    assert measure_platform(f, SNP, loader="cloud-hypervisor", vcpus=4, vcpu_type=vcpu_type).digest == ld
    # hyperv and igvmmeasure do not model the vCPU count
    assert measure_platform(f, SNP, loader="hyperv", vcpus=4).digest == measure_platform(f, SNP).digest


def test_vcpu_count_rules() -> None:
    bsp = base_page()
    two = small_file(bsp, base_page(rip=0xB004))
    m = measure_platform(two, SNP, loader="qemu")
    assert (m.vcpus, m.vp_contexts, m.vcpus_source) == (2, 2, "file")
    with pytest.raises(MeasurementError, match="VP context for vp 1 but the launch has 1 vCPU"):
        measure_platform(two, SNP, loader="qemu", vcpus=1)
    with pytest.raises(MeasurementError, match="at least 1"):
        measure_platform(two, SNP, loader="qemu", vcpus=0)
    with pytest.raises(MeasurementError, match="unknown vCPU type 'EPYC-Bergamo'"):
        measure_platform(two, SNP, loader="qemu", vcpus=3, vcpu_type="EPYC-Bergamo")
    # an AP's own sev_features are replaced by vp 0's (KVM applies vp 0's to every vCPU)
    odd = small_file(bsp, base_page(sev_features=0x21))
    assert measure_platform(odd, SNP, loader="qemu").digest == measure_platform(
        small_file(bsp, base_page()), SNP, loader="qemu").digest
    # a file QEMU refuses is an error naming the field, not a digest
    with pytest.raises(MeasurementError, match="refuses the VMSA of vp 1: field dr7"):
        measure_platform(small_file(bsp, base_page(dr7=0x401)), SNP, loader="qemu")


# --------------------------------------------------------------------------- builds


def ovmf_config(firmware: Path, *, vcpus: int = 1, features: int = 0x1, cr0: int = 0x10, loader: str = "qemu",
                vcpu_type: str = "EPYC-v4", vmm: str = "qemu") -> str:
    return (f'[image]\nplatforms = ["snp"]\nloader = "{loader}"\n[firmware]\npath = {q(firmware)}\n'
            f'[snp]\nvcpus = {vcpus}\nvcpu_type = "{vcpu_type}"\nguest_features = {features:#x}\ncr0 = {cr0:#x}\n'
            f'vmm_type = "{vmm}"\n')


def kernel_config(kernel: Path, *, vcpus: int = 1, loader: str = "qemu") -> str:
    return (f'[image]\nplatforms = ["snp"]\nloader = "{loader}"\n[kernel]\npath = {q(kernel)}\n'
            f'[snp]\nvcpus = {vcpus}\nvcpu_type = "EPYC-Genoa"\n')


@pytest.mark.parametrize("vcpus", [1, 2, 3, 4])
def test_ovmf_builds_are_fixed_points_and_hyperv_equals_qemu(tmp_path: Path, vcpus: int) -> None:
    f = build_igvm(config(tmp_path, ovmf_config(OVMF_BOOKWORM, vcpus=vcpus, features=0x21)))
    ctxs = [h for h in f.directives if isinstance(h, H.SnpVpContext)]
    for c in ctxs:
        for vmm in ("qemu", "cloud-hypervisor"):
            assert changes(bytes(as_view(c.blob())), vmm, vp0_features=None if c.vp_index == 0 else 0x21) == []
    # the file's VMSA bytes are what KVM measures: hyperv (bytes as they are) equals qemu
    assert measure_platform(f, SNP, loader="hyperv").digest == measure_platform(f, SNP, loader="qemu").digest


def build_to(cfg_body: str, directory: Path, name: str) -> tuple[Path, dict]:
    result = build(config(directory, cfg_body))
    out = directory / name
    out.write_bytes(result.data)
    return out, result.reference_values.to_dict()  # the JSON document of the typed ReferenceValues


def check_kvm(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(IGVMMEASURE), "--check-kvm", str(path), "measure", "-b"], capture_output=True,
                          text=True, timeout=120)


def test_igvmmeasure_check_kvm_accepts_protected_mode_kernels_and_cr0_0x30_ovmf(tmp_path: Path) -> None:
    cases = {"pvh": kernel_config(GRUB), "bzimage32": kernel_config(IPXE), "ovmf-bookworm": ovmf_config(OVMF_BOOKWORM, cr0=0x30),
             "ovmf-sid": ovmf_config(OVMF_SID, cr0=0x30, features=0x21, vcpu_type="EPYC-Milan")}
    for name, body in cases.items():
        d = tmp_path / name
        d.mkdir()
        out, _ = build_to(body, d, "out.igvm")
        proc = check_kvm(out)
        assert proc.returncode == 0, (name, proc.stderr)
        f = IgvmFile.load(out)
        regs = parse_vmsa(as_view(next(h for h in f.directives if isinstance(h, H.SnpVpContext)).blob()))
        assert regs["cr0"] == (0x30 if name.startswith("ovmf") else 0x31)
        # igvmmeasure hashes the bytes; they are what QEMU/KVM measure, so its digest is ours on qemu
        assert proc.stdout.strip().lower() == measure_platform(f, SNP, loader="qemu").hex, name


@pytest.mark.parametrize("kernel", [UBOOT, MEMTEST], ids=["elf64", "bzimage64"])
def test_igvmmeasure_check_kvm_refuses_long_mode_only_for_cr0(tmp_path: Path, kernel: Path) -> None:
    out, _ = build_to(kernel_config(kernel), tmp_path, "lm.igvm")
    proc = check_kvm(out)
    assert proc.returncode == 1 and "CR0 in the VMSA" in proc.stderr and "0x80000011" in proc.stderr
    f = IgvmFile.load(out)
    vp = next(h for h in f.directives if isinstance(h, H.SnpVpContext))
    # QEMU/KVM measure 0x80000011 unchanged (KVM_VMSA.md §3): the file is what they measure
    page = bytearray(as_view(vp.blob()))
    assert changes(page, "qemu") == changes(page, "cloud-hypervisor") == []
    # its only objection is CR0: with CR0 patched to 0x31 every other --check-kvm rule passes
    put(page, Q["cr0"], 0x31)
    patched = tmp_path / "patched.igvm"
    g = dataclasses.replace(f, directives=tuple(dataclasses.replace(h, vmsa=bytes(page)) if h is vp else h
                                                for h in f.directives))
    patched.write_bytes(g.to_bytes())
    assert check_kvm(patched).returncode == 0, check_kvm(patched).stderr


def test_kernel_launch_vcpus_documents_reset_state_aps(tmp_path: Path) -> None:
    out, refs_doc = build_to(kernel_config(GRUB, vcpus=4), tmp_path, "k.igvm")
    f = IgvmFile.load(out)
    assert [h.vp_index for h in f.directives if isinstance(h, H.SnpVpContext)] == [0]
    snp = refs_doc["platforms"]["snp"]
    assert snp["vcpus"] == 4
    assert snp["kvm_vmsas"]["vp_contexts"] == 1 and snp["kvm_vmsas"]["reset_state_vcpus"] == 3
    assert snp["kvm_vmsas"]["vcpu_type"] == "EPYC-Genoa" and snp["kvm_vmsas"]["checked_on_hardware"] is False
    assert "sev_es_sync_vmsa" in snp["kvm_vmsas"]["how_to_check"]
    one = measure_platform(f, SNP, loader="qemu").digest or b""
    ld = one
    for ap in ssm_pages(0xFFFFFFF0, "EPYC-Genoa", 0x1, "QEMU", 4)[1:]:
        ld = extend(ld, ap)
    assert snp["digest"] == ld.hex()
    assert any("3 reset-state AP VMSA(s)" in n for n in refs_doc["build"]["notes"])
    assert json.loads(json.dumps(refs_doc)) == refs_doc


# --------------------------------------------------------------------------- the measure command


def run_measure(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "igvm_builder", "measure", *args], capture_output=True, text=True,
                          timeout=120)


def test_measure_cli_vcpus(tmp_path: Path) -> None:
    path = tmp_path / "one.igvm"
    bsp = base_page(sev_features=0x21)
    path.write_bytes(small_file(bsp).to_bytes())
    ld = extend(bytes(48), bytes(range(256)) * 16, 1, 0x10000)
    one = extend(ld, bsp)
    proc = run_measure(str(path), "--loader", "qemu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"SEV_SNP sha384 {one.hex()} loader=qemu (QEMU >= 10.1 launching the IGVM file itself "
                           "(-object igvm-cfg) on KVM) vcpus=1  (vcpus = the file's VP contexts; --vcpus N for -smp N)\n")
    four = one
    for ap in ssm_pages(0xFFFFFFF0, "EPYC-Turin", 0x21, "QEMU", 4)[1:]:
        four = extend(four, ap)
    proc = run_measure(str(path), "--loader", "qemu", "--vcpus", "4", "--vcpu-type", "EPYC-Turin", "--json",
                       "--reference-values", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["platforms"][0]
    assert (entry["digest"], entry["vcpus"], entry["vp_contexts"], entry["vcpu_type"], entry["vcpus_source"]) == (
        four.hex(), 4, 1, "EPYC-Turin", "given")
    refs = json.loads((tmp_path / "r.json").read_text())["platforms"]["snp"]
    assert refs["digest"] == four.hex() and refs["vcpus"] == 4
    assert refs["kvm_vmsas"]["reset_state_vcpus"] == 3 and refs["kvm_vmsas"]["vcpu_type"] == "EPYC-Turin"
    assert any("not checked on SNP hardware" in n for n in refs["notes"])
    proc = run_measure(str(path), "--vcpus", "4")  # hyperv: said to be ignored
    assert proc.returncode == 0 and "apply to the KVM loaders" in proc.stderr
    proc = run_measure(str(path), "--loader", "qemu", "--vcpu-type", "EPYC-Bergamo")
    assert proc.returncode == 2 and "unknown vCPU type 'EPYC-Bergamo'" in proc.stderr
    proc = run_measure(str(path), "--loader", "qemu", "--vcpus", "0")
    assert proc.returncode == 2
    bad = tmp_path / "bad.igvm"
    bad.write_bytes(small_file(base_page(x87_fcw=0, pkru=1)).to_bytes())
    proc = run_measure(str(bad), "--loader", "qemu")
    assert proc.returncode == 2 and proc.stdout == ""  # the loader cannot measure it: unusable input
    assert proc.stderr.count("\n") == 1 and "refuses the VMSA of vp 0: field pkru" in proc.stderr


# --------------------------------------------------------------------------- lint


def lint_text(f: IgvmFile, loader: str) -> list[tuple[str, str]]:
    from igvm_builder.lint import lint

    return [(fd.severity, fd.message) for fd in lint(f, loader)]


def test_lint_names_each_changed_field_refusal_and_the_vcpu_count() -> None:
    page = build_vmsa(reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1)
                      | {"cr0": 0x1, "x87_fcw": 0, "mxcsr": 0})
    q = lint_text(small_file(page), "qemu")
    assert ("warning", "VMSA of vp 0: x87_fcw 0x0 is measured as 0x37f on qemu") in q
    assert ("warning", "VMSA of vp 0: mxcsr 0x0 is measured as 0x1f80 on qemu") in q
    assert ("warning", "VMSA of vp 0: cr0 0x1 is measured as 0x11 on qemu") in q
    assert not [m for s, m in q if s == "error"]
    assert [m for _, m in q if "depends on the vCPU count" in m] == [
        "the SEV-SNP digest on qemu depends on the vCPU count: KVM measures one VMSA per vCPU, so the file's 1 VP "
        "context(s) give its digest only for -smp 1; every further vCPU adds a reset-state VMSA (its RDX is the -cpu "
        "model's signature): `measure --vcpus N` gives the digest of -smp N"]
    ch = lint_text(small_file(page), "cloud-hypervisor")
    assert not [m for _, m in ch if "cr0" in m]  # CH keeps 0x1, and 0x1 is no ET fixed point to defend
    assert ("warning", "VMSA of vp 0: x87_fcw 0x0 is measured as 0x37f on cloud-hypervisor") in ch
    # every refusal is its own error, with the reason
    bad = lint_text(small_file(base_page(dr7=0x401, pkru=1, sev_features=0x9)), "qemu")
    errors = [m for s, m in bad if s == "error"]
    assert len(errors) == 3
    assert any("dr7 = 0x401: KVM launches only with dr7 0 or 0x400" in m for m in errors)
    assert any("pkru = 0x1: QEMU accepts no non-zero pkru" in m for m in errors)
    assert any("sev_features = 0x9 has bits 0x8 that upstream KVM does not support" in m for m in errors)
    # the byte-hashing loaders have nothing to say about it
    assert not [m for _, m in lint_text(small_file(page), "hyperv") if "measured as" in m or "vCPU" in m]


def test_lint_explains_the_over_strict_cr0_rule_for_long_mode(tmp_path: Path) -> None:
    lm, _ = build_to(kernel_config(UBOOT), tmp_path, "lm.igvm")
    for loader in ("qemu", "cloud-hypervisor"):
        found = lint_text(IgvmFile.load(lm), loader)
        assert [s for s, _ in found] == ["warning"] * len(found)
        cr0 = [m for _, m in found if "cr0" in m]
        assert len(cr0) == 1 and "--check-kvm refuses cr0 0x80000011" in cr0[0] and "over-strict" in cr0[0]
        assert len(found) == 2  # and the vCPU count
    pvh, _ = build_to(kernel_config(GRUB), tmp_path, "pvh.igvm")
    assert [m for _, m in lint_text(IgvmFile.load(pvh), "qemu") if "cr0" in m or "measured as" in m] == []


def test_lint_names_the_fields_kvm_changes_in_ec2_vmsas(tmp_path: Path) -> None:
    f = build_igvm(config(tmp_path, ovmf_config(OVMF_BOOKWORM, vcpus=2, vmm="ec2")))
    found = [m for _, m in lint_text(f, "qemu") if "measured as" in m]
    assert found == [f"VMSA of vp {vp}: {field} 0x0 is measured as {v} on qemu" for vp in (0, 1)
                     for field, v in (("mxcsr", "0x1f80"), ("x87_fcw", "0x37f"))]
    ok = build_igvm(config(tmp_path, ovmf_config(OVMF_BOOKWORM, vcpus=2)))
    assert [m for _, m in lint_text(ok, "qemu") if "measured as" in m] == []


# --------------------------------------------------------------------------- sign / verify for -smp N


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "igvm_builder", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_sign_and_verify_a_kernel_launch_for_its_vcpu_count(tmp_path: Path) -> None:
    """A kernel image built for 4 vCPUs on qemu: sign --config signs the 4-vCPU digest of the reference
    values (vp 0 + 3 reset-state APs), verify --reference checks it, verify without the count refuses."""
    id_pem = SHARED / "keys" / "test-only-id-p384.pem"
    body = kernel_config(GRUB, vcpus=4) + f"[sign]\nid_key = {q(id_pem)}\n"
    cfg = tmp_path / "g.toml"
    cfg.write_text(body)
    img, refs = tmp_path / "g.igvm", tmp_path / "g.json"
    assert run_cli("build", str(cfg), "-o", str(img), "--reference-values", str(refs)).returncode == 0
    ref_digest = json.loads(refs.read_text())["platforms"]["snp"]["digest"]
    signed = tmp_path / "s.igvm"
    proc = run_cli("sign", str(img), "-o", str(signed), "--config", str(cfg), "--allow-test-keys")
    assert proc.returncode == 0, proc.stderr
    assert f"launch digest {ref_digest[:16]}..." in proc.stdout  # the one-line result shows a prefix
    ld = next(h for h in IgvmFile.load(signed).directives if isinstance(h, H.SnpIdBlock)).ld
    assert bytes(ld).hex() == ref_digest
    assert run_cli("verify", str(signed), "--reference", str(refs)).returncode == 0
    proc = run_cli("verify", str(signed), "--loader", "qemu")  # -smp 1: not what was signed
    assert proc.returncode == 1 and "launch digest mismatch" in proc.stderr
    proc = run_cli("verify", str(signed), "--loader", "qemu", "--vcpus", "4", "--vcpu-type", "EPYC-Genoa")
    assert proc.returncode == 0, proc.stderr
    # the two-step flow records the count in the document, so the import measures alike
    tbs = tmp_path / "tbs.json"
    proc = run_cli("sign", str(img), "--export-tbs", str(tbs), "--config", str(cfg), "--allow-test-keys")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(tbs.read_text())
    assert (doc["vcpus"], doc["vcpu_type"], doc["loader"]) == (4, "EPYC-Genoa", "qemu")
    assert f"launch digest {ref_digest}" in proc.stdout


def test_measure_dump_vmsas(tmp_path: Path) -> None:
    """--dump-vmsas writes the pages to compare with the host's sev_es_sync_vmsa dump (KVM_VMSA.md §8)."""
    page = base_page(x87_fcw=0, cr0=0x1, sev_features=0x21)
    path = tmp_path / "f.igvm"
    path.write_bytes(small_file(page).to_bytes())
    out = tmp_path / "dump"
    proc = run_measure(str(path), "--loader", "qemu", "--vcpus", "3", "--vcpu-type", "EPYC-Milan",
                       "--dump-vmsas", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["vmsa0.bin", "vmsa1.bin", "vmsa2.bin"]
    assert (out / "vmsa0.bin").read_bytes() == naive(page, "qemu")
    ap = ssm_pages(0xFFFFFFF0, "EPYC-Milan", 0x21, "QEMU", 2)[1]
    assert (out / "vmsa1.bin").read_bytes() == (out / "vmsa2.bin").read_bytes() == ap
    # the digest printed is the chain over exactly these pages
    ld = extend(bytes(48), bytes(range(256)) * 16, 1, 0x10000)
    for name in ("vmsa0.bin", "vmsa1.bin", "vmsa2.bin"):
        ld = extend(ld, (out / name).read_bytes())
    assert ld.hex() in proc.stdout
    hv = tmp_path / "hv"
    assert run_measure(str(path), "--dump-vmsas", str(hv)).returncode == 0  # hyperv: the file's page
    assert [p.name for p in hv.iterdir()] == ["vmsa0.bin"] and (hv / "vmsa0.bin").read_bytes() == page
    refused = tmp_path / "refused.igvm"
    refused.write_bytes(small_file(base_page(dr7=0x401)).to_bytes())
    proc = run_measure(str(refused), "--loader", "qemu", "--dump-vmsas", str(tmp_path / "none"))
    assert proc.returncode == 2 and "field dr7" in proc.stderr and not (tmp_path / "none").exists()


def test_sign_image_signs_the_digest_of_the_vcpu_count() -> None:
    from igvm_builder.sign.image import sign_image

    f = small_file(base_page())
    signed = IgvmFile.from_bytes(sign_image(f.to_bytes(), id_key=str(SHARED / "keys" / "test-only-id-p384.pem"),
                                            loader="qemu", vcpus=3, vcpu_type="EPYC-Milan"))
    ld = bytes(next(h for h in signed.directives if isinstance(h, H.SnpIdBlock)).ld)
    one = measure_platform(f, SNP, loader="qemu").digest or b""
    assert ld == extend(extend(one, ssm_pages(0xFFFFFFF0, "EPYC-Milan", 1, "QEMU", 1)[0]),
                        ssm_pages(0xFFFFFFF0, "EPYC-Milan", 1, "QEMU", 1)[0])
