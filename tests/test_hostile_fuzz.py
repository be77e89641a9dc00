"""Issue #15: the bounded, seeded fuzz harness every CI run executes.

``tests/fuzz_pipeline.py`` mutates the reference vectors (bytes and model fields) and runs every
accepted file through parse -> dump -> measure -> lint -> diff -> verify -> sign/verify; it
raises on anything but the project's one-line errors, on an accepted file that does not
round-trip and on a signed file that does not verify.  Same seed, same inputs: a failure here
reproduces with the seed.  ``benchmarks/fuzz_campaign.py`` runs the same harness for longer.
"""

from __future__ import annotations

import pytest
from fuzz_pipeline import PipelineFailure, campaign

from igvm_builder.measure.engine import IMPLIED_PAGES_ENV

SEED = 15
EXECUTIONS = 2000


@pytest.fixture(autouse=True)
def _small_work_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # mutated parameter areas and error ranges hit the limit path instead of seconds of hashing
    monkeypatch.setenv(IMPLIED_PAGES_ENV, "4096")


def test_fuzz_pipeline_bounded() -> None:
    result = campaign(SEED, EXECUTIONS, sign_every=4)
    assert result.failures == []
    assert result.executions == EXECUTIONS
    assert result.pipelines >= EXECUTIONS // 10, result  # the mutations do reach the pipeline


def test_fuzz_is_deterministic() -> None:
    a, b = campaign(SEED + 1, 150), campaign(SEED + 1, 150)
    assert (a.executions, a.parsed, a.pipelines) == (b.executions, b.parsed, b.pipelines)


def test_harness_reports_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-project exception anywhere in the pipeline is a failure (the harness can fail)."""
    import igvm_builder.lint

    def broken(*_a: object, **_k: object) -> None:
        raise KeyError("injected")

    monkeypatch.setattr(igvm_builder.lint, "lint", broken)
    with pytest.raises(PipelineFailure, match="lint: KeyError"):
        campaign(SEED, 200)


def test_runs_seed_holds_every_kind_of_page_run() -> None:
    """The seed the mutations start from for format/pages.py: the parser folds it into runs of a
    contiguous buffer, of one repeated page and of data-less pages."""
    from fuzz_pipeline import runs_seed

    from igvm_builder.format import IgvmFile
    from igvm_builder.format.pages import PageRun

    runs = [x for x in IgvmFile.from_bytes(runs_seed()).directives.items() if isinstance(x, PageRun)]
    assert len(runs) >= 9
    assert any(r.source is not None and r.count > 1 for r in runs)
    assert any(r.source is None and len(r.fill) == 4096 and r.count > 1 for r in runs)
    assert any(r.source is None and len(r.fill) == 0 and r.count > 1 for r in runs)


# --------------------------------------------------------------------------- compatibility mask 0
# Found by this harness (seed 15 once the runs seed was added): a mutated snp_v1 whose first
# PAGE_DATA had compatibility_mask 0 parsed, was signed, and the signed file -- with that page --
# read differently in the reference crate, which drops every header with mask 0 (its filter mask
# is 0xFFFFFFFF when no platform is filtered for): igvm-oracle's re-serialization was 4,128 bytes
# shorter.  Now the parser drops such headers with a warning, and the writer refuses them.

def _oracle(*args: object) -> str:
    import subprocess

    from oracles import IGVM_ORACLE

    return subprocess.run([str(IGVM_ORACLE), *map(str, args)], capture_output=True, text=True, timeout=60).stdout


def _with_mask_zero(data: bytes, header_type: int) -> tuple[bytes, int]:
    """``data`` with the first header of ``header_type`` given compatibility_mask 0 (checksum fixed);
    returns it and that header's index."""
    import struct

    from fuzz_pipeline import _fix_crc

    buf = bytearray(data)
    voff, vsize = struct.unpack_from("<II", buf, 8)
    pos, index = voff, 0
    while pos < voff + vsize:
        typ, length = struct.unpack_from("<II", buf, pos)
        if typ == header_type:
            mask_at = {0x302: 8, 0x101: 8, 0x303: 8, 0x305: 8}[typ]  # PAGE_DATA, GUEST_POLICY, INSERT, REQUIRED
            struct.pack_into("<I", buf, pos + 8 + mask_at, 0)
            _fix_crc(buf)
            return bytes(buf), index
        pos += 8 + (length + 7) // 8 * 8
        index += 1
    raise AssertionError(f"no header {header_type:#x}")


@pytest.mark.parametrize("header_type", [0x302, 0x101, 0x303])
def test_mask_zero_headers_are_dropped_as_the_reference_parser_does(tmp_path, header_type: int) -> None:
    from fuzz_pipeline import VECTORS

    from igvm_builder.format import IgvmFile

    data, index = _with_mask_zero((VECTORS / "snp_v1.igvm").read_bytes(), header_type)
    f = IgvmFile.from_bytes(data)
    assert any(w.startswith(f"header {index}: ") and "compatibility_mask 0" in w for w in f.warnings), f.warnings
    assert f.header_indices is not None and index not in f.header_indices
    ours = tmp_path / "ours.igvm"
    ours.write_bytes(f.to_bytes())
    # the crate reads the mutated file as we do: its re-serialization of it is ours, byte for byte
    (tmp_path / "in.igvm").write_bytes(data)
    assert _oracle("roundtrip", ours).startswith("identical"), _oracle("roundtrip", ours)
    crate_dump = _oracle("dump", tmp_path / "in.igvm")
    ours_dump = _oracle("dump", ours)
    assert [line for line in crate_dump.splitlines() if line.startswith(("init", "directive"))] == \
        [line for line in ours_dump.splitlines() if line.startswith(("init", "directive"))]


def test_signed_file_of_a_mask_zero_input_reads_the_same_in_the_crate(tmp_path) -> None:
    from fuzz_pipeline import ID_PEM, VECTORS

    from igvm_builder.format import IgvmFile
    from igvm_builder.sign import PemFileKey
    from igvm_builder.sign.image import sign_igvm, verify_igvm

    data, _ = _with_mask_zero((VECTORS / "snp_v1.igvm").read_bytes(), 0x302)
    signed, _ = sign_igvm(IgvmFile.from_bytes(data), id_key=PemFileKey(ID_PEM), loader="hyperv")
    out = tmp_path / "signed.igvm"
    out.write_bytes(signed.to_bytes())
    assert _oracle("roundtrip", out).startswith("identical")
    verify_igvm(IgvmFile.from_bytes(out.read_bytes()), loader="hyperv")


def test_writer_refuses_mask_zero() -> None:
    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.format import IgvmFile
    from igvm_builder.format import headers as H
    from igvm_builder.format.defs import PlatformType
    from igvm_builder.format.pages import PageRun

    snp = (H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),)
    page = H.PageData(gpa=0x1000, compatibility_mask=1, data=b"")
    for bad in (H.PageData(gpa=0x2000, compatibility_mask=0, data=b""),
                H.RequiredMemory(gpa=0x10000, compatibility_mask=0, number_of_bytes=0x1000),
                PageRun(0x2000, 4, 0)):
        with pytest.raises(IgvmFormatError, match=r"header 2: .*compatibility_mask 0 applies to no platform"):
            IgvmFile(platforms=snp, directives=(page, bad)).to_bytes()  # type: ignore[arg-type]
    with pytest.raises(IgvmFormatError, match=r"header 1: GUEST_POLICY compatibility_mask 0"):
        IgvmFile(platforms=snp, initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=0),),
                 directives=(page,)).to_bytes()
