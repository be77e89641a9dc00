"""Reproducibility checks (igvm_builder.repro) and ``igvm-builder repro``.

Configs like the samples: a freestanding ELF kernel compiled here with gcc (kernel named
relatively from outside the config's directory, an include and a blob), and OVMF named by
absolute path.  Nondeterminism is injected into a real subprocess build through a
``sitecustomize`` module (on ``PYTHONPATH``, active only when ``IGVM_TEST_INJECT_TIMESTAMP``
is set) that writes the current time into the blob as the builder reads it; the check must
then fail with a diff naming the blob page's GPA.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import kernels
import pytest

from igvm_builder.assemble import build
from igvm_builder.cli import main
from igvm_builder.config import load_config
from igvm_builder.errors import ReproducibilityError
from igvm_builder.repro import (
    check_config_reproducible,
    check_config_reproducible_in_process,
    compare_builds,
    compare_reference_values,
    stage_tree,
)

OVMF = Path(__file__).resolve().parents[1].parent / "shared" / "firmware" / "bookworm-OVMF.fd"
BLOB_GPA = 0x800000

if shutil.which("gcc") is None:  # a hard requirement, like tests/test_inputs_elf.py
    raise RuntimeError("gcc is required by these tests")

def compile_kernel(out: Path, variant: str = "1") -> Path:
    """The small PVH kernel (kernels.compile_kernel); a different ``variant`` gives different bytes."""
    return kernels.compile_kernel(out, banner=f"igvm-builder repro kernel {variant}", bss_size=0x2000)


CONFIG = """\
# A kernel launch like samples/hello: the kernel lives outside this directory.
include = ["common.toml"]

[image]
platforms = ["native", "snp", "tdx"]
loader = "qemu"

[kernel]
path = "../build/hello.elf"
format = "elf"
cmdline = "console=ttyS0"

[[blob]]
path = "data/blob.bin"
gpa = 0x800000
"""

COMMON = """\
[memory]
size = "64M"

[snp]
policy = 0x30000
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_kernel(tmp_path_factory.mktemp("kernel") / "hello.elf")


def make_project(root: Path, kernel: Path) -> Path:
    """root/configs/hello.toml (+ common.toml, data/blob.bin) and root/build/hello.elf."""
    cfg_dir = root / "configs"
    (cfg_dir / "data").mkdir(parents=True)
    (root / "build").mkdir()
    shutil.copyfile(kernel, root / "build" / "hello.elf")
    (cfg_dir / "data" / "blob.bin").write_bytes(b"".join(bytes([i]) * 4096 for i in range(4)))
    (cfg_dir / "common.toml").write_text(COMMON)
    cfg = cfg_dir / "hello.toml"
    cfg.write_text(CONFIG)
    return cfg


@pytest.fixture
def project(tmp_path: Path, kernel: Path) -> Path:
    return make_project(tmp_path / "proj", kernel)


@pytest.fixture
def ovmf_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "ovmf" / "ovmf.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[image]\nplatforms = ["snp", "tdx"]\n\n[firmware]\npath = "{OVMF}"\n\n'
                   '[snp]\nvcpus = 2\nvcpu_type = "EPYC-v4"\n')
    return cfg


SITECUSTOMIZE = '''
import importlib.machinery
import importlib.util
import os
import sys

# Do not shadow another sitecustomize further down the path (coverage hooks, distro defaults).
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))

if os.environ.get("IGVM_TEST_INJECT_TIMESTAMP"):
    import time
    import igvm_builder.assemble.mapped as _b

    _get = _b._Inputs.get

    def _get_with_timestamp(self, path, role):
        view = _get(self, path, role)
        if role != "blob":
            return view
        data = bytearray(view)
        data[0x2010:0x2018] = time.time_ns().to_bytes(8, "little")  # the third page of the blob
        return memoryview(bytes(data))

    _b._Inputs.get = _get_with_timestamp
'''


@pytest.fixture
def inject_timestamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(hook) + (os.pathsep + old if old else ""))
    monkeypatch.setenv("IGVM_TEST_INJECT_TIMESTAMP", "1")


# --------------------------------------------------------------------------------- staging


