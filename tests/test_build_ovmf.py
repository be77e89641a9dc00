"""Issue #4: OVMF launches built from a config.

* SNP: the digest of our file under the ``cloud-hypervisor`` profile (a ZERO-type loader) equals
  what ``sev-snp-measure`` prints for the same QEMU launch, run as a subprocess over a covering
  set of vCPU counts / vCPU types / guest features / VMM types / kernel hashes; the ``hyperv``
  digest equals ``snp.json``'s NORMAL-zeros IGVM-layout digest; every ``snp.json`` case that
  can be built matches its expected_launch_digest.
* TDX: MRTD (single and two pass) equals ``tdx.json``.
* Firmware without the metadata a platform needs is refused through the CLI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_build_helpers import (
    FIRMWARE,
    MEMTEST,
    OVMF_BOOKWORM,
    OVMF_CODE_4M,
    OVMF_SID,
    OVMF_TRIXIE,
    SHARED,
    VECTORS,
    VMLINUZ,
    assert_cli_error,
    assert_no_output,
    build_igvm,
    cli,
    config,
    page_map,
    q,
    snp_digest,
    tdx_mrtd,
    vmsa_fields,
    vmsas,
)

from igvm_builder.assemble import build_file
from igvm_builder.config import load_config
from igvm_builder.errors import InputError
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PageDataFlags, PageDataType

SNP_VECTORS = json.loads((VECTORS / "measure" / "snp.json").read_text())
TDX_VECTORS = json.loads((VECTORS / "measure" / "tdx.json").read_text())

INITRD = MEMTEST  # a small real file standing in for an initrd (PROVENANCE.md)
CMDLINE = "console=ttyS0 root=/dev/vda1 quiet"


def snp_config(firmware: Path, *, vcpus: int = 1, vcpu_type: str = "EPYC-v4", features: int = 0x1,
               vmm: str = "qemu", kernel: Path | None = None, initrd: Path | None = None,
               cmdline: str | None = None, platforms: str = '"snp"', loader: str = "cloud-hypervisor") -> str:
    text = f"""
[image]
platforms = [{platforms}]
loader = "{loader}"

[firmware]
path = {q(firmware)}

