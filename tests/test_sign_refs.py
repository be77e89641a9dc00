"""The signed image's reference values (``sign --reference-values``, SCons ``IGVMSign``) take the
SEV-SNP measurement the signing made instead of hashing every page again.

Expectations, independent of that reuse:

* the reference values equal those measured from scratch: the same document through the full
  measurement (``measure_file`` of every platform, what the command did before), and
  ``reference_values`` of the signed bytes parsed back, with ``hashlib.sha256`` of those bytes;
* through the command, for an OVMF SNP+TDX launch: the SNP digest ``sev-snp-measure`` gives for
  that launch (``snp.json``) and the TDX MRTD of ``tdx.json``, the file's own SHA-256 and size;
* SHA-384 over 4 KiB buffers is counted (``hashlib.sha384`` wrapped): the reference values add no
  such call to what signing makes, where measuring again costs one SEV-SNP pass more;
* a launch other than the signed one (another loader, another vCPU count) is measured.

Also: a model built by hand that breaks a rule is one IgvmFormatError naming the header, before
anything is laid out or measured.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_release import run
from test_build_helpers import OVMF_BOOKWORM, VMLINUZ, q
from test_sign_image import ID_PEM, SNP_MASK, SNP_V1, _shared_block_file, id_key, make_file

from igvm_builder.errors import IgvmFormatError, MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.blob import as_view
from igvm_builder.format.defs import PlatformType
from igvm_builder.measure import measure_platform
from igvm_builder.measure.report import reference_values
from igvm_builder.recordclass import replace
from igvm_builder.reference import ReferenceValues
from igvm_builder.sign.image import sign_igvm, sign_igvm_layout
from igvm_builder.sign.stage import (
    SignPlan,
    launch_vcpus,
    plan_signing,
    sign_file_layout,
    signed_reference_values,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "vectors" / "measure"
SNP_CASE = next(c for c in json.loads((VECTORS / "snp.json").read_text())["cases"]
                if c["id"] == "bookworm-ovmf-2cpu-milan")
TDX_CASE = next(c for c in json.loads((VECTORS / "tdx.json").read_text())["cases"]
                if c["firmware"] == "firmware/bookworm-OVMF.fd")
PAGE = 4096

#: An OVMF launch for SEV-SNP (2 vCPUs, EPYC-Milan, Cloud Hypervisor's loader: the launch
#: sev-snp-measure measures) and TDX (two-pass page order).
OVMF_CONFIG = f"""
[image]
platforms = ["snp", "tdx"]
loader = "cloud-hypervisor"

[firmware]
path = {q(OVMF_BOOKWORM)}

[snp]
vcpus = 2
vcpu_type = "EPYC-Milan"

[tdx]
two_pass = true
"""

BZIMAGE_CONFIG = f"""
[image]
platforms = ["snp"]
loader = "qemu"

[kernel]
path = {q(VMLINUZ)}
cmdline = "console=ttyS0"

