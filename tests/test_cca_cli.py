"""The CLI on Arm CCA files: build, measure (realm parameters given as options or reference values),
lint, dump, diff and verify-release; checked against the shared CCA vectors' oracle RIMs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from ccatools import CCA_VECTORS, case

from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import Architecture, PageDataFlags, PlatformType
from igvm_builder.lint import lint

VEC = "kvmtool_ki_512M_2cpu"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "igvm_builder", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def vector_toml(path: Path, alg: str = "sha256", name: str = VEC) -> Path:
    d = CCA_VECTORS / name
    path.write_text(f'''[image]
platforms = ["cca"]
[kernel]
path = "{d / 'Image'}"
initrd = "{d / 'initrd.img'}"
[cca]
vmm = "kvmtool"
ram_size = "512M"
vcpus = 2
hash = "{alg}"
breakpoints = 6
watchpoints = 6
dtb = "{d / 'guest.dtb'}"
''')
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cca")
    cfg = vector_toml(tmp / "realm.toml")
    proc = cli("build", str(cfg), "-o", str(tmp / "realm.igvm"), "--reference-values", str(tmp / "realm.ref.json"))
    assert proc.returncode == 0, proc.stderr
    return tmp


def test_build_cli_reference_values(built: Path) -> None:
    refs = json.loads((built / "realm.ref.json").read_text())
    entry = refs["platforms"]["cca"]
    assert entry["digest"] == case(VEC)["results"]["sha256"]["oracle_rim"]
    assert entry["realm"]["ipa_bits"] == 33 and entry["vmm"] == "kvmtool"


def test_lint(built: Path) -> None:
    f = IgvmFile.load(built / "realm.igvm")
    msgs = [x.message for x in lint(f, "qemu")]
    assert any("derived" in m for m in msgs)
    # no CCA finding is an error (QEMU 10.2.2 itself refuses any CCA file: that is its own finding)
    assert not [x for x in lint(f, "qemu") if x.severity == "error" and x.message.startswith("CCA")]
    # a hand-made CCA file with the faults lint names: no policy, pages out of order / twice / beyond the
    # protected space, unmeasured data, a non-runnable vCPU 0
    dirs = (H.PageData(gpa=0x80001000, compatibility_mask=1, data=b"a"),
            H.PageData(gpa=0x80000000, compatibility_mask=1, data=b"b", flags=int(PageDataFlags.UNMEASURED)),
            H.PageData(gpa=0x80000000, compatibility_mask=1, data=b"c"),
            H.PageData(gpa=0x1_0000_0000, compatibility_mask=1, data=b"d"),
            H.CcaVpContext(compatibility_mask=1, vp_index=0, context=struct.pack("<10Q", *[0] * 10)))
    g = IgvmFile(revision=2, architecture=Architecture.AARCH64,
                 platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.CCA,
                                                platform_version=1, shared_gpa_boundary=1 << 32),),
                 directives=dirs).validate()
    findings = lint(g, "qemu")
    text = " | ".join(x.message for x in findings)
    assert "no CCA_POLICY" in text and "comes after 0x80001000" in text and "a second page at 0x80000000" in text
    assert "outside the protected IPA space" in text and "unmeasured page at 0x80000000" in text
    assert "vCPU 0 has no runnable VP context" in text
    cca_errors = [x for x in findings if x.severity == "error" and x.message.startswith("CCA")]
    assert len(cca_errors) == 3  # no policy, second page, outside


def test_measure_options_and_reference_values(built: Path) -> None:
    want = case(VEC)["results"]["sha256"]["oracle_rim"]
    f = str(built / "realm.igvm")
    # without the realm: no digest, and the note says what is missing
    proc = cli("measure", f)
    assert proc.returncode == 0 and proc.stdout.startswith("CCA - -") and "--cca-realm" in proc.stdout
    # the realm from the build's reference values
    proc = cli("measure", f, "--cca-realm", str(built / "realm.ref.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CCA", "sha256", want]
    # ... or as options; the IPA width comes from the file's shared_gpa_boundary
    proc = cli("measure", f, "--cca-ram", "0x80000000:512M", "--cca-breakpoints", "6", "--cca-watchpoints", "6",
               "--json", "--reference-values", str(built / "m.json"))
    assert proc.returncode == 0, proc.stderr
    refs = json.loads((built / "m.json").read_text())
    assert refs["platforms"]["cca"]["digest"] == want and refs["platforms"]["cca"]["realm"]["ipa_bits"] == 33
    # different realm parameters give a different RIM (here: more watchpoints)
    proc = cli("measure", f, "--cca-ram", "0x80000000:512M", "--cca-breakpoints", "6", "--cca-watchpoints", "4")
    assert proc.returncode == 0 and want not in proc.stdout
    # incomplete or impossible realms: one line, exit 2 (unusable input)
    proc = cli("measure", f, "--cca-ram", "0x80000000:512M")
    assert proc.returncode == 2 and "needs --cca-breakpoints, --cca-watchpoints" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = cli("measure", f, "--cca-ram", "0x80000000:8G", "--cca-breakpoints", "6", "--cca-watchpoints", "6")
    assert proc.returncode == 2 and "does not fit in the protected IPA space of a 33-bit realm" in proc.stderr
    proc = cli("measure", f, "--cca-realm", str(built / "realm.toml"))
    assert proc.returncode == 2 and "realm.toml: not JSON" in proc.stderr


def test_dump_diff_verify_release(built: Path, tmp_path: Path) -> None:
    f = str(built / "realm.igvm")
    proc = cli("dump", f)
    assert proc.returncode == 0
    assert "CCA_POLICY" in proc.stdout and "hash=SHA256" in proc.stdout
    assert "x0=0x8fe00000  pc=0x80000000  flags=0x1" in proc.stdout
    # a SHA-512 build of the same realm: diff names the policy change, and with the realm the RIM change
    cfg2 = vector_toml(tmp_path / "realm512.toml", "sha512")
    assert cli("build", str(cfg2), "-o", str(tmp_path / "r512.igvm"), "--reference-values",
               str(tmp_path / "r512.json")).returncode == 0
    proc = cli("diff", f, str(tmp_path / "r512.igvm"), "--cca-realm", str(built / "realm.ref.json"))
    assert proc.returncode == 1
    assert "hash_algorithm: 0x0 -> 0x1" in proc.stdout
    assert (f"measurement CCA: {case(VEC)['results']['sha256']['oracle_rim']} -> "
            f"{case(VEC)['results']['sha512']['oracle_rim']}") in proc.stdout
    # verify-release rebuilds the config; the DTB is one of the checked inputs
    proc = cli("verify-release", str(cfg2), "--reference", str(tmp_path / "r512.json"), "--igvm",
               str(tmp_path / "r512.igvm"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 input(s) and 1 measurement(s) match" in proc.stdout
    proc = cli("verify-release", str(built / "realm.toml"), "--reference", str(tmp_path / "r512.json"))
    assert proc.returncode == 1 and "platform cca: measurement" in proc.stdout
