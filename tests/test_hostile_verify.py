"""Issue #15, finding 4: ``verify --reference`` checks every platform the reference values record,
refuses platforms they do not record, says which it checked, and says what the ID block does
not cover.  Finding 11 (``diff`` and pages whose mask names no platform) is at the end.

The files are real builds (``igvm-builder build``), signed with the TEST-ONLY key, then changed
the way an attacker would: a TDX-only page added, an SEV-ES platform added, a native page
changed.  The expected digests are the measurement engine's for the changed file: each change is
checked to change exactly the platform it targets (SEV-SNP unchanged, so the ID block stays valid).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_build_helpers import SHARED, cli, q

from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.measure import measure_platform

ID_PEM = SHARED / "keys" / "test-only-id-p384.pem"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("verify")
    blob = tmp / "payload.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    cfg = tmp / "build.toml"
    cfg.write_text(f"[image]\nplatforms = [\"native\", \"snp\", \"tdx\"]\n\n[[blob]]\npath = {q(blob)}\n"
                   "gpa = 0x200000\n")
    proc = cli("build", str(cfg), "-o", str(tmp / "u.igvm"), "--reference-values", str(tmp / "ref.json"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("sign", str(tmp / "u.igvm"), "-o", str(tmp / "s.igvm"), "--id-key", str(ID_PEM), "--allow-test-keys",
               "--loader", "qemu")
    assert proc.returncode == 0, proc.stderr
    return tmp / "s.igvm", tmp / "ref.json"


def _rewrite(f: IgvmFile, path: Path, **changes: object) -> Path:
    path.write_bytes(dataclasses.replace(f, **changes).to_bytes())  # type: ignore[arg-type]
    return path


def _digest(path: Path, ptype: PlatformType) -> bytes | None:
    return measure_platform(IgvmFile.load(path), ptype, loader="qemu").digest


def test_verify_names_every_platform_checked(signed: tuple[Path, Path]) -> None:
    image, ref = signed
    proc = cli("verify", str(image), "--reference", str(ref))
    assert proc.returncode == 0, proc.stderr
    assert "reference values match for snp, native (no launch measurement), tdx" in proc.stdout
    # what the ID block proves and what it does not, on stderr as a note
    assert "the ID block covers the SEV-SNP launch only" in proc.stderr


def test_changed_tdx_page_fails(signed: tuple[Path, Path], tmp_path: Path) -> None:
    image, ref = signed
    f = IgvmFile.load(image)
    tdx = f.platform(PlatformType.TDX)
    assert tdx is not None
    extra = H.PageData(gpa=0x7000000, compatibility_mask=tdx.compatibility_mask, data=b"\x5a" * 4096)
    bad = _rewrite(f, tmp_path / "tdx.igvm", directives=(*f.directives, extra))
    assert _digest(bad, PlatformType.SEV_SNP) == _digest(image, PlatformType.SEV_SNP)  # the ID block still holds
    changed = _digest(bad, PlatformType.TDX)
    assert changed is not None and changed != _digest(image, PlatformType.TDX)
    proc = cli("verify", str(bad), "--reference", str(ref))
    assert proc.returncode == 1
    assert f"the file's TDX digest is {changed.hex()}" in proc.stderr
    assert json.loads(ref.read_text())["platforms"]["tdx"]["digest"] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_platform_the_reference_lacks_is_refused(signed: tuple[Path, Path], tmp_path: Path) -> None:
    image, ref = signed
    f = IgvmFile.load(image)
    used = 0
    for p in f.platforms:
        used |= p.compatibility_mask
    bit = 1 << used.bit_length()
    sev_es = H.SupportedPlatform(compatibility_mask=bit, platform_type=PlatformType.SEV_ES)
    bad = _rewrite(f, tmp_path / "es.igvm", platforms=(*f.platforms, sev_es))
    proc = cli("verify", str(bad), "--reference", str(ref))
    assert proc.returncode == 1, proc.stdout
    assert "SEV_ES platform the reference values do not record" in proc.stderr
    # and a platform the reference records that the file lacks
    doc = json.loads(ref.read_text())
    doc["platforms"]["sev-es"] = {"digest": "00" * 48}
    ref2 = tmp_path / "ref2.json"
    ref2.write_text(json.dumps(doc))
    proc = cli("verify", str(image), "--reference", str(ref2))
    assert proc.returncode == 1 and "record a SEV_ES platform the file does not have" in proc.stderr
    doc["platforms"]["bogus"] = {}
    ref2.write_text(json.dumps(doc))
    proc = cli("verify", str(image), "--reference", str(ref2))
    assert proc.returncode == 1 and "unknown platform 'bogus'" in proc.stderr


def test_changed_native_page_is_named_as_not_covered(signed: tuple[Path, Path], tmp_path: Path) -> None:
    """A native-only page has no launch measurement: verify passes (nothing can prove it) and
    says so, counting the page among what the ID block does not cover."""
    image, ref = signed
    f = IgvmFile.load(image)
    native = f.platform(PlatformType.NATIVE)
    assert native is not None
    extra = H.PageData(gpa=0x7000000, compatibility_mask=native.compatibility_mask, data=b"\xa5" * 4096)
    changed = _rewrite(f, tmp_path / "native.igvm", directives=(*f.directives, extra))
    proc = cli("verify", str(changed), "--reference", str(ref))
    assert proc.returncode == 0, proc.stderr
    assert "native (no launch measurement)" in proc.stdout
    assert "not covered: 1 page(s) for other platforms only" in proc.stderr


# --------------------------------------------------------------------------- diff (finding 11)


def test_diff_reports_pages_no_platform_claims(signed: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ref = signed
    f = IgvmFile.load(image)
    used = 0
    for p in f.platforms:
        used |= p.compatibility_mask
    stray_mask = 1 << used.bit_length()  # a bit no platform of the file has
    stray = H.PageData(gpa=0x7000000, compatibility_mask=stray_mask, data=b"\x11" * 4096)
    extra = _rewrite(f, tmp_path / "extra.igvm", directives=(*f.directives, stray))
    proc = cli("diff", str(image), str(extra))
    assert proc.returncode == 1, proc.stdout
    assert "page 0x7000000 (1 page) only in B (added) [no platform]" in proc.stdout
    proc = cli("diff", str(extra), str(image), "--json")
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "different"
    assert doc["pages"] == [{"gpa_start": "0x7000000", "gpa_end": "0x7000fff", "pages": 1, "aspect": "removed",
                             "platforms": ["no platform"], "a": None, "b": None}]
    # the same stray page with other contents: a data difference
    other = H.PageData(gpa=0x7000000, compatibility_mask=stray_mask, data=b"\x22" * 4096)
    changed = _rewrite(f, tmp_path / "changed.igvm", directives=(*f.directives, other))
    proc = cli("diff", str(extra), str(changed))
    assert proc.returncode == 1 and "page 0x7000000 (1 page) differs in data [no platform]" in proc.stdout
    assert cli("diff", str(extra), str(extra)).returncode == 0
