"""SEV VMSA pages: named-field table, build/parse, reset VMSA, vCPU signatures.

Expectations: ``shared/vectors/measure/snp.json`` ``vmsa_pages`` (pages dumped by
sev-snp-measure 0.0.13), ``shared/spec/IGVM_FORMAT.md`` Appendix A.2 offsets,
``shared/spec/MEASUREMENT.md`` §5.1, and sev-snp-measure's own VMSA builder and vCPU table,
imported here only as an independent oracle.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from igvm_builder import sev_vmsa as V
from igvm_builder.errors import ConfigError, IgvmError, IgvmFormatError
from igvm_builder.inputs.ovmf import parse_ovmf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def vmsa_vectors() -> dict:
    return json.loads((SHARED / "vectors" / "measure" / "snp.json").read_text())["vmsa_pages"]


# --- the pages in snp.json ---------------------------------------------------------------------


def test_vmsa_pages_match_snp_json() -> None:
    vec = vmsa_vectors()
    argv = vec["argv"]
    assert "--vcpu-type=EPYC-v4" in argv and "--vcpus=2" in argv
    firmware = SHARED / argv[argv.index("--ovmf") + 1]
    ap_eip = parse_ovmf(firmware.read_bytes(), firmware.name).sev_es_reset_eip
    assert ap_eip == 0x80B004
    sig = V.vcpu_signature("EPYC-v4")
    pages = {
        "vmsa0.bin": V.build_reset_vmsa(V.BSP_RESET_EIP, vcpu_signature=sig, sev_features=0x1),
        "vmsa1.bin": V.build_reset_vmsa(ap_eip, vcpu_signature=sig, sev_features=0x1),
    }
    for fname, page in pages.items():
        exp = vec["files"][fname]
        assert len(page) == 4096
        assert hashlib.sha256(page).hexdigest() == exp["sha256"], fname
        assert hashlib.sha384(page).hexdigest() == exp["sha384"], fname
        nonzero = {f"{i:#x}": b for i, b in enumerate(page) if b}
        assert nonzero == exp["nonzero_bytes"], fname


def test_parse_reset_vmsa_by_name() -> None:
    """The §5.1 table, read back through the named-field parser."""
    bsp = V.parse_vmsa(
        V.build_reset_vmsa(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=0x21), nonzero_only=True
    )
    for seg in ("es", "ss", "ds", "fs", "gs"):
        assert (bsp[f"{seg}.attrib"], bsp[f"{seg}.limit"]) == (0x93, 0xFFFF)
        assert f"{seg}.selector" not in bsp and f"{seg}.base" not in bsp
    assert (bsp["cs.selector"], bsp["cs.attrib"], bsp["cs.limit"], bsp["cs.base"]) == (
        0xF000,
        0x9B,
        0xFFFF,
        0xFFFF0000,
    )
    assert bsp["gdtr.limit"] == bsp["idtr.limit"] == 0xFFFF
    assert (bsp["ldtr.attrib"], bsp["tr.attrib"]) == (0x82, 0x8B)
    assert bsp["efer"] == 0x1000 and bsp["cr4"] == 0x40 and bsp["cr0"] == 0x10
    assert (bsp["dr7"], bsp["dr6"], bsp["rflags"], bsp["rip"]) == (0x400, 0xFFFF0FF0, 0x2, 0xFFF0)
    assert bsp["pat"] == 0x0007040600070406
    assert (bsp["rdx"], bsp["sev_features"], bsp["xcr0"]) == (0x800F12, 0x21, 0x1)
    assert (bsp["mxcsr"], bsp["x87_fcw"]) == (0x1F80, 0x37F)
    assert len(bsp) == 33
    ap = V.parse_vmsa(V.build_reset_vmsa(0x80B004, vcpu_signature=0x800F12, sev_features=1))
    assert (ap["cs.base"], ap["rip"]) == (0x800000, 0xB004)
    assert len(ap) == len(V.VMSA_FIELDS)  # every field reported when nonzero_only is False


# --- independent oracle: sev-snp-measure's builder -----------------------------------------------


@pytest.mark.parametrize("vmm", ["QEMU", "ec2", "gce"])
@pytest.mark.parametrize("eip", [0xFFFFFFF0, 0x80B004, 0x808004])
@pytest.mark.parametrize("features", [0x0, 0x1, 0x21])
def test_reset_vmsa_matches_sev_snp_measure(vmm: str, eip: int, features: int) -> None:
    from sevsnpmeasure.vcpu_types import CPU_SIGS
    from sevsnpmeasure.vmm_types import VMMType
    from sevsnpmeasure.vmsa import VMSA

    for name in ("EPYC-v4", "EPYC-Milan", "EPYC-Genoa", "EPYC-Turin"):
        expected = bytes(VMSA.build_save_area(eip, features, CPU_SIGS[name], VMMType[vmm]))
        got = V.build_reset_vmsa(eip, vcpu_signature=name, sev_features=features, vmm_type=vmm)
        assert got == expected, (vmm, hex(eip), features, name)


def test_vcpu_signatures_match_sev_snp_measure() -> None:
    from sevsnpmeasure.vcpu_types import CPU_SIGS, cpu_sig

    assert dict(V.VCPU_SIGNATURES) == CPU_SIGS
    rng = random.Random(1)
    for _ in range(500):
        fms = (rng.randrange(0, 0x10F), rng.randrange(0, 0x100), rng.randrange(0, 0x10))
        assert V.cpuid_signature(*fms) == cpu_sig(*fms)


def test_vcpu_signature_values_from_spec() -> None:
    # MEASUREMENT.md §5.1 (rdx row)
    expected = {
        "EPYC": 0x800F12,
        "EPYC-v1": 0x800F12,
        "EPYC-v2": 0x800F12,
        "EPYC-v3": 0x800F12,
        "EPYC-v4": 0x800F12,
        "EPYC-Rome": 0x830F10,
        "EPYC-Milan": 0xA00F11,
        "EPYC-Genoa": 0xA10F10,
        "EPYC-Turin": 0xB00F00,
    }
    for name, sig in expected.items():
        assert V.vcpu_signature(name) == sig
    for name, sig in V.VCPU_SIGNATURES.items():  # a model version never changes the signature
        assert sig == V.VCPU_SIGNATURES[name.rsplit("-v", 1)[0]]


def test_vcpu_signature_resolver() -> None:
    assert V.vcpu_signature("epyc-milan") == 0xA00F11
    assert V.vcpu_signature(" EPYC-Genoa-v1 ") == 0xA10F10
    assert V.vcpu_signature(0xA10F10) == 0xA10F10
    assert V.vcpu_signature("0xa10f11") == 0xA10F11
    assert V.vcpu_signature("10489617") == 0xA00F11
    with pytest.raises(ConfigError, match=r"unknown vCPU type 'EPYC-Bergamo'.*EPYC-Turin") as exc:
        V.vcpu_signature("EPYC-Bergamo")
    assert isinstance(exc.value, IgvmError) and isinstance(exc.value, ValueError)
    for bad in (-1, 1 << 32, "0x100000000"):
        with pytest.raises(ConfigError, match="32 bits"):
            V.vcpu_signature(bad)
    for bad in (True, 1.5, None):
        with pytest.raises(ConfigError):
            V.vcpu_signature(bad)  # type: ignore[arg-type]


# --- vmm types and options ----------------------------------------------------------------------


def test_vmm_type_differences() -> None:
    def fields(vmm: str, eip: int = V.BSP_RESET_EIP) -> dict[str, int]:
        return V.reset_vmsa_fields(eip, vcpu_signature=0xA10F10, sev_features=1, vmm_type=vmm)

    qemu = fields("qemu")
    ec2_bsp, ec2_ap, gce = fields("EC2"), fields("ec2", 0x80B004), fields("gce")
    assert (ec2_bsp["cs.attrib"], ec2_ap["cs.attrib"]) == (0x9A, 0x9B)
    assert (ec2_bsp["ss.attrib"], ec2_bsp["tr.attrib"]) == (0x92, 0x83)
    for other in (ec2_bsp, gce):
        assert other["rdx"] == 0x600
        assert "mxcsr" not in other and "x87_fcw" not in other
    assert gce["pat"] == 0x00070106
    diff = {k for k in qemu.keys() | gce.keys() if qemu.get(k) != gce.get(k)}
    assert diff == {"pat", "rdx", "mxcsr", "x87_fcw"}
    # ec2 and gce do not need a vCPU signature; qemu does
    V.build_reset_vmsa(V.BSP_RESET_EIP, sev_features=1, vmm_type="gce")
    with pytest.raises(ConfigError, match="needs a vCPU signature"):
        V.build_reset_vmsa(V.BSP_RESET_EIP, sev_features=1)
    with pytest.raises(ConfigError, match="unknown VMM type 'kvmtool'"):
        V.build_reset_vmsa(V.BSP_RESET_EIP, vcpu_signature=1, sev_features=1, vmm_type="kvmtool")
    assert V.resolve_vmm_type(V.VmmType.GCE) is V.VmmType.GCE


def test_cr0_option_changes_only_cr0() -> None:
    a = V.build_reset_vmsa(V.BSP_RESET_EIP, vcpu_signature=0x800F12, sev_features=0x21)
    b = V.build_reset_vmsa(V.BSP_RESET_EIP, vcpu_signature=0x800F12, sev_features=0x21, cr0=0x30)
    assert [i for i in range(4096) if a[i] != b[i]] == [0x158]
    assert V.parse_vmsa(b)["cr0"] == 0x30


# --- the field table and generic build / parse ---------------------------------------------------


def test_field_table_matches_appendix_a2() -> None:
    # IGVM_FORMAT.md Appendix A.2 (and §11.1) offsets, a representative sample of every region
    a2 = {
        "es.selector": 0, "cs.selector": 16, "ss.selector": 32, "ds.selector": 48, "fs.selector": 64,
        "gs.selector": 80, "gdtr.selector": 96, "ldtr.selector": 112, "idtr.selector": 128, "tr.selector": 144,
        "pl0_ssp": 160, "pl3_ssp": 184, "u_cet": 192, "vmpl": 202, "cpl": 203, "efer": 208, "xss": 320,
        "cr4": 328, "cr3": 336, "cr0": 344, "dr7": 352, "dr6": 360, "rflags": 368, "rip": 376, "dr0": 384,
        "dr3_addr_mask": 440, "rsp": 472, "s_cet": 480, "ssp": 488, "interrupt_ssp_table_addr": 496,
        "rax": 504, "star": 512, "lstar": 520, "cstar": 528, "sfmask": 536, "kernel_gs_base": 544,
        "sysenter_cs": 552, "sysenter_esp": 560, "sysenter_eip": 568, "cr2": 576, "pat": 616,
        "dbgctl": 624, "last_branch_from_ip": 632, "last_excp_to_ip": 656, "spec_ctrl": 736, "rcx": 776,
        "rdx": 784, "rbx": 792, "rbp": 808, "rsi": 816, "rdi": 824, "r8": 832, "r15": 888,
        "exit_info1": 912, "exit_info2": 920, "exit_int_info": 928, "next_rip": 936, "sev_features": 944,
        "v_intr_cntrl": 952, "guest_error_code": 960, "virtual_tom": 968, "tlb_id": 976, "pcpu_id": 984,
        "event_inject": 992, "xcr0": 1000, "xsave_valid_bitmap": 1008, "x87dp": 1024, "mxcsr": 1032,
        "x87_ftw": 1036, "x87_fsw": 1038, "x87_fcw": 1040, "x87_op": 1042, "x87_ds": 1044, "x87_cs": 1046,
        "x87_rip": 1048, "st0": 1056, "xmm0": 1136, "ymm0_high": 1392,
    }  # fmt: skip
    by_name = {f.name: f for f in V.VMSA_FIELDS}
    assert {k: by_name[k].offset for k in a2} == a2
    # segment records {u16 selector, u16 attrib, u32 limit, u64 base}
    assert [(by_name[f"tr.{p}"].offset, by_name[f"tr.{p}"].size) for p in ("selector", "attrib", "limit", "base")] == [
        (144, 2), (146, 2), (148, 4), (152, 8),
    ]  # fmt: skip
    end = 0
    for f in V.VMSA_FIELDS:  # sorted, no overlaps, inside the 1648-byte save area
        assert f.offset >= end
        end = f.end
    assert end == V.SAVE_AREA_SIZE == 1648


def test_build_parse_round_trip_random() -> None:
    rng = random.Random(20240611)
    for _ in range(200):
        chosen = rng.sample(V.VMSA_FIELDS, rng.randrange(1, 40))
        values = {f.name: rng.getrandbits(8 * f.size) or 1 for f in chosen}
        page = V.build_vmsa(values)
        assert len(page) == 4096
        assert V.parse_vmsa(page, nonzero_only=True) == values
        assert V.build_vmsa(V.parse_vmsa(page)) == page
        assert V.parse_vmsa(page[: V.SAVE_AREA_SIZE]) == V.parse_vmsa(memoryview(page))
        assert V.vmsa_reserved_nonzero(page) == ()


def test_build_vmsa_rejects_bad_fields() -> None:
    with pytest.raises(ConfigError, match="unknown VMSA field 'g_pat'") as exc:
        V.build_vmsa({"g_pat": 1})
    assert exc.value.key == "g_pat"
    with pytest.raises(ConfigError, match="unsigned 8-bit"):
        V.build_vmsa({"vmpl": 0x100})
    with pytest.raises(ConfigError, match="unsigned 16-bit"):
        V.build_vmsa({"cs.selector": -1})
    with pytest.raises(ConfigError):
        V.build_vmsa({"rip": "0xfff0"})  # type: ignore[dict-item]
    assert V.build_vmsa({"rip": (1 << 64) - 1})[376:384] == b"\xff" * 8


def test_parse_vmsa_size_and_reserved_bytes() -> None:
    for size in (0, 1647, 4097):
        with pytest.raises(IgvmFormatError, match="VMSA"):
            V.parse_vmsa(bytes(size))
    page = bytearray(V.build_vmsa({"rip": 0xFFF0}))
    page[200] = 1  # vmsa_reserved1
    page[0x2F0] = 2  # reserved between tsc_aux and rcx
    page[2000] = 3  # padding
    assert V.vmsa_reserved_nonzero(page) == (200, 0x2F0, 2000)
    assert V.parse_vmsa(page, nonzero_only=True) == {"rip": 0xFFF0}


def test_reserved_nonzero_agrees_with_a_byte_by_byte_scan() -> None:
    """vmsa_reserved_nonzero (which scans only the gaps between fields) against the definition: every
    non-zero byte that no field of VMSA_FIELDS covers, on random pages of every accepted length."""
    rng = random.Random(17)
    for _ in range(200):
        size = rng.choice((V.SAVE_AREA_SIZE, V.VMSA_SIZE, rng.randrange(V.SAVE_AREA_SIZE, V.VMSA_SIZE + 1)))
        page = bytearray(size)
        for _ in range(rng.randrange(0, 40)):
            page[rng.randrange(size)] = rng.randrange(1, 256)
        if rng.random() < 0.1:
            page = bytearray(rng.randbytes(size))
        covered = {i for x in V.VMSA_FIELDS for i in range(x.offset, x.offset + x.size)}
        want = tuple(i for i, b in enumerate(page) if b and i not in covered)
        assert V.vmsa_reserved_nonzero(page) == want
        assert V.vmsa_reserved_nonzero(memoryview(bytes(page))) == want


def test_reset_vmsa_passes_qemu_igvm_field_rule() -> None:
    """MEASUREMENT.md §7.4: the §5.1 VMSA only uses fields QEMU accepts in an IGVM VMSA."""
    for vmm in ("qemu", "ec2", "gce"):
        page = V.build_reset_vmsa(0x80B004, vcpu_signature=0x800F12, sev_features=0x21, vmm_type=vmm)
        assert set(V.parse_vmsa(page, nonzero_only=True)) <= V.QEMU_IGVM_VMSA_FIELDS
        assert V.vmsa_reserved_nonzero(page) == ()
