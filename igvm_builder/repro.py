"""Reproducibility: build a config twice under perturbed conditions and compare; verify a release.

:func:`check_config_reproducible` stages the config and every input it names into two
temporary trees, builds each one and compares the two IGVM files byte for byte (and the
two reference-value documents).  On a mismatch it raises
:class:`~igvm_builder.errors.ReproducibilityError` whose message carries the semantic diff
(:mod:`igvm_builder.diff`) naming the headers, registers and GPA ranges that differ.

Staging (``docs/REPRODUCIBLE_RELEASES.md``): the files are copied into each tree at their
path relative to the common ancestor of all of them, so every path the config writes
*relatively* resolves inside the tree and nothing in the config is rewritten (its bytes,
hence its SHA-256 in the reference values, are unchanged).  A path the config writes as an
*absolute* path (``/usr/share/ovmf/OVMF.fd``) cannot move without rewriting the config; such
inputs are read in place by both builds and listed in :attr:`ReproReport.unmoved`.

Perturbations between the two builds:

* ``isolation="subprocess"`` (the default, ``igvm-builder repro``): each build is a fresh
  ``python -m igvm_builder build`` with other absolute paths (trees of different depth and
  path length), working directory (and the config named relatively in one build,
  absolutely in the other), ``TZ``, ``LC_ALL``/``LANG``, ``umask``, ``PYTHONHASHSEED``,
  ``TMPDIR``, environment order, input mtimes and modes, and file creation order;
* ``isolation="in-process"`` (cheap, for the SCons ``IGVMReproCheck`` builder): both builds
  run in the calling process from the two trees: other absolute paths, mtimes, modes and
  creation order, and the second build runs in a process the first one has warmed (state
  leaking between builds shows up).  No environment or working-directory change, so it is
  safe in a threaded caller such as ``scons -j``.

:func:`verify_release` rebuilds a config and checks it against a published
reference-values file (``igvm-builder build --reference-values``): inputs first, then the
file SHA-256 and every platform's measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from igvm_builder.diff import FileDiff, diff_files
from igvm_builder.errors import IgvmError, ReproducibilityError, VerificationError
from igvm_builder.recordclass import field, record

if TYPE_CHECKING:
    from igvm_builder.config import BuildConfig
    from igvm_builder.io import ScratchDirectory

__all__ = [
    "ReleaseCheck",
    "ReleaseReport",
    "ReproReport",
    "StagedTree",
    "check_config_reproducible",
    "check_config_reproducible_in_process",
    "compare_builds",
    "compare_reference_values",
    "stage_tree",
    "verify_release",
]

#: The two builds' conditions (subprocess isolation).  Keys not listed are inherited.
PERTURBATIONS: tuple[dict[str, Any], dict[str, Any]] = (
    {"TZ": "UTC", "LC_ALL": "C", "LANG": "C", "PYTHONHASHSEED": "0", "umask": 0o022, "env_order": "sorted",
     "mtime": 0, "mode": 0o644, "create_order": "sorted", "config_arg": "relative"},
    {"TZ": "Asia/Kathmandu", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PYTHONHASHSEED": "3141592653",
     "umask": 0o077, "env_order": "reversed", "mtime": 2_000_000_000, "mode": 0o444, "create_order": "reversed",
     "config_arg": "absolute"},
)
SUBPROCESS_PERTURBED: tuple[str, ...] = ("absolute paths", "working directory", "TZ", "LC_ALL/LANG", "umask", "PYTHONHASHSEED",
                        "TMPDIR", "environment order", "input mtimes", "input modes", "file creation order")
IN_PROCESS_PERTURBED: tuple[str, ...] = ("absolute paths", "input mtimes", "input modes", "file creation order",
                        "warm process (second build)")


# =========================================================================== results


@record
class ReproReport:
    """Both builds agreed: what was built and what was varied."""

    config: str
    platforms: tuple[str, ...]
    loader: str | None
    sha256: str
    size: int
    isolation: str
    perturbed: tuple[str, ...]
    unmoved: tuple[str, ...] = ()

    def line(self) -> str:
        extra = f"; read in place (absolute paths): {', '.join(self.unmoved)}" if self.unmoved else ""
        return (f"{self.config}: reproducible: 2 builds ({self.isolation}) agree, {self.size} bytes, "
                f"sha256 {self.sha256}; varied: {', '.join(self.perturbed)}{extra}")

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "result": "reproducible", "platforms": list(self.platforms),
                "loader": self.loader, "sha256": self.sha256, "size": self.size, "isolation": self.isolation,
                "perturbed": list(self.perturbed), "unmoved_inputs": list(self.unmoved)}


# =========================================================================== comparing


def _buffer(data: bytes | bytearray | memoryview | mmap.mmap | str | os.PathLike[str]
            ) -> tuple[bytes | bytearray | memoryview | mmap.mmap, str | None]:
    if isinstance(data, str | os.PathLike):
        name = os.fspath(data)
        from igvm_builder.io import map_input

        return map_input(name, "IGVM file", error=ReproducibilityError), name  # regular files only
    return data, None


def _first_difference(a: memoryview, b: memoryview, chunk: int = 1 << 16) -> int | None:
    n = min(len(a), len(b))
    for off in range(0, n, chunk):
        ca, cb = a[off : off + chunk], b[off : off + chunk]
        if ca != cb:  # a shorter last chunk can be a prefix of the other: then the difference is at its end
            return off + next((i for i in range(min(len(ca), len(cb))) if ca[i] != cb[i]), min(len(ca), len(cb)))
    return None if len(a) == len(b) else n


def compare_builds(a: bytes | bytearray | memoryview | mmap.mmap | str | os.PathLike[str],
                   b: bytes | bytearray | memoryview | mmap.mmap | str | os.PathLike[str], *,
                   a_name: str = "build A", b_name: str = "build B", loader: str | None = None) -> FileDiff:
    """Compare two builds (bytes, or paths of IGVM files): byte-identical, or the semantic diff.

    The result's :attr:`~igvm_builder.diff.FileDiff.byte_identical` says whether the bytes
    agree; if they do not, the files are parsed (zero-copy) and diffed.  A build that is not
    a valid IGVM file raises :class:`~igvm_builder.errors.ReproducibilityError`.
    """
    from igvm_builder.format import IgvmFile

    buf_a, _ = _buffer(a)
    buf_b, _ = _buffer(b)
    va, vb = memoryview(buf_a), memoryview(buf_b)
    first = _first_difference(va, vb)
    if first is None:
        return FileDiff(a_name=a_name, b_name=b_name, platforms_a=(), platforms_b=(), byte_identical=True,
                        loader=loader)
    try:
        fa = IgvmFile.from_bytes(buf_a, source=a_name)
        fb = IgvmFile.from_bytes(buf_b, source=b_name)
    except IgvmError as exc:
        raise ReproducibilityError(f"builds differ from byte offset {first:#x} and one is not a valid IGVM "
                                   f"file: {exc}") from None
    return diff_files(fa, fb, a_name=a_name, b_name=b_name, loader=loader, byte_identical=False)


def _normalized_refs(refs: Mapping[str, Any]) -> dict[str, Any]:
    """Reference values minus what legitimately depends on where the tree lives.

    The ``inputs`` section keys inputs by their path relative to the config; for an input
    named by absolute path that relative path depends on the config's location, so inputs
    are compared as the sorted list of their SHA-256 digests.
    """
    out = {k: v for k, v in refs.items() if k != "inputs"}
    inputs = refs.get("inputs")
    if isinstance(inputs, Mapping):
        out["inputs"] = sorted(str(e.get("sha256")) if isinstance(e, Mapping) else repr(e)
                               for e in inputs.values())
    return out


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            yield from _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def compare_reference_values(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two reference-value documents (normalized)."""
    fa, fb = dict(_flatten(_normalized_refs(a))), dict(_flatten(_normalized_refs(b)))
    return [f"{k}: {fa.get(k, '(absent)')!r} != {fb.get(k, '(absent)')!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k, ...) != fb.get(k, ...)]


def _mismatch(config: str, d: FileDiff, refs_diff: Sequence[str], first: int | None = None) -> ReproducibilityError:
    lines = []
    if not d.byte_identical:
        where = f" (first difference at byte {first:#x})" if first is not None else ""
        lines.append(f"{config}: NOT reproducible: the two builds differ{where}")
        lines.append(d.render_text().rstrip("\n"))
    else:
        lines.append(f"{config}: NOT reproducible: the IGVM files agree but the reference values differ")
    if refs_diff:
        lines.append("reference values differ at:")
        lines += [f"  {r}" for r in refs_diff[:50]]
    err = ReproducibilityError("\n".join(lines))
    err.diff = d  # type: ignore[attr-defined]
    err.reference_differences = list(refs_diff)  # type: ignore[attr-defined]
    return err


# =========================================================================== staging


@record
class StagedTree:
    """A copy of a config and its inputs under ``root`` (see :func:`stage_tree`)."""

    root: str
    config: str  # the staged config's absolute path
    files: tuple[str, ...]  # staged copies, in creation order
    unmoved: tuple[str, ...]  # inputs the staged config still reads in place (absolute paths)


def _common_root(paths: Sequence[str]) -> str:
    dirs = [os.path.dirname(p) for p in paths]
    try:
        return os.path.commonpath(dirs)
    except ValueError:  # different drives (Windows)
        raise ReproducibilityError("the config and its inputs are on different drives; cannot stage them "
                                   "in one tree") from None


def _copy(src: str, dst: str, *, mtime: float, mode: int) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(dst, 0o644)  # a re-staged read-only copy
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    os.utime(dst, (mtime, mtime))


def stage_tree(config_path: str | os.PathLike[str], dest: str, *, mtime: float = 0, mode: int = 0o644,
               reverse: bool = False) -> StagedTree:
    """Copy ``config_path`` and every input it names under ``dest`` (relative layout mirrored).

    Each file goes to ``dest/<its path relative to the common ancestor of all the files>``.
    Includes are staged first (the staged config must load), then the staged config tells
    which inputs resolve inside the tree; inputs it names by absolute path stay where they
    are (:attr:`StagedTree.unmoved`).  Files are created in sorted or ``reverse`` order and
    given ``mtime`` and ``mode``.
    """
    from igvm_builder.config import load_config

    dest = os.path.abspath(dest)
    cfg = load_config(config_path)
    every = [cfg.source, *cfg.input_files]
    base = _common_root(every)

    def staged(p: str) -> str:
        return os.path.join(dest, os.path.relpath(p, base))

    def original(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.relpath(p, dest)))

    first = sorted([cfg.source, *cfg.includes], reverse=reverse)
    created: list[str] = []
    for p in first:
        _copy(p, staged(p), mtime=mtime, mode=mode)
        created.append(staged(p))
    staged_cfg = load_config(staged(cfg.source))
    inside, unmoved = [], []
    for p in staged_cfg.input_files:
        if os.path.commonpath([dest, p]) == dest:
            if p not in created:
                inside.append(p)
        else:
            unmoved.append(p)
    for p in sorted(inside, reverse=reverse):
        src = original(p)
        if not os.path.exists(src):
            raise ReproducibilityError(f"input {src} named by the config does not exist", source=cfg.source)
        _copy(src, p, mtime=mtime, mode=mode)
        created.append(p)
    return StagedTree(root=dest, config=staged(cfg.source), files=tuple(created), unmoved=tuple(unmoved))


