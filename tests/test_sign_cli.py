"""``igvm-builder sign`` and ``igvm-builder verify``: modes, usage errors, exit codes, secret hygiene."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from softhsm import TOKEN, SoftHsm, softhsm_token

from igvm_builder.cli import main
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice
from igvm_builder.format.defs import PageDataFlags, PlatformType
from igvm_builder.measure import measure_platform
from igvm_builder.sev_vmsa import build_vmsa, reset_vmsa_fields
from igvm_builder.sign import ExportedTbs, PemFileKey

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KEYS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())["keys"]
ID_PEM = SHARED / KEYS["id_key_pem"]
AUTHOR_PEM = SHARED / KEYS["author_key_pem"]
ID_PKCS8 = SHARED / KEYS["id_key_pkcs8_pem"]
ID_DIGEST = KEYS["id_key_digest"]
AUTHOR_DIGEST = KEYS["author_key_digest"]
SNP_V1 = SHARED / "vectors" / "igvm" / "snp_v1.igvm"


#: Reset-state VMSA fields: what QEMU and Cloud Hypervisor on KVM measure unchanged (KVM_VMSA.md §9).
KVM_FIXED = reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1)


def write_file(path: Path, *, policy: int | None = 0x30000) -> Path:
    """A small SNP file measurable by every loader (VMSA at the KVM GPA, one shared page)."""
    directives: list[H.Header] = [
        H.PageData(gpa=0x10000 + i * 0x1000, compatibility_mask=1, data=bytes([i + 1]) * 4096)
        for i in range(3)
    ]
    directives += [
        H.PageData(gpa=0x20000, compatibility_mask=1, flags=PageDataFlags.SHARED),
        H.SnpVpContext(gpa=0xFFFF_FFFF_F000, compatibility_mask=1, vmsa=build_vmsa(KVM_FIXED | {"rip": 0x10000})),
    ]
    f = IgvmFile(
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),),
        initializations=(H.GuestPolicy(policy=policy, compatibility_mask=1),) if policy is not None else (),
        directives=tuple(directives),
    )
    path.write_bytes(f.to_bytes())
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


def id_blocks(path: Path) -> list[H.SnpIdBlock]:
    return [h for h in IgvmFile.load(path).directives if isinstance(h, H.SnpIdBlock)]


TEST_KEYS = ("--id-key", ID_PEM, "--author-key", AUTHOR_PEM, "--allow-test-keys")


# --------------------------------------------------------------------------------------------
# sign


def test_sign_another_tools_file_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "signed.igvm"
    rc, stdout, stderr = cli(capsys, "sign", SNP_V1, "-o", out, *TEST_KEYS, "--guest-svn", "0x10")
    assert rc == 0, stderr
    assert stdout.splitlines()[0].startswith(f"{out}: replaced the SEV-SNP ID block for loader hyperv (default): ")
    assert f"ID key digest {ID_DIGEST}, author key digest {AUTHOR_DIGEST}" in stdout
    assert "TEST-ONLY" in stderr  # allowed, but never silently
    (block,) = id_blocks(out)
    assert block.guest_svn == 0x10 and block.author_key_enabled == 1

    rc, stdout, stderr = cli(
        capsys, "verify", out, "--id-key-digest", ID_DIGEST, "--author-key-digest", AUTHOR_DIGEST
    )
    assert rc == 0
    assert stdout.count("\n") == 1 and stdout.startswith(
        f"{out}: OK: SEV-SNP ID block verifies (loader hyperv"
    )
    assert "TEST-ONLY" in stderr

    # Signing the signed file again still leaves exactly one block.
    again = tmp_path / "again.igvm"
    rc, stdout, _ = cli(capsys, "sign", out, "-o", again, "--id-key", ID_PKCS8, "--allow-test-keys", "-q")
    assert rc == 0 and stdout == ""
    (block,) = id_blocks(again)
    assert block.guest_svn == 0 and block.author_key_enabled == 0


def test_sign_adds_a_block_and_refuses_test_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_file(tmp_path / "in.igvm")
    out = tmp_path / "out.igvm"
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", out, "--id-key", ID_PEM)
    assert rc == 2 and stdout == ""
    assert stderr == (
        "igvm-builder sign: error: refusing to sign with the public TEST-ONLY ID key (shared/keys): anything "
        "signed with it proves nothing; pass --allow-test-keys for tests\n"
    )
    assert not out.exists()
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", out, "--id-key", ID_PEM, "--author-key", AUTHOR_PEM)
    assert rc == 2 and "TEST-ONLY ID and author key" in stderr
    # A refused or failed run leaves an existing output as it was, and no temporary file.
    out.write_bytes(b"previous")
    rc, _, stderr = cli(capsys, "sign", src, "-o", out, "--id-key", tmp_path / "missing.pem")
    assert rc == 2 and "cannot read key file" in stderr
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.igvm", "out.igvm"]

    rc, stdout, _ = cli(capsys, "sign", src, "-o", out, *TEST_KEYS, "--loader", "qemu")
    assert rc == 0 and "added an SEV-SNP ID block for loader qemu (--loader)" in stdout
    assert len(id_blocks(out)) == 1
    assert cli(capsys, "verify", out, "--loader", "qemu")[0] == 0


def test_a_failure_after_the_data_was_written_leaves_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One-step sign writes OUT's data section while it measures and signs, and its headers last;
    a failure after that (here: --reference values of another file, found once the signed file
    is known) leaves the previous OUT as it was and no temporary file; then a good run writes
    the bytes the library serializes."""
    src = write_file(tmp_path / "in.igvm")
    other = write_file(tmp_path / "other.igvm", policy=0x30001)
    refs = tmp_path / "other.json"
    assert cli(capsys, "measure", other, "--reference-values", refs)[0] == 0
    out, out_refs = tmp_path / "out.igvm", tmp_path / "out.json"
    out.write_bytes(b"previous")
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", out, *TEST_KEYS, "--reference", refs,
                             "--reference-values", out_refs)
    assert rc != 0 and stdout == "" and "describe a file with sha256" in stderr, stderr
    assert out.read_bytes() == b"previous" and not out_refs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.igvm", "other.igvm", "other.json", "out.igvm"]
    assert cli(capsys, "sign", src, "-o", out, *TEST_KEYS, "-q")[0] == 0
    from igvm_builder.sign.image import sign_igvm

    expected, _ = sign_igvm(IgvmFile.load(src), id_key=PemFileKey(ID_PEM), author_key=PemFileKey(AUTHOR_PEM))
    assert out.read_bytes() == expected.to_bytes()


