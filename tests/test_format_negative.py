"""Malformed and edge-case IGVM files get the reference parser's verdict, cleanly.

Verdicts come from ``shared/vectors/igvm/negative/RESULTS.md`` (parsed here, not copied): rc 0
means the reference crate accepts the file, rc 1 that it rejects it and rc 3 that it panics.
We must accept exactly the rc-0 files and reject every other one with an ``IgvmFormatError``
(never another exception type) that says where the problem is.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format import IgvmFile

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NEGATIVE = SHARED / "vectors" / "igvm" / "negative"


def load_results() -> dict[str, tuple[int, str]]:
    """file name -> (rc, HEAD verdict text), from the RESULTS.md table."""
    rows: dict[str, tuple[int, str]] = {}
    for line in (NEGATIVE / "RESULTS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].endswith(".igvm"):
            rows[cells[0]] = (int(cells[2]), cells[3])
    return rows


RESULTS = load_results()
if len(RESULTS) < 40:  # a hard requirement, not a skip (STYLE.md pitfall 13)
    raise RuntimeError(f"could not read the verdict table in {NEGATIVE / 'RESULTS.md'}")

#: Rejected files whose defect sits in one header: the TLV type at the reported index/offset.
CULPRIT_TYPE = {
    "cca_policy_conflict.igvm": 0x106,
    "insert_unaligned.igvm": 0x303,
    "native_ctx_trailing_nonzero.igvm": 0x304,
    "page_data_len_28.igvm": 0x302,
    "page_gpa_unaligned.igvm": 0x302,
    "page_offset_partial_page.igvm": 0x302,
    "page_offset_past_end.igvm": 0x302,
    "param_area_dup_index.igvm": 0x301,
    "param_area_size_unaligned.igvm": 0x301,
    "param_use_after_insert.igvm": 0x30E,
    "platform_after_directive.igvm": 0x001,
    "platform_mask_2bits.igvm": 0x001,
    "platform_mask_zero.igvm": 0x001,
    "platform_type_7.igvm": 0x001,
    "platform_vtl1.igvm": 0x001,
    "reloc_alignment_zero.igvm": 0x102,
    "reloc_size_unaligned.igvm": 0x102,
    "reloc_size_zero.igvm": 0x102,
    "required_memory_reserved.igvm": 0x305,
    "required_memory_size_unaligned.igvm": 0x305,
    "snp_vmsa_gpa_unaligned.igvm": 0x304,
    "type_in_gap_0x250.igvm": 0x250,
    "vbs_ctx_mixed_vtl.igvm": 0x304,
    "vbs_ctx_offset0.igvm": 0x304,
    "vbs_ctx_vp_index_1.igvm": 0x304,
    "vbs_ctx_zero_regs.igvm": 0x304,
    "vp_context_tdx.igvm": 0x304,
}
#: Rejected because of the fixed header: the error names the byte offset of the bad field.
FIXED_HEADER_OFFSET = {
    "bad_checksum.igvm": 20,
    "bad_magic.igvm": 0,
    "bad_total_size.igvm": 16,
    "v2_page_size_64k.igvm": 28,
}
#: Whole-file rejections where no single header or offset applies.
NO_LOCATION = {"no_platform_header.igvm"}
#: Accepted files that bend a rule: the parser must say so in ``warnings``.
WARN = {
    "guest_policy_unknown_mask_OK.igvm": "0x10",
    "native_ctx_gpa_nonzero_OK.igvm": "gpa",
    "native_v2_as_v1_OK.igvm": "variable_header_offset",
    "page_2mb_flag_OK.igvm": "2mb",
    "page_flags_reserved_OK.igvm": "reserved",
    "snp_vmsa_tail_nonzero.igvm": "1648",
    "varhdr_offset_gap_OK.igvm": "variable_header_offset",
    "vp_context_pad_nonzero_OK.igvm": "padding",
}


def tlv_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, type) of each TLV record, walked independently of the library (best effort)."""
    voff, vsize = struct.unpack_from("<II", data, 8)
    out = []
    pos = voff
    while pos + 8 <= min(voff + vsize, len(data)):
        typ, length = struct.unpack_from("<II", data, pos)
        out.append((pos, typ))
        pos += 8 + (length + 7) // 8 * 8
    return out


def test_table_covers_every_file() -> None:
    assert set(RESULTS) == {p.name for p in NEGATIVE.glob("*.igvm")}
    assert {rc for rc, _ in RESULTS.values()} == {0, 1, 3}
    for name in (*CULPRIT_TYPE, *FIXED_HEADER_OFFSET, *NO_LOCATION):
        assert RESULTS[name][0] in (1, 3), name
    for name in WARN:
        assert RESULTS[name][0] == 0, name


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_reference_verdict(name: str) -> None:
    rc, verdict = RESULTS[name]
    path = NEGATIVE / name
    data = path.read_bytes()
    if rc == 0:
        f = IgvmFile.from_bytes(data)
        assert verdict.startswith("OK")
        assert IgvmFile.load(path) == f
        # Re-serializing normalizes (offsets, padding, gaps) but keeps the content.
        again = IgvmFile.from_bytes(f.to_bytes())
        assert again == f
        assert again.to_bytes() == f.to_bytes()
        if name in WARN:
            assert any(WARN[name] in w.lower() for w in f.warnings), f.warnings
        return
    try:
        IgvmFile.from_bytes(data)
    except IgvmFormatError as exc:
        error = exc
    except Exception as exc:  # pragma: no cover - the failure we are guarding against
        pytest.fail(f"{name}: {type(exc).__name__} instead of IgvmFormatError: {exc}")
    else:
        pytest.fail(f"{name}: accepted, the reference verdict is rc={rc}: {verdict}")
    message = str(error)
    assert "\n" not in message
    if name in NO_LOCATION:
        return
    assert error.header_index is not None or error.offset is not None, message
    if error.header_index is not None:
        assert f"header {error.header_index}" in message
    if error.offset is not None:
        assert f"offset {error.offset:#x}" in message
    if name in FIXED_HEADER_OFFSET:
        assert error.header_index is None
        assert error.offset == FIXED_HEADER_OFFSET[name]
    if name in CULPRIT_TYPE:
        records = tlv_records(data)
        assert error.header_index is not None, message
        offset, typ = records[error.header_index]
        assert typ == CULPRIT_TYPE[name], message
        if error.offset is not None:
            assert error.offset == offset, message


@pytest.mark.parametrize("name", sorted(n for n, (rc, _) in RESULTS.items() if rc != 0))
def test_load_names_the_file(name: str) -> None:
    with pytest.raises(IgvmFormatError) as info:
        IgvmFile.load(NEGATIVE / name)
    assert str(info.value).startswith(str(NEGATIVE / name))


def test_other_rejections_carry_a_location() -> None:
    rejected = {n for n, (rc, _) in RESULTS.items() if rc != 0}
    categorized = set(CULPRIT_TYPE) | set(FIXED_HEADER_OFFSET) | NO_LOCATION
    # The rest are platform-set / cross-header errors: they still carry a header index.
    for name in sorted(rejected - categorized):
        with pytest.raises(IgvmFormatError) as info:
            IgvmFile.from_bytes((NEGATIVE / name).read_bytes())
        assert info.value.header_index is not None or info.value.offset is not None, name
