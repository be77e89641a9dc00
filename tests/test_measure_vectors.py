"""Launch digests of the reference vectors, against the values the reference crate printed.

Every ``shared/vectors/igvm/X.measure.txt`` (one JSON object per platform, or the parser's
error) is parsed here and compared with :func:`measure_file`; the negative vector with a
digest and the COCONUT igvmmeasure known answers come from ``shared/vectors/igvm/README.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from igvm_builder.errors import IgvmFormatError, MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PageDataFlags, PageDataType, PlatformType
from igvm_builder.measure import measure_file, measure_platform

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors" / "igvm"
README = (VECTORS / "README.md").read_text()
MEASURE_TXT = sorted(VECTORS.glob("*.measure.txt"))


def expected_digests(path: Path) -> list[dict[str, str | None]] | None:
    """The platforms of a ``.measure.txt`` file, or None when the reference parser rejected the file."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if lines and lines[0].startswith("error:"):
        return None
    return [json.loads(ln) for ln in lines]


def readme_known_answer(label: str) -> str:
    """A 96-hex-digit digest that follows ``label`` in the vectors README."""
    m = re.search(re.escape(label) + r"\s*`?([0-9a-f]{96})`", README)
    assert m, f"no known answer after {label!r} in the vectors README"
    return m.group(1)


def test_measure_txt_files_found() -> None:
    names = {p.name.removesuffix(".measure.txt") for p in MEASURE_TXT}
    assert {"snp_v1", "tdx_v1", "vbs_v1_reloc", "c_api_test_data_v1", "native_v2_minimal"} <= names


@pytest.mark.parametrize("path", MEASURE_TXT, ids=lambda p: p.name.removesuffix(".measure.txt"))
def test_vector_digest_matches_reference(path: Path) -> None:
    igvm = path.with_name(path.name.replace(".measure.txt", ".igvm"))
    expected = expected_digests(path)
    if expected is None:  # the reference parser rejects it; so do we, and nothing is measured
        with pytest.raises(IgvmFormatError):
            IgvmFile.load(igvm)
        return
    f = IgvmFile.load(igvm)
    got = {m.platform.name: m for m in measure_file(f)}
    assert sorted(got) == sorted(e["platform"] for e in expected)
    for e in expected:
        m = got[str(e["platform"])]
        assert f"{m.compatibility_mask:#x}" == e["compatibility_mask"]
        assert m.hex == e["digest"], f"{path.name}: {e['platform']}"


def test_negative_vector_with_a_digest() -> None:
    m = re.search(r"`negative/error_range_parse_ok_roundtrip_panics` \| VBS boot digest \| `([0-9a-f]{64})`", README)
    assert m
    f = IgvmFile.load(VECTORS / "negative" / "error_range_parse_ok_roundtrip_panics.igvm")
    assert measure_platform(f, PlatformType.VSM_ISOLATION).hex == m.group(1)


def test_snp_id_block_ld_is_our_digest() -> None:
    f = IgvmFile.load(VECTORS / "snp_v1.igvm")
    (idb,) = [h for h in f.directives if isinstance(h, H.SnpIdBlock)]
    assert measure_platform(f, PlatformType.SEV_SNP).digest == bytes(idb.ld)


def test_snp_igvmmeasure_known_answers() -> None:
    f = IgvmFile.load(VECTORS / "snp_v1.igvm")
    assert measure_platform(f, PlatformType.SEV_SNP, loader="igvmmeasure").hex == readme_known_answer("default mode")
    assert (measure_platform(f, PlatformType.SEV_SNP, loader="igvmmeasure-native-zero").hex
            == readme_known_answer("`--native-zero`"))


@pytest.mark.parametrize("name", ["snp_v1", "tdx_v1", "vbs_v1_reloc", "c_api_test_data_v1"])
def test_bytes_mmap_parallel_and_sequential_agree(name: str) -> None:
    path = VECTORS / f"{name}.igvm"
    a = measure_file(IgvmFile.load(path))
    b = measure_file(IgvmFile.from_bytes(path.read_bytes()), parallel=False)
    assert [m.digest for m in a] == [m.digest for m in b]


def test_tdx_vector_two_pass_equals_single_pass() -> None:
    # tdx_v1's pages are not GPA-consecutive, so every region is one page: both orders agree.
    f = IgvmFile.load(VECTORS / "tdx_v1.igvm")
    one = measure_platform(f, PlatformType.TDX)
    two = measure_platform(f, PlatformType.TDX, tdx_two_pass=True)
    assert (one.digest, one.variant, two.variant) == (two.digest, "single-pass", "two-pass")


