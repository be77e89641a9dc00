"""``igvm-builder measure`` as a user runs it (``python -m igvm_builder`` in a subprocess), and
the reference-values document (:func:`igvm_builder.measure.report.reference_values`).

The files measured are the reference crate's vectors (written by another tool) and small
files built here; expected digests come from the vectors' ``.measure.txt`` files and
``shared/vectors/measure/idblock.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from igvm_builder.errors import MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.measure import PROFILES, measure_file, measure_platform
from igvm_builder.measure.report import SCHEMA_VERSION, reference_values

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VECTORS = SHARED / "vectors" / "igvm"
IDBLOCK = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())
KVM_VMSA_GPA = 0xFFFF_FFFF_F000
WARNING = "a signed ID block then verifies on only some loaders"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("IGVM_BUILDER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "igvm_builder", "measure", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)


def expected(name: str) -> dict[str, str | None]:
    lines = (VECTORS / f"{name}.measure.txt").read_text().splitlines()
    return {e["platform"]: e["digest"] for e in map(json.loads, lines)}


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr  # the file cannot be measured as asked (cli.EXIT_ERROR)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("igvm-builder measure: error: ")
    for n in needles:
        assert n in lines[0]


def write(tmp_path: Path, name: str, f: IgvmFile) -> Path:
    path = tmp_path / name
    path.write_bytes(f.to_bytes())
    return path


def vmsa(features: int = 0x1) -> bytes:
    """A reset-state VMSA, which QEMU and Cloud Hypervisor on KVM measure unchanged."""
    from igvm_builder.sev_vmsa import build_reset_vmsa

    return build_reset_vmsa(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=features)


def portable_snp_tdx(*, id_block: H.SnpIdBlock | None = None, vcpus: int = 2) -> IgvmFile:
    """SNP (mask 1) + TDX (mask 2): data pages only, VMSAs last at 0xFFFFFFFFF000."""
    pages = [H.PageData(gpa=0x1000 * (i + 1), compatibility_mask=3, data=bytes([i + 1]) * 4096) for i in range(3)]
    vps = [H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=1, vp_index=i, vmsa=vmsa(0x21)) for i in range(vcpus)]
    return IgvmFile(
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),
                   H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.TDX,
                                       shared_gpa_boundary=1 << 47)),
        initializations=(H.GuestPolicy(policy=0x3001F, compatibility_mask=1),
                         H.GuestPolicy(policy=0x2, compatibility_mask=2)),
        directives=(*pages, *vps, *((id_block,) if id_block else ())),
    )


# --------------------------------------------------------------------------- measure


@pytest.mark.parametrize("name", ["snp_v1", "tdx_v1", "vbs_v1_reloc", "c_api_test_data_v1", "native_v2_minimal"])
def test_measure_reference_crate_files(name: str) -> None:
    proc = run_cli(str(VECTORS / f"{name}.igvm"))
    assert proc.returncode == 0, proc.stderr
    # The parser's warnings are passed on (c_api_test_data_v1 has a policy for a mask no platform has).
    warnings = proc.stderr.splitlines()
    assert all(w.startswith("igvm-builder measure: warning: ") for w in warnings)
    assert len(warnings) == (1 if name == "c_api_test_data_v1" else 0)
    got = {}
    for line in proc.stdout.splitlines():
        platform, algorithm, digest, *rest = line.split()
        got[platform] = None if digest == "-" else digest
        if platform == "SEV_SNP":
            assert (algorithm, rest[0]) == ("sha384", "loader=hyperv")
            assert " ".join(rest[1:]) == "(Hyper-V and OpenVMM (microsoft/igvm's measurement model, which the " \
                "reference vectors follow; the default))"  # which real stack the profile models
        if platform == "TDX":
            assert (algorithm, rest) == ("sha384", ["order=single-pass"])
    assert got == expected(name)


def test_measure_json() -> None:
    proc = run_cli("--json", str(VECTORS / "tdx_v1.igvm"), "--tdx-two-pass")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (entry,) = doc["platforms"]
    assert entry == {"platform": "TDX", "name": "tdx", "compatibility_mask": "0x1", "algorithm": "sha384",
                     "digest": expected("tdx_v1")["TDX"], "pass_order": "two-pass"}


def test_measure_platform_and_loader(tmp_path: Path) -> None:
    path = write(tmp_path, "two.igvm", portable_snp_tdx())
    proc = run_cli(str(path), "--platform", "snp", "--loader", "cloud-hypervisor")
    assert proc.returncode == 0, proc.stderr
    f = IgvmFile.load(path)
    digest = measure_platform(f, PlatformType.SEV_SNP, loader="cloud-hypervisor").hex
    assert proc.stdout == (f"SEV_SNP sha384 {digest} loader=cloud-hypervisor "
                           f"({PROFILES['cloud-hypervisor'].description}) vcpus=2  (vcpus = the file's VP "
                           "contexts; --vcpus N for -smp N)\n")
    proc = run_cli(str(path), "--platform", "tdx")
    assert proc.stdout == f"TDX sha384 {measure_platform(f, PlatformType.TDX).hex} order=single-pass\n"


def test_measure_refuses_a_missing_platform() -> None:
    path = VECTORS / "snp_v1.igvm"
    assert_one_line_error(run_cli(str(path), "--platform", "tdx"), str(path), "no TDX platform", "(it has: SEV_SNP)")
    path = VECTORS / "tdx_v1.igvm"
    assert_one_line_error(run_cli(str(path), "--all-loaders"), str(path), "no SEV_SNP platform")


def test_measure_loader_rejection_is_one_line() -> None:
    path = VECTORS / "snp_v1.igvm"
    assert_one_line_error(run_cli(str(path), "--loader", "qemu"), str(path), "rejects the VMSA", "0xfffffffff000")


def test_measure_usage_errors() -> None:
    path = str(VECTORS / "snp_v1.igvm")
    proc = run_cli(path, "--loader", "nope")
    assert proc.returncode == 2 and "unknown loader 'nope'" in proc.stderr
    proc = run_cli(path, "--loader", "qemu", "--all-loaders")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = run_cli(path, "--all-loaders", "--platform", "tdx")
    assert proc.returncode == 2 and "SEV-SNP platform only" in proc.stderr


def test_help_states_the_default_loader() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    text = "".join(proc.stdout.split())  # argparse may wrap at a hyphen
    assert "default:hyperv" in text
    for name in PROFILES:
        assert name in text


# --------------------------------------------------------------------------- --all-loaders


def test_all_loaders_warns_when_digests_differ() -> None:
    proc = run_cli(str(VECTORS / "snp_v1.igvm"), "--all-loaders")
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"^  (\S+)\s+(.*?)\s*$", proc.stdout, re.MULTILINE))
    assert list(rows) == list(PROFILES)
    assert rows["hyperv"] == expected("snp_v1")["SEV_SNP"] + "  (default)"
    for kvm in ("qemu", "cloud-hypervisor"):
        assert rows[kvm].startswith(f"rejected: loader '{kvm}' rejects the VMSA of vp 0 at GPA 0xfffff000")
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("igvm-builder measure: warning: ")
    assert WARNING in warnings[0] and "qemu, cloud-hypervisor: rejects the file" in warnings[0]


def test_all_loaders_json_and_agreement(tmp_path: Path) -> None:
    path = write(tmp_path, "portable.igvm", portable_snp_tdx())
    proc = run_cli(str(path), "--all-loaders", "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert doc["loaders_agree"] is True and doc["default_loader"] == "hyperv"
    assert len({e["digest"] for e in doc["loaders"].values()}) == 1
    # A data-less page makes the ZERO-type loaders differ.
    f = portable_snp_tdx()
    dataless = IgvmFile(platforms=f.platforms, initializations=f.initializations,
                        directives=(H.PageData(gpa=0x9000, compatibility_mask=1), *f.directives))
    proc = run_cli(str(write(tmp_path, "dataless.igvm", dataless)), "--all-loaders", "--json")
    doc = json.loads(proc.stdout)
    assert doc["loaders_agree"] is False and WARNING in proc.stderr
    assert doc["loaders"]["cloud-hypervisor"]["digest"] == doc["loaders"]["igvmmeasure-native-zero"]["digest"]
    assert doc["loaders"]["cloud-hypervisor"]["digest"] != doc["loaders"]["qemu"]["digest"] == doc["loaders"]["hyperv"]["digest"]


# --------------------------------------------------------------------------- reference values


def sev_key(igvm_key: bytes) -> bytes:
    """IGVM 152-byte public key -> SEV 0x404-byte key (u32 curve, qx[72], qy[72], zeros), by hand."""
    return igvm_key[0:4] + igvm_key[8:152] + bytes(0x404 - 148)


def signed_id_block(ld: bytes) -> H.SnpIdBlock:
    """idblock.json vector 0's IGVM body (real test keys, author key enabled) with our ``ld``."""
    body = bytearray(bytes.fromhex(IDBLOCK["rfc6979_vectors"][0]["igvm_snp_id_block_body_hex"]))
    body[8:56] = ld
    return H.SnpIdBlock.unpack_body(memoryview(bytes(body)))


