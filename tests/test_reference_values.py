"""ReferenceValues: the typed, frozen reference values round-trip the published documents.

Documents come from real runs (build --reference-values, sign --reference-values of the
kernel project), so the type is checked against what the tools publish, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cli_release import make_release, run

from igvm_builder.errors import VerificationError
from igvm_builder.reference import SCHEMA_VERSION, ReferenceValues


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = make_release(tmp_path_factory.mktemp("release"))
    signed_refs = paths["ref"].parent / "signed.json"
    rc, _, err = run("sign", paths["igvm"], "-o", paths["ref"].parent / "s2.igvm", "--id-key", paths["key"],
                     "--config", paths["config"], "--reference", paths["ref"], "--reference-values", signed_refs, "-q")
    assert rc == 0, err
    paths["signed_ref"] = signed_refs
    return paths


def test_published_documents_round_trip_byte_for_byte(release: dict[str, Path]) -> None:
    for key in ("ref", "signed_ref"):
        text = release[key].read_text()
        refs = ReferenceValues.from_json(text)
        assert refs.to_json() == text
        assert ReferenceValues.load(release[key]) == refs and refs.schema_version == SCHEMA_VERSION


def test_typed_fields(release: dict[str, Path]) -> None:
    doc = json.loads(release["ref"].read_text())
    refs = ReferenceValues.load(release["ref"])
    assert refs.file is not None and refs.file.sha256 == doc["file"]["sha256"] and refs.file.size == doc["file"]["size"]
    assert refs.platforms["snp"].digest == doc["platforms"]["snp"]["digest"] and refs.loader == "qemu"
    assert refs.platforms["snp"].platform == "SEV_SNP" and refs.platforms["tdx"].details["pass_order"] == "single-pass"
    assert refs.build is not None and refs.build.platforms == ("native", "snp", "tdx")
    assert refs.inputs is not None and set(refs.inputs) == set(doc["inputs"]) and refs.signature is None
    signed = ReferenceValues.load(release["signed_ref"])
    assert signed.signature is not None and signed.signature.unsigned_file == refs.file
    assert signed.inputs == refs.inputs and signed.build == refs.build
    assert signed.platforms["snp"].details["id_block"]["present"] is True


def test_frozen(release: dict[str, Path]) -> None:
    refs = ReferenceValues.load(release["ref"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        refs.file = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        refs.platforms["snp"] = refs.platforms["tdx"]  # type: ignore[index]
    copy = refs["platforms"]  # reading it like the document gives a copy
    copy["snp"]["digest"] = "00"
    assert refs["platforms"]["snp"]["digest"] != "00" and refs.platforms["snp"].digest != "00"


def test_partial_and_bad_documents() -> None:
    partial = {"platforms": {"snp": {"digest": "ab" * 48, "policy": "0x30000"}}}
    refs = ReferenceValues.from_dict(partial)
    assert refs.file is None and refs.platforms["snp"].digest == "ab" * 48
    assert refs.to_dict() == {**partial, "schema_version": SCHEMA_VERSION}  # nothing invented
    for bad, needle in (({"schema_version": 2, "platforms": {}}, "schema_version 2"),
                        ({"platforms": []}, "platforms is not an object"),
                        ({"file": {"sha256": "xyz"}, "platforms": {}}, "file.sha256 is not 64 hex digits")):
        with pytest.raises(VerificationError, match=needle):
            ReferenceValues.from_dict(bad)
    with pytest.raises(VerificationError, match="not JSON"):
        ReferenceValues.from_json("{nope")