def test_missing_platform_is_refused() -> None:
    f = IgvmFile.load(VECTORS / "snp_v1.igvm")
    with pytest.raises(MeasurementError, match=r"no TDX platform \(it has: SEV_SNP\)"):
        measure_platform(f, PlatformType.TDX)
    with pytest.raises(MeasurementError, match="no TDX platform"):
        measure_file(f, platforms=[PlatformType.SEV_SNP, PlatformType.TDX])


# --------------------------------------------------------------------------- built in memory


def _one_page_file(ptype: PlatformType, data: bytes, *, flags: int = 0) -> IgvmFile:
    inits: tuple[H.Header, ...] = ()
    if ptype in (PlatformType.SEV_SNP, PlatformType.TDX):
        inits = (H.GuestPolicy(policy=0x30000 if ptype == PlatformType.SEV_SNP else 0, compatibility_mask=1),)
    return IgvmFile(
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=ptype,
                                       highest_vtl=2 if ptype == PlatformType.VSM_ISOLATION else 0),),
        initializations=inits,
        directives=(H.PageData(gpa=0x1000, compatibility_mask=1, flags=flags, data_type=PageDataType.NORMAL,
                               data=data),),
    )


@pytest.mark.parametrize("ptype", [PlatformType.SEV_SNP, PlatformType.TDX, PlatformType.VSM_ISOLATION])
@pytest.mark.parametrize("size", [1, 27, 2048, 4095, 4096])
def test_short_page_data_is_measured_zero_padded(ptype: PlatformType, size: int) -> None:
    """A model built in memory measures like its serialized file (the file stores the page padded)."""
    data = bytes((i * 7 + 1) & 0xFF for i in range(size))
    built = _one_page_file(ptype, data)
    padded = _one_page_file(ptype, data + bytes(4096 - size))
    reparsed = IgvmFile.from_bytes(built.to_bytes())
    digest = measure_platform(built, ptype).digest
    assert digest == measure_platform(padded, ptype).digest == measure_platform(reparsed, ptype).digest


@pytest.mark.parametrize("ptype", [PlatformType.SEV_SNP, PlatformType.TDX])
def test_unmeasured_page_data_does_not_matter(ptype: PlatformType) -> None:
    a = _one_page_file(ptype, b"\x01" * 4096, flags=PageDataFlags.UNMEASURED)
    b = _one_page_file(ptype, b"\x02" * 4096, flags=PageDataFlags.UNMEASURED)
    c = _one_page_file(ptype, b"\x02" * 4096)
    assert measure_platform(a, ptype).digest == measure_platform(b, ptype).digest != measure_platform(c, ptype).digest


# --------------------------------------------------------------------------- large files, mmap


def _many_pages_file(n: int) -> IgvmFile:
    pages = tuple(H.PageData(gpa=0x100000 + 0x1000 * i, compatibility_mask=3,
                             data=i.to_bytes(4, "little") * 1024) for i in range(n))
    return IgvmFile(
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),
                   H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.TDX)),
        initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),),
        directives=pages,
    )


@pytest.mark.parametrize("two_pass", [False, True])
def test_mmap_release_does_not_change_results(tmp_path: Path, two_pass: bool) -> None:
    """More pages than one release window: the mmap'd file (pages dropped from RSS as they are
    hashed, re-read by the other platform's thread) measures like the model it was written from."""
    f = _many_pages_file(1500)
    path = tmp_path / "many.igvm"
    path.write_bytes(f.to_bytes())
    expected = [m.digest for m in measure_file(f, parallel=False, tdx_two_pass=two_pass)]
    loaded = IgvmFile.load(path)
    assert [m.digest for m in measure_file(loaded, tdx_two_pass=two_pass)] == expected
    assert [m.digest for m in measure_file(loaded, tdx_two_pass=two_pass)] == expected  # again, after release


def test_private_mmap_modifications_are_kept(tmp_path: Path) -> None:
    """A copy-on-write mapping is never madvise'd: its modified pages are measured as modified."""
    import mmap

    f = _many_pages_file(600)
    path = tmp_path / "cow.igvm"
    path.write_bytes(f.to_bytes())
    with path.open("rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    view = IgvmFile.from_bytes(mm)
    first = view.directives[0].data
    mm[first.start : first.start + 4] = b"\xff\xff\xff\xff"
    modified = bytes(mm)
    before = [m.digest for m in measure_file(IgvmFile.from_bytes(modified))]
    assert [m.digest for m in measure_file(view)] == before
    assert mm[first.start : first.start + 4] == b"\xff\xff\xff\xff"
    assert [m.digest for m in measure_file(f)] != before
