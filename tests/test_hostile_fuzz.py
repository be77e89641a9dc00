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


def _patched(data: bytes, header_type: int, at: int, fmt: str, value: int, *, bits: bool = False
             ) -> tuple[bytes, int]:
    """``data`` with a field of the first header of ``header_type`` (``fmt`` at ``at`` in its body)
    set to ``value`` (or-ed into it with ``bits``), the checksum fixed; returns it and that header's
    index.  Walks the header table itself, not through the library."""
    import struct

    from fuzz_pipeline import _fix_crc

    buf = bytearray(data)
    voff, vsize = struct.unpack_from("<II", buf, 8)
    pos, index = voff, 0
    while pos < voff + vsize:
        typ, length = struct.unpack_from("<II", buf, pos)
        if typ == header_type:
            old = struct.unpack_from(fmt, buf, pos + 8 + at)[0]
            struct.pack_into(fmt, buf, pos + 8 + at, old | value if bits else value)
            _fix_crc(buf)
            return bytes(buf), index
        pos += 8 + (length + 7) // 8 * 8
        index += 1
    raise AssertionError(f"no header {header_type:#x}")


def _with_mask_zero(data: bytes, header_type: int) -> tuple[bytes, int]:
    """The first header of ``header_type`` (PAGE_DATA, GUEST_POLICY, PARAMETER_INSERT: the mask is
    the u32 at body offset 8) given compatibility_mask 0."""
    return _patched(data, header_type, 8, "<I", 0)


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


# --------------------------------------------------------------------------- fields the crate drops
# Found by the campaign's differential check against igvm-oracle (benchmarks/fuzz_campaign.py
# --oracle): files whose re-serialization by the crate differed from ours although both accepted
# them, because the crate's model has no place for a field and writes it as 0: a native or VBS
# VP_CONTEXT gpa, RELOCATABLE_REGION flag bits above 0x7, REQUIRED_MEMORY flag bits above 0x1.
# The parser now reads them as the crate does (with a warning naming the value), the writer
# refuses them, and a file we write from such an input reads the same in the crate.

