"""The signed-release CI flow, as a user runs it, through the CLI and through SCons.

For each KVM loader profile (qemu, cloud-hypervisor) the kernel project of test_repro is
built, signed with a key held in a SoftHSM2 token (PKCS#11; the token holds the TEST-ONLY
keys, so signing is explicitly allowed), and published: the signed image and its reference
values.  Then, from a clean copy of the sources at another path, ``verify-release --igvm``
must accept the release, and must fail, naming the cause, when an input changed, when the
image was re-signed with another key, and when the loader does not match.

Independent expectations: the ID key digest is the one of shared/vectors/measure/idblock.json;
the signed launch digest is the SNP digest the unsigned build's own reference values publish
for that loader (and the two KVM profiles give different digests for this image, which the
test checks first, so a loader mix-up cannot pass unnoticed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_release import run
from softhsm import KEYS, TOKEN, SoftHsm, softhsm_token
from test_repro import compile_kernel, make_project

from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H

REPO = Path(__file__).resolve().parents[1]
ID_DIGEST = KEYS["id_key_digest"]
AUTHOR_DIGEST = KEYS["author_key_digest"]
KVM_LOADERS = ("qemu", "cloud-hypervisor")

SCONSTRUCT = """\
import sys
sys.path.insert(0, {repo!r})
import igvm_builder.scons

env = Environment(tools=[igvm_builder.scons.generate], IGVM_SIGNING_KEY=ARGUMENTS["KEY"],
                  IGVM_ALLOW_TEST_KEYS=True)
