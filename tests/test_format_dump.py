"""``igvm_builder.format.dump``: the JSON schema (docs/DUMP_SCHEMA.md) and the text listing.

Field-by-field agreement with the reference crate is in ``test_format_vectors.py``; here: every
header kind (including those no vector has: CCA, AArch64 VBS, page-table relocation, CoRIM,
ERROR_RANGE), TLV offsets under a platform filter, and random models.
"""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from test_format_property import models

from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H
from igvm_builder.format.dump import (
    SCHEMA_VERSION,
    decode_native_context,
    dump_json,
    dump_text,
    iter_dump_json,
    iter_dump_text,
)

PT = D.PlatformType


def _every_kind_x64() -> IgvmFile:
    snp = H.SupportedPlatform(compatibility_mask=1, platform_type=PT.SEV_SNP, shared_gpa_boundary=1 << 46)
    tdx = H.SupportedPlatform(compatibility_mask=2, platform_type=PT.TDX)
    vbs = H.SupportedPlatform(compatibility_mask=4, platform_type=PT.VSM_ISOLATION, highest_vtl=2)
    native = H.SupportedPlatform(compatibility_mask=8, platform_type=PT.NATIVE)
    vmsa = bytearray(4096)
    struct.pack_into("<Q", vmsa, 376, 0xFFF0)  # rip
    struct.pack_into("<Q", vmsa, 944, 0x1 | 0x4)  # sev_features snp|reflect_vc
    native_ctx = bytearray(232)
    struct.pack_into("<Q", native_ctx, 128, 0x1000)  # rip
    struct.pack_into("<H", native_ctx, 168, 8)  # code_selector
    regs = (
        H.VbsRegister(name=0x20010, value=(0x200000).to_bytes(16, "little")),
        H.VbsRegister(name=0x60001, value=struct.pack("<QIHH", 0, 0xFFFFFFFF, 8, 0xA09B)),
        H.VbsRegister(name=0x70001, value=struct.pack("<4HQ", 0, 0, 0, 0x17, 0x206000)),
        H.VbsRegister(name=0x8000E, value=(6).to_bytes(16, "little")),
    )
    return IgvmFile(
        revision=1,
        platforms=(snp, tdx, vbs, native),
        initializations=(
            H.GuestPolicy(policy=0x30000, compatibility_mask=1),
            H.GuestPolicy(policy=0x2, compatibility_mask=2),
            H.RelocatableRegion(compatibility_mask=4, vtl=2, flags=7, relocation_alignment=0x200000,
                                relocation_region_gpa=0x200000, relocation_region_size=0x200000,
                                minimum_relocation_gpa=0x200000, maximum_relocation_gpa=0x40000000),
            H.PageTableRelocation(compatibility_mask=4, vtl=2, gpa=0x800000, size=0x4000, used_size=0x1000),
            H.CorimDocument(compatibility_mask=1, data=b"cbor"),
            H.CorimSignature(compatibility_mask=1, data=b"cose"),
        ),
        directives=(
            H.PageData(gpa=0x0, compatibility_mask=0xF, data=b"all"),
            H.PageData(gpa=0x1000, compatibility_mask=1, flags=2, data_type=D.PageDataType.SECRETS),
            H.PageData(gpa=0x2000, compatibility_mask=2, data=b"tdx only"),
            H.PageData(gpa=0x3000, compatibility_mask=4, data=b"all"),
            H.ParameterArea(number_of_bytes=0x1000, parameter_area_index=0, initial_data=b"console=ttyS0\0"),
            H.CommandLine(parameter_area_index=0),
            H.MemoryMap(parameter_area_index=0, byte_offset=0x100),
            H.ParameterInsert(gpa=0x10000, compatibility_mask=0xF, parameter_area_index=0),
            H.RequiredMemory(gpa=0x100000, compatibility_mask=0xF, number_of_bytes=0x200000, flags=1),
            H.ErrorRange(gpa=0x203000, compatibility_mask=4, size_bytes=0x1000),
            H.SnpVpContext(gpa=0xFFFFF000, compatibility_mask=1, vmsa=bytes(vmsa)),
            H.NativeVpContext(compatibility_mask=8, context=bytes(native_ctx)),
            H.VbsVpContext(compatibility_mask=4, vtl=2, registers=regs),
            H.SnpIdBlock(compatibility_mask=1, ld=bytes(48), guest_svn=3,
                         id_public_key=struct.pack("<II", 2, 0) + bytes(144)),
            H.VbsMeasurement(compatibility_mask=4, product_id=2, boot_measurement_digest=b"\x5a" * 64),
        ),
    )