def test_reference_values_cli(tmp_path: Path) -> None:
    unsigned = portable_snp_tdx()
    ld = measure_platform(unsigned, PlatformType.SEV_SNP).digest
    assert ld is not None
    f = portable_snp_tdx(id_block=signed_id_block(ld))
    path = write(tmp_path, "signed.igvm", f)
    out = tmp_path / "refs.json"
    proc = run_cli(str(path), "--reference-values", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    refs = json.loads(text)
    assert text == json.dumps(refs, indent=2, sort_keys=True) + "\n"
    data = path.read_bytes()
    assert refs["schema_version"] == SCHEMA_VERSION == 1
    assert refs["file"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert sorted(refs["platforms"]) == ["snp", "tdx"]

    snp = refs["platforms"]["snp"]
    assert snp["digest"] == ld.hex() and snp["algorithm"] == "sha384" and snp["loader"] == "hyperv"
    assert snp["platform"] == "SEV_SNP" and snp["compatibility_mask"] == "0x1"
    assert snp["policy"] == {"value": "0x3001f", "bits": {
        "abi_minor": 0x1F, "abi_major": 0, "smt": True, "reserved_must_be_one": True, "migrate_ma": False,
        "debug": False, "single_socket": False, "reserved": "0x0"}}
    assert snp["guest_features"]["value"] == "0x21" and snp["guest_features"]["names"] == ["SNP", "DEBUG_SWAP"]
    assert snp["guest_features"]["uniform"] is True and snp["vcpus"] == 2
    idb = snp["id_block"]
    assert idb["present"] is True and idb["ld"] == ld.hex() and idb["ld_matches_digest"] is True
    assert idb["author_key_enabled"] is True
    # Key digests: the published test-key digests, and SHA-384 of the SEV key built by hand here.
    keys = IDBLOCK["keys"]
    assert idb["id_key_digest"] == snp["id_key_digest"] == keys["id_key_digest"]
    assert idb["author_key_digest"] == snp["author_key_digest"] == keys["author_key_digest"]
    block = signed_id_block(ld)
    assert hashlib.sha384(sev_key(block.id_public_key)).hexdigest() == keys["id_key_digest"]
    assert sev_key(block.id_public_key).hex() == keys["id_key_sev_pubkey_hex"]

    tdx = refs["platforms"]["tdx"]
    assert tdx["digest"] == measure_platform(f, PlatformType.TDX).hex and tdx["pass_order"] == "single-pass"
    assert tdx["policy"] == {"value": "0x2", "bits": {"debug_allowed": False, "sept_ve_disable": True,
                                                      "migratable": False, "reserved": "0x0"}}

    # --platform restricts the output, not the reference values; --tdx-two-pass and --loader are recorded.
    out2 = tmp_path / "refs2.json"
    proc = run_cli(str(path), "--platform", "tdx", "--tdx-two-pass", "--loader", "qemu",
                   "--reference-values", str(out2))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TDX ")
    refs2 = json.loads(out2.read_text())
    assert refs2["platforms"]["tdx"]["pass_order"] == "two-pass"
    assert refs2["platforms"]["snp"]["loader"] == "qemu"
    # This file's digest is the same on every loader (portable layout): the ID block still matches.
    assert refs2["platforms"]["snp"]["id_block"]["ld_matches_digest"] is True


def test_reference_values_of_a_reference_crate_file(tmp_path: Path) -> None:
    out = tmp_path / "refs.json"
    proc = run_cli(str(VECTORS / "snp_v1.igvm"), "--json", "--reference-values", str(out))
    assert proc.returncode == 0, proc.stderr
    snp = json.loads(out.read_text())["platforms"]["snp"]
    assert snp["digest"] == expected("snp_v1")["SEV_SNP"]
    assert snp["policy"]["value"] == "0x30000"
    assert snp["guest_features"] == {"value": "0x1", "names": ["SNP"], "uniform": True, "per_vp": {"0": "0x1"}}
    assert snp["vcpus"] == 1
    idb = snp["id_block"]
    assert idb["ld_matches_digest"] is True and idb["guest_svn"] == 7 and idb["family_id"] == "11" * 16
    assert idb["author_key_enabled"] is False and idb["author_key_digest"] is None
    # A refused loader leaves no output file behind.
    out2 = tmp_path / "refs-qemu.json"
    proc = run_cli(str(VECTORS / "snp_v1.igvm"), "--loader", "qemu", "--reference-values", str(out2))
    assert proc.returncode == 2 and not out2.exists()
    assert list(tmp_path.iterdir()) == [out]


def test_reference_values_function() -> None:
    f = portable_snp_tdx(vcpus=1)
    sha = hashlib.sha256(f.to_bytes()).digest()
    refs = reference_values(f, sha, loader=None, tdx_two_pass=False)
    assert refs["file"] == {"sha256": sha.hex(), "size": len(f.to_bytes())}
    assert refs == reference_values(f, sha.hex(), loader="hyperv", tdx_two_pass=False,
                                    measurements=measure_file(f))
    assert refs["platforms"]["snp"]["id_block"] == {"present": False}
    assert refs["platforms"]["snp"]["id_key_digest"] is None

    def check_sorted(obj: Any) -> None:
        if isinstance(obj, dict):
            assert list(obj) == sorted(obj)
            for v in obj.values():
                check_sorted(v)
        elif isinstance(obj, list):
            for v in obj:
                check_sorted(v)

    check_sorted(refs)
    assert json.loads(json.dumps(refs)) == refs
    with pytest.raises(MeasurementError, match="SHA-256"):
        reference_values(f, "abc", loader=None, tdx_two_pass=False)
    with pytest.raises(MeasurementError, match="single-pass, not the page order"):
        reference_values(f, sha, loader=None, tdx_two_pass=True, measurements=measure_file(f))


def test_reference_values_mixed_guest_features() -> None:
    f = portable_snp_tdx(vcpus=1)
    vps = (H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=1, vp_index=0, vmsa=vmsa(0x1)),
           H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=1, vp_index=1, vmsa=vmsa(0x21)))
    g = IgvmFile(platforms=f.platforms, initializations=f.initializations,
                 directives=(*(h for h in f.directives if not isinstance(h, H.SnpVpContext)), *vps))
    feats = reference_values(g, bytes(32), loader=None, tdx_two_pass=False)["platforms"]["snp"]["guest_features"]
    assert feats == {"value": None, "names": [], "uniform": False, "per_vp": {"0": "0x1", "1": "0x21"}}


def test_doc_lists_every_loader_profile() -> None:
    doc = (ROOT / "docs" / "MEASUREMENT.md").read_text()
    for name in PROFILES:
        assert f"`{name}`" in doc, name
    assert "schema_version" in doc and "default" in doc