[memory]
size = "1G"
"""


def _build(directory: Path, body: str) -> tuple[Path, Path, Path]:
    """Build ``body`` with the command: (config, image, the build's reference values)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg, image, refs = directory / "build.toml", directory / "image.igvm", directory / "image.json"
    cfg.write_text(body)
    rc, _, err = run("build", cfg, "-o", image, "--reference-values", refs, "-q")
    assert rc == 0, err
    return cfg, image, refs


@pytest.fixture(scope="module")
def ovmf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _build(tmp_path_factory.mktemp("ovmf"), OVMF_CONFIG)


@pytest.fixture(scope="module")
def bzimage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _build(tmp_path_factory.mktemp("bzimage"), BZIMAGE_CONFIG)


def _load(tmp_path: Path, f: IgvmFile) -> IgvmFile:
    """``f`` written and mapped back, as the command holds an image."""
    path = tmp_path / "in.igvm"
    path.write_bytes(f.to_bytes())
    return IgvmFile.load(str(path))


def _plan(loader: str, vcpus: int | None = None, vcpu_type: str | None = None) -> SignPlan:
    return plan_signing(id_key=str(ID_PEM), loader=loader, vcpus=vcpus, vcpu_type=vcpu_type, guest_svn=4)


def _sign_and_refer(f: IgvmFile, plan: SignPlan, base: ReferenceValues | None = None,
                    unsigned: tuple[str, int] | None = None) -> dict[str, Any]:
    """Sign ``f`` as the command does, and its reference values three ways: reusing the
    signing's SEV-SNP measurement (what is shipped), measuring every platform again (what
    was shipped before), and from scratch over the signed bytes parsed back."""
    if unsigned is None:
        unsigned = (hashlib.sha256(f.to_bytes()).hexdigest(), sum(len(c) for c in f.iter_chunks()))
    out, outcome, layout = sign_file_layout(f, plan, output="signed.igvm", allow_test_keys=True)
    assert outcome.measured is not None
    vcpus, vcpu_type = launch_vcpus(f, plan)
    kw: dict[str, Any] = {"unsigned": unsigned, "base": base, "vcpus": vcpus, "vcpu_type": vcpu_type}
    reused = signed_reference_values(out, outcome, layout=layout, **kw)
    again = signed_reference_values(out, replace(outcome, measured=None), layout=layout, **kw)
    data = b"".join((layout.head, *(as_view(b) for b in layout.blobs)))
    tdx = base.platforms.get("tdx") if base is not None else None
    scratch = reference_values(IgvmFile.from_bytes(data), hashlib.sha256(data).hexdigest(), loader=plan.loader,
                               tdx_two_pass=bool(tdx and tdx.details.get("pass_order") == "two-pass"),
                               vcpus=vcpus, vcpu_type=vcpu_type)
    return {"reused": reused, "again": again, "scratch": scratch, "data": data, "outcome": outcome}


def _assert_same(r: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(r["reused"].to_json())
    assert r["reused"].to_json() == r["again"].to_json()  # byte for byte
    assert doc["platforms"] == r["scratch"]["platforms"] and doc["file"] == r["scratch"]["file"]
    assert doc["file"] == {"sha256": hashlib.sha256(r["data"]).hexdigest(), "size": len(r["data"])}
    assert doc["platforms"]["snp"]["digest"] == r["outcome"].launch_digest.hex()
    assert doc["platforms"]["snp"]["id_block"]["ld_matches_digest"] is True
    return doc


CASES: dict[str, Callable[[], IgvmFile]] = {
    "made": make_file,
    "shared_block": _shared_block_file,
    "snp_v1": lambda: IgvmFile.load(SNP_V1),
    "signed": lambda: IgvmFile.from_bytes(sign_igvm(make_file(), id_key=id_key(), guest_svn=7)[0].to_bytes()),
}


@pytest.mark.parametrize(("case", "loader", "vcpus"), [
    ("made", "hyperv", None), ("made", "qemu", None), ("made", "qemu", 3), ("made", "cloud-hypervisor", 2),
    ("made", "igvmmeasure", None), ("shared_block", "hyperv", None), ("shared_block", "qemu", None),
    ("snp_v1", "hyperv", None), ("signed", "qemu", None),
])
def test_reference_values_are_those_measured_again(case: str, loader: str, vcpus: int | None,
                                                   tmp_path: Path) -> None:
    doc = _assert_same(_sign_and_refer(_load(tmp_path, CASES[case]()), _plan(loader, vcpus)))
    assert doc["platforms"]["snp"]["loader"] == loader and set(doc["platforms"]) == {
        "snp" if p.platform_type == PlatformType.SEV_SNP else p.platform_type.name.lower()
        for p in CASES[case]().platforms}
    if vcpus is not None:
        assert doc["platforms"]["snp"]["vcpus"] == vcpus


def test_debian_bzimage(bzimage: tuple[Path, Path, Path]) -> None:
    from igvm_builder.config import load_config

    cfg, image, refs = bzimage
    f = IgvmFile.load(str(image))
    plan = plan_signing(config=load_config(str(cfg)), id_key=str(ID_PEM))
    r = _sign_and_refer(f, plan, ReferenceValues.load(refs), (hashlib.sha256(image.read_bytes()).hexdigest(),
                                                              image.stat().st_size))
    doc = _assert_same(r)
    # the signed launch digest is the build's (the ID block is not measured)
    assert doc["platforms"]["snp"]["digest"] == json.loads(refs.read_text())["platforms"]["snp"]["digest"]


def test_ovmf_snp_tdx_through_the_command(ovmf: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``sign --config --reference --reference-values`` of an OVMF SNP+TDX launch: the vectors'
    digests, the signed file's SHA-256, and what measuring every platform again gives."""
    cfg, image, refs = ovmf
    signed, signed_refs = tmp_path / "signed.igvm", tmp_path / "signed.json"
    rc, _, err = run("sign", image, "-o", signed, "--config", cfg, "--id-key", ID_PEM, "--allow-test-keys",
                     "--reference", refs, "--reference-values", signed_refs, "-q")
    assert rc == 0, err
    doc = json.loads(signed_refs.read_text())
    data = signed.read_bytes()
    assert doc["file"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert doc["platforms"]["snp"]["digest"] == SNP_CASE["expected_launch_digest"]
    assert doc["platforms"]["snp"]["vcpus"] == 2 and doc["platforms"]["snp"]["loader"] == "cloud-hypervisor"
    assert doc["platforms"]["tdx"]["digest"] == TDX_CASE["expected_mrtd_two_pass"]
    assert doc["platforms"]["tdx"]["pass_order"] == "two-pass"
    assert doc["signature"]["launch_digest"] == SNP_CASE["expected_launch_digest"]
    # `measure --reference-values` of the signed file measures every platform from its bytes
    _measure_agrees(signed, doc, tmp_path)
    # and the library's full measurement, byte for byte
    from igvm_builder.config import load_config

    r = _sign_and_refer(IgvmFile.load(str(image)), plan_signing(config=load_config(str(cfg)), id_key=str(ID_PEM)),
                        ReferenceValues.load(refs), (hashlib.sha256(image.read_bytes()).hexdigest(),
                                                     image.stat().st_size))
    assert _assert_same(r) == doc


def test_a_platform_that_cannot_be_measured_is_the_same_error(tmp_path: Path) -> None:
    """SEV-SNP signs, TDX cannot be measured (a parameter area over 4 GiB inserted for TDX only):
    the reference values, which measure TDX only, fail as measuring the signed file does."""
    f = make_file()
    platforms = (*f.platforms, H.SupportedPlatform(compatibility_mask=0x4, platform_type=PlatformType.TDX))
    huge = (H.ParameterArea(number_of_bytes=(1 << 32) + PAGE, parameter_area_index=1),
            H.ParameterInsert(gpa=0x700000, compatibility_mask=0x4, parameter_area_index=1))
    f = _load(tmp_path, IgvmFile(platforms=platforms, initializations=f.initializations,
                                 directives=(*f.directives, *huge)))
    out, outcome, layout = sign_file_layout(f, _plan("hyperv"), output="s.igvm", allow_test_keys=True)
    with pytest.raises(MeasurementError) as expected:
        measure_platform(out, PlatformType.TDX)
    with pytest.raises(MeasurementError) as info:
        signed_reference_values(out, outcome, unsigned=("0" * 64, 1), layout=layout)
    assert str(info.value) == str(expected.value) and "not measured" in str(info.value)


def test_scons_igvmsign_sidecar(tmp_path: Path) -> None:
    """SCons ``IGVM`` then ``IGVMSign`` of the OVMF SNP+TDX config (TDX two-pass, taken from the
    build's sidecar): the signed image's sidecar has the vectors' digests, and what measuring the
    signed file from its bytes gives."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "build.toml").write_text(OVMF_CONFIG)
    (tmp_path / "SConstruct").write_text(
        f"import sys\nsys.path.insert(0, {str(repo)!r})\nimport igvm_builder.scons\n"
        f"env = Environment(tools=[igvm_builder.scons.generate], IGVM_SIGNING_KEY={str(ID_PEM)!r}, "
        "IGVM_ALLOW_TEST_KEYS=True)\n"
        "env.IGVMSign('dist/g.signed.igvm', env.IGVM('dist/g', 'build.toml'))\n")
    proc = subprocess.run([sys.executable, "-m", "SCons", "-Q"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    signed, sidecar = tmp_path / "dist" / "g.signed.igvm", tmp_path / "dist" / "g.signed.igvm.ref.json"
    doc = json.loads(sidecar.read_text())
    data = signed.read_bytes()
    assert doc["file"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert doc["platforms"]["snp"]["digest"] == SNP_CASE["expected_launch_digest"]
    assert doc["platforms"]["tdx"]["digest"] == TDX_CASE["expected_mrtd_two_pass"]
    _measure_agrees(signed, doc, tmp_path)


@pytest.mark.parametrize("change", ["loader", "vcpus", "vcpu_type"])
def test_another_launch_than_the_signed_one_is_measured(change: str, tmp_path: Path) -> None:
    f = _load(tmp_path, make_file())
    plan = _plan("qemu")
    out, outcome, layout = sign_file_layout(f, plan, output="signed.igvm", allow_test_keys=True)
    unsigned = ("0" * 64, 1)
    loader, vcpus, vcpu_type = "qemu", None, None
    if change == "loader":
        loader = "cloud-hypervisor"
        outcome = replace(outcome, loader=loader)
    elif change == "vcpus":
        vcpus = 3
    else:
        vcpu_type = "EPYC-Genoa"
        vcpus = 2
    refs = json.loads(signed_reference_values(out, outcome, unsigned=unsigned, vcpus=vcpus, vcpu_type=vcpu_type,
                                              layout=layout).to_json())
    want = measure_platform(out, PlatformType.SEV_SNP, loader=loader, vcpus=vcpus, vcpu_type=vcpu_type).digest
    assert want is not None and refs["platforms"]["snp"]["digest"] == want.hex()
    assert want != outcome.launch_digest  # (so reusing the signed digest would have been caught)


class _Sha384Count:
    """``hashlib.sha384`` wrapped: how many times it is called on a 4 KiB buffer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pages: list[int] = []
        real = hashlib.sha384

        def sha384(data: Any = b"", **kwargs: Any) -> Any:
            if memoryview(data).nbytes == PAGE:
                self.pages.append(1)  # (list.append: atomic across the measuring threads)
            return real(data, **kwargs)

        monkeypatch.setattr(hashlib, "sha384", sha384)

    def __call__(self, fn: Callable[[], object]) -> int:
        before = len(self.pages)
        fn()
        return len(self.pages) - before


@pytest.fixture
def sha384_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Sha384Count]:
    yield _Sha384Count(monkeypatch)


@pytest.mark.parametrize(("case", "loader", "vcpus"), [("made", "hyperv", None), ("made", "qemu", 2),
                                                       ("shared_block", "hyperv", None), ("bzimage", "qemu", None)])
def test_the_reference_values_hash_no_page_again(case: str, loader: str, vcpus: int | None, tmp_path: Path,
                                                 bzimage: tuple[Path, Path, Path],
                                                 sha384_count: _Sha384Count) -> None:
    f = IgvmFile.load(str(bzimage[1])) if case == "bzimage" else _load(tmp_path, CASES[case]())
    plan = _plan(loader, vcpus)
    signing: list[Any] = []
    signs = sha384_count(lambda: signing.extend(sign_file_layout(f, plan, output="s.igvm", allow_test_keys=True)))
    out, outcome, layout = signing
    snp_pass = sha384_count(lambda: measure_platform(out, PlatformType.SEV_SNP, loader=loader, vcpus=vcpus))
    assert signs >= snp_pass > 0  # (the count sees the pages)
    kw: dict[str, Any] = {"unsigned": ("0" * 64, 1), "vcpus": vcpus, "layout": layout}
    assert sha384_count(lambda: signed_reference_values(out, outcome, **kw)) == 0
    assert sha384_count(lambda: signed_reference_values(out, replace(outcome, measured=None), **kw)) == snp_pass


def test_the_command_hashes_each_page_once(ovmf: tuple[Path, Path, Path], tmp_path: Path,
                                           sha384_count: _Sha384Count) -> None:
    """``sign --reference-values`` costs no 4 KiB SHA-384 more than ``sign``."""
    cfg, image, refs = ovmf
    counts = {}
    for name, extra in (("sign", ()), ("with refs", ("--reference", refs, "--reference-values", tmp_path / "r.json"))):
        argv = ("sign", image, "-o", tmp_path / "s.igvm", "--config", cfg, "--id-key", ID_PEM, "--allow-test-keys",
                "-q", *extra)
        counts[name] = sha384_count(lambda argv=argv: run(*argv))  # type: ignore[misc]
    assert counts["sign"] > 0 and counts["with refs"] == counts["sign"]


def test_the_two_step_import_reuses_its_measurement_too(ovmf: tuple[Path, Path, Path], tmp_path: Path,
                                                        sha384_count: _Sha384Count) -> None:
    """``sign --import-signature --reference-values``: the reference values of the one-step
    ``sign`` (deterministic signatures: the same file), and no 4 KiB SHA-384 more than the import."""
    from igvm_builder.sign import ExportedTbs, PemFileKey

    cfg, image, refs = ovmf
    tbs_path, sig = tmp_path / "tbs.json", tmp_path / "id.sig"
    rc, _, err = run("sign", image, "--export-tbs", tbs_path, "--config", cfg, "--id-key", ID_PEM, "--allow-test-keys",
                     "-q")
    assert rc == 0, err
    r, s = PemFileKey(ID_PEM).sign(ExportedTbs.from_json(tbs_path.read_bytes()).id_block_message)
    sig.write_text((r.to_bytes(48, "big") + s.to_bytes(48, "big")).hex())
    imported = ("sign", image, "-o", tmp_path / "two.igvm", "--import-signature", tbs_path, "--id-signature", sig,
                "--allow-test-keys", "-q")
    with_refs = (*imported, "--reference", refs, "--reference-values", tmp_path / "two.json")
    counts = {name: sha384_count(lambda argv=argv: run(*argv)) for name, argv in  # type: ignore[misc]
              (("import", imported), ("with refs", with_refs))}
    assert counts["import"] > 0 and counts["with refs"] == counts["import"]
    rc, _, err = run("sign", image, "-o", tmp_path / "one.igvm", "--config", cfg, "--id-key", ID_PEM,
                     "--allow-test-keys", "--reference", refs, "--reference-values", tmp_path / "one.json", "-q")
    assert rc == 0, err
    assert (tmp_path / "two.igvm").read_bytes() == (tmp_path / "one.igvm").read_bytes()
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    doc = json.loads((tmp_path / "two.json").read_text())
    assert doc["platforms"]["snp"]["digest"] == SNP_CASE["expected_launch_digest"]
    assert doc["platforms"]["tdx"]["digest"] == TDX_CASE["expected_mrtd_two_pass"]


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux /proc/self/pagemap")
def test_the_signed_image_is_not_left_resident(tmp_path: Path) -> None:
    """The signed file's SHA-256 reads the whole mapped image: its pages leave the resident set as
    they are hashed (before, a 1 GiB image ended up resident as a whole: 995 MiB peak RSS)."""
    import random

    from test_resident import resident_pages

    from igvm_builder.format.blob import RELEASE_ALIGN

    mib = 1 << 20
    data = tmp_path / "blob.bin"
    rng = random.Random(5)
    with open(data, "wb") as fh:
        for _ in range(40):  # 40 MiB: 7/8 distinct pages, 1/8 zero pages (stored once)
            fh.write(rng.randbytes(mib * 7 // 8) + bytes(mib // 8))
    cfg = tmp_path / "blob.toml"
    cfg.write_text(f'[image]\nplatforms = ["snp"]\n[[blob]]\npath = "{data}"\ngpa = 0x100000000\n')
    image = tmp_path / "blob.igvm"
    rc, _, err = run("build", cfg, "-o", image, "-q")
    assert rc == 0, err
    f = IgvmFile.load(str(image))  # (SEV-SNP only: no other platform's measurement releases pages here)
    out, outcome, layout = sign_file_layout(f, _plan("hyperv"), output="s.igvm", allow_test_keys=True)
    refs = signed_reference_values(out, outcome, unsigned=("0" * 64, 1), layout=layout)
    size = len(layout.head) + sum(len(b) for b in layout.blobs)
    assert refs.file is not None and refs.file.size == size > 30 * mib
    resident = resident_pages(image)
    assert len(resident) * PAGE <= 4 * RELEASE_ALIGN, f"{len(resident) * PAGE / mib:.1f} MiB left mapped"


# --------------------------------------------------------------------------------------------
# An invalid model


def _bad_models() -> dict[str, IgvmFile]:
    f = make_file()
    page = bytes(range(256)) * 16
    bad = {
        "negative gpa": H.PageData(gpa=-PAGE, compatibility_mask=SNP_MASK, data=page),
        "gpa over 64 bits": H.PageData(gpa=1 << 64, compatibility_mask=SNP_MASK, data=page),
        "undeclared parameter area": H.ParameterInsert(gpa=0x310000, compatibility_mask=SNP_MASK,
                                                       parameter_area_index=7),
        "mask of no platform": H.PageData(gpa=0x900000, compatibility_mask=0, data=page),
    }
    return {name: IgvmFile(platforms=f.platforms, initializations=f.initializations, directives=(*f.directives, h))
            for name, h in bad.items()}


@pytest.mark.parametrize("name", sorted(_bad_models()))
@pytest.mark.parametrize("loader", ["hyperv", "qemu"])
def test_an_invalid_model_is_one_clear_error(name: str, loader: str) -> None:
    f = _bad_models()[name]
    index = len(f.platforms) + len(f.initializations) + len(f.directives) - 1  # the bad header, the last
    seen: list[int] = []
    with pytest.raises(IgvmFormatError) as info:
        sign_igvm_layout(f, id_key=id_key(), loader=loader, on_data=lambda offset, blobs: seen.append(offset))
    assert info.value.header_index == index and f"header {index}:" in str(info.value)
    assert "\n" not in str(info.value) and not seen  # nothing laid out
    with pytest.raises(IgvmFormatError) as again:
        sign_igvm(f, id_key=id_key(), loader=loader)
    assert str(again.value) == str(info.value)


# --------------------------------------------------------------------------------------------
# kvm_vmsa.measured_vmsa reads the file's VMSA once


def test_measured_vmsa_parses_the_page_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import igvm_builder.kvm_vmsa as K
    from igvm_builder.sev_vmsa import build_vmsa, reset_vmsa_fields

    fields = reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1) | {"rip": 0x100000,
                                                                                      "cs.selector": 0x8}
    page = build_vmsa(fields)
    expected = {vmm: K.measured_vmsa(page, vmm) for vmm in K.KVM_VMMS}
    calls: list[int] = []
    real = K.parse_vmsa

    def parse(*args: Any, **kwargs: Any) -> dict[str, int]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "parse_vmsa", parse)
    for vmm in K.KVM_VMMS:
        before = len(calls)
        assert K.measured_vmsa(page, vmm) == expected[vmm]
        assert len(calls) - before == 1
    with pytest.raises(MeasurementError, match="field dr7"):  # KVM launches with dr7 0 or 0x400 only
        K.measured_vmsa(build_vmsa(fields | {"dr7": 0x1234}), "qemu")


def _measure_agrees(signed: Path, doc: dict[str, Any], tmp_path: Path) -> None:
    """`measure --reference-values` of the signed OVMF file (its launch: cloud-hypervisor, 2
    EPYC-Milan vCPUs, TDX two-pass) measures every platform from its bytes: the same values."""
    measured = tmp_path / "measured.json"
    rc, _, err = run("measure", signed, "--loader", "cloud-hypervisor", "--vcpus", 2, "--vcpu-type", "EPYC-Milan",
                     "--tdx-two-pass", "--reference-values", measured)
    assert rc == 0, err
    again = json.loads(measured.read_text())
    assert doc["platforms"] == again["platforms"] and doc["file"] == again["file"]
