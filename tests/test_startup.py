"""Start-up cost of the CLI, guarded deterministically (timings are in benchmarks/bench_startup.py).

Small jobs (``check``, ``measure`` of a small file, ``--help``) are start-up bound: their cost is
the modules they import.  Each case runs in a fresh interpreter started with ``-S -E`` (no
``site``, no environment: the count does not depend on how the package is installed), with the
checkout and the environment's site-packages on ``sys.path``, and lists the modules that importing a
command module, or running a command on a small vector, added to ``sys.modules``.  It checks that

* no heavy module the job does not need is among them (numpy, cryptography, lief, pyelftools,
  SCons, PKCS#11, ``importlib.metadata``: each costs 10-200 ms and belongs to the command that
  uses it, imported when that command runs);
* ``check`` and ``measure`` (their command modules, and runs on small files) do not import
  :mod:`dataclasses` and what it pulls in (``inspect``, ``ast``, ``dis``, ``tokenize``: ~5 ms; the
  models are :mod:`igvm_builder.recordclass` records), nor the CCA realm model (a CCA file only)
  nor the guest-policy enums (``format.policy``);
* their number stays within a budget set from the count measured when the budget was set (the
  value in the comment), with room for a few more: a jump means some module started importing
  something big at its top.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from igvm_builder.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO.parent / "shared" / "vectors" / "igvm"
SNP = VECTORS / "snp_v1.igvm"
TDX = VECTORS / "tdx_v1.igvm"

#: Modules no start-up-bound job needs; each is imported by the command that uses it, when it runs.
HEAVY = ("numpy", "cryptography", "lief", "elftools", "SCons", "pkcs11", "hypothesis",
         "importlib.metadata", "email", "tomllib", "subprocess", "concurrent.futures", "tempfile",
         "multiprocessing", "asyncio", "ctypes", "xml", "decimal", "zipfile", "unittest")

#: What ``check`` and ``measure`` do without (besides HEAVY), on the files of the cases below.
NOT_FOR_CHECK_MEASURE = ("dataclasses", "inspect", "ast", "dis", "tokenize", "igvm_builder.measure.cca",
                         "igvm_builder.format.policy")

#: A command's module alone (what ``igvm-builder COMMAND --help`` imports).  Measured: 15-17 for
#: most (the format package's constants), 38 for measure (its loader profiles need the engine).
COMMAND_MODULE_BUDGET = {"measure": 42}
COMMAND_MODULE_DEFAULT_BUDGET = 20
#: ``igvm_builder.cli`` alone (``--help``, ``--version``).  Measured: 15.
CLI_BUDGET = 18
#: Whole runs on a small file.  Measured: check 48, measure 54.
RUN_BUDGET = {"check": 52, "measure": 58}

_PROBE = r"""
import contextlib, io, json, sys
sys.path[:0] = json.loads(sys.argv[1])
before = set(sys.modules)
what, args = sys.argv[2], sys.argv[3:]
if what == "run":
    from igvm_builder.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(args)
    if status:
        raise SystemExit(f"exit status {status}")
else:
    __import__(what)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _new_modules(what: str, *args: str) -> list[str]:
    paths = [str(REPO)] + [p for p in sys.path if p.endswith("site-packages")]
    # the probe's own imports (contextlib, io, json) are made before `before` is taken
    out = subprocess.run([sys.executable, "-S", "-E", "-c", _PROBE, json.dumps(paths), what, *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def _heavy(modules: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)]


def test_cli_alone_is_small() -> None:
    new = _new_modules("igvm_builder.cli")
    assert _heavy(new) == []
    assert not [m for m in new if m.startswith("igvm_builder.") and m != "igvm_builder.cli"], new
    assert len(new) <= CLI_BUDGET, new


@pytest.mark.parametrize("module", sorted({m for m, _help in COMMANDS.values()}))
def test_command_module_imports_nothing_heavy(module: str) -> None:
    new = _new_modules(f"igvm_builder.commands.{module}")
    assert f"igvm_builder.commands.{module}" in new
    assert _heavy(new) == [], f"importing the {module} command pulls in {_heavy(new)}"
    if module in ("check", "measure"):
        assert _heavy(new, NOT_FOR_CHECK_MEASURE) == [], _heavy(new, NOT_FOR_CHECK_MEASURE)
    assert len(new) <= COMMAND_MODULE_BUDGET.get(module, COMMAND_MODULE_DEFAULT_BUDGET), \
        f"{len(new)} modules: {new}"


@pytest.mark.parametrize(("command", "args"), [
    ("check", ["-q", str(SNP)]),
    ("check", [str(TDX), "--platform", "tdx"]),
    ("measure", [str(SNP)]),
    ("measure", ["--loader", "qemu", "--json", str(TDX)]),
])
def test_small_job_imports_nothing_heavy(command: str, args: list[str]) -> None:
    new = _new_modules("run", command, *args)
    assert "igvm_builder.format.file" in new  # it did read the file
    assert _heavy(new) == [], f"{command} pulls in {_heavy(new)}"
    assert _heavy(new, NOT_FOR_CHECK_MEASURE) == [], f"{command} pulls in {_heavy(new, NOT_FOR_CHECK_MEASURE)}"
    assert len(new) <= RUN_BUDGET[command], f"{len(new)} modules: {new}"


def test_collector_frozen_only_for_the_program() -> None:
    """Run as the program, the CLI freezes its start-up objects out of the cyclic GC's sight;
    called in a process (``main(argv)``: tests, a library user) it leaves the collector as it was."""
    import contextlib
    import gc
    import io

    from igvm_builder.cli import main

    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["check", "-q", str(SNP)]) == 0
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)
    probe = ("import gc, sys; from igvm_builder.cli import main; sys.argv[1:] = ['check', '-q', sys.argv[1]]; "
             "status = main(); print(status, gc.isenabled(), gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", probe, str(SNP)], capture_output=True, text=True, cwd=REPO,
                         timeout=60)
    status, collecting, count = out.stdout.split()
    assert (status, collecting) == ("0", "True") and int(count) > 10_000, out


