"""The measurement engine against independent implementations, on real firmware.

SEV-SNP: the IGVM layout of ``shared/spec/MEASUREMENT.md`` §7.1 is built here, directly with
the IgvmFile model, from the Debian OVMF images (pages, ASEV sections in table order, one
VMSA per vCPU at 0xFFFFFFFFF000).  Its ``cloud-hypervisor`` (ZERO-type) digest must equal
what sev-snp-measure prints for the QEMU launch (run as a subprocess, §11), and its
``hyperv`` (NORMAL-zeros) digest ``igvm_layout_digests.data_less_pages_as_NORMAL_zeros`` of
``snp.json`` (COCONUT igvmmeasure and microsoft/igvm computed those).

TDX: the §8.3 layout from the TDVF table, against ``tdx.json`` (td-shim's script for single
pass, quex reproduce.mjs for two pass).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PageDataFlags, PageDataType, PlatformType
from igvm_builder.inputs.ovmf import (
    SevSectionType,
    TdvfSectionType,
    kernel_hashes_page,
    parse_ovmf,
    require_tdx,
)
from igvm_builder.measure import measure_platform
from igvm_builder.sev_vmsa import BSP_RESET_EIP, build_reset_vmsa

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SNP_JSON = json.loads((SHARED / "vectors" / "measure" / "snp.json").read_text())
TDX_JSON = json.loads((SHARED / "vectors" / "measure" / "tdx.json").read_text())
KVM_VMSA_GPA = 0xFFFF_FFFF_F000

SNP_CASES = [c for c in SNP_JSON["cases"] if c.get("igvm_layout_digests") and c["vmm_type"] == "QEMU"]
TDX_CASES = [c for c in TDX_JSON["cases"] if "expected_failure" not in c]


@cache
def firmware(rel: str) -> bytes:
    return (SHARED / rel).read_bytes()


def snp_layout(case: dict[str, Any]) -> IgvmFile:
    """MEASUREMENT.md §7.1 for one ``snp.json`` case."""
    fw = firmware(case["firmware"])
    img = parse_ovmf(fw, case["firmware"])
    dirs: list[H.Header] = [H.PageData(gpa=img.gpa_base + off, compatibility_mask=1, data=fw[off : off + 4096])
                            for off in range(0, len(fw), 4096)]
    kernel = (SHARED / case["kernel"]).read_bytes() if case["kernel"] else None
    for s in img.sev_sections:
        if not s.size:
            continue
        if s.type == SevSectionType.SNP_SECRETS:
            dirs.append(H.PageData(gpa=s.base, compatibility_mask=1, data_type=PageDataType.SECRETS))
        elif s.type == SevSectionType.CPUID:
            dirs.append(H.PageData(gpa=s.base, compatibility_mask=1, data_type=PageDataType.CPUID_DATA))
        elif s.type == SevSectionType.SNP_KERNEL_HASHES and kernel is not None:
            initrd = (SHARED / case["initrd"]).read_bytes() if case["initrd"] else None
            dirs.append(H.PageData(gpa=s.base, compatibility_mask=1,
                                   data=kernel_hashes_page(img, kernel, initrd, case["append"])))
        else:  # SEC_MEM, SVSM_CAA, KERNEL_HASHES without a kernel: pages without data
            dirs += [H.PageData(gpa=gpa, compatibility_mask=1) for gpa in range(s.base, s.end, 4096)]
    features = int(case["guest_features"], 16)
    for vp in range(case["vcpus"]):
        eip = BSP_RESET_EIP if vp == 0 else img.sev_es_reset_eip
        assert eip is not None
        vmsa = build_reset_vmsa(eip, vcpu_signature=case["vcpu_type"], sev_features=features)
        dirs.append(H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=1, vp_index=vp, vmsa=vmsa))
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),),
                 initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),), directives=tuple(dirs))
    return IgvmFile.from_bytes(f.to_bytes())  # measure what a loader reads: the serialized file


@pytest.mark.parametrize("case", SNP_CASES, ids=[c["id"] for c in SNP_CASES])
def test_snp_ovmf_layout_known_answers(case: dict[str, Any]) -> None:
    f = snp_layout(case)
    layout = case["igvm_layout_digests"]
    assert measure_platform(f, PlatformType.SEV_SNP, loader="cloud-hypervisor").hex == layout[
        "data_less_pages_as_ZERO_type"] == case["expected_launch_digest"]
    normal = layout["data_less_pages_as_NORMAL_zeros"]
    for loader in ("hyperv", "qemu", "igvmmeasure"):
        assert measure_platform(f, PlatformType.SEV_SNP, loader=loader).hex == normal, loader


@pytest.mark.parametrize("case_id", ["bookworm-ovmf-1cpu-epycv4", "bookworm-ovmf-2cpu-milan",
                                     "sid-amdsev-1cpu-epycv4-kernel-append"])
def test_snp_ovmf_layout_against_sev_snp_measure(case_id: str) -> None:
    (case,) = [c for c in SNP_CASES if c["id"] == case_id]
    out = subprocess.run(case["argv"], cwd=SHARED, check=True, capture_output=True, text=True, timeout=300)
    reference = out.stdout.strip()
    assert len(reference) == 96, out.stdout
    assert measure_platform(snp_layout(case), PlatformType.SEV_SNP, loader="cloud-hypervisor").hex == reference


def test_reset_vmsa_pages_match_sev_snp_measure_dumps() -> None:
    pages = SNP_JSON["vmsa_pages"]["files"]
    img = parse_ovmf(firmware("firmware/bookworm-OVMF.fd"))
    assert img.sev_es_reset_eip is not None
    for name, eip in (("vmsa0.bin", BSP_RESET_EIP), ("vmsa1.bin", img.sev_es_reset_eip)):
        vmsa = build_reset_vmsa(eip, vcpu_signature="EPYC-v4", sev_features=0x1)
        assert hashlib.sha384(vmsa).hexdigest() == pages[name]["sha384"], name


# --------------------------------------------------------------------------- TDX


def tdx_layout(fw: bytes, name: str) -> IgvmFile:
    """MEASUREMENT.md §8.3: TDVF sections in table order."""
    img = require_tdx(parse_ovmf(fw, name))
    dirs: list[H.Header] = []
    for s in img.tdx_sections:
        if s.page_aug:
            continue
        for i in range(s.mem_size // 4096):
            gpa = s.mem_base + i * 4096
            off = s.data_offset + i * 4096
            data = fw[off : off + 4096] if s.raw_size and i * 4096 < s.raw_size else b""
            flags = 0 if s.mr_extend else PageDataFlags.UNMEASURED
            dirs.append(H.PageData(gpa=gpa, compatibility_mask=1, flags=flags, data=data))
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.TDX,
                                                shared_gpa_boundary=1 << 47),),
                 initializations=(H.GuestPolicy(policy=0x2, compatibility_mask=1),), directives=tuple(dirs))
    return IgvmFile.from_bytes(f.to_bytes())


@pytest.mark.parametrize("case", TDX_CASES, ids=[c["firmware"].split("/")[-1] for c in TDX_CASES])
def test_tdx_ovmf_layout_known_answers(case: dict[str, Any]) -> None:
    fw = firmware(case["firmware"])
    img = parse_ovmf(fw, case["firmware"])
    assert [(f"{s.mem_base:#x}", f"{s.mem_size:#x}", f"{s.attributes:#x}") for s in img.tdx_sections] == [
        (s["mem_base"], s["mem_size"], s["attributes"]) for s in case["tdvf_sections"]]
    assert any(s.type == TdvfSectionType.BFV and s.mr_extend for s in img.tdx_sections)
    f = tdx_layout(fw, case["firmware"])
    assert measure_platform(f, PlatformType.TDX).hex == case["expected_mrtd_single_pass"]
    assert measure_platform(f, PlatformType.TDX, tdx_two_pass=True).hex == case["expected_mrtd_two_pass"]