def _by_kind(doc: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in doc["headers"]:
        out.setdefault(e["kind"], []).append(e)
    return out


def test_every_x64_kind() -> None:
    data = _every_kind_x64().to_bytes()
    f = IgvmFile.from_bytes(data)
    doc = dump_json(f, source_bytes=data)
    json.dumps(doc)  # serializable
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    kinds = _by_kind(doc)
    assert set(kinds) == {
        "SupportedPlatform", "GuestPolicy", "RelocatableRegion", "PageTableRelocationRegion", "CorimDocument",
        "CorimSignature", "PageData", "ParameterArea", "CommandLine", "MemoryMap", "ParameterInsert",
        "RequiredMemory", "ErrorRange", "SnpVpContext", "X64NativeVpContext", "X64VbsVpContext", "SnpIdBlock",
        "VbsMeasurement",
    }
    snp_policy, tdx_policy = kinds["GuestPolicy"]
    assert snp_policy["policy_decoded"]["smt"] is True and snp_policy["policy_decoded"]["format"] == "snp"
    assert tdx_policy["policy_decoded"] == {"format": "tdx", "debug_allowed": False, "sept_ve_disable": True,
                                            "migratable": False, "reserved": "0x0"}
    assert kinds["PageData"][0]["mask_platforms"] == ["SEV_SNP", "TDX", "VSM_ISOLATION", "NATIVE"]
    secrets = kinds["PageData"][1]
    assert (secrets["data_type_name"], secrets["unmeasured"], secrets["data_len"]) == ("SECRETS", True, 0)
    assert secrets["file_offset"] == "0x0"
    assert kinds["PageData"][0]["file_offset"] == kinds["PageData"][3]["file_offset"] != "0x0"  # deduplicated
    snp = kinds["SnpVpContext"][0]
    assert snp["vmsa"]["rip"] == "0xfff0"
    assert snp["sev_features_decoded"]["snp"] and snp["sev_features_decoded"]["reflect_vc"]
    assert not snp["sev_features_decoded"]["vtom"]
    native = kinds["X64NativeVpContext"][0]
    assert (native["context"]["rip"], native["context"]["code_selector"], native["context_len"]) == ("0x1000", "0x8", 232)
    vbs = kinds["X64VbsVpContext"][0]
    assert [r["name"] for r in vbs["registers"]] == ["Rip", "Cs", "Gdtr", "MsrMtrrDefType"]
    assert vbs["registers"][1]["segment"] == {"base": "0x0", "limit": "0xffffffff", "selector": "0x8",
                                              "attributes": "0xa09b"}
    assert vbs["registers"][2]["table"] == {"base": "0x206000", "limit": "0x17"}
    assert kinds["SnpIdBlock"][0]["id_public_key"]["curve"] == 2
    assert kinds["ErrorRange"][0]["size_bytes"] == "0x1000"
    assert kinds["RequiredMemory"][0]["vtl2_protectable"] is True
    assert kinds["CorimDocument"][0]["data_len"] == 4
    assert doc["counts"]["pages_with_data"] == 3 and doc["counts"]["pages_without_data"] == 1

    text = dump_text(f, source_bytes=data)
    lines = text.splitlines()
    assert sum(1 for ln in lines if ln.startswith("[")) == len(f.headers)
    for word in ("Rip", "Cs", "Gdtr", "MsrMtrrDefType", "rip=0xfff0", "code_selector=0x8", "flags=unmeasured",
                 "type=SECRETS", "ERROR_RANGE", "CORIM_SIGNATURE", "PAGE_TABLE_RELOCATION_REGION"):
        assert word in text, word


def test_platform_filter_keeps_tlv_offsets() -> None:
    data = _every_kind_x64().to_bytes()
    full = dump_json(IgvmFile.from_bytes(data), source_bytes=data)
    offsets = {e["tlv"]["offset"]: e for e in full["headers"]}
    for ptype in (PT.SEV_SNP, PT.TDX, PT.VSM_ISOLATION, PT.NATIVE):
        f = IgvmFile.from_bytes(data, platform=ptype)
        doc = dump_json(f, source_bytes=data, platform=ptype)
        assert doc["platform_filter"] == ptype.name
        assert len(doc["headers"]) < len(full["headers"])
        for e in doc["headers"]:
            assert "tlv" in e, e
            ref = offsets[e["tlv"]["offset"]]
            assert {k: v for k, v in ref.items() if k != "index"} == {k: v for k, v in e.items() if k != "index"}


def test_aarch64_kinds() -> None:
    vbs = H.SupportedPlatform(compatibility_mask=1, platform_type=PT.VSM_ISOLATION)
    cca = H.SupportedPlatform(compatibility_mask=2, platform_type=PT.CCA)
    context = struct.pack("<10Q", 1, 2, 3, 4, 5, 6, 7, 8, 0x80000000, 0)
    f = IgvmFile(
        revision=2, architecture=D.Architecture.AARCH64, platforms=(vbs, cca),
        initializations=(H.CcaPolicy(compatibility_mask=2, attributes_required_ones=1, hash_algorithm=2),),
        directives=(
            H.VbsVpContext(compatibility_mask=1, vtl=0, registers=(
                H.VbsRegister(name=0x20022, value=(0x1234).to_bytes(16, "little")),
                H.VbsRegister(name=0x20000, value=(0x42).to_bytes(16, "little")))),
            H.CcaVpContext(compatibility_mask=2, context=context),
        ),
    )
    data = f.to_bytes()
    doc = dump_json(IgvmFile.from_bytes(data), source_bytes=data)
    kinds = _by_kind(doc)
    assert doc["file"]["architecture"] == "AARCH64"
    assert doc["file"]["fixed_header"]["architecture"] == 1
    regs = kinds["AArch64VbsVpContext"][0]["registers"]
    assert [(r["name"], r["value"]) for r in regs] == [("XPc", "0x1234"), ("X0", "0x42")]
    ctx = kinds["AArch64CcaVpContext"][0]
    assert ctx["context"]["pc"] == "0x80000000" and ctx["context"]["x7"] == "0x8"
    policy = kinds["CcaPolicy"][0]
    assert policy["hash_algorithm_name"] == "SHA384"
    assert policy["attributes_required_ones_decoded"] == {"debug": True, "mec": False}
    assert "XPc" in dump_text(IgvmFile.from_bytes(data))


def test_dump_without_bytes_and_of_built_model() -> None:
    f = _every_kind_x64()
    doc = dump_json(f)
    assert "size" not in doc["file"] and "fixed_header" not in doc["file"]
    assert all("tlv" not in e and "file_offset" not in e for e in doc["headers"])
    parsed = IgvmFile.from_bytes(f.to_bytes())
    # Data is described as the parser returns it, so model and parsed file dump the same.
    assert dump_json(parsed)["headers"] == doc["headers"]
    assert dump_text(parsed) == dump_text(f)


def test_decode_native_context_covers_every_byte() -> None:
    ctx = bytes(range(232))
    fields = decode_native_context(ctx)
    assert len(fields) == 37
    assert fields["rax"] == int.from_bytes(ctx[0:8], "little")
    assert fields["efer"] == int.from_bytes(ctx[224:232], "little")
    assert fields["reserved1"] == int.from_bytes(ctx[156:158], "little")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_dump_random_models(f: IgvmFile) -> None:
    data = f.to_bytes()
    parsed = IgvmFile.from_bytes(data)
    doc = json.loads(json.dumps(dump_json(parsed, source_bytes=data), sort_keys=True))
    assert len(doc["headers"]) == len(parsed.headers) == doc["counts"]["total"]
    voff, vsize = struct.unpack_from("<II", data, 8)
    pos = voff
    for e, h in zip(doc["headers"], parsed.headers, strict=True):
        assert e["tlv"] == {"offset": pos, "length": h.SIZE}
        assert int(e["type_id"], 16) == struct.unpack_from("<I", data, pos)[0]
        pos += 8 + (h.SIZE + 7) // 8 * 8
    assert pos == voff + vsize
    text = dump_text(parsed, source_bytes=data)
    assert sum(1 for ln in text.splitlines() if ln.startswith("[")) == len(parsed.headers)
    _assert_streams_whole(parsed, data, None)


def _assert_streams_whole(f: IgvmFile, data: bytes | None, platform: PT | None) -> None:
    """The CLI's streamed text is json.dumps of the whole document, byte for byte."""
    whole = json.dumps(dump_json(f, source_bytes=data, platform=platform), indent=2, sort_keys=True)
    assert "".join(iter_dump_json(f, source_bytes=data, platform=platform)) == whole
    lines = list(iter_dump_text(f, source_bytes=data, platform=platform))
    assert all(ln.endswith("\n") for ln in lines) and "".join(lines) == dump_text(f, source_bytes=data,
                                                                                   platform=platform)
    assert sum(1 for ln in lines if ln.startswith("[")) == len(f.headers)


def test_streamed_dumps_equal_the_whole_document() -> None:
    f = _every_kind_x64()
    data = f.to_bytes()
    _assert_streams_whole(f, None, None)
    _assert_streams_whole(IgvmFile.from_bytes(data), data, None)
    for ptype in (PT.SEV_SNP, PT.TDX, PT.VSM_ISOLATION, PT.NATIVE):
        _assert_streams_whole(IgvmFile.from_bytes(data, platform=ptype), data, ptype)
    # a warning whose text looks like the key the streamed JSON is spliced at
    odd = IgvmFile.from_bytes(data)
    object.__setattr__(odd, "warnings", ('\n  "headers": [] <- not the key',))
    _assert_streams_whole(odd, data, None)


def test_file_sha256_of_a_mapped_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import mmap
    import random

    from igvm_builder.format.blob import sha256_released

    path = tmp_path / "big.bin"
    path.write_bytes(random.Random(9).randbytes((20 << 20) + 123))  # windows of 8 MiB, a short last one
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m).cast("B")
        assert sha256_released(view) == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sha256_released(view, stop=lambda: True) is None  # a cancelled hash gives no digest
        view.release()
