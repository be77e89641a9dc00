"""The positive IGVM reference vectors: parse, decode field by field, re-serialize byte-identically.

Expectations come from ``shared/vectors/igvm/*.parse.txt`` (the reference crate's view of each
file, format in ``shared/vectors/igvm/README.md``); raw TLV offsets are recomputed here by
walking the records independently of the library.  Measured digests are tested elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format import FileSlice, IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.dump import dump_json

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "vectors" / "igvm"
REJECTED = "native_v1_nodata_REJECTED"
POSITIVE = sorted(p.stem for p in VECTORS.glob("*.igvm") if p.stem != REJECTED)

if len(POSITIVE) < 6:  # a hard requirement, not a skip (STYLE.md pitfall 13)
    raise RuntimeError(f"expected the reference vectors in {VECTORS}")

SECTION = {"platform": "platform", "init": "initialization", "directive": "directive"}


# --------------------------------------------------------------------------- helpers


def parse_reference(name: str) -> dict[str, Any]:
    """Split a ``.parse.txt`` into its parts (README "Format of the .parse.txt dumps")."""
    ref: dict[str, Any] = {"raw": [], "decoded": [], "errors": []}
    for line in (VECTORS / f"{name}.parse.txt").read_text().splitlines():
        if line.startswith("raw "):
            ref["raw"].append(json.loads(line[4:]))
        elif line.startswith(("platform ", "init ", "directive ")):
            section, _, obj = line.partition(" ")
            ref["decoded"].append((SECTION[section], json.loads(obj)))
        elif line.startswith("{"):
            obj = json.loads(line)
            if "file_len" in obj:
                ref["file"] = obj
            elif obj.get("kind") == "FixedHeader":
                ref["fixed"] = obj
            elif "counts" in obj:
                ref["counts"] = obj["counts"]
            else:
                raise AssertionError(f"unexpected line in {name}.parse.txt: {line}")
        else:
            ref["errors"].append(line)
    return ref


def walk_tlvs(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of every TLV record, computed without the library."""
    voff, vsize = struct.unpack_from("<II", data, 8)
    out = []
    pos = voff
    while pos < voff + vsize:
        typ, length = struct.unpack_from("<II", data, pos)
        out.append((pos, typ, length))
        pos += 8 + (length + 7) // 8 * 8
    assert pos == voff + vsize
    return out