def test_remove_gives_back_the_unsigned_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sign, then sign --remove: the bytes of the unsigned file again, the same launch digest for
    every loader; on a file without a block it is said, and the file written unchanged."""
    src = write_file(tmp_path / "in.igvm")
    signed, stripped = tmp_path / "signed.igvm", tmp_path / "stripped.igvm"
    assert cli(capsys, "sign", src, "-o", signed, *TEST_KEYS, "-q")[0] == 0
    assert len(id_blocks(signed)) == 1
    rc, stdout, _ = cli(capsys, "sign", signed, "--remove", "-o", stripped)
    assert rc == 0 and stdout == f"{stripped}: removed the SEV-SNP ID block\n"
    assert stripped.read_bytes() == src.read_bytes()
    for loader in ("hyperv", "qemu", "cloud-hypervisor"):
        digests = {measure_platform(IgvmFile.load(p), PlatformType.SEV_SNP, loader=loader).digest
                   for p in (src, signed, stripped)}
        assert len(digests) == 1, loader
    again = tmp_path / "again.igvm"
    rc, stdout, _ = cli(capsys, "sign", stripped, "--remove", "-o", again)
    assert rc == 0 and "has no SEV-SNP ID block; written unchanged" in stdout
    assert again.read_bytes() == src.read_bytes()
    # the reference crate's vector: its block goes, nothing else changes
    rc, _, _ = cli(capsys, "sign", SNP_V1, "--remove", "-o", tmp_path / "v.igvm", "-q")
    assert rc == 0 and id_blocks(tmp_path / "v.igvm") == []
    kept = [h for h in IgvmFile.load(SNP_V1).headers if not isinstance(h, H.SnpIdBlock)]
    assert list(IgvmFile.load(tmp_path / "v.igvm").headers) == kept
    assert "--remove signs nothing: do not give --id-key" in usage_error(
        capsys, "sign", signed, "--remove", "-o", tmp_path / "x.igvm", "--id-key", ID_PEM)
    assert "-o/--output is required" in usage_error(capsys, "sign", signed, "--remove")


def test_sign_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_file(tmp_path / "nopolicy.igvm", policy=None)
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", tmp_path / "o.igvm", *TEST_KEYS)
    assert rc == 2 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith("igvm-builder sign: error: no GUEST_POLICY for the SEV_SNP platform (mask 0x1)")
    native = tmp_path / "native.igvm"
    native.write_bytes((SHARED / "vectors" / "igvm" / "native_v2_minimal.igvm").read_bytes())
    rc, _, stderr = cli(capsys, "sign", native, "-o", tmp_path / "o.igvm", *TEST_KEYS)
    assert rc == 2 and "has no SEV_SNP platform" in stderr
    assert not (tmp_path / "o.igvm").exists()


def test_config_supplies_the_sign_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id.pem").write_bytes(ID_PEM.read_bytes())
    config = tmp_path / "guest.toml"
    config.write_text(
        '[image]\nplatforms = ["snp"]\nloader = "qemu"\n'
        '[[blob]]\npath = "blob.bin"\ngpa = 0x100000\n'
        '[sign]\nid_key = "keys/id.pem"\nfamily_id = "0102030405060708090a0b0c0d0e0f10"\nguest_svn = 3\n'
    )
    src = write_file(tmp_path / "in.igvm")
    out = tmp_path / "out.igvm"
    monkeypatch.chdir(REPO)  # the key path is resolved against the config, not the working directory
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", out, "--config", config, "--allow-test-keys")
    assert rc == 0, stderr
    assert "for loader qemu (image.loader of " in stdout and stdout.endswith("guest svn 3\n")
    (block,) = id_blocks(out)
    assert block.family_id == bytes(range(1, 17)) and block.guest_svn == 3
    qemu = measure_platform(IgvmFile.load(src), PlatformType.SEV_SNP, loader="qemu").digest
    assert block.ld == qemu
    # Command-line options win over the config.
    rc, _, _ = cli(capsys, "sign", src, "-o", out, "--config", config, "--allow-test-keys", "--guest-svn", "9",
                   "--loader", "hyperv")  # fmt: skip
    assert rc == 0 and id_blocks(out)[0].guest_svn == 9
    assert cli(capsys, "verify", out)[0] == 0


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_file(tmp_path / "in.igvm")
    assert "-o/--output is required" in usage_error(capsys, "sign", src, "--id-key", ID_PEM)
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", tmp_path / "o.igvm")
    assert (rc, stdout) == (2, "") and "no ID key: give --id-key (or a config with [sign] id_key)" in stderr
    assert "drop -o" in usage_error(
        capsys, "sign", src, "-o", "x", "--export-tbs", "t.json", "--id-key", ID_PEM
    )
    err = usage_error(capsys, "sign", src, "-o", "x", "--import-signature", "t.json")
    assert "--import-signature needs --id-signature" in err
    err = usage_error(capsys, "sign", src, "-o", "x", "--import-signature", "t", "--id-signature", "s",
                      "--id-key", ID_PEM, "--guest-svn", "1")  # fmt: skip
    assert "do not give --id-key, --guest-svn" in err
    err = usage_error(capsys, "sign", src, "-o", "x", "--import-signature", "t", "--id-signature", "-",
                      "--author-signature", "-")  # fmt: skip
    assert "only one of --id-signature and --author-signature" in err
    assert "go with --import-signature" in usage_error(capsys, "sign", src, "-o", "x", "--id-signature", "s")
    assert "give one" in usage_error(capsys, "sign", src, "--export-tbs", "a", "--import-signature", "b")
    assert "32 hexadecimal digits" in usage_error(capsys, "sign", src, "-o", "x", "--family-id", "zz")
    assert "out of range" in usage_error(capsys, "sign", src, "-o", "x", "--guest-svn", str(1 << 32))
    assert "96 hexadecimal digits" in usage_error(capsys, "verify", src, "--id-key-digest", "xyz")
    assert "48 bytes" in usage_error(capsys, "verify", src, "--author-key-digest", "00" * 32)
    assert not (tmp_path / "o.igvm").exists()


# --------------------------------------------------------------------------------------------
# two-step


def _der(key_path: Path, message: bytes) -> bytes:
    r, s = PemFileKey(key_path).sign(message)
    return utils.encode_dss_signature(r, s)


def test_two_step_flow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_file(tmp_path / "in.igvm")
    tbs_path = tmp_path / "tbs.json"
    id_pub = tmp_path / "id.pub.pem"
    id_pub.write_bytes(
        PemFileKey(ID_PEM)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # Only public keys are needed; test keys are refused here already.
    args = ("sign", src, "--export-tbs", tbs_path, "--id-key", id_pub, "--author-key", AUTHOR_PEM)
    rc, _, stderr = cli(capsys, *args, "--image-id", "11" * 16)
    assert rc == 2 and "TEST-ONLY" in stderr and not tbs_path.exists()
    rc, stdout, _ = cli(capsys, *args, "--image-id", "11" * 16, "--allow-test-keys")
    assert rc == 0 and stdout.startswith(f"{tbs_path}: to-be-signed document for {src} (loader hyperv")
    assert not (tmp_path / "out.igvm").exists()
    document = tbs_path.read_bytes()
    assert b"PRIVATE" not in document
    tbs = ExportedTbs.from_json(document)
    assert tbs.fields.image_id == b"\x11" * 16

    # Sign elsewhere: the ID signature as hex DER in a file, the author's as raw binary on stdin.
    (tmp_path / "id.sig").write_text(_der(ID_PEM, tbs.id_block_message).hex() + "\n")
    r, s = PemFileKey(AUTHOR_PEM).sign(tbs.id_key_message or b"")
    monkeypatch.setattr(
        sys, "stdin", io.TextIOWrapper(io.BytesIO(r.to_bytes(48, "big") + s.to_bytes(48, "big")))
    )
    out = tmp_path / "out.igvm"
    imported = ("sign", src, "-o", out, "--import-signature", tbs_path, "--id-signature", tmp_path / "id.sig")
    rc, stdout, stderr = cli(capsys, *imported, "--author-signature", "-", "--allow-test-keys")
    assert rc == 0, stderr
    assert f"author key digest {AUTHOR_DIGEST}" in stdout
    # Deterministic signatures: the same bytes as signing in one step.
    one_step = tmp_path / "one.igvm"
    assert cli(capsys, "sign", src, "-o", one_step, *TEST_KEYS, "--image-id", "11" * 16)[0] == 0
    assert out.read_bytes() == one_step.read_bytes()

    # Not the exported file: one page changed.
    other = tmp_path / "other.igvm"
    data = bytearray(src.read_bytes())
    page = next(h for h in IgvmFile.load(src).directives if isinstance(h, H.PageData) and len(h.data))
    assert isinstance(page.data, FileSlice)
    data[page.data.start] ^= 0xFF
    other.write_bytes(bytes(data))
    (tmp_path / "author.sig").write_bytes(base64.b64encode(r.to_bytes(48, "big") + s.to_bytes(48, "big")))
    rc, _, stderr = cli(capsys, "sign", other, "-o", tmp_path / "x.igvm", "--import-signature", tbs_path,
                        "--id-signature", tmp_path / "id.sig", "--author-signature", tmp_path / "author.sig",
                        "--allow-test-keys")  # fmt: skip
    assert rc == 2 and "not the file it was exported from" in stderr and stderr.count("\n") == 1
    # A signature by the wrong key.
    (tmp_path / "bad.sig").write_bytes(_der(AUTHOR_PEM, tbs.id_block_message))
    rc, _, stderr = cli(capsys, "sign", src, "-o", tmp_path / "x.igvm", "--import-signature", tbs_path,
                        "--id-signature", tmp_path / "bad.sig", "--author-signature", tmp_path / "author.sig",
                        "--allow-test-keys")  # fmt: skip
    assert rc == 2 and "ID block signature does not verify" in stderr
    assert not (tmp_path / "x.igvm").exists()

    # The exported document records its loader; the import measures with it unless told otherwise.
    rc, _, _ = cli(capsys, "sign", src, "--export-tbs", tbs_path, "--id-key", ID_PEM, "--loader", "qemu",
                   "--allow-test-keys")  # fmt: skip
    assert rc == 0 and json.loads(tbs_path.read_text())["loader"] == "qemu"
    tbs = ExportedTbs.from_json(tbs_path.read_bytes())
    (tmp_path / "id.sig").write_bytes(_der(ID_PEM, tbs.id_block_message))
    rc, stdout, stderr = cli(capsys, *imported, "--allow-test-keys")
    assert rc == 0 and "for loader qemu (recorded in " in stdout, stderr
    qemu = measure_platform(IgvmFile.load(src), PlatformType.SEV_SNP, loader="qemu").digest
    assert id_blocks(out)[0].ld == qemu
    rc, _, stderr = cli(capsys, *imported, "--allow-test-keys", "--loader", "hyperv")
    assert (
        rc == 2 and "under loader hyperv: not the file it was exported from (or another --loader)" in stderr
    )


# --------------------------------------------------------------------------------------------
# verify


def test_verify_reports_each_failure_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_file(tmp_path / "in.igvm")
    signed = tmp_path / "signed.igvm"
    assert cli(capsys, "sign", src, "-o", signed, *TEST_KEYS)[0] == 0

    rc, stdout, stderr = cli(capsys, "verify", src)
    assert rc == 1 and stdout == ""
    assert stderr == (
        f"igvm-builder verify: error: {src}: not signed: no SNP_ID_BLOCK directive for the SEV_SNP platform "
        "(mask 0x1)\n"
    )

    data = bytearray(signed.read_bytes())
    page = next(h for h in IgvmFile.load(signed).directives if isinstance(h, H.PageData) and len(h.data))
    data[page.data.start + 7] ^= 0x01
    tampered = tmp_path / "tampered.igvm"
    tampered.write_bytes(bytes(data))
    rc, stdout, stderr = cli(capsys, "verify", tampered, "--id-key-digest", AUTHOR_DIGEST)
    lines = stderr.splitlines()
    assert rc == 1 and stdout == "" and len(lines) == 2
    assert lines[0].startswith(f"igvm-builder verify: error: {tampered}: launch digest mismatch: ")
    assert lines[1] == (
        f"igvm-builder verify: error: {tampered}: ID key digest is {ID_DIGEST}, expected {AUTHOR_DIGEST}"
    )

    rc, _, stderr = cli(capsys, "verify", signed, "--loader", "qemu")
    assert rc == 1 and "--loader hyperv" not in stderr and "--explain" in stderr
    rc, _, stderr = cli(capsys, "verify", signed, "--loader", "qemu", "--explain")
    assert rc == 1 and "--loader hyperv" in stderr

    ref = tmp_path / "ref.json"
    digest = measure_platform(IgvmFile.load(src), PlatformType.SEV_SNP).hex
    ref.write_text(json.dumps({"platforms": {"snp": {"digest": digest, "policy": "0x30000"}}}))
    rc, stdout, _ = cli(capsys, "verify", signed, "--reference", ref, "--id-key-digest", ID_DIGEST)
    assert rc == 0 and "reference values match" in stdout
    ref.write_text(json.dumps({"platforms": {"snp": {"digest": digest, "policy": "0x10000"}}}))
    rc, _, stderr = cli(capsys, "verify", signed, "--reference", ref)
    assert rc == 1 and stderr.endswith("the reference values say 0x10000\n") and stderr.count("\n") == 1
    ref.write_text("{not json")
    rc, _, stderr = cli(capsys, "verify", signed, "--reference", ref)
    assert rc == 2 and "not JSON" in stderr


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    yield from softhsm_token(tmp_path_factory)


def test_pkcs11_uri_on_the_command_line(
    softhsm: SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_file(tmp_path / "in.igvm")
    out = tmp_path / "out.igvm"
    pin = tmp_path / "pin"
    pin.write_text("4711-test-pin\n")
    uri = softhsm.uri(f"token={TOKEN};object=snp-id", f"pin-source={pin}")
    rc, stdout, stderr = cli(capsys, "sign", src, "-o", out, "--id-key", uri, "--allow-test-keys")
    assert rc == 0, stderr
    assert f"ID key digest {ID_DIGEST}" in stdout and "4711" not in stdout + stderr
    rc, stdout, _ = cli(capsys, "verify", out, "--id-key-digest", ID_DIGEST)
    assert rc == 0 and "OK" in stdout


# --------------------------------------------------------------------------------------------
# No key material in outputs, logs or errors


def _secret_strings(pem_path: Path) -> list[str]:
    """Every form of a private key a careless tool might print: PEM body lines, DER base64, scalar."""
    pem = pem_path.read_text()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value
    size = (key.curve.key_size + 7) // 8
    body = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return [
        *body,
        "".join(body),
        base64.b64encode(der).decode(),
        scalar.to_bytes(size, "big").hex(),
        scalar.to_bytes(size, "little").hex(),
        scalar.to_bytes(size, "big").hex().upper(),
        str(scalar),
        "PRIVATE KEY",
    ]


def test_private_key_never_appears_in_outputs_or_errors(tmp_path: Path) -> None:
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    secrets = _secret_strings(ID_PEM) + _secret_strings(AUTHOR_PEM) + _secret_strings(p256)
    src = write_file(tmp_path / "in.igvm")
    nopolicy = write_file(tmp_path / "nopolicy.igvm", policy=None)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "IGVM_TEST_KEY": ID_PEM.read_text(),
        "IGVM_TEST_P256": p256.read_text(),
    }
    out = tmp_path / "out.igvm"
    tbs = tmp_path / "tbs.json"
    runs = [
        (0, ["sign", src, "-o", out, *TEST_KEYS]),
        (0, ["sign", src, "--export-tbs", tbs, *TEST_KEYS]),
        (
            0,
            [
                "sign",
                src,
                "-o",
                out,
                "--id-key",
                "env:IGVM_TEST_KEY",
                "--allow-test-keys",
                "--guest-svn",
                "2",
            ],
        ),
        (2, ["sign", nopolicy, "-o", tmp_path / "x.igvm", *TEST_KEYS]),  # fails after loading the keys
        (2, ["sign", src, "-o", tmp_path / "x.igvm", "--id-key", ID_PEM]),  # test key refused
        (2, ["sign", src, "-o", tmp_path / "x.igvm", "--id-key", "env:IGVM_TEST_P256"]),  # wrong curve
        (2, ["sign", src, "-o", tmp_path / "x.igvm", "--id-key", p256]),
        (1, ["verify", out, "--author-key-digest", AUTHOR_DIGEST]),
    ]
    for expected_rc, argv in runs:
        proc = subprocess.run(
            [sys.executable, "-m", "igvm_builder", *map(str, argv)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == expected_rc, (argv, proc.stderr)
        texts = {"stdout": proc.stdout, "stderr": proc.stderr}
        if expected_rc:
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        for name, text in texts.items():
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{argv}: {name} contains key material"
    for path in (out, tbs):
        data = path.read_bytes()
        text = data.decode("latin-1")
        assert not [s for s in secrets if s in text], f"{path.name} contains key material"
        raw = {
            serialization.load_pem_private_key(p.read_bytes(), password=None).private_numbers().private_value
            for p in (ID_PEM, AUTHOR_PEM)
        }
        for scalar in raw:
            assert scalar.to_bytes(48, "big") not in data and scalar.to_bytes(48, "little") not in data
    assert not (tmp_path / "x.igvm").exists()