FIELD_CASES = {  # vector, header type, body offset, struct format, value or-ed in, warning text
    "native-vp-gpa": ("native_v2_minimal.igvm", 0x304, 0, "<Q", 0x80000000, "native VP_CONTEXT gpa is 0x80000000"),
    "vbs-vp-gpa": ("vbs_v1_reloc.igvm", 0x304, 0, "<Q", 0x2000000000, "VBS VP_CONTEXT gpa is 0x2000000000"),
    "relocation-flags": ("vbs_v1_reloc.igvm", 0x102, 7, "<B", 0x80, "RELOCATABLE_REGION flags 0x87"),
    "required-memory-flags": ("native_v1_params_dedup.igvm", 0x305, 16, "<I", 0x80, "REQUIRED_MEMORY flags 0x8"),
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_fields_the_crate_drops_are_read_as_it_reads_them(tmp_path, case: str) -> None:
    from fuzz_pipeline import VECTORS

    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.format import IgvmFile
    from igvm_builder.recordclass import replace

    vector, typ, at, fmt, value, warning = FIELD_CASES[case]
    data, index = _patched((VECTORS / vector).read_bytes(), typ, at, fmt, value, bits=True)
    f = IgvmFile.from_bytes(data)
    assert any(w.startswith(f"header {index}: {warning}") for w in f.warnings), f.warnings
    (tmp_path / "in.igvm").write_bytes(data)
    ours = tmp_path / "ours.igvm"
    ours.write_bytes(f.to_bytes())
    assert _oracle("roundtrip", ours).startswith("identical"), _oracle("roundtrip", ours)

    def headers(dump: str) -> list[str]:
        return [line for line in dump.splitlines() if line.startswith(("init", "directive"))]

    assert headers(_oracle("dump", tmp_path / "in.igvm")) == headers(_oracle("dump", ours))
    # the unpatched vector parses without that warning; the raw value is refused by the writer
    assert not any(w.startswith(f"header {index}: ") for w in IgvmFile.from_bytes((VECTORS / vector).read_bytes()).warnings)
    position = index - len(f.platforms)
    section = "initializations" if position < len(f.initializations) else "directives"
    items = list(getattr(f, section))
    k = position if section == "initializations" else position - len(f.initializations)
    field = "gpa" if typ == 0x304 else "flags"
    items[k] = replace(items[k], **{field: getattr(items[k], field) | value})
    with pytest.raises(IgvmFormatError, match=rf"header {index}: .*{field} {getattr(items[k], field):#x} "):
        replace(f, **{section: tuple(items)}).to_bytes()


# --------------------------------------------------------------------------- the crate, differentially


def test_fuzz_inputs_read_as_the_reference_crate_reads_them(tmp_path) -> None:
    """200 mutated inputs: igvm-oracle gives our verdict on each, and re-serializes the file we
    write from each accepted one to the same bytes (how the mask-0 and dropped-field findings
    above were found)."""
    from fuzz_pipeline import OracleCheck

    check = OracleCheck(tmp_path)
    result = campaign(SEED + 2, 200, pipeline_every=1 << 30, check=check)
    assert result.failures == [] and check.checked == 200


def test_oracle_check_can_fail(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzz_pipeline import VECTORS, OracleCheck

    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.format import IgvmFile

    data = (VECTORS / "snp_v1.igvm").read_bytes()
    check = OracleCheck(tmp_path)
    check(data)  # agrees

    def refuse(*_a: object, **_k: object) -> None:
        raise IgvmFormatError("injected refusal")

    monkeypatch.setattr(IgvmFile, "from_bytes", refuse)
    with pytest.raises(PipelineFailure, match="oracle/parse: the crate accepts"):
        check(data)


# --------------------------------------------------------------------------- the campaign's findings
# benchmarks/fuzz_campaign.py --seed 20261203 --executions 250000 --oracle-every 5 found, besides
# the crate's own panics on inputs we reject: (1) a RELOCATABLE_REGION whose gpa + size passes 2^64,
# which the crate panics on ("assertion failed: !range.is_empty()") and we accepted; (2) VBS
# register values with bytes their type does not use (bytes 8-15 of a 64-bit register, a table
# register's pad), which the crate drops when it re-serializes.


def _vbs_with_register_byte(offset: int, name: int = 0x20010) -> bytes:
    """vbs_v1_reloc with one byte of register ``name``'s 16-byte value set (found without the library)."""
    import struct

    from fuzz_pipeline import VECTORS, _fix_crc

    buf = bytearray((VECTORS / "vbs_v1_reloc.igvm").read_bytes())
    record = bytes([2]) + struct.pack("<I", name) + bytes(11)  # vtl 2, name, reserved
    at = bytes(buf).index(record) + len(record)
    buf[at + offset] = 0x55
    _fix_crc(buf)
    return bytes(buf)


def test_vbs_register_bytes_the_crate_drops(tmp_path) -> None:
    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.format import IgvmFile
    from igvm_builder.format import headers as H
    from igvm_builder.recordclass import replace

    for name, offset, kept in ((0x20010, 8, False), (0x70001, 2, False), (0x70001, 8, True)):  # RIP; GDTR pad, base
        data = _vbs_with_register_byte(offset, name)
        f = IgvmFile.from_bytes(data)
        warned = any("has non-zero bytes its type does not use" in w for w in f.warnings)
        assert warned is not kept, (name, offset, f.warnings)
        (tmp_path / "in.igvm").write_bytes(data)
        ours = tmp_path / "ours.igvm"
        ours.write_bytes(f.to_bytes())
        assert _oracle("roundtrip", ours).startswith("identical")
        assert _oracle("dump", tmp_path / "in.igvm").splitlines()[3:] == _oracle("dump", ours).splitlines()[3:]
    # the writer refuses a value with such bytes
    f = IgvmFile.from_bytes(_vbs_with_register_byte(0))
    ctx = next(h for h in f.directives if isinstance(h, H.VbsVpContext))
    bad = replace(ctx, registers=(H.VbsRegister(name=0x20010, value=bytes(8) + b"\x01" + bytes(7)), *ctx.registers[1:]))
    with pytest.raises(IgvmFormatError, match="non-zero bytes its type does not use"):
        replace(f, directives=tuple(bad if h is ctx else h for h in f.directives)).to_bytes()


def test_relocation_region_past_2_64_is_refused_as_the_crate_panics(tmp_path) -> None:
    import subprocess

    from fuzz_pipeline import VECTORS
    from oracles import IGVM_ORACLE

    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.format import IgvmFile
    from igvm_builder.format import headers as H
    from igvm_builder.recordclass import replace

    base = (VECTORS / "vbs_v1_reloc.igvm").read_bytes()
    for size, crate_rc in (((1 << 64) - 0x1000, 3), ((1 << 64) - 0x200000, 0)):  # past 2^64; ending at it
        data, index = _patched(base, 0x102, 24, "<Q", size)  # relocation_region_size (region at 0x200000)
        path = tmp_path / "reloc.igvm"
        path.write_bytes(data)
        rc = subprocess.run([str(IGVM_ORACLE), "parse", str(path)], capture_output=True, timeout=60).returncode
        assert rc == crate_rc
        if crate_rc == 3:  # the crate panics: we refuse, naming the header
            with pytest.raises(IgvmFormatError, match=rf"header {index}: RELOCATABLE_REGION .* runs past 2\^64"):
                IgvmFile.from_bytes(data)
        else:
            IgvmFile.from_bytes(data)
    # a page-table relocation region the same (the writer shares the rule)
    f = IgvmFile.from_bytes(base)
    pt = H.PageTableRelocation(compatibility_mask=1, vp_index=0, vtl=2, gpa=0x40000000, size=(1 << 64) - 0x1000,
                               used_size=0x1000)
    with pytest.raises(IgvmFormatError, match=r"PAGE_TABLE_RELOCATION_REGION .* runs past 2\^64"):
        replace(f, initializations=(*f.initializations, pt)).to_bytes()


def test_oracle_check_counts_the_known_differences(tmp_path) -> None:
    from fuzz_pipeline import VECTORS, OracleCheck, _fix_crc

    from igvm_builder.format import IgvmFile
    from igvm_builder.format import headers as H
    from igvm_builder.format.defs import PlatformType

    check = OracleCheck(tmp_path)
    # a file without file data: we write the byte the crate's parser needs and its writer omits
    check(IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),),
                   initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),)).to_bytes())
    # two platforms with one mask bit: the crate accepts them, we refuse them
    import struct

    data = bytearray((VECTORS / "tdx_v1.igvm").read_bytes())
    snp = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.NATIVE),
                              H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.SEV_SNP)),
                   initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=2),),
                   directives=(H.PageData(gpa=0x1000, compatibility_mask=3, data=b"\x01" * 4096),)).to_bytes()
    data = bytearray(snp)
    struct.pack_into("<I", data, 24 + 8 + 16 + 8, 1)  # the second platform header's mask
    _fix_crc(data)
    check(bytes(data))
    assert check.known == {"no file data": 1, "duplicate platform mask": 1}