def as_int(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("0x"):
        return int(value, 16)
    return value


def same(mine: Any, ref: Any) -> bool:
    if isinstance(ref, bool) or isinstance(mine, bool):
        return mine is ref
    return as_int(mine) == as_int(ref)


_RUST_REG = re.compile(r"^(\w+)\((.*)\)$")
_RUST_STRUCT = re.compile(r"^(\w+) \{ (.*) \}$")
#: Rust X86Register / AArch64Register variant -> Hyper-V register name used by the dump.
_RUST_TO_HV = {"Pc": "XPc"}


def rust_struct_fields(text: str) -> dict[str, Any]:
    m = _RUST_STRUCT.match(text)
    assert m, text
    out: dict[str, Any] = {}
    for part in re.split(r", (?=\w+: )", m.group(2)):
        key, _, value = part.partition(": ")
        out[key] = [int(v) for v in value.strip("[]").split(", ")] if value.startswith("[") else int(value)
    return out


def check_vbs_register(mine: dict[str, Any], ref: dict[str, Any], vtl: int) -> None:
    assert ref["vtl"] == vtl
    assert int(mine["number"], 16) == int(ref["name"], 16)
    assert mine["value_hex"] == ref["value_hex"]
    m = _RUST_REG.match(ref["reg"])
    assert m, ref["reg"]
    variant, inner = m.groups()
    expected_name = _RUST_TO_HV.get(variant, variant)
    if variant.startswith("Mtrr"):
        expected_name = "Msr" + variant
    assert mine["name"] == expected_name
    if inner.startswith("SegmentRegister"):
        seg = rust_struct_fields(inner)
        assert mine["kind"] == "segment"
        assert {k: int(v, 16) for k, v in mine["segment"].items()} == seg
    elif inner.startswith("TableRegister"):
        assert mine["kind"] == "table"
        assert {k: int(v, 16) for k, v in mine["table"].items()} == rust_struct_fields(inner)
    else:
        assert mine["kind"] == "integer"
        assert int(mine["value"], 16) == int(inner)


def lookup(mine: dict[str, Any], key: str) -> Any:
    """The dump value that corresponds to a ``.parse.txt`` key."""
    if key in mine:
        return mine[key]
    head, dot, rest = key.partition(".")
    if dot and head in mine:  # vmsa.cs.selector, id_public_key.curve
        return mine[head][rest]
    for suffix, sub in (("_len", "len"), ("_sha256", "sha256")):
        base = key.removesuffix(suffix)
        if key.endswith(suffix) and isinstance(mine.get(base), dict):
            return mine[base][sub]
    raise KeyError(key)


def check_decoded(mine: dict[str, Any], ref: dict[str, Any]) -> None:
    """Compare one header of the dump with the reference line, key by key."""
    assert mine["kind"] == ref["kind"]
    for key, value in ref.items():
        if key == "kind":
            continue
        if key in ("data_hex", "initial_data_hex"):  # only present for empty data
            assert value == ""
            assert mine[key.replace("_hex", "_len")] == 0
        elif key == "context_debug":
            fields = rust_struct_fields(value)
            reserved = fields.pop("reserved")
            fields["reserved0"], fields["reserved1"] = reserved
            assert {k: int(v, 16) for k, v in mine["context"].items()} == fields
        elif key == "registers":
            assert len(mine["registers"]) == len(value)
            for m_reg, r_reg in zip(mine["registers"], value, strict=True):
                check_vbs_register(m_reg, r_reg, ref["vtl"])
        else:
            got = lookup(mine, key)
            assert same(got, value), f"{ref['kind']}.{key}: dump has {got!r}, reference {value!r}"


def check_model(h: H.Header, ref: dict[str, Any]) -> None:
    """The model attributes that share a name with a reference key hold the same value."""
    for key, value in ref.items():
        attr = getattr(h, key, None)
        if isinstance(value, int | str) and not isinstance(value, bool) and isinstance(attr, int):
            assert int(attr) == as_int(value), f"{type(h).__name__}.{key}"
    if isinstance(h, H.PageData):
        blob = h.blob() or b""
        assert len(blob) == ref["data_len"]
        assert hashlib.sha256(bytes(blob)).hexdigest() == ref["data_sha256"]
    if isinstance(h, H.SnpVpContext):
        assert hashlib.sha256(bytes(h.blob())).hexdigest() == ref["vmsa_sha256"]
    if isinstance(h, H.NativeVpContext):
        assert hashlib.sha256(h.context).hexdigest() == ref["context_sha256"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=POSITIVE)
def vector(request: pytest.FixtureRequest) -> tuple[str, bytes, IgvmFile, dict[str, Any], dict[str, Any]]:
    name = request.param
    data = (VECTORS / f"{name}.igvm").read_bytes()
    f = IgvmFile.from_bytes(data, source=name)
    return name, data, f, parse_reference(name), dump_json(f, source_bytes=data)


# --------------------------------------------------------------------------- tests


def test_every_vector_has_a_reference_dump() -> None:
    for path in VECTORS.glob("*.igvm"):
        assert (VECTORS / f"{path.stem}.parse.txt").is_file()


def test_rejected_vector_is_rejected() -> None:
    ref = parse_reference(REJECTED)
    assert "exit=1" in ref["errors"]
    assert "error: invalid fixed header" in ref["errors"]
    data = (VECTORS / f"{REJECTED}.igvm").read_bytes()
    with pytest.raises(IgvmFormatError) as info:
        IgvmFile.from_bytes(data)
    assert info.value.offset is not None
    with pytest.raises(IgvmFormatError, match=REJECTED):
        IgvmFile.load(VECTORS / f"{REJECTED}.igvm")


def test_file_info(vector) -> None:
    _name, data, f, ref, doc = vector
    assert ref["file"] == {"file_len": len(data), "file_sha256": hashlib.sha256(data).hexdigest()}
    assert doc["file"]["size"] == ref["file"]["file_len"]
    assert doc["file"]["sha256"] == ref["file"]["file_sha256"]
    fixed = dict(ref["fixed"])
    del fixed["kind"]
    mine = doc["file"]["fixed_header"]
    assert mine.keys() == fixed.keys()
    for key, value in fixed.items():
        assert same(mine[key], value), key
    assert f.revision == ref["fixed"]["format_version"]
    assert int(f.architecture) == ref["fixed"].get("architecture", 0)


def test_raw_tlvs(vector) -> None:
    _name, data, _f, ref, doc = vector
    walked = [{"offset": o, "type": f"{t:#x}", "length": n} for o, t, n in walk_tlvs(data)]
    assert walked == ref["raw"]
    assert [{"offset": e["tlv"]["offset"], "type": e["type_id"], "length": e["tlv"]["length"]}
            for e in doc["headers"]] == ref["raw"]


def test_sections_and_kinds(vector) -> None:
    _name, _data, f, ref, doc = vector
    assert [(e["section"], e["kind"]) for e in doc["headers"]] == [(s, o["kind"]) for s, o in ref["decoded"]]
    assert [e["index"] for e in doc["headers"]] == list(range(len(ref["decoded"])))
    assert len(f.platforms) == sum(1 for s, _ in ref["decoded"] if s == "platform")


def test_decoded_fields(vector) -> None:
    _name, _data, f, ref, doc = vector
    for h, mine, (_section, obj) in zip(f.headers, doc["headers"], ref["decoded"], strict=True):
        check_decoded(mine, obj)
        check_model(h, obj)


def test_counts(vector) -> None:
    _name, _data, f, ref, doc = vector
    counts = {"platform": len(f.platforms), "initialization": len(f.initializations),
              "directive": len(f.directives)}
    assert counts == ref["counts"]
    assert {k: doc["counts"][k] for k in counts} == ref["counts"]


def test_reserialize_identical(vector, tmp_path: Path) -> None:
    name, data, f, _ref, _doc = vector
    assert f.to_bytes() == data
    sink = io.BytesIO()
    assert f.write(sink) == len(data)
    assert sink.getvalue() == data
    assert b"".join(bytes(c) for c in f.iter_chunks()) == data
    path = tmp_path / f"{name}.igvm"
    path.write_bytes(data)
    loaded = IgvmFile.load(path)
    assert loaded == f
    assert loaded.to_bytes() == data
    pages = [h for h in loaded.directives if isinstance(h, H.PageData) and len(h.data)]
    assert all(isinstance(h.data, FileSlice) for h in pages)  # zero-copy windows into the mmap
    rebuilt = IgvmFile(revision=f.revision, architecture=f.architecture, platforms=f.platforms,
                       initializations=f.initializations, directives=f.directives)
    assert rebuilt.to_bytes() == data


def test_dedup_offsets_match_reference(vector) -> None:
    """Identical blobs share one file offset (the crate's dedup), others get their own."""
    _name, data, f, _ref, doc = vector
    seen: dict[bytes, int] = {}
    for h, e in zip(f.headers, doc["headers"], strict=True):
        blob = h.blob()
        if blob is None:
            if "file_offset" in e:
                assert e["file_offset"] == "0x0"
            continue
        offset = int(e["file_offset"], 16)
        key = bytes(blob)
        assert data[offset : offset + len(key)] == key
        if key in seen:
            assert offset == seen[key]
        else:
            assert offset not in seen.values()
            seen[key] = offset