[snp]
vcpus = {vcpus}
vcpu_type = "{vcpu_type}"
guest_features = {features:#x}
vmm_type = "{vmm}"
"""
    if kernel is not None:
        text += f"\n[kernel]\npath = {q(kernel)}\n"
        if initrd is not None:
            text += f"initrd = {q(initrd)}\n"
        if cmdline is not None:
            text += f"cmdline = {json.dumps(cmdline)}\n"
    return text


def sev_snp_measure(firmware: Path, *, vcpus: int, vcpu_type: str, features: int, vmm: str,
                    kernel: Path | None = None, initrd: Path | None = None, cmdline: str | None = None) -> str:
    argv = ["sev-snp-measure", "--mode", "snp", f"--vcpus={vcpus}", f"--vcpu-type={vcpu_type}",
            f"--guest-features={features:#x}", f"--vmm-type={vmm}", "--ovmf", str(firmware)]
    if kernel is not None:
        argv += ["--kernel", str(kernel)]
        if initrd is not None:
            argv += ["--initrd", str(initrd)]
        if cmdline is not None:
            argv += ["--append", cmdline]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout.strip()
    assert len(out) == 96, out
    return out


# A covering set: every firmware, vCPU count, vCPU type, guest-feature value and VMM type
# appears several times, every pair of VMM type with (vCPU count, vCPU type, features, firmware)
# at least once, and measured direct boot with kernel only / kernel+cmdline / kernel+initrd+cmdline.
K, KI, KC, KIC = "kernel", "kernel+initrd", "kernel+cmdline", "kernel+initrd+cmdline"
COVERING = [
    # firmware, vcpus, vcpu type, guest features, vmm type, kernel hashes
    (OVMF_BOOKWORM, 1, "EPYC-v4", 0x1, "QEMU", None),
    (OVMF_BOOKWORM, 2, "EPYC-Milan", 0x21, "ec2", None),
    (OVMF_BOOKWORM, 4, "EPYC-Genoa", 0x1, "gce", None),
    (OVMF_TRIXIE, 1, "EPYC-Milan", 0x21, "gce", None),
    (OVMF_TRIXIE, 2, "EPYC-Genoa", 0x1, "QEMU", None),
    (OVMF_TRIXIE, 4, "EPYC-v4", 0x21, "ec2", None),
    (OVMF_SID, 1, "EPYC-Genoa", 0x21, "QEMU", None),
    (OVMF_SID, 2, "EPYC-v4", 0x1, "ec2", KIC),
    (OVMF_SID, 4, "EPYC-Milan", 0x1, "QEMU", KIC),
    (OVMF_SID, 1, "EPYC-v4", 0x21, "gce", KC),
    (OVMF_SID, 2, "EPYC-Genoa", 0x21, "QEMU", K),
    (OVMF_SID, 4, "EPYC-Genoa", 0x21, "gce", KIC),
]


@pytest.mark.parametrize(("firmware", "vcpus", "vcpu_type", "features", "vmm", "hashes"), COVERING,
                         ids=[f"{c[0].name}-{c[1]}cpu-{c[2]}-gf{c[3]:#x}-{c[4]}-{c[5] or 'nokernel'}"
                              for c in COVERING])
def test_snp_digest_equals_sev_snp_measure(tmp_path: Path, firmware: Path, vcpus: int, vcpu_type: str,
                                           features: int, vmm: str, hashes: str | None) -> None:
    kernel = VMLINUZ if hashes else None
    initrd = INITRD if hashes and "initrd" in hashes else None
    cmdline = CMDLINE if hashes and "cmdline" in hashes else None
    expected = sev_snp_measure(firmware, vcpus=vcpus, vcpu_type=vcpu_type, features=features, vmm=vmm,
                               kernel=kernel, initrd=initrd, cmdline=cmdline)
    cfg = config(tmp_path, snp_config(firmware, vcpus=vcpus, vcpu_type=vcpu_type, features=features,
                                      vmm=vmm.lower(), kernel=kernel, initrd=initrd, cmdline=cmdline))
    f = build_igvm(cfg)
    # igvmmeasure --native-zero: ZERO-type data-less pages, the file's VMSA bytes as they are
    assert snp_digest(f, "igvmmeasure-native-zero") == expected
    if vmm == "QEMU":  # the KVM transform leaves QEMU-model VMSAs alone (fixed points)
        assert snp_digest(f, "cloud-hypervisor") == expected
    else:  # ec2/gce model other hosts: Cloud Hypervisor/KVM measures FCW 0x37f, MXCSR 0x1f80 (KVM_VMSA.md §5)
        assert snp_digest(f, "cloud-hypervisor") != expected
    # one VMSA per vCPU, after every page, at the KVM VMSA GPA
    ctxs = vmsas(f)
    assert [c.vp_index for c in ctxs] == list(range(vcpus))
    assert {c.gpa for c in ctxs} == {0xFFFF_FFFF_F000}
    assert vmsa_fields(f)["sev_features"] == features
    assert vmsa_fields(f)["rip"] == 0xFFF0
    last_page = max(i for i, h in enumerate(f.directives) if isinstance(h, H.PageData))
    assert all(f.directives.index(c) > last_page for c in ctxs)
    if kernel is not None:
        # the hash page holds SHA-256 of exactly what was given (MEASUREMENT.md §6)
        import hashlib

        page = page_map(f, "snp")[0x810000]
        table = bytes(page.data)[0xC00 : 0xC00 + 0xA8]
        assert table[0x76 + 18 : 0x76 + 50] == hashlib.sha256(kernel.read_bytes()).digest()
        assert table[0x44 + 18 : 0x44 + 50] == hashlib.sha256(initrd.read_bytes() if initrd else b"").digest()
        want_cmd = (cmdline or "").encode() + b"\0"
        assert table[0x12 + 18 : 0x12 + 50] == hashlib.sha256(want_cmd).digest()


def _vector_config(case: dict, loader: str) -> str:
    return snp_config(SHARED / case["firmware"], vcpus=case["vcpus"], vcpu_type=case["vcpu_type"],
                      features=int(case["guest_features"], 16), vmm=case["vmm_type"].lower(),
                      kernel=SHARED / case["kernel"] if case["kernel"] else None,
                      initrd=SHARED / case["initrd"] if case["initrd"] else None,
                      cmdline=case["append"], loader=loader)


BUILDABLE = [c for c in SNP_VECTORS["cases"] if "OVMF_CODE_4M" not in c["firmware"]]
REFUSED = [c for c in SNP_VECTORS["cases"] if "OVMF_CODE_4M" in c["firmware"]]


@pytest.mark.parametrize("case", BUILDABLE, ids=[c["id"] for c in BUILDABLE])
def test_snp_vectors(tmp_path: Path, case: dict) -> None:
    """expected_launch_digest (ZERO-type profile) and the NORMAL-zeros layout digest (hyperv)."""
    f = build_igvm(config(tmp_path, _vector_config(case, "cloud-hypervisor")))
    assert snp_digest(f, "cloud-hypervisor") == case["expected_launch_digest"]
    layout = case.get("igvm_layout_digests")
    if layout:
        assert snp_digest(f, "cloud-hypervisor") == layout["data_less_pages_as_ZERO_type"]
        assert snp_digest(f, "hyperv") == layout["data_less_pages_as_NORMAL_zeros"]
        # QEMU's IGVM loader also measures data-less pages as NORMAL zeros (MEASUREMENT.md §7.2)
        assert snp_digest(f, "qemu") == layout["data_less_pages_as_NORMAL_zeros"]


def test_every_snp_vector_case_is_covered() -> None:
    assert len(BUILDABLE) + len(REFUSED) == len(SNP_VECTORS["cases"])
    assert len(BUILDABLE) >= 6 and len(REFUSED) == 1
    # the vector with the only layout digests of a firmware we refuse still exists in the file
    assert REFUSED[0]["expected_launch_digest"]


def test_snp_vector_vmsa_pages(tmp_path: Path) -> None:
    """The BSP/AP VMSA pages equal those sev-snp-measure dumped (snp.json vmsa_pages)."""
    import hashlib

    vp = SNP_VECTORS["vmsa_pages"]
    f = build_igvm(config(tmp_path, snp_config(OVMF_BOOKWORM, vcpus=2, vcpu_type="EPYC-v4")))
    pages = {c.vp_index: bytes(c.blob()) for c in vmsas(f)}
    for i, name in enumerate(("vmsa0.bin", "vmsa1.bin")):
        want = vp["files"][name]
        page = pages[i]
        assert hashlib.sha384(page).hexdigest() == want["sha384"]
        nonzero = {f"{off:#x}": b for off, b in enumerate(page) if b}
        assert nonzero == want["nonzero_bytes"]


def test_snp_layout_follows_measurement_md(tmp_path: Path) -> None:
    """MEASUREMENT.md §7.1: every OVMF page with data (zeros too), then ASEV sections in table order."""
    f = build_igvm(config(tmp_path, snp_config(OVMF_BOOKWORM)))
    pages = [h for h in f.directives if isinstance(h, H.PageData)]
    fw = OVMF_BOOKWORM.read_bytes()
    base = (1 << 32) - len(fw)
    head = pages[: len(fw) // 0x1000]
    assert [h.gpa for h in head] == list(range(base, 1 << 32, 0x1000))
    for h in head:
        assert len(h.data) == 0x1000 and h.flags == 0
        assert bytes(h.data) == fw[h.gpa - base : h.gpa - base + 0x1000]
    rest = [(h.gpa, int(h.data_type), len(h.data)) for h in pages[len(head) :]]
    expected = ([(0x800000 + i * 0x1000, 0, 0) for i in range(9)]
                + [(0x80A000 + i * 0x1000, 0, 0) for i in range(3)]
                + [(0x80D000, PageDataType.SECRETS, 0), (0x80E000, PageDataType.CPUID_DATA, 0)]
                + [(0x80F000 + i * 0x1000, 0, 0) for i in range(0x11)])
    assert rest == expected


def test_snp_vmm_type_conventions(tmp_path: Path) -> None:
    """ec2 measures the CPUID page last; gce imports SNP_SEC_MEM as UNMEASURED pages."""
    ec2 = build_igvm(config(tmp_path, snp_config(OVMF_BOOKWORM, vmm="ec2"), "ec2.toml"))
    kinds = [int(h.data_type) for h in ec2.directives if isinstance(h, H.PageData)]
    assert kinds[-1] == PageDataType.CPUID_DATA and kinds.count(PageDataType.CPUID_DATA) == 1
    gce = build_igvm(config(tmp_path, snp_config(OVMF_BOOKWORM, vmm="gce"), "gce.toml"))
    sec_mem = [h for h in gce.directives if isinstance(h, H.PageData) and 0x800000 <= h.gpa < 0x820000
               and h.data_type == PageDataType.NORMAL]
    assert len(sec_mem) == 9 + 3 + 0x11
    assert all(h.flags & PageDataFlags.UNMEASURED for h in sec_mem)


# --------------------------------------------------------------------------- TDX

TDX_CASES = [c for c in TDX_VECTORS["cases"] if c.get("expected_mrtd_single_pass")]


@pytest.mark.parametrize("case", TDX_CASES, ids=[Path(c["firmware"]).name for c in TDX_CASES])
def test_tdx_mrtd_equals_vectors(tmp_path: Path, case: dict) -> None:
    firmware = SHARED / case["firmware"]
    for two_pass in (False, True):
        body = f'[image]\nplatforms = ["tdx"]\n[firmware]\npath = {q(firmware)}\n[tdx]\ntwo_pass = {str(two_pass).lower()}\n'
        cfg = config(tmp_path, body)
        assert cfg.tdx.two_pass is two_pass
        f = build_igvm(cfg)
        assert tdx_mrtd(f, False) == case["expected_mrtd_single_pass"]
        assert tdx_mrtd(f, True) == case["expected_mrtd_two_pass"]
        assert f.platforms[0].shared_gpa_boundary == 1 << 47
        assert not [h for h in f.directives if isinstance(h, H.VpContextBase)]  # TDX has no VP context


def test_tdx_vectors_cover_every_firmware_with_tdx_metadata() -> None:
    from igvm_builder.inputs.ovmf import parse_ovmf

    with_meta = {p.name for p in FIRMWARE.glob("*.fd") if parse_ovmf(p.read_bytes(), p.name).has_tdx_metadata}
    in_vectors = {Path(c["firmware"]).name for c in TDX_CASES}
    # sid's OVMF.amdsev.fd carries TDX metadata but has no published MRTD; all others are checked
    assert in_vectors == with_meta - {OVMF_SID.name}
    assert OVMF_CODE_4M.name not in with_meta


def test_tdx_sid_builds_and_two_pass_differs(tmp_path: Path) -> None:
    f = build_igvm(config(tmp_path, f'[image]\nplatforms = ["tdx"]\n[firmware]\npath = {q(OVMF_SID)}\n'))
    assert tdx_mrtd(f) != tdx_mrtd(f, True)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("platform", "what"), [("snp", "SEV metadata"), ("tdx", "TDX metadata")])
def test_firmware_without_metadata_refused_by_cli(tmp_path: Path, platform: str, what: str) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[image]\nplatforms = ["{platform}"]\n[firmware]\npath = {q(OVMF_CODE_4M)}\n')
    out = tmp_path / "out.igvm"
    proc = cli("build", str(cfg), "-o", str(out))
    assert_cli_error(proc, str(OVMF_CODE_4M), what)
    assert proc.stdout == ""
    assert_no_output(tmp_path, out)
    # the same through the API
    with pytest.raises(InputError, match=what) as info:
        build_file(load_config(cfg))
    assert info.value.source == str(OVMF_CODE_4M)


def test_kernel_hashes_need_a_kernel_hashes_section(tmp_path: Path) -> None:
    """snp.json expected_errors: trixie has SEV metadata but no SNP_KERNEL_HASHES section."""
    assert any("trixie" in " ".join(e["argv"]) for e in SNP_VECTORS["expected_errors"])
    cfg = config(tmp_path, snp_config(OVMF_TRIXIE, kernel=VMLINUZ))
    with pytest.raises(InputError) as info:
        build_file(cfg)
    assert str(OVMF_TRIXIE) in str(info.value)
    assert "KERNEL_HASHES" in str(info.value).upper().replace(" ", "_")


# --------------------------------------------------------------------------- build() and the CLI


def test_cli_reference_values_follow_the_loader_choice(tmp_path: Path) -> None:
    """`build --reference-values`: the SNP digest of the chosen loader, the configured TDX page order."""
    import hashlib

    from igvm_builder.assemble import build

    case = next(c for c in SNP_VECTORS["cases"] if c["id"] == "bookworm-ovmf-2cpu-milan")
    tdx = next(c for c in TDX_VECTORS["cases"] if c["firmware"] == "firmware/bookworm-OVMF.fd")
    body = snp_config(OVMF_BOOKWORM, vcpus=2, vcpu_type="EPYC-Milan", platforms='"snp", "tdx"',
                      loader="qemu") + "\n[tdx]\ntwo_pass = true\n"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(body)
    outputs = {}
    for loader, want in (("cloud-hypervisor", case["expected_launch_digest"]),
                         ("qemu", case["igvm_layout_digests"]["data_less_pages_as_NORMAL_zeros"])):
        out, refs = tmp_path / f"{loader}.igvm", tmp_path / f"{loader}.json"
        proc = cli("build", str(cfg), "-o", str(out), "--loader", loader, "--reference-values", str(refs))
        assert proc.returncode == 0, proc.stderr
        values = json.loads(refs.read_text())
        assert values["platforms"]["snp"]["digest"] == want
        assert values["platforms"]["snp"]["loader"] == loader
        assert values["platforms"]["tdx"]["digest"] == tdx["expected_mrtd_two_pass"]
        assert values["file"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert values["file"]["size"] == out.stat().st_size
        assert want in proc.stdout and tdx["expected_mrtd_two_pass"] in proc.stdout
        outputs[loader] = out.read_bytes()
    # the loader changes the reference values only, never the file
    assert outputs["qemu"] == outputs["cloud-hypervisor"]
    result = build(load_config(cfg), loader="cloud-hypervisor")
    assert result.data == outputs["qemu"]
    assert result.sha256 == hashlib.sha256(result.data).hexdigest() and result.size == len(result.data)
    assert result.reference_values["platforms"]["snp"]["digest"] == case["expected_launch_digest"]
    only_snp = build(load_config(cfg), platforms=["snp"], loader="cloud-hypervisor")
    assert list(only_snp.reference_values["platforms"]) == ["snp"]
    assert only_snp.reference_values["platforms"]["snp"]["digest"] == case["expected_launch_digest"]
