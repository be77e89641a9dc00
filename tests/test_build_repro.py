"""Issue #4: reproducible builds, and what ``lint --loader qemu`` says about them.

The same config built twice, from different working directories, time zones, umasks and
locales, gives byte-identical IGVM files (and identical reference values); the output mode
does not follow the umask.  Our OVMF SNP build passes ``lint --loader qemu`` without errors,
while the reference vector ``snp_v1.igvm`` (VMSA at 0xfffff000) is flagged.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest
from test_build_helpers import (
    MEMTEST,
    OVMF_SID,
    VECTORS,
    VMLINUZ,
    build_bytes,
    cli,
    config,
    q,
)

from igvm_builder.assemble import build_file
from igvm_builder.config import load_config
from igvm_builder.format.file import IgvmFile
from igvm_builder.lint import lint


def _rel(target: Path, base: Path) -> str:
    return os.path.relpath(target, base)


def write_project(root: Path, kind: str) -> Path:
    """A config with relative paths, an include and a blob: what a real project looks like."""
    proj = root / "project"
    (proj / "conf").mkdir(parents=True)
    (proj / "data").mkdir()
    (proj / "data" / "initrd.img").write_bytes(random.Random(3).randbytes(300_001))
    (proj / "data" / "blob.bin").write_bytes(b"igvm-builder reproducibility blob\n" * 100)
    (proj / "conf" / "common.toml").write_text(
        '[snp]\nvcpus = 2\nvcpu_type = "EPYC-Milan"\nguest_features = 0x21\n\n[tdx]\ntwo_pass = true\n')
    base = proj / "conf"
    if kind == "kernel":
        body = f"""include = ["common.toml"]

[image]
platforms = ["native", "snp", "tdx"]
loader = "qemu"

[kernel]
path = {q(_rel(MEMTEST, base))}
initrd = "../data/initrd.img"
cmdline = "console=ttyS0 quiet"

[[blob]]
path = "../data/blob.bin"
gpa = 0x7000000
measured = false

[memory]
size = "1G"
"""
    else:
        body = f"""include = ["common.toml"]

[image]
platforms = ["snp", "tdx"]
loader = "cloud-hypervisor"

[firmware]
path = {q(_rel(OVMF_SID, base))}

[kernel]
path = {q(_rel(VMLINUZ, base))}
initrd = "../data/initrd.img"
cmdline = "console=ttyS0"
"""
    cfg = base / "build.toml"
    cfg.write_text(body)
    return cfg


@pytest.mark.parametrize("kind", ["kernel", "ovmf"])
def test_build_is_reproducible(tmp_path: Path, kind: str) -> None:
    cfg = write_project(tmp_path, kind)
    runs = [
        {"cwd": cfg.parent, "env": {"TZ": "UTC", "LC_ALL": "C"}, "umask": 0o022},
        {"cwd": "/", "env": {"TZ": "Pacific/Kiritimati", "LC_ALL": "C.UTF-8", "SOURCE_DATE_EPOCH": "1"},
         "umask": 0o077},
    ]
    outputs = []
    for i, run in enumerate(runs):
        out = tmp_path / f"out{i}" / "image.igvm"
        out.parent.mkdir()
        refs = out.with_suffix(".json")
        config_arg = "build.toml" if run["cwd"] == cfg.parent else str(cfg)
        proc = cli("build", config_arg, "-o", str(out), "--reference-values", str(refs), "-q", cwd=run["cwd"],
                   env=run["env"], umask=run["umask"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        outputs.append((out.read_bytes(), json.loads(refs.read_text())))
    (bytes_a, refs_a), (bytes_b, refs_b) = outputs
    assert bytes_a == bytes_b
    assert refs_a == refs_b
    # and the in-process API agrees with the command line
    assert build_bytes(load_config(cfg)) == bytes_a
    f = IgvmFile.from_bytes(bytes_a)
    assert len(f.platforms) == (3 if kind == "kernel" else 2)


def test_api_build_twice_identical(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, "kernel")
    a, hashes_a, notes_a = build_file(load_config(cfg))
    b, hashes_b, notes_b = build_file(load_config(cfg))
    assert a.to_bytes() == b.to_bytes()
    assert hashes_a == hashes_b and notes_a == notes_b
    # every input is hashed, including the included config
    assert {Path(p).name for p in load_config(cfg).input_files} == {
        "common.toml", MEMTEST.name, "initrd.img", "blob.bin"}


# --------------------------------------------------------------------------- lint


def test_lint_qemu_accepts_our_ovmf_snp_build(tmp_path: Path) -> None:
    body = f"""