# =========================================================================== builds


def _package_parent() -> str:
    import igvm_builder

    return os.path.dirname(os.path.dirname(os.path.abspath(igvm_builder.__file__)))


def _child_env(p: Mapping[str, Any], tmpdir: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("TZ", "LC_ALL", "LANG", "PYTHONHASHSEED", "TMPDIR"):
        env.pop(k, None)
    env.update({"TZ": p["TZ"], "LC_ALL": p["LC_ALL"], "LANG": p["LANG"], "PYTHONHASHSEED": p["PYTHONHASHSEED"],
                "TMPDIR": tmpdir})
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _package_parent() + (os.pathsep + old if old else "")
    keys = sorted(env, reverse=p["env_order"] == "reversed")
    return {k: env[k] for k in keys}


def _run_build(n: int, tree: StagedTree, out: str, refs: str, workdir: str, p: Mapping[str, Any],
               platforms: Sequence[str] | None, loader: str | None, timeout: float) -> None:
    tmpdir = os.path.join(os.path.dirname(workdir), f"tmp{n}")
    os.makedirs(tmpdir, exist_ok=True)
    os.makedirs(workdir, exist_ok=True)
    config_arg = tree.config
    cwd = workdir
    if p["config_arg"] == "relative":
        cwd = os.path.dirname(tree.config)
        config_arg = os.path.basename(tree.config)
    cmd = [sys.executable, "-m", "igvm_builder", "build", config_arg, "-o", out, "--reference-values", refs, "-q"]
    if platforms:
        cmd += ["--platforms", ",".join(platforms)]
    if loader:
        cmd += ["--loader", loader]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=_child_env(p, tmpdir), umask=p["umask"], capture_output=True,
                              text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ReproducibilityError(f"build {'AB'[n]} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise ReproducibilityError(f"build {'AB'[n]} failed (exit {proc.returncode}): {tail}")


def _params(config_path: str | os.PathLike[str], platforms: Sequence[str] | str | None, loader: str | None
            ) -> tuple[str, tuple[str, ...] | None]:
    path = os.path.abspath(os.fspath(config_path))
    if isinstance(platforms, str):
        platforms = [p.strip() for p in platforms.split(",") if p.strip()]
    return path, tuple(platforms) if platforms else None


def _mkdirs() -> tuple[ScratchDirectory, str, str]:
    from igvm_builder.io import ScratchDirectory

    holder = ScratchDirectory("igvm-repro-")  # what a killed run left goes first
    # Two trees at different depths and path lengths.
    a = os.path.join(holder.name, "a")
    b = os.path.join(holder.name, "build-b-with-a-much-longer-directory-name", "nested", "deeper")
    return holder, a, b


def check_config_reproducible(config_path: str | os.PathLike[str], *, platforms: Sequence[str] | str | None = None,
                              loader: str | None = None, isolation: str = "subprocess",
                              keep: str | os.PathLike[str] | None = None, timeout: float = 900.0) -> ReproReport:
    """Build ``config_path`` twice under perturbed conditions; raise on any difference.

    ``platforms`` / ``loader`` override the config (as ``igvm-builder build`` does).
    ``isolation`` is ``"subprocess"`` (fresh interpreters, full perturbation) or
    ``"in-process"`` (cheap; see the module docstring).  ``keep`` names a directory that
    receives both builds (``a.igvm``, ``b.igvm`` and their reference values) for
    inspection.  Raises :class:`~igvm_builder.errors.ReproducibilityError` (with ``.diff``,
    the :class:`~igvm_builder.diff.FileDiff`, and a message holding its text rendering).
    """
    if isolation not in ("subprocess", "in-process"):
        raise ValueError(f"isolation must be 'subprocess' or 'in-process', not {isolation!r}")
    path, plats = _params(config_path, platforms, loader)
    holder, root_a, root_b = _mkdirs()
    with holder:
        trees = []
        for root, p in zip((root_a, root_b), PERTURBATIONS, strict=True):
            trees.append(stage_tree(path, os.path.join(root, "src"), mtime=p["mtime"], mode=p["mode"],
                                    reverse=p["create_order"] == "reversed"))
        outs = [os.path.join(root_a, "out", "a.igvm"), os.path.join(root_b, "output", "image-b.igvm")]
        refs_paths = [o + ".json" for o in outs]
        if isolation == "subprocess":
            for n, (tree, p) in enumerate(zip(trees, PERTURBATIONS, strict=True)):
                os.makedirs(os.path.dirname(outs[n]), exist_ok=True)
                workdir = os.path.join((root_a, root_b)[n], "cwd" if n == 0 else "elsewhere/working-dir")
                _run_build(n, tree, outs[n], refs_paths[n], workdir, p, plats, loader, timeout)
            from igvm_builder.reference import ReferenceValues

            # each build's reference values, parsed as the typed value (a malformed one is named)
            refs = [ReferenceValues.load(rp).to_dict() for rp in refs_paths]
            perturbed = SUBPROCESS_PERTURBED
        else:
            from igvm_builder.assemble import build
            from igvm_builder.config import load_config
            from igvm_builder.io import AtomicFile

            refs = []
            for n, tree in enumerate(trees):
                os.makedirs(os.path.dirname(outs[n]), exist_ok=True)
                with AtomicFile(outs[n]) as out:
                    result = build(load_config(tree.config), platforms=plats, loader=loader, output=out)
                refs.append(result.reference_values.to_dict())
            perturbed = IN_PROCESS_PERTURBED
        if keep is not None:
            os.makedirs(keep, exist_ok=True)
            for src, name in zip(outs, ("a.igvm", "b.igvm"), strict=True):
                shutil.copyfile(src, os.path.join(keep, name))
            for r, name in zip(refs, ("a.json", "b.json"), strict=True):
                with open(os.path.join(keep, name), "w", encoding="utf-8") as fh:
                    json.dump(r, fh, indent=2, sort_keys=True)
        d = compare_builds(outs[0], outs[1], a_name="build A", b_name="build B", loader=_measure_loader(refs[0]))
        refs_diff = compare_reference_values(refs[0], refs[1])
        if not d.byte_identical or refs_diff:
            first = None
            if not d.byte_identical:
                first = _first_difference(memoryview(_buffer(outs[0])[0]), memoryview(_buffer(outs[1])[0]))
            raise _mismatch(path, d, refs_diff, first)
        from igvm_builder.io import sha256_input

        sha256, size = sha256_input(outs[0], "build output", error=ReproducibilityError)
        build_info = refs[0].get("build", {}) if isinstance(refs[0], Mapping) else {}
        return ReproReport(
            config=path,
            platforms=tuple(build_info.get("platforms", plats or ())),
            loader=build_info.get("loader", loader),
            sha256=sha256, size=size, isolation=isolation, perturbed=perturbed,
            unmoved=trees[0].unmoved,
        )


def _measure_loader(refs: Any) -> str | None:
    if isinstance(refs, Mapping):
        loader = refs.get("build", {}).get("loader") if isinstance(refs.get("build"), Mapping) else None
        from igvm_builder.measure.profiles import PROFILES

        if loader in PROFILES:
            return str(loader)
    return None


def check_config_reproducible_in_process(config_path: str | os.PathLike[str], *,
                                         platforms: Sequence[str] | str | None = None,
                                         loader: str | None = None) -> ReproReport:
    """:func:`check_config_reproducible` with ``isolation="in-process"`` (cheap; thread-safe)."""
    return check_config_reproducible(config_path, platforms=platforms, loader=loader, isolation="in-process")


# =========================================================================== release verification


@record
class ReleaseCheck:
    """One comparison against the published reference values."""

    kind: str  # "input" | "build" | "file" | "measurement" | "reference" | "igvm"
    name: str
    ok: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "ok": self.ok, "message": self.message}


@record
class ReleaseReport:
    """The outcome of :func:`verify_release`; problems are ordered inputs first."""

    config: str
    reference: str
    sha256: str | None
    checks: tuple[ReleaseCheck, ...]
    diff: FileDiff | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> tuple[ReleaseCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def render_text(self) -> str:
        if self.ok:
            n_inputs = sum(1 for c in self.checks if c.kind == "input")
            n_meas = sum(1 for c in self.checks if c.kind == "measurement")
            return (f"{self.config}: release verified against {self.reference}: sha256 {self.sha256}, "
                    f"{n_inputs} input(s) and {n_meas} measurement(s) match\n")
        lines = [f"{self.config}: release does NOT match {self.reference}:"]
        lines += [f"  {c.message}" for c in self.problems]
        if self.diff is not None and not self.diff.identical:
            lines.append("semantic diff (released file -> rebuild):")
            lines += ["  " + x for x in self.diff.render_text().rstrip("\n").splitlines()]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "reference": self.reference, "ok": self.ok, "sha256": self.sha256,
                "checks": [c.as_dict() for c in self.checks],
                "diff": self.diff.as_dict() if self.diff is not None else None}


def _sha256_file(path: str) -> str | None:
    """SHA-256 of ``path``, or None if it is missing or unreadable (or no regular file)."""
    from igvm_builder.io import sha256_input

    try:
        return sha256_input(path, "file", error=ReproducibilityError)[0]
    except ReproducibilityError:
        return None


def _rel_key(path: str, base: str) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _roles(cfg: Any) -> dict[str, str]:
    """Absolute input path -> role (firmware, kernel, initrd, blob, CCA dtb, include)."""
    roles: dict[str, str] = {}
    for p in cfg.includes:
        roles.setdefault(p, "include")
    if cfg.firmware:
        roles.setdefault(cfg.firmware, "firmware")
    if cfg.kernel:
        roles.setdefault(cfg.kernel.path, "kernel")
        if cfg.kernel.initrd:
            roles.setdefault(cfg.kernel.initrd, "initrd")
    for b in cfg.blobs:
        roles.setdefault(b.path, f"blob@{b.gpa:#x}")
    if getattr(cfg, "cca", None) is not None and cfg.cca.dtb:
        roles.setdefault(cfg.cca.dtb, "dtb")
    return roles


def _strip_up(key: str) -> str:
    while key.startswith("../"):
        key = key[3:]
    return key.lstrip("/")


def _pair_moved_inputs(current: Sequence[str], published: Sequence[str]) -> dict[str, str]:
    """Pair inputs whose relative key differs only because the tree moved.

    An input the config names by absolute path is keyed by its path relative to the
    config, which depends on where the checkout lives (``../../../usr/share/ovmf/OVMF.fd``
    on one machine, ``../../usr/share/ovmf/OVMF.fd`` on another).  Keys equal once their
    leading ``../`` are dropped are the same input; failing that, a unique basename.
    """
    out: dict[str, str] = {}
    left = list(published)
    for key in current:
        hit = [p for p in left if _strip_up(p) == _strip_up(key)]
        if len(hit) != 1:
            hit = [p for p in left if p.rsplit("/", 1)[-1] == key.rsplit("/", 1)[-1]]
        if len(hit) == 1:
            out[key] = hit[0]
            left.remove(hit[0])
    return out


def _short(h: str | None) -> str:
    return f"{h[:12]}…" if h else "(unreadable)"


def _show(value: Any) -> str:
    """A reference value as text for people: JSON spelling (``null``, ``true``), never a Python repr."""
    if value is ...:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _platform_entries(refs: Mapping[str, Any]) -> dict[str, Any]:
    plats = refs.get("platforms")
    return dict(plats) if isinstance(plats, Mapping) else {}


def _entry_digest(entry: Any) -> Any:
    if isinstance(entry, Mapping):
        return entry.get("digest", entry.get("measurement"))
    return entry


def verify_release(config_path: str | os.PathLike[str], reference: Mapping[str, Any] | str | os.PathLike[str], *,
                   igvm: str | os.PathLike[str] | None = None, platforms: Sequence[str] | str | None = None,
                   loader: str | None = None) -> ReleaseReport:
    """Rebuild ``config_path`` and compare it with the published ``reference`` values.

    ``reference`` is the JSON written by ``igvm-builder build --reference-values`` (a path
    or the decoded document).  The build uses the platforms and loader it records unless
    ``platforms`` / ``loader`` override them.  Checks, in this order: the SHA-256 of the
    config and of every input (a changed input is the usual cause, so it is named first),
    the rebuild itself, the file SHA-256 and size, every platform's measurement, and with
    ``igvm`` the released file itself (its SHA-256, and a semantic diff against the rebuild
    when it differs).
    """
    from igvm_builder.assemble import build
    from igvm_builder.config import load_config

    ref_name = "reference values"
    if isinstance(reference, str | os.PathLike):
        ref_name = os.fspath(reference)
        from igvm_builder.io import load_json

        reference = load_json(ref_name, "reference values", error=VerificationError)
    if not isinstance(reference, Mapping):
        raise VerificationError("the reference values are not a JSON object", source=ref_name)
    from igvm_builder.reference import ReferenceValues

    try:
        refs = ReferenceValues.from_dict(reference)
    except VerificationError as exc:
        raise exc.with_source(ref_name) from None
    signature = refs.signature
    path, plats = _params(config_path, platforms, loader)
    build_info: Mapping[str, Any] = _mapping(reference.get("build"))
    if plats is None and build_info.get("platforms"):
        plats = tuple(build_info["platforms"])
    if loader is None and build_info.get("loader"):
        loader = str(build_info["loader"])

    checks: list[ReleaseCheck] = []
    cfg = load_config(path)
    checks += _check_inputs(cfg, _mapping(reference.get("inputs")))  # a changed input first: the usual cause
    # ---- rebuild
    try:
        result = build(cfg, platforms=plats, loader=loader)
    except IgvmError as exc:
        checks.append(ReleaseCheck("build", "rebuild", False, f"the rebuild failed: {exc}"))
        return ReleaseReport(path, ref_name, None, tuple(checks))
    pub_file: Mapping[str, Any] = _mapping(reference.get("file"))
    pub_sha = pub_file.get("sha256")  # the published (released) file: signed, for a signed release
    # the rebuild gives the unsigned image: for a signed release, what was signed
    unsigned_sha = signature.unsigned_file.sha256 if signature is not None else pub_sha
    unsigned_size = signature.unsigned_file.size if signature is not None else pub_file.get("size")
    what = "unsigned file" if signature is not None else "file"
    checks.append(ReleaseCheck("file", "sha256", result.sha256 == unsigned_sha,
                               f"{what} sha256 {_short(result.sha256)} != published {_short(unsigned_sha)}"
                               if result.sha256 != unsigned_sha else f"{what} sha256 {result.sha256} matches"))
    if isinstance(unsigned_size, int) and unsigned_size >= 0 and unsigned_size != result.size:
        checks.append(ReleaseCheck("file", "size", False,
                                   f"{what} size {result.size} != published {unsigned_size}"))
    checks += _check_measurements(_platform_entries(reference), _platform_entries(result.reference_values),
                                  signed=signature is not None)
    # ---- the released file itself
    d: FileDiff | None = None
    if igvm is not None:
        igvm_path = os.fspath(igvm)
        released = _sha256_file(igvm_path)
        if released is None:
            checks.append(ReleaseCheck("igvm", igvm_path, False, f"released file {igvm_path}: cannot read it"))
        else:
            checks.append(ReleaseCheck("igvm", igvm_path, released == pub_sha,
                                       f"released file {igvm_path}: sha256 {_short(released)} != published "
                                       f"{_short(pub_sha)}" if released != pub_sha
                                       else f"released file {igvm_path}: sha256 matches"))
            signed_checks, unsigned_bytes = _check_signature(igvm_path, signature, result.sha256, loader)
            checks.extend(signed_checks)
            if released != result.sha256 and (unsigned_bytes is None or
                                               hashlib.sha256(unsigned_bytes).hexdigest() != result.sha256):
                try:
                    d = compare_builds(igvm_path if unsigned_bytes is None else unsigned_bytes, result.data,
                                       a_name=igvm_path, b_name="rebuild", loader=loader)
                except ReproducibilityError as exc:
                    checks.append(ReleaseCheck("igvm", igvm_path, False, f"released file {igvm_path}: {exc}"))
    return ReleaseReport(path, ref_name, result.sha256, tuple(checks), d)


def _check_inputs(cfg: BuildConfig, published: Mapping[str, Any]) -> list[ReleaseCheck]:
    """The SHA-256 of the config and of every input against the published ones (moved inputs paired)."""
    checks: list[ReleaseCheck] = []
    base = os.path.dirname(cfg.source)
    current: dict[str, tuple[str, str, str | None]] = {}  # key -> (role, shown path, sha256)
    current["config"] = ("config", os.path.basename(cfg.source), _sha256_file(cfg.source))
    for p, role in _roles(cfg).items():
        key = _rel_key(p, base)
        current[key] = (role, key, _sha256_file(p))
    aliases = _pair_moved_inputs([k for k in current if k not in published],
                                 [k for k in published if k not in current and k != "config"])
    for key, (role, shown, digest) in current.items():
        entry = published.get(aliases.get(key, key))
        if key in aliases:
            shown = f"{shown} (published as {aliases[key]})"
        if entry is None:
            if role != "include":  # includes are not in the reference values (they change no input hash)
                checks.append(ReleaseCheck("input", key, False, f"{role} {shown}: read by this build but not "
                                           "listed in the published reference values"))
            continue
        pub = entry.get("sha256") if isinstance(entry, Mapping) else None
        if digest is None:
            checks.append(ReleaseCheck("input", key, False, f"{role} {shown}: missing or unreadable "
                                       f"(published sha256 {_short(pub)})"))
        elif digest != pub:
            checks.append(ReleaseCheck("input", key, False, f"{role} {shown}: sha256 {_short(digest)} != "
                                       f"published {_short(pub)}"))
        else:
            checks.append(ReleaseCheck("input", key, True, f"{role} {shown}: sha256 {_short(digest)} matches"))
    for key, entry in published.items():
        if key not in current and key not in aliases.values():
            shown = entry.get("path", key) if isinstance(entry, Mapping) else key
            checks.append(ReleaseCheck("input", key, False, f"input {shown}: in the published reference values "
                                       "but not named by this config"))
    return checks


def _check_measurements(pub_plats: Mapping[str, Any], new_plats: Mapping[str, Any], *, signed: bool
                        ) -> list[ReleaseCheck]:
    """Every platform's measurement, and everything else a verifier checks besides the digest
    (for a signed release, not the SEV-SNP ID block: the released file's is checked instead)."""
    checks: list[ReleaseCheck] = []
    for name in dict.fromkeys([*pub_plats, *new_plats]):
        if name not in new_plats:
            checks.append(ReleaseCheck("measurement", name, False, f"platform {name}: published but not built"))
            continue
        if name not in pub_plats:
            checks.append(ReleaseCheck("measurement", name, False, f"platform {name}: built but not published"))
            continue
        a, b = _entry_digest(new_plats[name]), _entry_digest(pub_plats[name])
        if a == b:
            checks.append(ReleaseCheck("measurement", name, True, f"platform {name}: measurement matches"))
        else:
            checks.append(ReleaseCheck("measurement", name, False, f"platform {name}: measurement "
                                       f"{_short(str(a))} != published {_short(str(b))}"))
        # Everything else a verifier checks besides the digest (policy, features, ID block, ...).
        fa = dict(_flatten(new_plats[name])) if isinstance(new_plats[name], Mapping) else {}
        fb = dict(_flatten(pub_plats[name])) if isinstance(pub_plats[name], Mapping) else {}
        for k in sorted(set(fa) | set(fb)):
            if signed and name == "snp" and k.split(".")[0] in _SIGNED_FIELDS:
                continue  # the signed image's ID block: checked against the released file below
            if k not in ("digest", "measurement") and fa.get(k, ...) != fb.get(k, ...):
                checks.append(ReleaseCheck("reference", f"{name}.{k}", False,
                                           f"platform {name}: {k} {_show(fa.get(k, ...))} != published "
                                           f"{_show(fb.get(k, ...))}"))
    return checks


#: Fields of the SEV-SNP reference values that describe the ID block (they differ between the
#: signed image and its unsigned rebuild by design).
_SIGNED_FIELDS = ("id_block", "id_key_digest", "author_key_digest")


def _check_signature(path: str, signature: Any, rebuilt_sha: str, loader_override: str | None
                     ) -> tuple[list[ReleaseCheck], bytes | None]:
    """The released file's SEV-SNP ID block against the signature the reference values record.

    Returns the checks (kind ``signature``) and, for a signed file, its bytes without the ID
    block (for the semantic diff).  A file that has an ID block must come back as the rebuild
    without it, and the block must verify under the recorded loader (or ``loader_override``)
    and key digests; a file without one is only acceptable when no signature is recorded."""
    from igvm_builder.format import IgvmFile
    from igvm_builder.format.defs import PlatformType
    from igvm_builder.sign.image import IdBlockVerificationError, find_id_blocks, remove_id_block, verify_igvm

    checks: list[ReleaseCheck] = []
    try:
        f = IgvmFile.load(path)
    except IgvmError as exc:
        checks.append(ReleaseCheck("igvm", path, False, f"released file {path}: {exc.message}"))
        return checks, None
    snp = f.platform(PlatformType.SEV_SNP)
    signed = bool(snp is not None and find_id_blocks(f, snp.compatibility_mask))
    if not signed:
        if signature is not None:
            checks.append(ReleaseCheck("signature", "missing", False, f"released file {path}: not signed (no "
                                       "SEV-SNP ID block), but the reference values record a signature"))
        return checks, None
    unsigned, _ = remove_id_block(f)
    data = unsigned.to_bytes()
    same = hashlib.sha256(data).hexdigest() == rebuilt_sha
    checks.append(ReleaseCheck("signature", "unsigned", same,
                               f"released file {path}: without its ID block it is the rebuild" if same else
                               f"released file {path}: without its ID block it differs from the rebuild (the "
                               "signed image is not this source's)"))
    if signature is None:
        checks.append(ReleaseCheck("signature", "reference", False, f"released file {path}: signed, but the "
                                   "reference values record no signature (publish the signed image's: "
                                   "igvm-builder sign --reference REF.json --reference-values SIGNED.json)"))
        return checks, data
    name = (loader_override or signature.loader).lower()
    try:
        report = verify_igvm(
            f, loader=name, id_key_digest=bytes.fromhex(signature.id_key_digest),
            author_key_digest=bytes.fromhex(signature.author_key_digest) if signature.author_key_digest else None,
            vcpus=signature.vcpus, vcpu_type=signature.vcpu_type, explain=True)
    except IdBlockVerificationError as exc:
        for failure in exc.failures:
            checks.append(ReleaseCheck("signature", failure.kind, False, f"released file {path}: ID block: "
                                       f"{failure.message}"))
        return checks, data
    except (IgvmError, ValueError) as exc:
        checks.append(ReleaseCheck("signature", "verify", False, f"released file {path}: ID block: {exc}"))
        return checks, data
    if name != signature.loader:
        checks.append(ReleaseCheck("signature", "loader", False, f"released file {path}: ID block verifies under "
                                   f"loader {name}, but the reference values record loader {signature.loader}"))
    if report.launch_digest.hex() != signature.launch_digest:
        checks.append(ReleaseCheck("signature", "launch-digest", False, f"released file {path}: ID block signs "
                                   f"{_short(report.launch_digest.hex())}, the reference values record "
                                   f"{_short(signature.launch_digest)}"))
    checks.append(ReleaseCheck("signature", "verify", True, f"released file {path}: ID block verifies (loader "
                               f"{report.loader}, ID key digest {_short(report.id_key_digest.hex())})"))
    return checks, data


def _mapping(value: object) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, Mapping) else {}
