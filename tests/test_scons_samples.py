"""End to end: real ``scons`` runs on copies of the samples (issue #6 acceptance).

Each test works in a temporary checkout: SConstruct, site_scons/, samples/ and
igvm_builder/ copied from this repository, beside a ``shared`` link to the real
../shared (the layout of a CI checkout).  One clean ``scons igvm`` build is
shared (module fixture); tests that edit files work on copies of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KEYS = SHARED / "keys"

IMAGES = ("build/hello.igvm", "build/ovmf.igvm", "build/linux.igvm")
SIDECARS = tuple(i + ".ref.json" for i in IMAGES)
INTERMEDIATES = (
    "samples/hello/build/entry.o",
    "samples/hello/build/hello.o",
    "samples/hello/build/hello.elf",
    "samples/linux/build/vmlinuz",
    "samples/linux/build/init.o",
    "samples/linux/build/init",
    "samples/linux/build/initrd.cpio",
)
OUTPUTS = IMAGES + SIDECARS + INTERMEDIATES
HELLO = (
    "samples/hello/build/hello.o",
    "samples/hello/build/hello.elf",
    "build/hello.igvm",
    "build/hello.igvm.ref.json",
)

pytestmark = pytest.mark.skipif(
    not (SHARED / "inputs").is_dir(), reason="needs ../shared beside the checkout"
)


def make_checkout(parent: Path) -> Path:
    """A clean checkout at parent/main (with parent/shared -> the real ../shared)."""
    main = parent / "main"
    ignore = shutil.ignore_patterns("__pycache__", "build", ".sconsign*")
    main.mkdir(parents=True)
    shutil.copy2(REPO / "SConstruct", main / "SConstruct")
    for tree in ("site_scons", "samples", "igvm_builder"):
        shutil.copytree(REPO / tree, main / tree, ignore=ignore, symlinks=True)
    (parent / "shared").symlink_to(SHARED, target_is_directory=True)
    return main


def copy_checkout(built: Path, parent: Path) -> Path:
    """A copy of a built checkout (outputs and .sconsign included): up to date as it stands."""
    shutil.copytree(built.parent, parent, symlinks=True)
    return parent / "main"


def scons(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SCONSFLAGS", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine: .pyc files keep no-op runs fast
    proc = subprocess.run(
        [sys.executable, "-m", "SCons", "-Q", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"scons {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def is_up_to_date(cwd: Path, *args: str) -> bool:
    """``scons -q``: exit status 0 means nothing would be built."""
    return scons(cwd, "-q", *args, check=False).returncode == 0


def stamps(root: Path, names=OUTPUTS) -> dict[str, tuple[int, int]]:
    """Inode and mtime of each output: atomic writes give a rebuilt file a new inode."""
    return {n: ((st := (root / n).stat()).st_ino, st.st_mtime_ns) for n in names}


def rebuilt(before: dict[str, tuple[int, int]], root: Path) -> set[str]:
    after = stamps(root, before)
    return {n for n in before if after[n] != before[n]}


def leftover_files(root: Path) -> list[str]:
    dirs = [root / "build", *(root / "samples").glob("*/build")]
    return sorted(
        str(p.relative_to(root)) for d in dirs if d.exists() for p in d.rglob("*") if not p.is_dir()
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("scons: ***")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = make_checkout(tmp_path_factory.mktemp("built"))
    scons(root, "igvm")
    return root


@pytest.fixture
def work(built, tmp_path) -> Iterator[Path]:
    yield copy_checkout(built, tmp_path / "copy")


# ------------------------------------------------------------------------------------ building


def test_clean_build_builds_every_sample(built):
    for name in OUTPUTS:
        assert (built / name).is_file(), name
    for image in IMAGES:
        data = (built / image).read_bytes()
        assert data[:4] == b"IGVM", image
        refs = json.loads((built / (image + ".ref.json")).read_text())
        assert isinstance(refs, dict) and refs, image
    assert (built / "samples/linux/build/vmlinuz").read_bytes() == (
        SHARED / "inputs/vmlinuz-6.1.0-56-cloud-amd64"
    ).read_bytes()
    assert (built / "samples/linux/build/initrd.cpio").read_bytes().startswith(b"070701")


def test_linux_initrd_holds_only_a_static_init(built):
    """/init is the compiled program (a static ELF, no interpreter: the initrd has no shell or libc)."""
    archive = (built / "samples/linux/build/initrd.cpio").read_bytes()
    members = []
    offset = 0
    while True:  # newc: 110-byte header, name, data, each padded to 4 bytes
        fields = [int(archive[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = archive[offset + 110: offset + 110 + namesize - 1]
        start = offset + 110 + namesize + (-(110 + namesize) % 4)
        if name == b"TRAILER!!!":
            break
        members.append((name, mode, archive[start: start + size]))
        offset = start + size + (-size % 4)
    assert [(name, oct(mode)) for name, mode, _ in members] == [(b"init", "0o100755")]
    init = members[0][2]
    assert init == (built / "samples/linux/build/init").read_bytes()
    with open(built / "samples/linux/build/init", "rb") as fh:
        elf = ELFFile(fh)
        assert elf["e_type"] == "ET_EXEC" and elf["e_machine"] == "EM_X86_64"
        assert not [s for s in elf.iter_segments() if s["p_type"] in ("PT_INTERP", "PT_DYNAMIC")]
    assert b"igvm-builder linux sample: /init reached\n" in init


def test_ovmf_sample_adds_native_and_keeps_its_snp_and_tdx_digests(built, tmp_path):
    """Adding the native platform changes no digest: SNP and TDX equal an SNP + TDX build of the
    same config, SNP equals sev-snp-measure's (under the ZERO-page loader profile that tool models)
    and TDX the shared td-shim vector when the installed OVMF is the one the vector was made from."""
    from igvm_builder.assemble import build_file
    from igvm_builder.config import load_config
    from igvm_builder.format.file import IgvmFile
    from igvm_builder.measure import measure_file

    def digests(f, loader):
        return {m.platform.name: m.hex for m in measure_file(f, loader=loader) if m.digest is not None}

    sample = IgvmFile.load(built / "build/ovmf.igvm")
    assert sorted(p.platform_type.name for p in sample.platforms) == ["NATIVE", "SEV_SNP", "TDX"]
    config_path = built / "samples/ovmf/ovmf.toml"
    text = config_path.read_text()
    assert 'platforms = ["native", "snp", "tdx"]' in text
    two = tmp_path / "ovmf-snp-tdx.toml"
    two.write_text(text.replace('platforms = ["native", "snp", "tdx"]', 'platforms = ["snp", "tdx"]'))
    built_two, _hashes, _notes = build_file(load_config(two))
    old = IgvmFile.from_bytes(built_two.to_bytes())
    assert sorted(p.platform_type.name for p in old.platforms) == ["SEV_SNP", "TDX"]
    for loader in ("hyperv", "qemu", "cloud-hypervisor"):
        assert digests(sample, loader) == digests(old, loader), loader

    firmware = Path("/usr/share/ovmf/OVMF.fd")
    snp_measure = subprocess.run(
        [str(Path(sys.executable).parent / "sev-snp-measure"), "--mode", "snp", "--vcpus=2",
         "--vcpu-type=EPYC-v4", "--ovmf", str(firmware)],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.split()[-1].lower()
    assert digests(sample, "cloud-hypervisor")["SEV_SNP"] == snp_measure
    vector = json.loads((SHARED / "vectors/measure/tdx.json").read_text())["cases"][0]
    assert vector["firmware"] == "firmware/bookworm-OVMF.fd"
    if hashlib.sha256(firmware.read_bytes()).hexdigest() == vector["firmware_sha256"]:
        assert digests(sample, "hyperv")["TDX"] == vector["expected_mrtd_single_pass"]


def test_hello_kernel_is_a_pvh_elf_linked_at_1mib(built):
    with open(built / "samples/hello/build/hello.elf", "rb") as fh:
        elf = ELFFile(fh)
        assert elf.elfclass == 64 and elf["e_machine"] == "EM_X86_64"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert min(s["p_paddr"] for s in loads) == 0x100000
        notes = [n for s in elf.iter_segments() if s["p_type"] == "PT_NOTE" for n in s.iter_notes()]
        pvh = [n for n in notes if n["n_name"] == "Xen" and n["n_type"] == 18]
        assert len(pvh) == 1
        entry = int.from_bytes(pvh[0]["n_descdata"][:4], "little")
        assert entry == elf.get_section_by_name(".symtab").get_symbol_by_name("pvh_start")[0]["st_value"]
        assert not elf.get_section_by_name(".interp") and not elf.get_section_by_name(".dynamic")
        text = elf.get_section_by_name(".rodata").data()
    assert b"Hello from an IGVM-launched kernel!" in text


def test_second_run_does_nothing_in_under_a_second(built):
    """Timed in CPU seconds of the scons process (wall time is reported): a loaded CI box
    stretches wall time, not the work a no-op build does."""
    timings = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        assert is_up_to_date(built, "igvm")
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        timings.append((round(cpu, 3), round(wall, 3)))
    assert min(cpu for cpu, _ in timings) < 1.0, f"(cpu, wall) seconds: {timings}"
    assert "is up to date" in scons(built, "igvm").stdout


def test_editing_the_kernel_source_rebuilds_only_its_image(work):
    before = stamps(work)
    source = work / "samples/hello/hello.c"
    source.write_text(source.read_text().replace("Hello from", "Greetings from"))
    assert not is_up_to_date(work, "igvm")
    scons(work, "igvm")
    assert rebuilt(before, work) == set(HELLO)
    assert is_up_to_date(work, "igvm")


def test_unrelated_edits_rebuild_nothing(work):
    (work / "samples/hello/README.md").write_text("edited\n")
    (work / "samples/NOTES.txt").write_text("new file\n")
    os.utime(work / "samples/hello/hello.c")  # a touch is not a change (content decider)
    assert is_up_to_date(work, "igvm")


def test_changing_platforms_rebuilds_the_images(work):
    before = stamps(work)
    assert not is_up_to_date(work, "igvm", "IGVM_PLATFORMS=snp")
    out = scons(work, "igvm", "IGVM_PLATFORMS=snp", "--debug=explain").stdout
    assert "the contents of the build action changed" in out
    assert rebuilt(before, work) == set(IMAGES + SIDECARS)
    # the kernels booted without firmware on SNP are told what the image leaves undone; OVMF is not
    notes = [line for line in out.splitlines() if line.startswith("  note    ")]
    assert sorted(line.split(":")[0].split()[-1] for line in notes) == ["build/hello.igvm", "build/linux.igvm"]
    assert all("snp: the kernel starts without firmware" in line for line in notes)
    assert is_up_to_date(work, "igvm", "IGVM_PLATFORMS=snp")
    assert not is_up_to_date(work, "igvm")


def test_changing_igvm_builder_code_rebuilds(work):
    module = work / "igvm_builder/cpio.py"
    module.write_text(module.read_text() + "\n# an edit to the library\n")
    assert not is_up_to_date(work, "igvm")
    out = scons(work, "igvm", "--debug=explain").stdout
    assert "igvm_builder/cpio.py' changed" in out
    assert is_up_to_date(work, "igvm")


def test_clean_removes_outputs_and_sidecars(work):
    scons(work, "-c", "igvm")
    assert leftover_files(work) == []
    assert not any((work / n).exists() for n in OUTPUTS)


def test_parallel_and_cache_fed_builds_are_byte_identical(built, tmp_path):
    cache = tmp_path / "cache"
    first = make_checkout(tmp_path / "a")
    scons(first, "-j", "2", "igvm", f"CACHE_DIR={cache}")
    second = make_checkout(tmp_path / "b")
    out = scons(second, "igvm", f"CACHE_DIR={cache}").stdout
    for image in IMAGES + SIDECARS:
        assert f"Retrieved `{image}' from cache" in out
    for name in OUTPUTS:
        reference = (built / name).read_bytes()
        assert (first / name).read_bytes() == reference, f"-j 2 differs: {name}"
        assert (second / name).read_bytes() == reference, f"cache-fed differs: {name}"


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param("[kernel\n", "samples/hello/hello.toml:", id="toml-syntax"),
        pytest.param("[snp]\nvcpus = 'x'\n", "samples/hello/hello.toml", id="bad-value"),
    ],
)
def test_broken_config_fails_in_one_line_without_output(work, edit, expected):
    config = work / "samples/hello/hello.toml"
    config.write_text(config.read_text().replace("[snp]\npolicy = 0x30000\nvcpus = 1\n", "") + edit)
    proc = scons(work, "igvm", check=False)
    assert proc.returncode == 2
    errors = error_lines(proc)
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "build/hello.igvm").exists() and not (work / "build/hello.igvm.ref.json").exists()
    assert not list((work / "build").glob(".igvm-*")), "temporary files left behind"


def test_missing_input_fails_in_one_line_naming_it(work):
    config = work / "samples/hello/hello.toml"
    config.write_text(config.read_text().replace("build/hello.elf", "build/missing.elf"))
    proc = scons(work, "igvm", check=False)
    assert proc.returncode == 2
    errors = error_lines(proc)
    assert len(errors) == 1 and "samples/hello/build/missing.elf" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_ovmf_asks_to_install_it(work):
    config = work / "samples/ovmf/ovmf.toml"
    config.write_text(config.read_text().replace("/usr/share/ovmf/OVMF.fd", "/nonexistent/ovmf/OVMF.fd"))
    before = stamps(work)
    proc = scons(work, "igvm", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()], "one line"
    assert "/nonexistent/ovmf/OVMF.fd" in proc.stderr and "apt-get install ovmf" in proc.stderr
    assert rebuilt(before, work) == set()
    scons(work, "-c", "igvm")  # cleaning still works without the firmware
    assert leftover_files(work) == []


# ------------------------------------------------------------------------------------ other stages


def test_repro_check_writes_a_stamp(work):
    scons(work, "build/hello.repro")
    stamp = json.loads((work / "build/hello.repro").read_text())
    assert stamp["result"] == "reproducible"
    assert stamp["config"] == "samples/hello/hello.toml" and stamp["images"] == ["build/hello.igvm"]


def test_signing_never_prints_key_material(work):
    key = KEYS / "test-only-id-p384.pem"
    spec = f"IGVM_SIGNING_KEY=file:{key}"
    refused = scons(work, "igvm", spec, check=False)  # the public TEST-ONLY key, as the CLI refuses it
    assert refused.returncode != 0 and "refusing to sign with the public TEST-ONLY ID key" in refused.stderr
    assert "set IGVM_ALLOW_TEST_KEYS=1" in refused.stderr and not (work / "build/hello.signed.igvm").exists()
    spec = f"IGVM_SIGNING_KEY=file:{key} IGVM_ALLOW_TEST_KEYS=1"
    proc = scons(work, "igvm", *spec.split(), "VERBOSE=1")
    signed = work / "build/hello.signed.igvm"
    assert signed.is_file()
    assert signed.read_bytes() != (work / "build/hello.igvm").read_bytes()
    body = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    for line in body:
        assert line not in proc.stdout and line not in proc.stderr
    # the signing stage's one line: the config's loader (hello.toml says qemu) and the key digest
    assert "added an SEV-SNP ID block for loader qemu (image.loader of hello.toml)" in proc.stdout
    assert "TEST-ONLY ID key was used" in proc.stderr
    assert is_up_to_date(work, "igvm", *spec.split())
    assert not is_up_to_date(work, "igvm", f"IGVM_SIGNING_KEY=file:{KEYS / 'test-only-author-p384.pem'}",
                             "IGVM_ALLOW_TEST_KEYS=1")