def test_stage_tree_mirrors_layout(project: Path, tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    tree = stage_tree(project, str(dest), mtime=123456789, mode=0o444, reverse=True)
    staged = Path(tree.config)
    assert staged.read_bytes() == project.read_bytes()  # the config is not rewritten
    assert staged.relative_to(dest) == Path("configs/hello.toml")  # common ancestor: proj/
    for rel in ("configs/common.toml", "configs/data/blob.bin", "build/hello.elf"):
        p = dest / rel
        assert p.read_bytes() == (project.parent.parent / rel).read_bytes()
        st = p.stat()
        assert int(st.st_mtime) == 123456789 and stat.S_IMODE(st.st_mode) == 0o444
    assert tree.unmoved == ()
    cfg = load_config(staged)
    assert all(str(p).startswith(str(dest)) for p in cfg.input_files)
    assert tree.files[0].endswith("hello.toml")  # reverse creation order


def test_stage_tree_absolute_input_stays(ovmf_config: Path, tmp_path: Path) -> None:
    tree = stage_tree(ovmf_config, str(tmp_path / "stage"))
    assert tree.unmoved == (str(OVMF),)
    assert Path(tree.config).read_bytes() == ovmf_config.read_bytes()


# --------------------------------------------------------------------------------- passing


def test_repro_elf_subprocess(project: Path) -> None:
    report = check_config_reproducible(project)
    fresh = build(load_config(project))
    assert report.sha256 == fresh.sha256 and report.size == fresh.size
    assert report.isolation == "subprocess"
    assert {"TZ", "umask", "PYTHONHASHSEED", "environment order", "input mtimes", "working directory"} <= \
        set(report.perturbed)
    assert report.platforms == ("native", "snp", "tdx") and report.loader == "qemu"
    line = report.line()
    assert "\n" not in line and line.startswith(f"{project}: reproducible: 2 builds (subprocess) agree")


def test_repro_ovmf_subprocess(ovmf_config: Path) -> None:
    report = check_config_reproducible(ovmf_config, platforms="snp")
    assert report.platforms == ("snp",)
    assert report.unmoved == (str(OVMF),)
    assert f"read in place (absolute paths): {OVMF}" in report.line()


def test_repro_in_process(project: Path, ovmf_config: Path) -> None:
    r1 = check_config_reproducible_in_process(project, platforms=["snp"], loader="hyperv")
    assert r1.isolation == "in-process" and r1.platforms == ("snp",) and r1.loader == "hyperv"
    r2 = check_config_reproducible(ovmf_config, isolation="in-process")
    assert r2.sha256 == build(load_config(ovmf_config)).sha256


def test_cli_repro_ok(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keep = tmp_path / "keep"
    assert main(["repro", str(project), "--in-process", "--keep", str(keep)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "reproducible" in out
    assert (keep / "a.igvm").read_bytes() == (keep / "b.igvm").read_bytes()
    assert main(["repro", str(project), "--in-process", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"] == "reproducible" and doc["isolation"] == "in-process"


# --------------------------------------------------------------------------------- failing


def test_compare_builds_names_gpa_range(project: Path) -> None:
    a = build(load_config(project)).data
    blob = project.parent / "data" / "blob.bin"
    data = bytearray(blob.read_bytes())
    data[0x1000:0x3000] = b"\xff" * 0x2000  # pages 1 and 2 of the blob
    blob.write_bytes(bytes(data))
    b = build(load_config(project)).data
    assert compare_builds(a, a).byte_identical
    d = compare_builds(a, b, a_name="one", b_name="two")
    assert not d.byte_identical and not d.identical
    assert [(r.start, r.end, r.aspect) for r in d.pages] == [(BLOB_GPA + 0x1000, BLOB_GPA + 0x2FFF, "data")]
    assert "pages 0x801000-0x802fff (2 pages) differ in data [NATIVE, SEV_SNP, TDX]" in d.render_text()


def test_injected_timestamp_fails(project: Path, inject_timestamp: None) -> None:
    with pytest.raises(ReproducibilityError) as exc:
        check_config_reproducible(project, platforms="snp,tdx")
    msg = str(exc.value)
    assert "NOT reproducible: the two builds differ (first difference at byte 0x" in msg
    assert "page 0x802000 (1 page) differs in data [SEV_SNP, TDX]" in msg
    assert "measurement SEV_SNP:" in msg
    d = exc.value.diff  # type: ignore[attr-defined]
    assert [(r.start, r.pages) for r in d.pages] == [(0x802000, 1)]
    # the reference values differ too: the measurements
    assert any(r.startswith("platforms.") for r in exc.value.reference_differences)  # type: ignore[attr-defined]


def test_cli_repro_mismatch(project: Path, inject_timestamp: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["repro", str(project), "--platforms", "snp"]) == 1
    out = capsys.readouterr().out
    assert "NOT reproducible" in out and "page 0x802000 (1 page) differs in data [SEV_SNP]" in out


def test_failed_build_is_reported(project: Path) -> None:
    (project.parent.parent / "build" / "hello.elf").write_bytes(b"not an elf")
    with pytest.raises(ReproducibilityError, match="build A failed"):
        check_config_reproducible(project)


def test_reference_values_compared() -> None:
    a = {"file": {"sha256": "aa"}, "inputs": {"x.bin": {"path": "x.bin", "sha256": "11"}},
         "platforms": {"snp": {"digest": "d1"}}}
    moved = {"file": {"sha256": "aa"}, "inputs": {"../../x.bin": {"path": "../../x.bin", "sha256": "11"}},
             "platforms": {"snp": {"digest": "d1"}}}
    assert compare_reference_values(a, moved) == []  # input naming depends on the location: ignored
    other = {**a, "platforms": {"snp": {"digest": "d2"}}}
    assert compare_reference_values(a, other) == ["platforms.snp.digest: 'd1' != 'd2'"]


# --------------------------------------------------------------------------------- regression


def test_reference_values_name_inputs_as_written(tmp_path: Path) -> None:
    """build.py named an input outside the checkout by a path relative to the config, so the
    reference values depended on where the checkout lived (``../../../usr/share/...``).
    Inputs are now named as the config writes them: absolute paths stay absolute, relative
    ones are relative to the top-level config (also when written in an included config)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.bin").write_bytes(b"blob")
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "common.toml").write_text('[[blob]]\npath = "../data/b.bin"\ngpa = 0x200000\n')
    cfg = tmp_path / "guest.toml"
    cfg.write_text(f'include = ["inc/common.toml"]\n[image]\nplatforms = ["snp"]\n\n[firmware]\npath = "{OVMF}"\n')
    refs = build(load_config(cfg)).reference_values
    assert str(OVMF) in refs["inputs"]
    assert "data/b.bin" in refs["inputs"]


def test_reference_values_do_not_depend_on_checkout_location(tmp_path: Path) -> None:
    refs = []
    for where in ("one", "two/much/deeper/checkout"):
        cfg = tmp_path / where / "ovmf.toml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text(f'[image]\nplatforms = ["snp"]\n\n[firmware]\npath = "{OVMF}"\n')
        refs.append(build(load_config(cfg)).reference_values)
    assert refs[0] == refs[1]
    assert str(OVMF) in refs[0]["inputs"]