def test_version_is_looked_up_only_when_asked() -> None:
    """``--version`` reads the installed metadata (importlib.metadata) only when given."""
    out = subprocess.run([sys.executable, "-m", "igvm_builder", "--version"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    from igvm_builder import __version__

    assert out.stdout == f"igvm-builder {__version__}\n"


def _has_o_tmpfile(directory: Path) -> bool:
    import os

    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


def test_writing_an_output_imports_no_tempfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output is an unnamed (O_TMPFILE) temporary file until published: ``sign`` (and every
    command that writes a file) imports ``tempfile`` (and ``shutil``, ``bz2``, ``lzma`` with it:
    2-3 ms) only for the named temporary file of a directory without O_TMPFILE."""
    from igvm_builder.io import RECORD_OUTPUTS_ENV

    monkeypatch.delenv(RECORD_OUTPUTS_ENV, raising=False)  # (the suite's copy of each output uses tempfile)
    keys = REPO.parent / "shared" / "keys"
    out = tmp_path / "signed.igvm"
    new = _new_modules("run", "sign", str(SNP), "-o", str(out), "--id-key", str(keys / "test-only-id-p384.pem"),
                       "--allow-test-keys", "-q")
    assert out.stat().st_size > 0 and "igvm_builder.sign.image" in new
    named = [m for m in ("tempfile", "shutil", "bz2", "lzma") if m in new]
    assert named == ([] if _has_o_tmpfile(tmp_path) else ["tempfile", "shutil", "bz2", "lzma"]), named


# --------------------------------------------------------------------------- build

#: What ``build`` of a small SNP config needs of HEAVY: the TOML parser (not pyelftools for an ELF
#: kernel: inputs/elf.py reads the headers itself; not concurrent.futures, with logging,
#: traceback and tokenize, for the build's threads: assemble/mapped.Task).
BUILD_NEEDS = ("tomllib",)
#: What ``build`` of a small x86 config without signing does without (besides HEAVY): the CCA
#: realm model, builder, arm64 and DTB inputs, signing, the linter, and what the build path used
#: to import at its top for a rare case (uuid and platform for GUIDs, difflib for an unknown-key
#: hint, json for the reference-values document, not written here).
NOT_FOR_BUILD = ("igvm_builder.measure.cca", "igvm_builder.assemble.cca", "igvm_builder.inputs.arm64",
                 "igvm_builder.inputs.dtb", "igvm_builder.sign", "igvm_builder.lint", "igvm_builder.qemu_loader",
                 "uuid", "platform", "difflib", "json", "logging", "traceback", "tokenize")
#: Classes on the build path still made by ``dataclasses`` (the rest are recordclass records);
#: once none is left, the build must not import ``dataclasses`` (nor inspect, ast, dis).
BUILD_DATACLASSES: set[str] = set()
_DATACLASSES_IMPORTS = ("dataclasses", "inspect", "ast", "dis")
#: Whole builds.  Measured (this probe: nothing imported before it but what ``-S -E`` starts
#: with): OVMF 107, bzImage 108, ELF 108 (117-118 with concurrent.futures, 125-126 while
#: BuildResult was a dataclass; 183 when the ELF reader imported pyelftools).
BUILD_BUDGET = {"ovmf": 112, "bzimage": 112, "elf": 112}
#: A CCA realm's build (its DTB checked with the fdt package).  Measured: 112 (130 before).
CCA_BUILD_BUDGET = 116

#: Builds ``argv[2:]`` with nothing imported first (not even json), then prints the modules the
#: build added and the dataclasses (not records) defined in the package's modules among them.
_BUILD_PROBE = r"""
import sys
sys.path[:0] = sys.argv[1].split("\n")
before = set(sys.modules)
from igvm_builder.cli import main
status = main(sys.argv[2:])
new = sorted(set(sys.modules) - before)
if status:
    raise SystemExit(f"exit status {status}")
made = sorted(f"{name}.{cls.__qualname__}" for name in new if name.startswith("igvm_builder")
              for cls in vars(sys.modules[name]).values()
              if isinstance(cls, type) and cls.__module__ == name and "__dataclass_params__" in vars(cls))
import json
print(json.dumps([new, made]))
"""


def _build_config(tmp_path: Path, case: str) -> Path:
    shared = REPO.parent / "shared"
    kernel = {"ovmf": f"[firmware]\npath = '{shared / 'firmware' / 'bookworm-OVMF.fd'}'\n",
              "elf": f"[kernel]\npath = '{shared / 'inputs' / 'u-boot-qemu-x86_64.elf'}'\nformat = \"elf\"\n",
              "bzimage": f"[kernel]\npath = '{shared / 'inputs' / 'vmlinuz-6.1.0-56-cloud-amd64'}'\n"
                         "cmdline = \"console=ttyS0\"\n"}[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(f"[image]\nplatforms = [\"snp\"]\nloader = \"qemu\"\n{kernel}[snp]\nvcpus = 1\n")
    return path


def _cca_config(tmp_path: Path) -> Path:
    """An Arm CCA realm: the arm64 Image and DTB of a shared CCA vector, for QEMU."""
    vector = REPO.parent / "shared" / "vectors" / "cca" / "qemu_k_1G_1cpu"
    path = tmp_path / "cca.toml"
    path.write_text(f"[image]\nplatforms = [\"cca\"]\n[kernel]\npath = '{vector / 'Image'}'\n[cca]\nvmm = \"qemu\"\n"
                    f"ram_size = \"1G\"\nbreakpoints = 6\nwatchpoints = 6\ndtb = '{vector / 'guest.dtb'}'\n")
    return path


@pytest.mark.parametrize("case", sorted(BUILD_BUDGET))
def test_small_build_imports_only_what_its_config_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        case: str) -> None:
    """``build`` of a small SNP config (firmware, ELF kernel, bzImage): nothing heavy but what it
    needs, none of NOT_FOR_BUILD, no dataclass but those listed, and a module count in budget."""
    from igvm_builder.format.file import IgvmFile
    from igvm_builder.io import RECORD_OUTPUTS_ENV

    monkeypatch.delenv(RECORD_OUTPUTS_ENV, raising=False)  # (the suite's copy of each output uses tempfile)

    out = tmp_path / "out.igvm"
    paths = [str(REPO)] + [p for p in sys.path if p.endswith("site-packages")]
    run = subprocess.run([sys.executable, "-S", "-E", "-c", _BUILD_PROBE, "\n".join(paths), "build",
                          str(_build_config(tmp_path, case)), "-o", str(out), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    new, made = json.loads(run.stdout)
    assert IgvmFile.load(out).platforms  # it did build an image
    assert "igvm_builder.assemble.pipeline" in new and f"igvm_builder.inputs.{case}" in new
    assert not [m for m in new if m.startswith("fdt")]  # (the CCA realm's device-tree package)
    needs = BUILD_NEEDS + (() if _has_o_tmpfile(tmp_path) else ("tempfile",))
    assert _heavy(new, tuple(h for h in HEAVY if h not in needs)) == [], _heavy(new)
    assert _heavy(new, NOT_FOR_BUILD) == [], _heavy(new, NOT_FOR_BUILD)
    assert set(made) <= BUILD_DATACLASSES, f"dataclasses on the build path (make them records): {made}"
    if not made:
        assert _heavy(new, _DATACLASSES_IMPORTS) == [], _heavy(new, _DATACLASSES_IMPORTS)
    assert len(new) <= BUILD_BUDGET[case], f"{len(new)} modules: {new}"


def test_cca_build_defines_no_dataclass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``build`` of a CCA realm: the realm model and builder (records, not dataclasses), the
    device-tree package, none of the x86 inputs, nothing heavy but what a build needs."""
    from igvm_builder.io import RECORD_OUTPUTS_ENV

    monkeypatch.delenv(RECORD_OUTPUTS_ENV, raising=False)
    out = tmp_path / "cca.igvm"
    paths = [str(REPO)] + [p for p in sys.path if p.endswith("site-packages")]
    run = subprocess.run([sys.executable, "-S", "-E", "-c", _BUILD_PROBE, "\n".join(paths), "build",
                          str(_cca_config(tmp_path)), "-o", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    new, made = json.loads(run.stdout)
    assert {"igvm_builder.measure.cca", "igvm_builder.assemble.cca", "igvm_builder.inputs.arm64"} <= set(new)
    assert not [m for m in new if m.startswith(("igvm_builder.inputs.ovmf", "igvm_builder.inputs.elf",
                                                "igvm_builder.inputs.bzimage", "igvm_builder.sign"))], new
    needs = BUILD_NEEDS + (() if _has_o_tmpfile(tmp_path) else ("tempfile",))
    assert _heavy(new, tuple(h for h in HEAVY if h not in needs)) == [], _heavy(new)
    assert set(made) <= BUILD_DATACLASSES, f"dataclasses on the CCA build path (make them records): {made}"
    assert len(new) <= CCA_BUILD_BUDGET, f"{len(new)} modules: {new}"
