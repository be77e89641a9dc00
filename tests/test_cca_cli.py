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
    assert not [x for x in lint(f, "qemu") if x.severity == "error"]
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
    assert sum(1 for x in findings if x.severity == "error") == 3  # no policy, second page, outside
