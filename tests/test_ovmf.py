"""OVMF footer table, SEV/TDX/IGVM metadata and the kernel-hash page.

Expectations come from outside this project: ``shared/firmware/PROVENANCE.md`` (section
tables, transcribed below), ``shared/vectors/measure/tdx.json`` (TDVF sections),
``shared/vectors/measure/snp.json`` (sev-snp-measure traces and outputs) and sev-snp-measure's
own hash-page builder, imported here only as an independent oracle.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igvm_builder.errors import InputError
from igvm_builder.inputs import ovmf as O

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIRMWARE = SHARED / "firmware"
KERNEL = SHARED / "inputs" / "vmlinuz-6.1.0-56-cloud-amd64"
INITRD = SHARED / "inputs" / "ipxe.lkrn"  # any real file serves as an initrd for hashing

SEC_MEM, SECRETS, CPUID, CAA, HASHES = (
    O.SevSectionType.SNP_SEC_MEM,
    O.SevSectionType.SNP_SECRETS,
    O.SevSectionType.CPUID,
    O.SevSectionType.SVSM_CAA,
    O.SevSectionType.SNP_KERNEL_HASHES,
)

# Transcribed from shared/firmware/PROVENANCE.md ("What each image carries").
EXPECTED = {
    "bookworm-OVMF.fd": {
        "size": 2_097_152,
        "gpa_base": 0xFFE00000,
        "reset_eip": 0x80B004,
        "secret": None,
        "hash_table": None,
        "sev_offset": 0x1FFAD4,
        "tdx_offset": 0x1FF7C0,
        "igvm_offset": None,
        "sev": [
            (0x800000, 0x9000, SEC_MEM),
            (0x80A000, 0x3000, SEC_MEM),
            (0x80D000, 0x1000, SECRETS),
            (0x80E000, 0x1000, CPUID),
            (0x80F000, 0x11000, SEC_MEM),
        ],
        "igvm": [],
    },
    "bookworm-OVMF_CODE_4M.fd": {
        "size": 3_653_632,
        "gpa_base": 0xFFC84000,
        "reset_eip": 0x808004,
        "secret": None,
        "hash_table": None,
        "sev_offset": None,
        "tdx_offset": None,
        "igvm_offset": None,
        "sev": [],
        "igvm": [],
    },
    "trixie-OVMF.fd": {
        "size": 4_194_304,
        "gpa_base": 0xFFC00000,
        "reset_eip": 0x80B004,
        "secret": None,
        "hash_table": None,
        "sev_offset": 0x3FFAB8,
        "tdx_offset": 0x3FF640,
        "igvm_offset": None,
        "sev": [
            (0x800000, 0x9000, SEC_MEM),
            (0x80A000, 0x3000, SEC_MEM),
            (0x80D000, 0x1000, SECRETS),
            (0x80E000, 0x1000, CPUID),
            (0x80F000, 0x1000, CAA),
            (0x810000, 0x10000, SEC_MEM),
        ],
        "igvm": [],
    },
    "sid-OVMF.amdsev.fd": {
        "size": 4_194_304,
        "gpa_base": 0xFFC00000,
        "reset_eip": 0x80B004,
        "secret": (0x810000, 0xC00),
        "hash_table": (0x810C00, 0x400),
        "sev_offset": 0x3FFA3C,
        "tdx_offset": 0x3FF5A0,
        "igvm_offset": 0x3FFAA0,
        "sev": [
            (0x800000, 0x9000, SEC_MEM),
            (0x80A000, 0x3000, SEC_MEM),
            (0x80D000, 0x1000, SECRETS),
            (0x80E000, 0x1000, CPUID),
            (0x80F000, 0x1000, CAA),
            (0x811000, 0x1F000, SEC_MEM),
            (0x810000, 0x1000, HASHES),
        ],
        "igvm": [
            (0x812000, 0x1000, O.IgvmMetaType.PARAMETER_AREA),
            (0x0, 0xC0, O.IgvmMetaType.MEMORY_MAP),
            (0xC0, 0x10, O.IgvmMetaType.VP_COUNT),
            (0x813000, 0x1000, O.IgvmMetaType.HOB_AREA),
        ],
    },
}

# sid is not in tdx.json; transcribed from PROVENANCE.md.
SID_TDVF = [
    (0x84000, 0x37C000, 0xFFC84000, 0x37C000, 0, 0x1),
    (0x0, 0x84000, 0xFFC00000, 0x84000, 1, 0x0),
    (0x0, 0x0, 0x814000, 0xC000, 3, 0x0),
    (0x0, 0x0, 0x80B000, 0x2000, 3, 0x0),
    (0x0, 0x0, 0x809000, 0x2000, 2, 0x0),
    (0x0, 0x0, 0x800000, 0x6000, 3, 0x0),
    (0x0, 0x0, 0x820000, 0x10000, 3, 0x0),
]


@cache
def fw(name: str) -> bytes:
    return (FIRMWARE / name).read_bytes()


@cache
def parsed(name: str) -> O.OvmfImage:
    return O.parse_ovmf(fw(name), f"firmware/{name}")


@cache
def kernel() -> bytes:
    return KERNEL.read_bytes()


def load_vectors(name: str) -> dict:
    return json.loads((SHARED / "vectors" / "measure" / name).read_text())


# --- the Debian images -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_debian_image_metadata(name: str) -> None:
    exp = EXPECTED[name]
    img = parsed(name)
    assert img.name == f"firmware/{name}"
    assert img.size == exp["size"] == len(fw(name))
    assert img.gpa_base == exp["gpa_base"]
    assert img.gpa_base + img.size == 1 << 32
    assert img.sev_es_reset_eip == exp["reset_eip"]
    assert img.sev_secret == exp["secret"]
    assert img.sev_hash_table == exp["hash_table"]
    assert img.sev_metadata_offset == exp["sev_offset"]
    assert img.tdx_metadata_offset == exp["tdx_offset"]
    assert img.igvm_metadata_offset == exp["igvm_offset"]
    assert [(s.base, s.size, s.type) for s in img.sev_sections] == exp["sev"]
    assert all(isinstance(s.type, O.SevSectionType) for s in img.sev_sections)
    assert [(e.start, e.size, e.type) for e in img.igvm_entries] == exp["igvm"]
    assert img.has_sev_metadata == bool(exp["sev"])
    assert img.has_igvm_metadata == bool(exp["igvm"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_footer_table_order_and_raw_entries(name: str) -> None:
    img = parsed(name)
    guids = [g for g, _ in img.footer_entries]
    # Read backwards from the footer: reset block, secret, hash table, then the metadata entries.
    expected = [O.SEV_ES_RESET_BLOCK_GUID, O.SEV_SECRET_BLOCK_GUID, O.SEV_HASH_TABLE_GUID]
    if img.has_sev_metadata:
        expected += [O.SEV_METADATA_GUID, O.TDX_METADATA_GUID]
    if img.has_igvm_metadata:
        expected.append(O.IGVM_METADATA_GUID)
    assert guids == expected
    assert list(img.footer_table) == expected
    reset = img.footer_entry(O.SEV_ES_RESET_BLOCK_GUID.upper())
    assert reset is not None and struct.unpack("<I", reset) == (EXPECTED[name]["reset_eip"],)
    assert img.footer_entry("00000000-0000-0000-0000-000000000000") is None
    if img.has_sev_metadata:
        off = struct.unpack("<I", img.footer_table[O.SEV_METADATA_GUID])[0]
        assert img.sev_metadata_offset == img.size - off
        assert fw(name)[img.sev_metadata_offset : img.sev_metadata_offset + 4] == b"ASEV"


def test_tdvf_sections_match_tdx_json() -> None:
    for case in load_vectors("tdx.json")["cases"]:
        name = Path(case["firmware"]).name
        img = parsed(name)
        assert img.size == case["firmware_size"]
        if case["tdvf_sections"] is None:
            assert case["expected_failure"]["reason"] == "no TDX metadata"
            assert img.tdx_sections == ()
            with pytest.raises(InputError, match=r"firmware/bookworm-OVMF_CODE_4M\.fd: no TDX metadata"):
                O.require_tdx(img)
            continue
        got = [
            {
                "data_offset": hex(s.data_offset),
                "raw_size": hex(s.raw_size),
                "mem_base": hex(s.mem_base),
                "mem_size": hex(s.mem_size),
                "type": hex(s.type),
                "type_name": s.type_name,
                "attributes": hex(s.attributes),
                "mr_extend": s.mr_extend,
                "page_aug": s.page_aug,
            }
            for s in img.tdx_sections
        ]
        assert got == case["tdvf_sections"]
        assert O.require_tdx(img) is img


def test_sid_tdvf_sections() -> None:
    img = parsed("sid-OVMF.amdsev.fd")
    got = [
        (s.data_offset, s.raw_size, s.mem_base, s.mem_size, s.type, s.attributes) for s in img.tdx_sections
    ]
    assert got == SID_TDVF
    assert [s.mr_extend for s in img.tdx_sections] == [True] + [False] * 6
    assert not any(s.page_aug for s in img.tdx_sections)
    O.require_tdx(img)


def test_sev_sections_follow_sev_snp_measure_trace() -> None:
    """Every SNP case's trace lists one run per ASEV section, in table order (MEASUREMENT.md §5)."""
    run_type = {SEC_MEM: "ZERO", SECRETS: "SECRETS", CPUID: "CPUID", CAA: "ZERO"}
    for case in load_vectors("snp.json")["cases"]:
        if case["vmm_type"] != "QEMU":
            continue
        img = parsed(Path(case["firmware"]).name)
        trace = case["trace"]
        assert trace[0] == {**trace[0], "type": "NORMAL", "gpa": hex(img.gpa_base), "pages": img.size // 4096}
        runs = [(r["type"], int(r["gpa"], 16), r["pages"]) for r in trace[1:] if r["type"] != "VMSA"]
        expected = []
        for s in img.sev_sections:
            kind = ("NORMAL" if case["kernel"] else "ZERO") if s.type == HASHES else run_type[s.type]
            pages = s.size // 4096 if kind in ("ZERO", "NORMAL") else 1
            last = expected[-1] if expected else None
            if last and last[0] == kind == "ZERO" and last[1] + 4096 * last[2] == s.base:
                # the trace groups contiguous runs of one type (trixie: SVSM_CAA + SEC_MEM)
                expected[-1] = (kind, last[1], last[2] + pages)
            else:
                expected.append((kind, s.base, pages))
        assert runs == expected, case["id"]


@pytest.mark.parametrize("name", ["bookworm-OVMF.fd", "trixie-OVMF.fd", "sid-OVMF.amdsev.fd"])
def test_require_sev_and_tdx_accept_debian_images(name: str) -> None:
    img = parsed(name)
    assert O.require_sev(img) is img
    assert O.require_tdx(img) is img


def test_code_4m_has_no_sev_or_tdx_metadata() -> None:
    img = parsed("bookworm-OVMF_CODE_4M.fd")
    with pytest.raises(InputError) as exc:
        O.require_sev(img)
    assert str(exc.value) == (
        "firmware/bookworm-OVMF_CODE_4M.fd: no SEV metadata (ASEV table) in the OVMF footer table; "
        "this firmware cannot launch an SEV-SNP guest"
    )
    assert exc.value.source == "firmware/bookworm-OVMF_CODE_4M.fd"
    with pytest.raises(InputError) as exc:
        O.require_tdx(img)
    assert str(exc.value) == (
        "firmware/bookworm-OVMF_CODE_4M.fd: no TDX metadata (TDVF table) in the OVMF footer table; "
        "this firmware cannot launch a TDX guest"
    )


def test_memoryview_input_gives_same_result() -> None:
    data = fw("sid-OVMF.amdsev.fd")
    ref = parsed("sid-OVMF.amdsev.fd")
    assert O.parse_ovmf(memoryview(data), ref.name) == ref
    assert O.parse_ovmf(memoryview(bytearray(data)), ref.name) == ref
    assert O.parse_ovmf(bytearray(data), ref.name) == ref
    # a non-byte memoryview is read as bytes
    assert O.parse_ovmf(memoryview(data).cast("I"), ref.name) == ref
    assert hash(ref) == hash(O.parse_ovmf(data, ref.name))  # frozen and hashable


# --- kernel hashes -------------------------------------------------------------------------------


def _oracle_page(
    tmp_path: Path, kernel_path: Path, initrd: bytes | None, cmdline: str | None, offset: int
) -> bytes:
    from sevsnpmeasure.sev_hashes import SevHashes  # independent oracle (test only)

    initrd_path = None
    if initrd is not None:
        initrd_path = tmp_path / "initrd"
        initrd_path.write_bytes(initrd)
    return SevHashes(str(kernel_path), str(initrd_path) if initrd_path else None, cmdline).construct_page(
        offset
    )


@pytest.mark.parametrize(
    ("with_initrd", "cmdline"),
    [
        (False, "console=ttyS0 root=/dev/vda1"),
        (True, "console=ttyS0 root=/dev/vda1"),
        (True, None),
        (False, None),
        (False, "quiet \u00e9l\u00e8ve"),  # non-ASCII: UTF-8, as sev-snp-measure encodes it
    ],
)
def test_kernel_hashes_page_matches_sev_snp_measure(
    tmp_path: Path, with_initrd: bool, cmdline: str | None
) -> None:
    img = parsed("sid-OVMF.amdsev.fd")
    initrd = INITRD.read_bytes() if with_initrd else None
    page = O.kernel_hashes_page(img, memoryview(kernel()), initrd, cmdline)
    assert len(page) == 4096
    assert page == _oracle_page(tmp_path, KERNEL, initrd, cmdline, 0xC00)
    # the table sits at hash_table_base & 0xfff, everything else is zero
    assert page[:0xC00] == bytes(0xC00) and page[0xCB0:] == bytes(4096 - 0xCB0)
    assert page[0xC00:0xC10] == uuid.UUID(O.SEV_HASH_TABLE_HEADER_GUID).bytes_le
    assert page[0xC10:0xC12] == b"\xa8\x00"
    assert page[0xC00 + 0x76 + 18 : 0xC00 + 0x76 + 50] == hashlib.sha256(kernel()).digest()


def test_kernel_hashes_page_reproduces_snp_trace_step() -> None:
    """The NORMAL step at the SNP_KERNEL_HASHES GPA in snp.json, recomputed from our page."""
    for case in load_vectors("snp.json")["cases"]:
        if not case["kernel"]:
            continue
        img = parsed(Path(case["firmware"]).name)
        initrd = (SHARED / case["initrd"]).read_bytes() if case["initrd"] else None
        page = O.kernel_hashes_page(img, (SHARED / case["kernel"]).read_bytes(), initrd, case["append"])
        section = img.kernel_hashes_section
        assert section is not None
        steps = case["trace"]
        i = next(
            n for n, r in enumerate(steps) if r["type"] == "NORMAL" and int(r["gpa"], 16) == section.base
        )
        page_info = (
            bytes.fromhex(steps[i - 1]["ld_after"])
            + hashlib.sha384(page).digest()
            + struct.pack("<HBBBBBBQ", 0x70, 1, 0, 0, 0, 0, 0, section.base)
        )
        assert hashlib.sha384(page_info).hexdigest() == steps[i]["ld_after"], case["id"]


def test_kernel_hashes_table_reproduces_sev_mode_digest() -> None:
    """``--mode sev`` = SHA-256(OVMF ‖ padded hash table) (snp.json other_modes)."""
    (case,) = [m for m in load_vectors("snp.json")["other_modes"] if "--kernel" in m["argv"]]
    argv = case["argv"]
    firmware = SHARED / argv[argv.index("--ovmf") + 1]
    append = argv[argv.index("--append") + 1]
    table = O.kernel_hashes_table(kernel(), None, append)
    assert len(table) == 0xB0
    assert hashlib.sha256(firmware.read_bytes() + table).hexdigest() == case["expected_output"]


def test_empty_cmdline_equals_no_cmdline() -> None:
    assert O.kernel_hashes_table(b"k", None, "") == O.kernel_hashes_table(b"k", b"", None)
    assert O.kernel_hashes_table(b"k", None, "x") == O.kernel_hashes_table(b"k", None, b"x")


def test_cmdline_with_nul_is_refused() -> None:
    with pytest.raises(InputError, match="NUL"):
        O.kernel_hashes_table(b"k", None, "a\x00b")


@pytest.mark.parametrize("name", ["bookworm-OVMF.fd", "trixie-OVMF.fd", "bookworm-OVMF_CODE_4M.fd"])
def test_kernel_hashes_need_a_kernel_hashes_section(name: str) -> None:
    # snp.json expected_errors: sev-snp-measure refuses --kernel for these images too
    with pytest.raises(InputError, match=rf"^firmware/{name}: no SNP_KERNEL_HASHES section"):
        O.kernel_hashes_page(parsed(name), b"kernel", None, None)


# --- synthetic images: malformed and edge cases ----------------------------------------------------


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def make_image(
    entries: list[tuple[str, bytes]],
    tables: dict[int, bytes] | None = None,
    size: int = 0x2000,
    total_adjust: int = 0,
) -> bytearray:
    """An image with a footer table (``entries`` nearest-the-footer first) and ``tables``
    placed at the given offsets from the end."""
    img = bytearray(size)
    for off, blob in (tables or {}).items():
        img[size - off : size - off + len(blob)] = blob
    body = b"".join(_entry(g, d) for g, d in reversed(entries))
    end = size - 50
    img[end - len(body) : end] = body
    img[end : end + 2] = struct.pack("<H", len(body) + 18 + total_adjust)
    img[end + 2 : end + 18] = uuid.UUID(O.OVMF_TABLE_FOOTER_GUID).bytes_le
    return img


def _u32(*v: int) -> bytes:
    return struct.pack(f"<{len(v)}I", *v)


def asev(
    sections: list[tuple[int, int, int]], version: int = 1, sig: bytes = b"ASEV", length: int | None = None
) -> bytes:
    body = b"".join(_u32(*s) for s in sections)
    return (
        struct.pack("<4sIII", sig, length if length is not None else 16 + len(body), version, len(sections))
        + body
    )


def tdvf(sections: list[tuple[int, int, int, int, int, int]], guid: bool = True) -> bytes:
    body = b"".join(struct.pack("<IIQQII", *s) for s in sections)
    head = uuid.UUID(O.TDX_METADATA_TABLE_GUID).bytes_le if guid else bytes(16)
    return head + struct.pack("<4sIII", b"TDVF", 16 + len(body), 1, len(sections)) + body


def test_synthetic_image_round_trip() -> None:
    data = make_image(
        [
            (O.SEV_ES_RESET_BLOCK_GUID, _u32(0x80B004)),
            (O.SEV_HASH_TABLE_GUID, _u32(0x810C00, 0x400)),
            (O.SEV_METADATA_GUID, _u32(0x400)),
            (O.TDX_METADATA_GUID, _u32(0x300)),
            ("12345678-1234-1234-1234-123456789abc", b"xyz"),
            (O.SEV_ES_RESET_BLOCK_GUID, _u32(0xDEAD)),  # duplicate: first one wins
        ],
        {0x400: asev([(0x800000, 0x1000, 1), (0x810000, 0x1000, 0x10), (0, 0, 4)]), 0x310: tdvf([])},
    )
    img = O.parse_ovmf(data, "synthetic.fd")
    assert img.gpa_base == (1 << 32) - 0x2000
    assert img.sev_es_reset_eip == 0x80B004
    assert img.footer_table["12345678-1234-1234-1234-123456789abc"] == b"xyz"
    assert len(img.footer_entries) == 5
    assert img.sev_secret is None
    assert img.sev_metadata_offset == 0x2000 - 0x400
    assert img.tdx_metadata_offset == 0x2000 - 0x300
    assert img.tdx_sections == ()
    assert img.kernel_hashes_section == O.SevSection(0x810000, 0x1000, HASHES)
    O.require_sev(img)  # zero-size sections are accepted
    with pytest.raises(InputError, match="no BFV section"):
        O.require_tdx(img)
    page = O.kernel_hashes_page(img, b"kernel", None, None)
    assert page[0xC00:0xCB0] == O.kernel_hashes_table(b"kernel", None, None)


def _footer(*extra: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    return [(O.SEV_ES_RESET_BLOCK_GUID, _u32(0x80B004)), *extra]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image is empty"),
        (bytes(4095), "not a multiple of 4 KiB"),
        (bytes(4096), "no OVMF footer GUID table"),
        (b"\xff" * 8192, "no OVMF footer GUID table"),
        (make_image(_footer(), total_adjust=-30), "footer table length 10 is invalid"),
        (make_image(_footer(), total_adjust=0x4000), "footer table length .* is invalid"),
        (make_image(_footer(), total_adjust=5), "5 stray bytes"),
        (make_image([(O.SEV_ES_RESET_BLOCK_GUID, b"\x04\xb0")]), "SEV-ES reset block .* 2 data bytes"),
        (
            make_image([(O.SEV_HASH_TABLE_GUID, _u32(1))]),
            "SEV hash table .* 4 data bytes, expected at least 8",
        ),
        (make_image(_footer((O.SEV_METADATA_GUID, _u32(0x3000)))), "SEV metadata .* points outside"),
        (make_image(_footer((O.SEV_METADATA_GUID, _u32(0)))), "SEV metadata .* points outside"),
        (make_image(_footer((O.SEV_METADATA_GUID, _u32(8))), {8: b"ASEV"}), "points outside"),
        (
            make_image(_footer((O.SEV_METADATA_GUID, _u32(0x400))), {0x400: asev([], sig=b"ASEW")}),
            "signature",
        ),
        (make_image(_footer((O.SEV_METADATA_GUID, _u32(0x400))), {0x400: asev([], version=2)}), "version 2"),
        (
            make_image(
                _footer((O.SEV_METADATA_GUID, _u32(0x400))), {0x400: asev([(0, 0, 1)] * 3, length=20)}
            ),
            "too small for 3 entries",
        ),
        (
            make_image(_footer((O.SEV_METADATA_GUID, _u32(0x400))), {0x400: asev([], length=0x500)}),
            "runs past the end",
        ),
        (
            make_image(
                _footer((O.SEV_METADATA_GUID, _u32(0x400))),
                {0x400: struct.pack("<4sIII", b"ASEV", 16, 1, 0xFFFFFFFF)},
            ),
            "too small",
        ),
        (make_image(_footer((O.TDX_METADATA_GUID, _u32(0x300))), {0x310: tdvf([], guid=False)}), "e9eaf9f3"),
        (make_image(_footer((O.IGVM_METADATA_GUID, _u32(0x300))), {0x300: asev([])}), "expected b'IGVM'"),
    ],
)
def test_malformed_images_raise_input_error(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as exc:
        O.parse_ovmf(data, "bad.fd")
    assert str(exc.value).startswith("bad.fd")
    assert "\n" not in str(exc.value)


def test_truncated_real_image() -> None:
    data = fw("bookworm-OVMF.fd")
    for cut in (1, 32, 48, 4096, len(data) - 4096):
        with pytest.raises(InputError, match="bookworm"):
            O.parse_ovmf(memoryview(data)[: len(data) - cut], "bookworm-OVMF.fd")


def test_require_sev_rejects_unusable_sections() -> None:
    def img(sections: list[tuple[int, int, int]], reset: bool = True) -> O.OvmfImage:
        entries = [(O.SEV_METADATA_GUID, _u32(0x400))] + (_footer() if reset else [])
        return O.parse_ovmf(make_image(entries, {0x400: asev(sections)}), "x.fd")

    unknown = img([(0x800000, 0x1000, 5)])
    assert unknown.sev_sections[0].type == 5 and unknown.sev_sections[0].type_name == "UNKNOWN(0x5)"
    with pytest.raises(InputError, match="unknown type 0x5"):
        O.require_sev(unknown)
    with pytest.raises(InputError, match="not 4 KiB aligned"):
        O.require_sev(img([(0x800800, 0x1000, 1)]))
    with pytest.raises(InputError, match="above 4 GiB"):
        O.require_sev(img([(0xFFFFF000, 0x2000, 1)]))
    with pytest.raises(InputError, match="no SEV-ES reset block"):
        O.require_sev(img([], reset=False))


def test_require_tdx_rejects_split_code_layout() -> None:
    # TDVF data offsets refer to the unified image; here they point past this image's end.
    sections = [(0x84000, 0x37C000, 0xFFC84000, 0x37C000, 0, 1)]
    entries = _footer((O.TDX_METADATA_GUID, _u32(0x300)))
    img = O.parse_ovmf(make_image(entries, {0x310: tdvf(sections)}), "OVMF_CODE.fd")
    assert img.tdx_sections[0].mr_extend
    with pytest.raises(InputError, match=r"^OVMF_CODE\.fd: TDVF section 0 \(BFV\) .*outside.*unified"):
        O.require_tdx(img)
    unaligned = [(0, 0x1000, 0xFFFFE000, 0x1000, 0, 1), (0, 0, 0x800100, 0x1000, 3, 0)]
    img = O.parse_ovmf(make_image(entries, {0x310: tdvf(unaligned)}), "x.fd")
    with pytest.raises(InputError, match=r"section 1 \(TEMP_MEM\).*not 4 KiB aligned"):
        O.require_tdx(img)
    short = [(0, 0x1000, 0xFFFFE000, 0x2000, 0, 1)]
    img = O.parse_ovmf(make_image(entries, {0x310: tdvf(short)}), "x.fd")
    with pytest.raises(InputError, match=r"MR\.EXTEND"):
        O.require_tdx(img)


@pytest.mark.parametrize(
    ("hash_table", "sections", "message"),
    [
        (None, [(0x810000, 0x1000, 0x10)], "no SEV hash table"),
        ((0x810C00, 0x80), [(0x810000, 0x1000, 0x10)], "smaller than"),
        ((0x810C00, 0x400), [(0x810000, 0x2000, 0x10)], "not exactly one 4 KiB page"),
        ((0x811C00, 0x400), [(0x810000, 0x1000, 0x10)], "does not lie inside"),
        ((0x810F80, 0x400), [(0x810000, 0x1000, 0x10)], "does not lie inside"),
        ((0x810C00, 0x400), [(0x810000, 0, 0x10)], "no SNP_KERNEL_HASHES"),
    ],
)
def test_kernel_hashes_page_inconsistent_metadata(
    hash_table: tuple[int, int] | None, sections: list, message: str
) -> None:
    entries = _footer((O.SEV_METADATA_GUID, _u32(0x400)))
    if hash_table is not None:
        entries.append((O.SEV_HASH_TABLE_GUID, _u32(*hash_table)))
    img = O.parse_ovmf(make_image(entries, {0x400: asev(sections)}), "x.fd")
    with pytest.raises(InputError, match=message):
        O.kernel_hashes_page(img, b"k", None, None)


# --- fuzzing: anything malformed is an InputError, never struct.error / IndexError ---------------

_SID_TAIL = fw("sid-OVMF.amdsev.fd")[-4096:]


def test_sid_tail_alone_parses_like_sid() -> None:
    """All sid tables sit in the last 4 KiB (offsets are from the end), so the fuzz base is rich."""
    tail = O.parse_ovmf(_SID_TAIL, "tail")
    full = parsed("sid-OVMF.amdsev.fd")
    assert tail.sev_sections == full.sev_sections
    assert tail.tdx_sections == full.tdx_sections
    assert tail.igvm_entries == full.igvm_entries
    assert tail.footer_entries == full.footer_entries


def _exercise(data: bytes) -> None:
    try:
        img = O.parse_ovmf(data, "fuzz.fd")
    except InputError as exc:
        assert str(exc).startswith("fuzz.fd")
        return
    for check in (O.require_sev, O.require_tdx, lambda i: O.kernel_hashes_page(i, b"k", b"i", "c")):
        try:
            check(img)
        except InputError as exc:
            assert str(exc).startswith("fuzz.fd")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(4096 - 0xB00, 4095), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_tables(mutations: list[tuple[int, int]]) -> None:
    data = bytearray(_SID_TAIL)
    for index, value in mutations:
        data[index] = value
    _exercise(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 3))
def test_fuzz_garbage_and_truncation(garbage: bytes, pages: int) -> None:
    _exercise(garbage)
    _exercise(bytes(4096 * pages - len(garbage) % 4096 if pages else 0) + garbage)
    _exercise(_SID_TAIL[len(garbage) :])


@given(st.binary(min_size=16, max_size=16))
@settings(max_examples=300, deadline=None)
def test_guid_conversions_agree_with_uuid(raw: bytes) -> None:
    """The module's own EFI_GUID conversions (it does not import uuid) give what uuid gives:
    on-disk bytes to the canonical string and back, for any 16 bytes."""
    text = O._guid_str(raw)
    assert text == str(uuid.UUID(bytes_le=raw))
    assert O._guid_bytes(text) == raw == uuid.UUID(text).bytes_le


def test_guid_constants_convert_as_uuid_does() -> None:
    constants = {k: v for k, v in vars(O).items() if k.endswith("_GUID") and isinstance(v, str)}
    assert len(constants) >= 12
    for name, guid in constants.items():
        assert O._guid_bytes(guid) == uuid.UUID(guid).bytes_le, name
        assert O._guid_str(uuid.UUID(guid).bytes_le) == guid, name