image = env.IGVM("dist/hello", "configs/hello.toml")  # + dist/hello.igvm.ref.json
env.IGVMSign("dist/hello.signed.igvm", image)         # + dist/hello.signed.igvm.ref.json
"""


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    yield from softhsm_token(tmp_path_factory)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_kernel(tmp_path_factory.mktemp("kernel") / "hello.elf")


def _project(root: Path, kernel: Path, loader: str) -> Path:
    cfg = make_project(root, kernel)
    text = cfg.read_text()
    assert 'loader = "qemu"' in text
    cfg.write_text(text.replace('loader = "qemu"', f'loader = "{loader}"'))
    # two vCPUs: KVM measures a reset-state VMSA for the second one, which QEMU and Cloud Hypervisor
    # set up differently, so the two profiles sign different digests (and the signature records it)
    common = cfg.parent / "common.toml"
    common.write_text(common.read_text().replace("[snp]\n", "[snp]\nvcpus = 2\n"))
    return cfg


def _cli_release(root: Path, kernel: Path, hsm: SoftHsm, loader: str) -> dict[str, Path]:
    cfg = _project(root / "src", kernel, loader)
    dist = root / "src" / "dist"
    dist.mkdir()
    image, refs = dist / "hello.igvm", dist / "hello.igvm.ref.json"
    signed, signed_refs = dist / "hello.signed.igvm", dist / "hello.signed.igvm.ref.json"
    rc, _, err = run("build", cfg, "-o", image, "--reference-values", refs, "-q")
    assert rc == 0, err
    rc, out, err = run("sign", image, "-o", signed, "--config", cfg, "--id-key", hsm.uri(f"token={TOKEN};object=snp-id"),
                       "--allow-test-keys", "--reference", refs, "--reference-values", signed_refs)
    assert rc == 0, err
    # the one-line result: the config's loader, the ID key digest
    assert f"for loader {loader} (image.loader of hello.toml)" in out and f"ID key digest {ID_DIGEST}" in out
    return {"config": cfg, "image": image, "refs": refs, "signed": signed, "signed_refs": signed_refs}


def _scons_release(root: Path, kernel: Path, hsm: SoftHsm, loader: str) -> dict[str, Path]:
    cfg = _project(root / "src", kernel, loader)
    (root / "src" / "SConstruct").write_text(SCONSTRUCT.format(repo=str(REPO)))
    env = {k: v for k, v in hsm.env.items() if k != "SCONSFLAGS"}
    proc = subprocess.run([sys.executable, "-m", "SCons", "-Q", f"KEY={hsm.uri(f'token={TOKEN};object=snp-id')}"],
                          cwd=root / "src", env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the signing stage's one line: the config's loader and the key digest, never the PIN
    assert f"for loader {loader} (image.loader of hello.toml)" in proc.stdout, proc.stdout
    assert f"ID key digest {ID_DIGEST}" in proc.stdout and "4711" not in proc.stdout + proc.stderr
    dist = root / "src" / "dist"
    return {"config": cfg, "image": dist / "hello.igvm", "refs": dist / "hello.igvm.ref.json",
            "signed": dist / "hello.signed.igvm", "signed_refs": dist / "hello.signed.igvm.ref.json"}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, kernel: Path, softhsm: SoftHsm) -> dict[tuple[str, str], Any]:
    made: dict[tuple[str, str], dict[str, Path]] = {}
    for via, make in (("cli", _cli_release), ("scons", _scons_release)):
        for loader in KVM_LOADERS:
            made[via, loader] = make(tmp_path_factory.mktemp(f"{via}-{loader}"), kernel, softhsm, loader)
    return made


def _clean_copy(release: dict[str, Path], dest: Path) -> dict[str, Path]:
    """The sources (as a fresh checkout would have them) at another, deeper path, and the
    published files as downloaded elsewhere; nothing of the build tree comes along."""
    src = release["config"].parents[1]
    checkout = dest / "elsewhere" / "a" / "checkout"
    shutil.copytree(src / "configs", checkout / "configs")
    shutil.copytree(src / "build", checkout / "build")  # the kernel, an input the release names
    download = dest / "download"
    download.mkdir()
    for key in ("signed", "signed_refs"):
        shutil.copyfile(release[key], download / release[key].name)
    return {"config": checkout / "configs" / "hello.toml", "kernel": checkout / "build" / "hello.elf",
            "signed": download / release["signed"].name, "refs": download / release["signed_refs"].name}


def _verify_release(copy: dict[str, Path], *extra: object) -> tuple[int, dict[str, Any]]:
    rc, out, err = run("verify-release", copy["config"], "--reference", copy["refs"], "--igvm", copy["signed"],
                       "--json", *extra)
    assert rc in (0, 1), err
    return rc, json.loads(out)


def _problems(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in doc["checks"] if not c["ok"]]


CASES = [(via, loader) for via in ("cli", "scons") for loader in KVM_LOADERS]


def test_the_kvm_profiles_sign_different_digests(releases: dict[tuple[str, str], Any]) -> None:
    """Precondition of the loader cases: this image measures differently under the two profiles."""
    digests = {json.loads(releases["cli", loader]["refs"].read_text())["platforms"]["snp"]["digest"]
               for loader in KVM_LOADERS}
    assert len(digests) == 2


@pytest.mark.parametrize(("via", "loader"), CASES)
def test_signed_release_verifies_from_a_clean_copy(releases: dict[tuple[str, str], Any], tmp_path: Path,
                                                   via: str, loader: str) -> None:
    release = releases[via, loader]
    build_refs = json.loads(release["refs"].read_text())
    refs = json.loads(release["signed_refs"].read_text())
    # what the published reference values of the signed image say
    sig = refs["signature"]
    assert sig["loader"] == loader and sig["id_key_digest"] == ID_DIGEST and sig["author_key_digest"] is None
    assert sig["launch_digest"] == build_refs["platforms"]["snp"]["digest"]  # the unsigned build's digest
    assert sig["unsigned_file"] == build_refs["file"]
    assert refs["inputs"] == build_refs["inputs"] and refs["build"] == build_refs["build"]
    snp = refs["platforms"]["snp"]
    assert snp["id_block"]["present"] is True and snp["id_key_digest"] == ID_DIGEST
    assert snp["id_block"]["ld"] == sig["launch_digest"] and snp["digest"] == sig["launch_digest"]
    ld = next(h for h in IgvmFile.load(release["signed"]).directives if isinstance(h, H.SnpIdBlock)).ld
    assert bytes(ld).hex() == sig["launch_digest"]
    # the CI step: verify the published release from a clean copy of the sources elsewhere
    copy = _clean_copy(release, tmp_path)
    rc, doc = _verify_release(copy)
    assert rc == 0 and doc["ok"], _problems(doc)
    kinds = {c["kind"] for c in doc["checks"]}
    assert {"input", "file", "measurement", "igvm", "signature"} <= kinds
    assert any(c["kind"] == "signature" and c["name"] == "verify" and c["ok"] for c in doc["checks"])
    # verify with the same reference values agrees
    rc, _, err = run("verify", copy["signed"], "--reference", copy["refs"])
    assert rc == 0, err


@pytest.mark.parametrize(("via", "loader"), CASES)
def test_changed_input_is_named_first(releases: dict[tuple[str, str], Any], tmp_path: Path,
                                      via: str, loader: str) -> None:
    copy = _clean_copy(releases[via, loader], tmp_path)
    compile_kernel(tmp_path / "k2" / "hello.elf", variant="2").replace(copy["kernel"])
    rc, doc = _verify_release(copy)
    problems = _problems(doc)
    assert rc == 1 and problems[0]["kind"] == "input" and problems[0]["name"] == "../build/hello.elf"
    assert problems[0]["message"].startswith("kernel ../build/hello.elf: sha256 ")
    # the signed file is still the one published: only the sources moved on
    assert not any(c["kind"] == "igvm" and not c["ok"] for c in doc["checks"])
    assert any(c["kind"] == "signature" and c["name"] == "unsigned" and not c["ok"] for c in problems)


@pytest.mark.parametrize(("via", "loader"), CASES)
def test_resigned_with_another_key_is_named(releases: dict[tuple[str, str], Any], softhsm: SoftHsm,
                                            tmp_path: Path, via: str, loader: str) -> None:
    release = releases[via, loader]
    copy = _clean_copy(release, tmp_path)
    # the same launch (the config's loader and vCPUs), another ID key
    rc, _, err = run("sign", release["signed"], "-o", copy["signed"], "--config", copy["config"],
                     "--allow-test-keys", "--id-key", softhsm.uri(f"token={TOKEN};object=snp-author"))
    assert rc == 0, err
    rc, doc = _verify_release(copy)
    problems = _problems(doc)
    assert rc == 1
    assert [(c["kind"], c["name"]) for c in problems] == [("igvm", str(copy["signed"])),
                                                          ("signature", "id-key-digest")]
    assert f"ID key digest is {AUTHOR_DIGEST}, expected {ID_DIGEST}" in problems[1]["message"]


@pytest.mark.parametrize(("via", "loader"), CASES)
def test_loader_mismatch_is_named(releases: dict[tuple[str, str], Any], softhsm: SoftHsm, tmp_path: Path,
                                  via: str, loader: str) -> None:
    release = releases[via, loader]
    other = next(x for x in KVM_LOADERS if x != loader)
    copy = _clean_copy(release, tmp_path)
    # the published image verified for another loader than the one recorded
    rc, doc = _verify_release(copy, "--loader", other)
    names = {(c["kind"], c["name"]) for c in _problems(doc)}
    assert rc == 1 and ("signature", "launch-digest") in names
    msg = next(c["message"] for c in _problems(doc) if c["name"] == "launch-digest")
    assert f"under loader {other}" in msg and f"loader {loader}" in msg
    # an image re-signed (same key) for the other loader, checked against the published values
    rc, _, err = run("sign", release["signed"], "-o", copy["signed"], "--config", copy["config"], "--loader",
                     other.upper(), "--allow-test-keys", "--id-key", softhsm.uri(f"token={TOKEN};object=snp-id"))
    assert rc == 0, err
    rc, doc = _verify_release(copy)
    problems = _problems(doc)
    assert rc == 1 and ("signature", "launch-digest") in {(c["kind"], c["name"]) for c in problems}
    msg = next(c["message"] for c in problems if c["name"] == "launch-digest")
    assert f"under loader {loader}" in msg and f"loader {other}" in msg  # signed for the other one


def test_verify_release_of_a_signed_image_needs_its_signed_reference_values(
        releases: dict[tuple[str, str], Any], tmp_path: Path) -> None:
    """The unsigned build's reference values say nothing about a signature: the check names that."""
    release = releases["cli", "qemu"]
    rc, out, _ = run("verify-release", release["config"], "--reference", release["refs"], "--igvm",
                     release["signed"])
    assert rc == 1 and "the reference values record no signature" in out
    assert "without its ID block it is the rebuild" not in out.split("does NOT match")[1].split("\n")[0]
    assert os.path.exists(release["signed"])