[image]
platforms = ["snp"]
loader = "qemu"
[firmware]
path = {q(OVMF_SID)}
[kernel]
path = {q(MEMTEST)}
cmdline = "console=ttyS0"
[snp]
vcpus = 4
guest_features = 0x21
"""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(body)
    out = tmp_path / "ovmf.igvm"
    proc = cli("build", str(cfg), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = cli("lint", str(out), "--loader", "qemu", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    findings = json.loads(proc.stdout)
    assert not [fd for fd in findings if fd["severity"] == "error"], findings
    # the API agrees, and the in-memory build is what was written
    f = IgvmFile.load(out)
    assert not [fd for fd in lint(f, "qemu") if fd.severity == "error"]
    assert build_bytes(config(tmp_path, body, "again.toml")) == out.read_bytes()


def test_lint_qemu_flags_the_vmsa_gpa_of_snp_v1() -> None:
    vector = VECTORS / "igvm" / "snp_v1.igvm"
    proc = cli("lint", str(vector), "--loader", "qemu")
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if ": error: " in line]
    assert any("VMSA" in line and "0xfffff000" in line and "0xfffffffff000" in line for line in errors), proc.stdout
    found = lint(IgvmFile.load(vector), "qemu")
    assert any(fd.severity == "error" and "0xfffff000" in fd.message for fd in found)


def test_build_result_chunks_are_the_file(tmp_path: Path) -> None:
    """build(): the streamed chunks (windows of the mmap'd inputs) are exactly the canonical bytes."""
    import hashlib

    from igvm_builder.assemble import WINDOW, build

    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(random.Random(5).randbytes(WINDOW + 12345))  # more than one window
    body = f"""
[image]
platforms = ["native", "snp", "tdx"]
[kernel]
path = {q(VMLINUZ)}
initrd = {q(initrd)}
[memory]
size = "1G"
"""
    cfg = config(tmp_path, body)
    result = build(cfg)
    streamed = list(result.chunks())
    assert all(len(c) <= WINDOW for c in streamed[1:])
    data = b"".join(streamed)
    assert data == result.data == build_bytes(cfg)
    assert b"".join(result.chunks()) == data  # a second pass reads the same bytes back
    assert result.size == len(data) and result.sha256 == hashlib.sha256(data).hexdigest()
    inputs = result.reference_values["inputs"]
    assert inputs[str(initrd)]["sha256"] == hashlib.sha256(initrd.read_bytes()).hexdigest()  # named as written
    assert any(v["sha256"] == hashlib.sha256(VMLINUZ.read_bytes()).hexdigest() for v in inputs.values())


def test_lint_flags_an_snp_policy_without_the_must_be_one_bit(tmp_path: Path) -> None:
    """SNP ABI: GUEST_POLICY bit 17 must be one (the firmware refuses the launch); a TDX policy
    in the same file is not an SNP policy."""
    from igvm_builder.format import headers as H
    from igvm_builder.format.defs import PlatformType

    def policy_file(snp_policy: int) -> IgvmFile:
        return IgvmFile(
            platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),
                       H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.TDX)),
            initializations=(H.GuestPolicy(policy=snp_policy, compatibility_mask=1),
                             H.GuestPolicy(policy=0x0, compatibility_mask=2)),
            directives=(H.PageData(gpa=0x1000, compatibility_mask=3, data=b"x"),))

    bad = [fd for fd in lint(policy_file(0x10000), "hyperv") if "bit 17" in fd.message]
    assert [(fd.severity, fd.header_index) for fd in bad] == [("error", 2)]
    # the TDX policy (header 3) is checked against IGVM's TdxPolicy bits instead
    tdx = IgvmFile(platforms=policy_file(0x30000).platforms,
                   initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),
                                    H.GuestPolicy(policy=0x10000002, compatibility_mask=2)),
                   directives=policy_file(0x30000).directives)
    found = [(fd.severity, fd.header_index, fd.message) for fd in lint(tdx, "hyperv") if "policy" in fd.message]
    assert [(sev, idx) for sev, idx, _m in found] == [("warning", 3)] and "bits 0x10000000" in found[0][2]
    assert not [fd for fd in lint(policy_file(0x30000), "hyperv") if "bit 17" in fd.message]
    path = tmp_path / "bad.igvm"
    path.write_bytes(policy_file(0x1).to_bytes())
    proc = cli("lint", str(path), "--loader", "qemu")
    assert proc.returncode == 1 and "policy 0x1 has bit 17 (0x20000) clear" in proc.stdout, proc.stdout
