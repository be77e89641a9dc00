"""Signing whole IGVM files (``igvm_builder.sign.image``): sign_igvm, sign_image, verify_igvm, two-step.

Known answers: ``shared/vectors/measure/idblock.json`` (RFC 6979 ID blocks from the
TEST-ONLY keys).  The same key as a PEM file, in a SoftHSM2 token and behind an
external signer command must give files that verify under one ID-key digest.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from softhsm import TOKEN, SoftHsm, softhsm_token

from igvm_builder.errors import IgvmFormatError, MeasurementError, SigningError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, as_view
from igvm_builder.format.defs import PageDataFlags, PageDataType, PlatformType
from igvm_builder.measure import DEFAULT_LOADER, measure_file, measure_platform
from igvm_builder.measure.profiles import PROFILES
from igvm_builder.sev_vmsa import build_vmsa, reset_vmsa_fields
from igvm_builder.sign import (
    CommandKey,
    ExportedTbs,
    PemFileKey,
    Pkcs11Key,
    key_source_from_spec,
)
from igvm_builder.sign.image import (
    FAILURE_KINDS,
    IdBlockVerificationError,
    export_igvm_tbs,
    find_id_blocks,
    import_igvm_signature,
    sign_igvm,
    sign_igvm_layout,
    sign_image,
    verify_igvm,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = json.loads((SHARED / "vectors" / "measure" / "idblock.json").read_text())
KEYS = VECTORS["keys"]
RFC6979 = VECTORS["rfc6979_vectors"]
ID_PEM = SHARED / KEYS["id_key_pem"]
AUTHOR_PEM = SHARED / KEYS["author_key_pem"]
ID_DIGEST = bytes.fromhex(KEYS["id_key_digest"])
AUTHOR_DIGEST = bytes.fromhex(KEYS["author_key_digest"])
SNP_V1 = SHARED / "vectors" / "igvm" / "snp_v1.igvm"

SNP_MASK = 0x1
NATIVE_MASK = 0x2
KVM_VMSA_GPA = 0xFFFF_FFFF_F000


def _page(seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(4096))


def make_file(*, policy: int = 0x30000, with_policy: bool = True, snp: bool = True) -> IgvmFile:
    """An SNP + native file, parsed back from its bytes (page data are FileSlices, as in real use)."""
    platforms = [H.SupportedPlatform(compatibility_mask=NATIVE_MASK, platform_type=PlatformType.NATIVE)]
    if snp:
        platforms.insert(
            0, H.SupportedPlatform(compatibility_mask=SNP_MASK, platform_type=PlatformType.SEV_SNP)
        )
    both = SNP_MASK | NATIVE_MASK if snp else NATIVE_MASK
    inits = (H.GuestPolicy(policy=policy, compatibility_mask=SNP_MASK),) if snp and with_policy else ()
    directives: list[H.Header] = [
        H.PageData(gpa=0x100000 + i * 0x1000, compatibility_mask=both, data=_page(i)) for i in range(4)
    ]
    directives += [
        H.PageData(gpa=0x200000, compatibility_mask=both),  # measured, no data
        H.PageData(gpa=0x201000, compatibility_mask=both, flags=PageDataFlags.UNMEASURED),
        H.ParameterArea(number_of_bytes=0x1000, parameter_area_index=0),
        H.VpCount(parameter_area_index=0),
        H.ParameterInsert(gpa=0x300000, compatibility_mask=both, parameter_area_index=0),
    ]
    if snp:
        directives += [
            H.PageData(gpa=0x202000, compatibility_mask=SNP_MASK, flags=PageDataFlags.SHARED),
            H.PageData(gpa=0x203000, compatibility_mask=SNP_MASK, data_type=PageDataType.SECRETS),
            H.SnpVpContext(
                gpa=KVM_VMSA_GPA,
                compatibility_mask=SNP_MASK,
                vmsa=build_vmsa(reset_vmsa_fields(0xFFFFFFF0, vcpu_signature=0x800F12, sev_features=1)
                                | {"rip": 0x100000, "cs.selector": 0x8}),
            ),
        ]
    directives += [
        H.NativeVpContext(compatibility_mask=NATIVE_MASK, context=bytes(range(232))),
        H.PageData(gpa=0x400000, compatibility_mask=NATIVE_MASK, data=_page(9)),
    ]
    f = IgvmFile(platforms=tuple(platforms), initializations=inits, directives=tuple(directives))
    return IgvmFile.from_bytes(f.to_bytes())


def id_key() -> PemFileKey:
    return PemFileKey(ID_PEM)


def author_key() -> PemFileKey:
    return PemFileKey(AUTHOR_PEM)


def without_id_blocks(f: IgvmFile) -> list[H.Header]:
    return [h for h in f.headers if not isinstance(h, H.SnpIdBlock)]


def reparse(data: bytes) -> IgvmFile:
    return IgvmFile.from_bytes(data)


def fails(f: IgvmFile, **kwargs) -> IdBlockVerificationError:
    with pytest.raises(IdBlockVerificationError) as info:
        verify_igvm(f, **kwargs)
    err = info.value
    assert all(kind in FAILURE_KINDS for kind in err.kinds)
    assert all("\n" not in failure.message for failure in err.failures)
    return err


# --------------------------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("index", range(len(RFC6979)))
def test_vector_id_blocks_are_reproduced_by_sign_igvm(index: int) -> None:
    vec = RFC6979[index]
    params = vec["params"]
    f = make_file(policy=int(params["policy"], 0))
    out, signed = sign_igvm(
        f,
        id_key=id_key(),
        author_key=author_key(),
        family_id=bytes.fromhex(params["family_id"]),
        image_id=bytes.fromhex(params["image_id"]),
        guest_svn=params["guest_svn"],
        ld=bytes.fromhex(vec["launch_digest"]),
    )
    assert signed.deterministic
    assert signed.id_block.hex() == vec["id_block_hex"]
    assert signed.id_auth.hex() == vec["id_auth_hex"]
    assert signed.igvm_body.hex() == vec["igvm_snp_id_block_body_hex"]
    (block,) = find_id_blocks(out, SNP_MASK)
    assert block.pack_body().hex() == vec["igvm_snp_id_block_body_hex"]
    # The signed file survives serialization with the exact 696 bytes in its header area.
    data = out.to_bytes()
    assert bytes.fromhex(vec["igvm_snp_id_block_body_hex"]) in data
    (again,) = find_id_blocks(reparse(data), SNP_MASK)
    assert again == block
    # The block signs the vector's digest, not this file's: verification says so.
    err = fails(reparse(data))
    assert err.kinds == ("launch-digest",)
    assert vec["launch_digest"] in str(err)


def test_sign_a_real_file_changes_nothing_but_the_id_block() -> None:
    f = make_file()
    out, signed = sign_igvm(f, id_key=id_key(), author_key=author_key(), guest_svn=3)
    data = out.to_bytes()
    g = reparse(data)
    # Header by header (page data compared by content): only the new block was added, at the end.
    assert without_id_blocks(g) == list(f.headers)
    assert g.headers[:-1] == f.headers
    assert isinstance(g.directives[-1], H.SnpIdBlock)
    assert g.directives[-1].compatibility_mask == SNP_MASK
    assert g.directives[-1].pack_body() == signed.igvm_body
    assert (g.revision, g.architecture) == (f.revision, f.architecture)
    # Every platform's measurement is unchanged; the block signs the SNP digest for the default loader.
    assert measure_file(g) == measure_file(f)
    assert signed.fields.ld == measure_platform(f, PlatformType.SEV_SNP, loader=DEFAULT_LOADER).digest
    assert signed.fields.policy == 0x30000 and signed.fields.guest_svn == 3
    report = verify_igvm(g, id_key_digest=ID_DIGEST, author_key_digest=AUTHOR_DIGEST)
    assert report.loader == DEFAULT_LOADER and report.launch_digest == signed.fields.ld
    assert report.id_key_digest == ID_DIGEST and report.author_key_digest == AUTHOR_DIGEST
    assert report.uses_test_only_key and report.guest_svn == 3
    assert "verifies" in report.summary() and "\n" not in report.summary()
    # Deterministic keys: signing again gives the same bytes.
    assert sign_igvm(f, id_key=id_key(), author_key=author_key(), guest_svn=3)[0].to_bytes() == data


def _shared_block_file() -> IgvmFile:
    """make_file() with an ID block of another tool shared by the SNP and native masks, and a
    repeated page (laid out once): signing keeps the block for the native mask only."""
    f = make_file()
    block = H.SnpIdBlock.unpack_body(memoryview(bytes(H.SnpIdBlock.SIZE)))
    block = dataclasses.replace(block, compatibility_mask=SNP_MASK | NATIVE_MASK, ld=bytes(range(48)))
    extra = H.PageData(gpa=0x500000, compatibility_mask=SNP_MASK | NATIVE_MASK, data=_page(2))
    g = IgvmFile(revision=2, platforms=f.platforms, initializations=f.initializations,
                 directives=(*f.directives, extra, block))
    return IgvmFile.from_bytes(g.to_bytes())


@pytest.mark.parametrize(("source", "loader"), [
    *((source, loader) for source in ("made", "signed", "shared_block", "bzimage") for loader in ("hyperv", "qemu")),
    ("snp_v1", "hyperv"),  # (its VMSA is not at KVM's GPA: the KVM loaders refuse it)
])
def test_sign_igvm_layout_gives_the_serializers_bytes(source: str, loader: str, tmp_path: Path) -> None:
    """sign_igvm_layout (each page hashed once, the ID block's bytes put in place of a
    placeholder's) gives exactly what sign_igvm's file serializes to, and signs the digest
    measure_platform computes from the pages themselves."""
    if source == "bzimage":
        from igvm_builder.assemble.pipeline import build_file
        from igvm_builder.config import load_config

        cfg = tmp_path / "linux.toml"
        cfg.write_text(f"[image]\nplatforms = [\"snp\"]\n\n[kernel]\npath = '{SHARED}/inputs/vmlinuz-6.1.0-56-cloud-amd64'"
                       "\ncmdline = \"console=ttyS0\"\n\n[memory]\nsize = \"1G\"\n")
        (tmp_path / "linux.igvm").write_bytes(build_file(load_config(str(cfg)))[0].to_bytes())
        f = IgvmFile.load(str(tmp_path / "linux.igvm"))
    else:
        f = {"made": make_file, "snp_v1": lambda: IgvmFile.load(SNP_V1), "shared_block": _shared_block_file,
             "signed": lambda: reparse(sign_igvm(make_file(), id_key=id_key(), guest_svn=7)[0].to_bytes())}[source]()
    out, signed, layout = sign_igvm_layout(f, id_key=id_key(), author_key=author_key(), loader=loader, guest_svn=5)
    expected, expected_signed = sign_igvm(f, id_key=id_key(), author_key=author_key(), loader=loader, guest_svn=5)
    data = b"".join((layout.head, *(as_view(b) for b in layout.blobs)))
    assert data == expected.to_bytes() == out.to_bytes()
    assert layout.head.readonly  # the signed headers, as the layout's, cannot be changed by accident
    assert signed.igvm_body == expected_signed.igvm_body
    assert signed.fields.ld == measure_platform(f, PlatformType.SEV_SNP, loader=loader).digest
    g = reparse(data)  # checksum, sizes and offsets hold
    (block,) = find_id_blocks(g, SNP_MASK)
    assert block.pack_body() == signed.igvm_body and g.directives[-1] == block
    assert verify_igvm(g, loader=loader, id_key_digest=ID_DIGEST, author_key_digest=AUTHOR_DIGEST).guest_svn == 5
    if source == "shared_block":  # the other tool's block stays, for the native mask only
        (kept,) = find_id_blocks(g, NATIVE_MASK)
        assert kept.compatibility_mask == NATIVE_MASK and kept.ld == bytes(range(48))
        assert g.revision == 2


def test_loader_selects_the_signed_digest() -> None:
    f = make_file()
    hyperv = measure_platform(f, PlatformType.SEV_SNP, loader="hyperv").digest
    qemu = measure_platform(f, PlatformType.SEV_SNP, loader="qemu").digest
    assert hyperv != qemu  # the shared page is measured by QEMU only
    out, signed = sign_igvm(f, id_key=id_key(), loader="qemu")
    assert signed.fields.ld == qemu
    assert verify_igvm(out, loader="qemu").loader == "qemu"
    err = fails(out, loader="hyperv")  # fast by default: no other loader is tried
    assert err.kinds == ("launch-digest",)
    assert "loader qemu" not in str(err) and "--explain" in str(err)
    err = fails(out, loader="hyperv", explain=True)
    assert err.kinds == ("launch-digest",)
    assert "loader qemu" in str(err) and "--loader qemu" in str(err)


def test_signing_twice_leaves_exactly_one_id_block() -> None:
    first, _ = sign_igvm(make_file(), id_key=id_key(), guest_svn=1)
    second, _ = sign_igvm(reparse(first.to_bytes()), id_key=id_key(), author_key=author_key(), guest_svn=2)
    g = reparse(second.to_bytes())
    blocks = [h for h in g.directives if isinstance(h, H.SnpIdBlock)]
    assert len(blocks) == 1 and blocks[0].guest_svn == 2 and blocks[0].author_key_enabled == 1
    assert without_id_blocks(g) == without_id_blocks(first)
    assert verify_igvm(g).guest_svn == 2


def test_signing_another_tools_file_replaces_its_id_block() -> None:
    f = IgvmFile.load(SNP_V1)
    (old,) = find_id_blocks(f, SNP_MASK)  # a dummy block written by another tool
    assert fails(f).kinds == ("signature",)
    out, signed = sign_igvm(f, id_key=id_key(), author_key=author_key())
    g = reparse(out.to_bytes())
    (new,) = [h for h in g.directives if isinstance(h, H.SnpIdBlock)]
    assert new != old and new.pack_body() == signed.igvm_body
    assert g.directives[-1] == new
    assert without_id_blocks(g) == without_id_blocks(f)
    # The old block was not measured either: the digest is the one the vector file records.
    assert signed.fields.ld == old.ld
    verify_igvm(g, id_key_digest=ID_DIGEST, author_key_digest=AUTHOR_DIGEST)


def test_files_that_cannot_be_signed() -> None:
    with pytest.raises(SigningError, match=r"no SEV_SNP platform \(it has: NATIVE\)"):
        sign_igvm(make_file(snp=False), id_key=id_key())
    with pytest.raises(SigningError, match="no GUEST_POLICY for the SEV_SNP platform"):
        sign_igvm(make_file(with_policy=False), id_key=id_key())
    with pytest.raises(SigningError, match=r"ld .* must be 48 bytes"):
        sign_igvm(make_file(), id_key=id_key(), ld=bytes(47))
    with pytest.raises(SigningError, match="family_id must be 16 bytes"):
        sign_igvm(make_file(), id_key=id_key(), family_id=bytes(15))
    with pytest.raises(MeasurementError, match="unknown loader"):
        sign_igvm(make_file(), id_key=id_key(), loader="no-such-loader")
    assert fails(make_file(snp=False)).kinds == ("platform",)
    assert fails(make_file(with_policy=False)).kinds == ("platform",)


def test_sign_image_takes_spec_strings_and_hex_ids() -> None:
    f = make_file()
    data = sign_image(
        f.to_bytes(),
        id_key=f"file:{ID_PEM}",
        author_key=str(AUTHOR_PEM),
        loader="qemu",
        family_id="0x0102030405060708090a0b0c0d0e0f10",
        image_id=bytes.fromhex("1112131415161718191a1b1c1d1e1f20"),
        guest_svn="7",
    )
    expected, _ = sign_igvm(
        f,
        id_key=id_key(),
        author_key=author_key(),
        loader="qemu",
        family_id=bytes(range(1, 17)),
        image_id=bytes(range(0x11, 0x21)),
        guest_svn=7,
    )
    assert data == expected.to_bytes()
    assert verify_igvm(reparse(data), loader="qemu").guest_svn == 7
    with pytest.raises(SigningError, match="image_id must be 32 hexadecimal digits"):
        sign_image(f.to_bytes(), id_key=str(ID_PEM), image_id="not hex")
    with pytest.raises(IgvmFormatError):
        sign_image(b"not an igvm file", id_key=str(ID_PEM))


# --------------------------------------------------------------------------------------------
# One key, three key sources


SIGNER = r'''
"""Deterministic test signer (CommandKey protocol): RFC 6979 over the digest on stdin."""
import sys
from pathlib import Path
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

key = serialization.load_pem_private_key(Path(sys.argv[1]).read_bytes(), password=None)
if sys.argv[-1] == "--public-key":
    sys.stdout.write(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    sys.exit(0)
digest = bytes.fromhex(sys.stdin.read().strip())
der = key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA384()), deterministic_signing=True))
sys.stdout.write(der.hex() + "\n")
'''


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signer") / "signer.py"
    path.write_text(SIGNER)
    return path


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    yield from softhsm_token(tmp_path_factory)


def test_pem_and_deterministic_command_give_identical_bytes(signer: Path) -> None:
    f = make_file()
    pem, _ = sign_igvm(f, id_key=id_key(), author_key=author_key(), guest_svn=5)
    command = key_source_from_spec(f"cmd:{sys.executable} {signer} {ID_PEM}")
    author_command = CommandKey([sys.executable, str(signer), str(AUTHOR_PEM)], deterministic=True)
    cmd, signed = sign_igvm(f, id_key=command, author_key=author_command, guest_svn=5)
    assert cmd.to_bytes() == pem.to_bytes()
    assert not signed.deterministic  # a cmd: spec does not claim RFC 6979, though this signer uses it


def test_pem_pkcs11_and_command_verify_under_one_id_key_digest(softhsm: SoftHsm, signer: Path) -> None:
    f = make_file()
    sources = {
        "pem": (id_key(), author_key()),
        "pkcs11": (
            Pkcs11Key(softhsm.uri(f"token={TOKEN};object=snp-id")),
            key_source_from_spec(softhsm.uri(f"token={TOKEN};object=snp-author")),
        ),
        "cmd": (
            key_source_from_spec(f"cmd:{sys.executable} {signer} {ID_PEM}"),
            key_source_from_spec(f"cmd:{sys.executable} {signer} {AUTHOR_PEM}"),
        ),
    }
    blobs = {}
    for name, (ident, author) in sources.items():
        out, signed = sign_igvm(f, id_key=ident, author_key=author, family_id=b"F" * 16)
        blobs[name] = out.to_bytes()
        report = verify_igvm(reparse(blobs[name]), id_key_digest=ID_DIGEST, author_key_digest=AUTHOR_DIGEST)
        assert report.id_key_digest == signed.id_key_digest == ID_DIGEST, name
        assert report.family_id == b"F" * 16
    assert blobs["pem"] == blobs["cmd"]
    # The token's nonces are random: other signature bytes, same everything else.
    assert len(blobs["pkcs11"]) == len(blobs["pem"]) and blobs["pkcs11"] != blobs["pem"]
    assert without_id_blocks(reparse(blobs["pkcs11"])) == without_id_blocks(reparse(blobs["pem"]))


# --------------------------------------------------------------------------------------------
# Verification failures


@pytest.fixture(scope="module")
def signed_bytes() -> bytes:
    out, _ = sign_igvm(make_file(), id_key=id_key(), author_key=author_key())
    return out.to_bytes()


def _replace_id_block(f: IgvmFile, **changes) -> IgvmFile:
    directives = tuple(
        dataclasses.replace(h, **changes) if isinstance(h, H.SnpIdBlock) else h for h in f.directives
    )
    return reparse(dataclasses.replace(f, directives=directives).to_bytes())


def _with_policy(f: IgvmFile, policy: int) -> IgvmFile:
    inits = tuple(
        dataclasses.replace(h, policy=policy) if isinstance(h, H.GuestPolicy) else h
        for h in f.initializations
    )
    return reparse(dataclasses.replace(f, initializations=inits).to_bytes())


def test_verify_rejects_a_changed_page(signed_bytes: bytes) -> None:
    f = reparse(signed_bytes)
    page = next(h for h in f.directives if isinstance(h, H.PageData) and isinstance(h.data, FileSlice))
    data = bytearray(signed_bytes)
    data[page.data.start + 100] ^= 0x01  # file data: not covered by the header checksum
    tampered = reparse(bytes(data))
    err = fails(tampered)
    assert err.kinds == ("launch-digest",)
    assert str(err).startswith("launch digest mismatch: the ID block signs ")
    assert "changed after signing" in str(err)


def test_verify_rejects_a_changed_signature(signed_bytes: bytes) -> None:
    f = reparse(signed_bytes)
    (block,) = find_id_blocks(f, SNP_MASK)
    sig = bytearray(block.id_key_signature)
    sig[5] ^= 0x40
    err = fails(_replace_id_block(f, id_key_signature=bytes(sig)))
    assert err.kinds == ("signature",)
    assert "ID block signature (ID_BLOCK_SIG) does not verify" in str(err)
    # The author's signature over the ID key is checked too.
    sig = bytearray(block.author_key_signature)
    sig[0] ^= 0x01
    err = fails(_replace_id_block(f, author_key_signature=bytes(sig)))
    assert err.kinds == ("signature",) and "ID key signature (ID_KEY_SIG) does not verify" in str(err)


def test_verify_rejects_a_wrong_key_digest(signed_bytes: bytes) -> None:
    f = reparse(signed_bytes)
    err = fails(f, id_key_digest=AUTHOR_DIGEST)
    assert err.kinds == ("id-key-digest",)
    assert str(err) == f"ID key digest is {ID_DIGEST.hex()}, expected {AUTHOR_DIGEST.hex()}"
    err = fails(f, author_key_digest=ID_DIGEST)
    assert err.kinds == ("author-key-digest",)
    unsigned_author, _ = sign_igvm(make_file(), id_key=id_key())
    err = fails(unsigned_author, author_key_digest=AUTHOR_DIGEST)
    assert "none (no author key)" in str(err)
    # Several failures at once: one line each.
    err = fails(f, id_key_digest=AUTHOR_DIGEST, author_key_digest=ID_DIGEST)
    assert err.kinds == ("id-key-digest", "author-key-digest")
    assert str(err).startswith("2 checks failed: ")


@pytest.mark.parametrize("new_policy", [0x30000 | 0x80000, 0x3001F, 0x12345678])
def test_verify_rejects_a_policy_mismatch(signed_bytes: bytes, new_policy: int) -> None:
    tampered = _with_policy(reparse(signed_bytes), new_policy)
    # Same pages: the launch digest still matches; only the policy the loader rebuilds changed.
    err = fails(tampered)  # fast by default: the signature fails, no policy is guessed
    assert err.kinds == ("signature",) and "--explain" in str(err)
    err = fails(tampered, explain=True)
    assert err.kinds == ("policy",)
    assert str(err) == (
        f"policy mismatch: the ID block was signed for policy 0x30000, but the file's GUEST_POLICY is "
        f"{new_policy:#x} (changed after signing; the SNP firmware would reject the launch)"
    )


def test_verify_missing_and_duplicate_blocks(signed_bytes: bytes) -> None:
    err = fails(make_file())
    assert err.kinds == ("missing",) and str(err).startswith("not signed: no SNP_ID_BLOCK")
    f = reparse(signed_bytes)
    (block,) = find_id_blocks(f, SNP_MASK)
    doubled = reparse(dataclasses.replace(f, directives=(*f.directives, block)).to_bytes())
    err = fails(doubled)
    assert err.kinds == ("duplicate",) and "2 SNP_ID_BLOCK directives" in str(err)


def _reference(f: IgvmFile, **snp) -> dict:
    entry = {
        "digest": measure_platform(f, PlatformType.SEV_SNP, loader="hyperv").hex,
        "policy": "0x30000",
        **snp,
    }
    return {"platforms": {"snp": entry, "native": {"digest": None}}, "build": {"loader": "hyperv"}}


def test_verify_against_reference_values(signed_bytes: bytes) -> None:
    f = reparse(signed_bytes)
    unsigned = make_file()
    ref = _reference(unsigned, id_key_digest=ID_DIGEST.hex(), author_key_digest=AUTHOR_DIGEST.hex())
    report = verify_igvm(f, reference=ref)
    assert report.reference_checked and "reference values match" in report.summary()
    # every platform the reference records is named (the file has NATIVE and SEV_SNP)
    assert report.reference_platforms == ("snp", "native (no launch measurement)")
    # A per-loader table and other spellings of the SNP entry are read too.
    qemu = measure_platform(unsigned, PlatformType.SEV_SNP, loader="qemu").hex
    verify_igvm(f, reference={"platforms": [{"platform": "SEV_SNP", "digests": {"qemu": qemu}},
                                            {"platform": "NATIVE"}]})
    hyperv = ref["platforms"]["snp"]["digest"]
    verify_igvm(f, reference={"platforms": {"SEV_SNP": hyperv, "native": {}}, "build": {"loader": "hyperv"}})
    # issue #15 finding 4: a reference that does not record the file's NATIVE platform is refused
    err = fails(f, reference={"snp": {"launch_digest": hyperv, "policy": {"value": "0x30000"}}})
    assert err.kinds == ("reference",) and "NATIVE platform the reference values do not record" in str(err)

    err = fails(f, reference=_reference(unsigned, digest="00" * 48))
    assert err.kinds == ("reference",)
    assert "the reference values say " + "00" * 48 in str(err)
    err = fails(f, reference=_reference(unsigned, policy=0x3001F))
    assert err.kinds == ("policy",)
    assert str(err) == "policy mismatch: the file's GUEST_POLICY is 0x30000, the reference values say 0x3001f"
    err = fails(f, reference=_reference(unsigned, id_key_digest=AUTHOR_DIGEST.hex()))
    assert err.kinds == ("id-key-digest",) and "the reference values say" in str(err)
    err = fails(f, reference={"platforms": {"tdx": {"digest": "00"}}})
    assert err.kinds == ("reference",) and "no SEV-SNP entry" in str(err)
    # The reference's loader is the default loader of the check.
    signed_qemu, _ = sign_igvm(unsigned, id_key=id_key(), loader="qemu")
    ref = {"platforms": {"snp": {"digest": qemu, "loader": "qemu"}, "native": {}}}
    assert verify_igvm(signed_qemu, reference=ref).loader == "qemu"


# --------------------------------------------------------------------------------------------
# Two-step signing of a file


def test_two_step_gives_the_one_step_bytes() -> None:
    f = make_file()
    tbs = export_igvm_tbs(f, id_key=id_key().public_key(), author_key=author_key(), guest_svn=4)
    document = tbs.to_json()
    assert b"PRIVATE" not in document
    parsed = ExportedTbs.from_json(document)
    id_sig = id_key().sign(parsed.id_block_message)
    author_sig = author_key().sign(parsed.id_key_message or b"")
    out, signed = import_igvm_signature(f, document, id_block_signature=id_sig, id_key_signature=author_sig)
    one_step, _ = sign_igvm(f, id_key=id_key(), author_key=author_key(), guest_svn=4)
    assert out.to_bytes() == one_step.to_bytes()
    assert signed.fields.ld == measure_platform(f, PlatformType.SEV_SNP).digest

    # Another file (one changed page), another policy, another loader: refused.
    other = make_file(policy=0x30000)
    directives = list(other.directives)
    directives[0] = dataclasses.replace(directives[0], data=_page(77))
    other = dataclasses.replace(other, directives=tuple(directives))
    with pytest.raises(SigningError, match="not the file it was exported from"):
        import_igvm_signature(other, tbs, id_block_signature=id_sig, id_key_signature=author_sig)
    with pytest.raises(SigningError, match="for policy 0x30000, but the file's GUEST_POLICY is 0x3001f"):
        import_igvm_signature(
            make_file(policy=0x3001F), tbs, id_block_signature=id_sig, id_key_signature=author_sig
        )
    with pytest.raises(SigningError, match="under loader qemu"):
        import_igvm_signature(f, tbs, id_block_signature=id_sig, id_key_signature=author_sig, loader="qemu")
    with pytest.raises(SigningError, match="author's ID key signature is required"):
        import_igvm_signature(f, tbs, id_block_signature=id_sig)


def test_verify_guesses_only_with_explain(signed_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed check costs no more than a passed one unless ``explain``: no policy is guessed (an
    ECDSA verification each), the file is measured under no other loader."""
    import igvm_builder.sign.image as image

    calls = {"measure": 0, "ecdsa": 0}
    real_measure, real_verify = image._measure, image._ecdsa.verify_message

    def measure(*args, **kwargs):
        calls["measure"] += 1
        return real_measure(*args, **kwargs)

    def verify(*args, **kwargs):
        calls["ecdsa"] += 1
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(image, "_measure", measure)
    monkeypatch.setattr(image._ecdsa, "verify_message", verify)
    f = reparse(signed_bytes)
    broken = dataclasses.replace(f, directives=tuple(  # an ID signature no policy verifies
        dataclasses.replace(h, id_key_signature=bytes([h.id_key_signature[0] ^ 1]) + h.id_key_signature[1:])
        if isinstance(h, H.SnpIdBlock) else h for h in f.directives))
    for explain in (False, True):
        calls.update(measure=0, ecdsa=0)
        err = fails(broken, loader="qemu", explain=explain)  # the file was signed for hyperv
        assert err.kinds == ("signature", "launch-digest")
        assert ("--explain" in str(err)) != explain
        if explain:  # every candidate policy tried, the other loaders measured until one matches
            assert calls["ecdsa"] >= 60 and 1 < calls["measure"] <= len(PROFILES), calls
            assert "--loader hyperv" in str(err)
        else:  # the ID signature once (the author signature is not reached), the asked loader once
            assert calls == {"measure": 1, "ecdsa": 1}, calls