def test_scons_signing_stage_takes_the_config_sign_table(kernel: Path, softhsm: SoftHsm, tmp_path: Path) -> None:
    """No $IGVM_SIGNING_KEY: IGVMSign signs with the config's [sign] table (key, IDs, SVN), for its
    image.loader, and refuses the TEST-ONLY key unless IGVM_ALLOW_TEST_KEYS is set."""
    cfg = _project(tmp_path / "src", kernel, "cloud-hypervisor")
    uri = softhsm.uri(f"token={TOKEN};object=snp-id")
    cfg.write_text(cfg.read_text() + f"\n[sign]\nid_key = '{uri}'\nguest_svn = 5\nimage_id = \"{'ab' * 16}\"\n")
    sconstruct = SCONSTRUCT.format(repo=str(REPO)).replace('IGVM_SIGNING_KEY=ARGUMENTS["KEY"],\n', "").replace(
        "IGVM_ALLOW_TEST_KEYS=True", 'IGVM_ALLOW_TEST_KEYS=ARGUMENTS.get("ALLOW", "")')
    (tmp_path / "src" / "SConstruct").write_text(sconstruct)

    def scons(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "SCons", "-Q", *args], cwd=tmp_path / "src", env=softhsm.env,
                              capture_output=True, text=True, timeout=600, check=False)

    refused = scons()
    assert refused.returncode != 0 and "refusing to sign with the public TEST-ONLY ID key" in refused.stderr
    assert "set IGVM_ALLOW_TEST_KEYS=1" in refused.stderr
    proc = scons("ALLOW=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "for loader cloud-hypervisor (image.loader of hello.toml)" in proc.stdout
    block = next(h for h in IgvmFile.load(tmp_path / "src" / "dist" / "hello.signed.igvm").directives
                 if isinstance(h, H.SnpIdBlock))
    assert block.guest_svn == 5 and bytes(block.image_id).hex() == "ab" * 16
    refs = json.loads((tmp_path / "src" / "dist" / "hello.signed.igvm.ref.json").read_text())
    assert refs["signature"]["id_key_digest"] == ID_DIGEST and refs["signature"]["guest_svn"] == 5
