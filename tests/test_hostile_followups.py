"""Issue #15, small follow-ups: the build note for a VBS image built for QEMU (checked against
the bundled QEMU 10.2.2 itself), and ``sign --import-signature ... --reference-values`` (the
written reference values checked against the signed file by ``verify --reference``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import utils
from qemu import run_qemu

from igvm_builder.cli import main
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.sign import ExportedTbs, PemFileKey

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())["keys"]
ID_PEM = SHARED / KEYS["id_key_pem"]
AUTHOR_PEM = SHARED / KEYS["author_key_pem"]
ID_DIGEST = KEYS["id_key_digest"]
AUTHOR_DIGEST = KEYS["author_key_digest"]


def _config(tmp: Path, platforms: str, loader: str) -> Path:
    blob = tmp / "payload.bin"
    blob.write_bytes(bytes(range(256)) * 32)
    cfg = tmp / f"{loader}-{platforms.replace(' ', '')}.toml"
    cfg.write_text(f'[image]\nplatforms = [{platforms}]\nloader = "{loader}"\n\n'
                   '[[blob]]\npath = "payload.bin"\ngpa = 0x200000\n')
    return cfg


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- vbs + loader qemu


def test_vbs_image_for_qemu_gets_a_build_note_and_qemu_refuses_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, '"native", "snp", "vbs"', "qemu")
    image, refs = tmp_path / "v.igvm", tmp_path / "v.json"
    rc, _, err = _cli(capsys, "build", cfg, "-o", image, "--reference-values", refs)
    assert rc == 0, err
    notes = json.loads(refs.read_text())["build"]["notes"]
    assert len(notes) == 1 and "VBS_MEASUREMENT" in notes[0] and notes[0].startswith("loader qemu: "), notes
    assert f"note: {notes[0]}" in err
    # QEMU itself refuses the file, whatever platform it would start (no confidential-guest object:
    # the NATIVE platform)
    run = run_qemu(image, "-no-reboot", timeout=60)
    assert run.status == 1 and run.stderr.startswith("qemu-system-x86_64: "), run.report()
    assert "Unknown header type" in run.stderr and "0x311" in run.stderr and "(type 0x311)" in notes[0]
    # the same image for another loader, or without vbs for QEMU: no note
    for platforms, loader in (('"native", "snp", "vbs"', "hyperv"), ('"native", "snp"', "qemu")):
        other = tmp_path / "o.json"
        rc, _, err = _cli(capsys, "build", _config(tmp_path, platforms, loader), "-o", tmp_path / "o.igvm",
                          "--reference-values", other)
        assert rc == 0 and json.loads(other.read_text())["build"]["notes"] == [], err


def test_vbs_build_note_through_build_overrides(tmp_path: Path) -> None:
    """``build(loader=...)`` (what ``$IGVM_LOADER`` and ``--loader`` do) decides, not only the config."""
    from igvm_builder.assemble import build
    from igvm_builder.config import load_config

    cfg = load_config(_config(tmp_path, '"snp", "vbs"', "hyperv"))
    assert build(cfg).reference_values.build is not None
    assert list(build(cfg).reference_values.build.notes) == []  # type: ignore[union-attr]
    notes = build(cfg, loader="qemu").reference_values.build.notes  # type: ignore[union-attr]
    assert len(notes) == 1 and "VBS_MEASUREMENT" in notes[0]


# --------------------------------------------------------------------------- import-signature + reference values


def test_import_signature_writes_reference_values_that_verify(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, '"native", "snp"', "qemu")
    image, built_refs = tmp_path / "x.igvm", tmp_path / "x.json"
    assert _cli(capsys, "build", cfg, "-o", image, "--reference-values", built_refs)[0] == 0
    id_pub = tmp_path / "id.pub.pem"
    id_pub.write_bytes(PemFileKey(ID_PEM).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    tbs_path = tmp_path / "tbs.json"
    rc, _, err = _cli(capsys, "sign", image, "--export-tbs", tbs_path, "--id-key", id_pub, "--author-key", AUTHOR_PEM,
                      "--loader", "qemu", "--image-id", "22" * 16, "--allow-test-keys")
    assert rc == 0, err
    tbs = ExportedTbs.from_json(tbs_path.read_bytes())
    # signed elsewhere (here: with the key files, as an offline signer would)
    r, s = PemFileKey(ID_PEM).sign(tbs.id_block_message)
    (tmp_path / "id.sig").write_bytes(utils.encode_dss_signature(r, s))
    r, s = PemFileKey(AUTHOR_PEM).sign(tbs.id_key_message or b"")
    (tmp_path / "author.sig").write_bytes(r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    signed, signed_refs = tmp_path / "signed.igvm", tmp_path / "signed.json"
    rc, out, err = _cli(capsys, "sign", image, "-o", signed, "--import-signature", tbs_path,
                        "--id-signature", tmp_path / "id.sig", "--author-signature", tmp_path / "author.sig",
                        "--reference", built_refs, "--reference-values", signed_refs, "--allow-test-keys")
    assert rc == 0, err

    refs = json.loads(signed_refs.read_text())
    data = signed.read_bytes()
    assert refs["file"] == {**refs["file"], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (block,) = [h for h in IgvmFile.from_bytes(data).directives if isinstance(h, H.SnpIdBlock)]
    snp = refs["platforms"]["snp"]
    assert snp["id_block"]["ld"] == bytes(block.ld).hex() == snp["digest"]
    assert snp["id_key_digest"] == ID_DIGEST and snp["author_key_digest"] == AUTHOR_DIGEST
    assert snp["id_block"]["image_id"] == "22" * 16 and snp["loader"] == "qemu"
    assert refs["inputs"] == json.loads(built_refs.read_text())["inputs"]  # extends the build's
    # the reference values describe the signed file: verify --reference checks them against it
    rc, out, err = _cli(capsys, "verify", signed, "--reference", signed_refs, "--id-key-digest", ID_DIGEST,
                        "--author-key-digest", AUTHOR_DIGEST)
    assert rc == 0 and "reference values match" in out, err
    # the same document for the unsigned file, or a changed digest, fails
    rc, _, err = _cli(capsys, "verify", image, "--reference", signed_refs)
    assert rc == 1, err
    changed = dict(refs)
    changed["platforms"] = {**refs["platforms"], "snp": {**snp, "digest": "00" * 48}}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    rc, _, err = _cli(capsys, "verify", signed, "--reference", tmp_path / "changed.json")
    assert rc == 1 and err.count("\n") >= 1, err
    # and equal to what signing in one step writes (deterministic signatures, same fields)
    one, one_refs = tmp_path / "one.igvm", tmp_path / "one.json"
    rc, _, err = _cli(capsys, "sign", image, "-o", one, "--id-key", ID_PEM, "--author-key", AUTHOR_PEM, "--loader",
                      "qemu", "--image-id", "22" * 16, "--reference", built_refs, "--reference-values", one_refs,
                      "--allow-test-keys")
    assert rc == 0, err
    assert one.read_bytes() == data
    one_doc = json.loads(one_refs.read_text())
    assert one_doc["platforms"] == refs["platforms"] and one_doc["file"] == refs["file"]
