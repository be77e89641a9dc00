"""The SCons tool ``igvm``: builders for IGVM images, signed images, repro checks and cpio initrds.

This is the only module of igvm-builder that imports SCons.  It is thin: every
action calls the pure library (``igvm_builder.config``, ``.build``,
``.sign.image``, ``.repro``, ``.cpio``) and the library is imported inside the
actions and scanners, never when the tool is loaded, so a no-op build stays fast.

Builders added by :func:`generate` (details in ``docs/SCONS_TOOL.md``):

``env.IGVM(target, config)``
    config (TOML) -> ``<target>`` (``$IGVMSUFFIX``, ``.igvm``) plus the
    reference-values sidecar ``<target>$IGVM_REFSUFFIX`` (``.ref.json``).
``env.IGVMSign(target, image)``
    image -> signed image: the signing stage of ``igvm-builder sign`` (``igvm_builder.sign.stage``):
    the loader and ``[sign]`` table of the image's config (known when ``env.IGVM`` built the
    image, or given as a ``.toml`` source), overridden by ``$IGVM_LOADER`` and
    ``$IGVM_SIGNING_KEY`` & co; TEST-ONLY keys refused unless ``$IGVM_ALLOW_TEST_KEYS``.
``env.IGVMReproCheck(stamp, [config, image...])``
    rebuilds in-process and compares; writes a stamp (never cached).
``env.Cpio(target, directory)``
    directory -> deterministic newc cpio archive (an initrd).

Rebuild rules: a source scanner turns every file a config names into a
dependency; ``varlist`` puts ``SIGNATURE_VARS`` (and ``SIGN_SIGNATURE_VARS``)
into the action signatures; a target scanner adds igvm-builder's own ``.py``
files (``$IGVM_TOOL_DEPS``) and, for signing, the SHA-256 of the public key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import SCons.Action
import SCons.Builder
import SCons.Errors
import SCons.Node
import SCons.Node.FS
import SCons.Scanner
import SCons.Util

from igvm_builder.errors import IgvmError

__all__ = [
    "REPRO_SIGNATURE_VARS",
    "SIGNATURE_VARS",
    "SIGN_SIGNATURE_VARS",
    "exists",
    "generate",
]

#: Construction variables that change an image: part of the IGVM action's signature.
SIGNATURE_VARS: tuple[str, ...] = ("IGVM_PLATFORMS", "IGVM_LOADER")
#: Construction variables that change a signed image.
SIGN_SIGNATURE_VARS: tuple[str, ...] = (
    "IGVM_SIGNING_KEY",
    "IGVM_AUTHOR_KEY",
    "IGVM_LOADER",
    "IGVM_FAMILY_ID",
    "IGVM_IMAGE_ID",
    "IGVM_GUEST_SVN",
    "IGVM_VCPUS",
    "IGVM_VCPU_TYPE",
    "IGVM_ALLOW_TEST_KEYS",
)
#: Construction variables of the reproducibility check (the same build parameters).
REPRO_SIGNATURE_VARS: tuple[str, ...] = SIGNATURE_VARS

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _package_sources() -> tuple[str, ...]:
    """Every ``.py`` file of igvm_builder, sorted: what the actions really run."""
    found: list[str] = []
    for directory, dirs, files in os.walk(_PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
    return tuple(sorted(found))


def _defaults() -> dict[str, Any]:
    return {
        "IGVM_PLATFORMS": [],  # empty: the platforms the config lists
        "IGVM_LOADER": "",  # empty: the config's loader (or the library default)
        "IGVM_SIGNING_KEY": "",  # key source spec of the SNP ID key, e.g. file:keys/id.pem
        "IGVM_AUTHOR_KEY": "",  # optional author key source spec
        "IGVM_FAMILY_ID": "",
        "IGVM_IMAGE_ID": "",
        "IGVM_GUEST_SVN": "",
        "IGVM_VCPUS": "",  # qemu/cloud-hypervisor: the launch's vCPU count (-smp); empty: the file's VP contexts
        "IGVM_VCPU_TYPE": "",  # qemu: the -cpu model of reset-state VMSAs; empty: EPYC-v4
        "IGVM_ALLOW_TEST_KEYS": False,  # sign with the public TEST-ONLY keys (tests only)
        "IGVMSUFFIX": ".igvm",
        "IGVM_REFSUFFIX": ".ref.json",
        "IGVMCONFIGSUFFIX": ".toml",
        "IGVMSIGNSUFFIX": ".signed.igvm",
        "IGVMREPROSUFFIX": ".repro",
        "CPIOSUFFIX": ".cpio",
        "IGVM_ALIAS": "igvm",
        "IGVMSIGN_ALIAS": "igvm",
        "IGVMREPRO_ALIAS": "igvm-check",
        "IGVM_TOOL_DEPS": list(_package_sources()),
        "IGVM_PROGRESS_INTERVAL": 5,  # seconds between "still working" lines; 0 disables
        "IGVMCOMSTR": "  IGVM    $TARGET",
        "IGVMSIGNCOMSTR": "  SIGN    $TARGET",
        "IGVMREPROCOMSTR": "  REPRO   $TARGET",
        "CPIOCOMSTR": "  CPIO    $TARGET",
    }


# --------------------------------------------------------------------------------------------
# Helpers shared by the actions


def _subst(env: Any, text: str, target: Sequence[Any], source: Sequence[Any]) -> str:
    return str(env.subst(text, target=target, source=source)).strip()


def _build_params(
    env: Any, target: Sequence[Any], source: Sequence[Any]
) -> tuple[list[str] | None, str | None]:
    """``$IGVM_PLATFORMS`` (comma or space separated) and ``$IGVM_LOADER``; empty means "the config's"."""
    platforms = [p for p in re.split(r"[\s,]+", _subst(env, "$IGVM_PLATFORMS", target, source)) if p]
    loader = _subst(env, "$IGVM_LOADER", target, source)
    return (platforms or None), (loader or None)


def _shown_path(env: Any, path: str) -> str:
    """``path`` relative to the top directory when it lies inside it (for messages)."""
    top = env.Dir("#").get_abspath()
    if os.path.isabs(path) and path.startswith(top + os.sep):
        return os.path.relpath(path, top)
    return path


def _fail(env: Any, exc: IgvmError, default_source: Any) -> SCons.Errors.UserError:
    """Turn a library error into the one-line SCons error ``file: where: what``.

    SCons prints a UserError raised by an action as ``scons: *** [target] message``
    without a traceback.  A multi-line message (a reproducibility diff) keeps its
    first line there; the rest goes to stderr first.
    """
    if exc.source is None:
        exc.source = str(default_source)
    else:
        exc.source = _shown_path(env, exc.source)
    first, _, rest = str(exc).partition("\n")
    if rest.strip():
        sys.stderr.write(rest.rstrip("\n") + "\n")
    return SCons.Errors.UserError(first)


def _write_output(env: Any, node: Any, data: bytes, source: Any) -> None:
    """Write ``data`` to ``node`` atomically; a failure is the tool's one-line error."""
    from igvm_builder.io import atomic_write

    try:
        atomic_write(node.get_abspath(), data)
    except IgvmError as exc:
        raise _fail(env, exc, source) from None


def _write_outputs(env: Any, nodes: Sequence[Any], data: Sequence[Iterable[bytes | memoryview]],
                   source: Any) -> None:
    """Write several outputs, each given as its chunks, together (all or none); a failure is the
    tool's one-line error."""
    from igvm_builder.io import atomic_outputs

    try:
        with atomic_outputs(*(n.get_abspath() for n in nodes)) as files:
            for fh, chunks in zip(files, data, strict=True):
                assert fh is not None
                for chunk in chunks:
                    fh.write(chunk)
    except IgvmError as exc:
        raise _fail(env, exc, source) from None


@contextlib.contextmanager
def _progress(env: Any, node: Any) -> Iterator[None]:
    """Print "still working" lines every ``$IGVM_PROGRESS_INTERVAL`` seconds during a long stage."""
    try:
        interval = float(env.subst("$IGVM_PROGRESS_INTERVAL") or 0)
    except ValueError:
        interval = 0.0
    if interval <= 0 or not SCons.Action.print_actions:
        yield
        return
    start = time.monotonic()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            sys.stdout.write(f"  ...     {node}: {time.monotonic() - start:.0f} s\n")
            sys.stdout.flush()

    thread = threading.Thread(target=tick, name=f"igvm-progress-{node}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        elapsed = time.monotonic() - start
        if elapsed >= interval:
            sys.stdout.write(f"  done    {node} in {elapsed:.1f} s\n")
            sys.stdout.flush()


def _strfunction(name: str) -> Any:
    """The verbose line (shown when the ``*COMSTR`` is empty): names only, never key material."""

    def show(target: Sequence[Any], source: Sequence[Any], env: Any) -> str:
        return f"{name}([{', '.join(map(str, target))}], [{', '.join(map(str, source))}])"

    return show


# --------------------------------------------------------------------------------------------
# IGVM: config -> image + reference values


def _config_path(node: Any) -> str:
    return str(node.rfile().get_abspath())


def _scan_config(node: Any, env: Any, path: Any = ()) -> list[Any]:
    """Every file the config names (firmware, kernel, initrd, blobs, included configs).

    Returns ``[]`` when the config does not exist yet (a generated config: SCons
    rescans it once built) or cannot be parsed (the action then reports the error).
    """
    if not node.rexists():
        return []
    from igvm_builder.config import load_config

    config = _config_path(node)
    try:
        cfg = load_config(config)
    except IgvmError:
        return []
    return [env.File(p) for p in cfg.input_files if os.path.abspath(p) != config]


def _igvm_emitter(target: list[Any], source: list[Any], env: Any) -> tuple[list[Any], list[Any]]:
    image = target[0]
    image.attributes.igvm_config = source[0]  # IGVMSign signs for this config's loader and [sign] table
    refs = image.dir.File(image.name + env.subst("$IGVM_REFSUFFIX"))
    targets = [image, refs]
    _add_to_alias(env, "IGVM_ALIAS", targets)
    return targets, source


def _add_to_alias(env: Any, variable: str, nodes: list[Any]) -> None:
    name = env.subst(f"${variable}")
    if name:
        env.Alias(name, nodes)


def _igvm_build(target: list[Any], source: list[Any], env: Any) -> None:
    from igvm_builder.assemble import build
    from igvm_builder.config import load_config
    from igvm_builder.io import atomic_outputs

    image, refs = target[0], target[1]
    platforms, loader = _build_params(env, target, source)
    with _progress(env, image):
        try:
            cfg = load_config(_config_path(source[0]))
            with atomic_outputs(image.get_abspath(), refs.get_abspath()) as (out, refs_out):
                result = build(cfg, platforms=platforms, loader=loader, output=out)  # streamed into `out`
                assert refs_out is not None
                refs_out.write(result.reference_values.to_json().encode())
        except IgvmError as exc:
            raise _fail(env, exc, source[0]) from None
    if SCons.Action.print_actions:  # what the image leaves to the guest (also in the reference values)
        for note in (result.reference_values.build.notes if result.reference_values.build else ()):
            sys.stdout.write(f"  note    {image}: {note}\n")


_igvm_build.strfunction = _strfunction("igvm_build")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# IGVMSign: image -> signed image

def _resolve_key(env: Any, spec: str) -> str:
    """The key source spec with a relative file path made absolute against the top directory
    (:func:`igvm_builder.sign.stage.resolve_key_spec`, as the CLI resolves it against the config's)."""
    from igvm_builder.sign.stage import resolve_key_spec

    return resolve_key_spec(spec, str(env.Dir("#").get_abspath()))


def _key_dependencies(env: Any, spec: str) -> list[Any]:
    """A Value of the public key's SHA-256: changes with the key, and no private key is hashed.

    File and environment keys are read here; a token (``pkcs11:``) or a signer
    command (``cmd:``) is not asked at scan time: those are tracked through the
    spec in the signature only.  A key that cannot be loaded gives no dependency
    (signing then fails and reports it).
    """
    if not spec or spec.partition(":")[0].lower() in ("pkcs11", "cmd"):
        return []
    from cryptography.hazmat.primitives import serialization

    from igvm_builder.sign.keys import key_source_from_spec

    try:
        public = key_source_from_spec(_resolve_key(env, spec)).public_key()
    except IgvmError:
        return []
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return [env.Value(f"igvm-public-key-sha256:{hashlib.sha256(der).hexdigest()}")]


def _scan_tool_deps(node: Any, env: Any, path: Any = ()) -> list[Any]:
    return [
        env.File(p) if SCons.Util.is_String(p) else p for p in env.Flatten([env.get("IGVM_TOOL_DEPS", [])])
    ]


def _scan_sign_deps(node: Any, env: Any, path: Any = ()) -> list[Any]:
    deps = _scan_tool_deps(node, env, path)
    config = _sign_config(env, node.sources)
    for variable, field in (("$IGVM_SIGNING_KEY", "id_key"), ("$IGVM_AUTHOR_KEY", "author_key")):
        spec = env.subst(variable).strip()
        if not spec and config is not None:  # the config's [sign] key, relative to the config
            from igvm_builder.sign.stage import resolve_key_spec

            configured = getattr(config.sign, field)
            spec = resolve_key_spec(configured, os.path.dirname(config.source)) if configured else ""
        deps.extend(_key_dependencies(env, spec))
    return deps


def _is_config(env: Any, node: Any) -> bool:
    return str(node).endswith(env.subst("$IGVMCONFIGSUFFIX"))


def _sign_config(env: Any, sources: Sequence[Any]) -> Any:
    """The BuildConfig among IGVMSign's sources (None when there is none or it cannot be read yet)."""
    for s in sources:
        if _is_config(env, s) and s.rexists():
            from igvm_builder.config import load_config

            try:
                return load_config(_config_path(s))
            except IgvmError:
                return None
    return None


def _is_sidecar(env: Any, node: Any) -> bool:
    return str(node).endswith(env.subst("$IGVM_REFSUFFIX"))


def _sign_emitter(target: list[Any], source: list[Any], env: Any) -> tuple[list[Any], list[Any]]:
    sidecars = [s for s in source if _is_sidecar(env, s)]
    configs = [s for s in source if _is_config(env, s)]
    images = [s for s in source if not _is_sidecar(env, s) and not _is_config(env, s)]
    if len(images) != 1 or len(target) != 1 or len(configs) > 1:
        raise SCons.Errors.UserError(
            f"IGVMSign takes one target, one image and at most one config, got {list(map(str, target))} <- "
            f"{list(map(str, source))}"
        )
    image = images[0]
    if not configs:  # the config env.IGVM built the image from: its loader and [sign] table apply
        config = getattr(image.attributes, "igvm_config", None)
        configs = [config] if config is not None else []
    if not sidecars and getattr(image.attributes, "igvm_config", None) is not None:
        sidecars = [image.dir.File(image.name + env.subst("$IGVM_REFSUFFIX"))]  # the build's reference values
    signed = target[0]
    targets = [signed, signed.dir.File(signed.name + env.subst("$IGVM_REFSUFFIX"))]
    _add_to_alias(env, "IGVMSIGN_ALIAS", targets)
    return targets, [image, *configs, *sidecars[:1]]


def _id_value(value: Any) -> Any:
    """``$IGVM_FAMILY_ID``/``$IGVM_IMAGE_ID``: a hex string becomes bytes; other values pass as given."""
    if isinstance(value, str):
        from igvm_builder.hexstr import parse_hex

        try:
            return parse_hex(value)
        except ValueError:
            return value
    return value


def _sign_options(env: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, variable in (("family_id", "IGVM_FAMILY_ID"), ("image_id", "IGVM_IMAGE_ID")):
        value = env.get(variable)
        if value not in (None, ""):
            options[key] = _id_value(value)
    svn = env.get("IGVM_GUEST_SVN")
    if svn not in (None, ""):
        options["guest_svn"] = svn  # checked (one-line error) by the signing stage
    vcpus = env.get("IGVM_VCPUS")
    if vcpus not in (None, ""):
        try:
            options["vcpus"] = int(str(vcpus), 0)
        except ValueError:
            from igvm_builder.errors import SigningError

            raise SigningError(f"$IGVM_VCPUS must be an integer, got '{vcpus}'") from None
    vcpu_type = env.get("IGVM_VCPU_TYPE")
    if vcpu_type not in (None, ""):
        options["vcpu_type"] = vcpu_type
    return options


def _truthy(env: Any, variable: str) -> bool:
    value = env.get(variable)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _igvm_sign(target: list[Any], source: list[Any], env: Any) -> None:
    from igvm_builder.errors import SigningError
    from igvm_builder.format import IgvmFile
    from igvm_builder.format.blob import as_view
    from igvm_builder.io import sha256_input
    from igvm_builder.sign.stage import plan_signing, sign_file_layout

    image = source[0]
    config_node = next((s for s in source[1:] if _is_config(env, s)), None)
    sidecar = next((s for s in source[1:] if _is_sidecar(env, s)), None)
    id_spec = _subst(env, "$IGVM_SIGNING_KEY", target, source)
    author_spec = _subst(env, "$IGVM_AUTHOR_KEY", target, source)
    _, loader = _build_params(env, target, source)
    with _progress(env, target[0]):
        try:
            config = None
            if config_node is not None:
                from igvm_builder.config import load_config

                config = load_config(_config_path(config_node))
            options = _sign_options(env)
            plan = plan_signing(
                config=config,
                id_key=_resolve_key(env, id_spec) if id_spec else None,
                author_key=_resolve_key(env, author_spec) if author_spec else None,
                loader=loader,
                loader_option="$IGVM_LOADER",
                id_key_option="$IGVM_SIGNING_KEY",
                **options,
            )
            # mapped, not read: the image is held once (its pages are the signed file's data)
            unsigned = IgvmFile.load(image.get_abspath())
            unsigned_sha256 = sha256_input(image.get_abspath(), "IGVM file", error=SigningError)
            signed, outcome, layout = sign_file_layout(
                unsigned, plan, output=str(target[0]),
                allow_test_keys=_truthy(env, "IGVM_ALLOW_TEST_KEYS"),
                how_to_allow="set IGVM_ALLOW_TEST_KEYS=1",
            )
            from igvm_builder.reference import ReferenceValues
            from igvm_builder.sign.stage import launch_vcpus, signed_reference_values

            base = ReferenceValues.load(sidecar.get_abspath()) if sidecar is not None else None
            vcpus, vcpu_type = launch_vcpus(unsigned, plan)
            refs = signed_reference_values(signed, outcome, unsigned=unsigned_sha256,
                                           base=base, vcpus=vcpus, vcpu_type=vcpu_type, layout=layout)
        except IgvmError as exc:
            raise _fail(env, exc, image) from None
        image_chunks = (layout.head, *(as_view(blob) for blob in layout.blobs))  # the signed file, streamed
        _write_outputs(env, target[:2], (image_chunks, (refs.to_json().encode(),)), image)
    if SCons.Action.print_actions:  # the one-line result of the signing stage (as igvm-builder sign)
        sys.stdout.write(f"  signed  {outcome.line()}\n")
    if outcome.test_key_warning:
        sys.stderr.write(f"scons: warning: {target[0]}: {outcome.test_key_warning}\n")


_igvm_sign.strfunction = _strfunction("igvm_sign")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# IGVMReproCheck: [config, image...] -> stamp


def _repro_emitter(target: list[Any], source: list[Any], env: Any) -> tuple[list[Any], list[Any]]:
    sources = [s for s in source if not _is_sidecar(env, s)]
    if not sources or len(target) != 1:
        raise SCons.Errors.UserError("IGVMReproCheck takes one stamp target and a config (then images)")
    env.NoCache(target)  # a cached stamp would skip the check it stands for
    _add_to_alias(env, "IGVMREPRO_ALIAS", target)
    return target, sources


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _igvm_repro(target: list[Any], source: list[Any], env: Any) -> None:
    from igvm_builder.errors import ReproducibilityError
    from igvm_builder.repro import check_config_reproducible

    config, images = source[0], source[1:]
    platforms, loader = _build_params(env, target, source)
    with _progress(env, target[0]):
        try:
            check_config_reproducible(_config_path(config), platforms=platforms, loader=loader)
            if images:
                from igvm_builder.assemble import build
                from igvm_builder.config import load_config

                fresh = bytes(
                    build(load_config(_config_path(config)), platforms=platforms, loader=loader).data
                )
                for image in images:
                    with open(image.get_abspath(), "rb") as fh:
                        built = fh.read()
                    if built != fresh:
                        raise ReproducibilityError(
                            f"differs from a fresh build of {config} "
                            f"(first difference at offset {_first_difference(built, fresh):#x})",
                            source=str(image),
                        )
        except IgvmError as exc:
            raise _fail(env, exc, config) from None
        stamp = {
            "config": config.get_internal_path(),
            "images": [i.get_internal_path() for i in images],
            "platforms": platforms,
            "loader": loader,
            "result": "reproducible",
        }
        _write_output(env, target[0], (json.dumps(stamp, sort_keys=True, indent=2) + "\n").encode(), config)


_igvm_repro.strfunction = _strfunction("igvm_repro_check")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Cpio: directory -> newc archive


def _cpio_root(node: Any) -> str:
    return str(node.srcnode().get_abspath())


def _scan_cpio_dir(node: Any, env: Any, path: Any = ()) -> list[Any]:
    """Regular files of the tree, plus a Value for its shape (names, kinds, exec bits, links).

    The shape Value makes an added empty directory, a chmod +x or a new symlink
    target a change, and puts them in the CacheDir key.
    """
    from igvm_builder.cpio import EntryKind, list_directory

    root = _cpio_root(node)
    try:
        members = list_directory(root)
    except IgvmError:
        return []  # the action reports it
    shape = hashlib.sha256()
    files: list[Any] = []
    for m in members:
        shape.update(b"%s\0%s\0%d\0%s\0\0" % (m.name, m.kind.value.encode(), m.executable, m.link))
        if m.kind is EntryKind.FILE:
            files.append(env.File(m.path))
    return [*files, env.Value(f"cpio-tree-sha256:{shape.hexdigest()}")]


def _cpio_build(target: list[Any], source: list[Any], env: Any) -> None:
    from igvm_builder.cpio import pack_directory

    try:
        data = pack_directory(_cpio_root(source[0]))
    except IgvmError as exc:
        raise _fail(env, exc, source[0]) from None
    _write_output(env, target[0], data, source[0])


_cpio_build.strfunction = _strfunction("cpio_pack")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Tool entry points


def _builders() -> dict[str, SCons.Builder.BuilderBase]:
    # node_class=Node: these scanners return Value nodes too, which must not become files.
    tool_deps = SCons.Scanner.Scanner(_scan_tool_deps, name="IGVMToolDeps", node_class=SCons.Node.Node)
    config_scanner = SCons.Scanner.Scanner(_scan_config, name="IGVMConfig")
    return {
        "IGVM": SCons.Builder.Builder(
            action=SCons.Action.Action(_igvm_build, "$IGVMCOMSTR", varlist=SIGNATURE_VARS),
            emitter=_igvm_emitter,
            source_scanner=config_scanner,
            target_scanner=tool_deps,
            suffix="$IGVMSUFFIX",
            src_suffix="$IGVMCONFIGSUFFIX",
            single_source=True,
        ),
        "IGVMSign": SCons.Builder.Builder(
            action=SCons.Action.Action(_igvm_sign, "$IGVMSIGNCOMSTR", varlist=SIGN_SIGNATURE_VARS),
            emitter=_sign_emitter,
            target_scanner=SCons.Scanner.Scanner(
                _scan_sign_deps, name="IGVMSignDeps", node_class=SCons.Node.Node
            ),
            suffix="$IGVMSIGNSUFFIX",
            src_suffix="$IGVMSUFFIX",
        ),
        "IGVMReproCheck": SCons.Builder.Builder(
            action=SCons.Action.Action(_igvm_repro, "$IGVMREPROCOMSTR", varlist=REPRO_SIGNATURE_VARS),
            emitter=_repro_emitter,
            source_scanner=config_scanner,
            target_scanner=tool_deps,
            suffix="$IGVMREPROSUFFIX",
            src_suffix="$IGVMCONFIGSUFFIX",
        ),
        "Cpio": SCons.Builder.Builder(
            action=SCons.Action.Action(_cpio_build, "$CPIOCOMSTR"),
            source_factory=SCons.Node.FS.Dir,
            source_scanner=SCons.Scanner.Scanner(_scan_cpio_dir, name="CpioDir", node_class=SCons.Node.Node),
            target_scanner=tool_deps,
            suffix="$CPIOSUFFIX",
            single_source=True,
        ),
    }


def generate(env: Any, **kwargs: Any) -> None:
    """Add the builders and default construction variables to ``env``.

    Variables the user already set are kept (``SetDefault``); keyword arguments
    (``tools=[("igvm", {"IGVM_LOADER": "qemu"})]``) are set explicitly.
    """
    defaults = _defaults()
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise SCons.Errors.UserError(f"igvm tool: unknown option(s): {', '.join(unknown)}")
    env.SetDefault(**defaults)
    if kwargs:
        env.Replace(**kwargs)
    env.Append(BUILDERS=_builders())


def exists(env: Any) -> bool:
    """The tool works wherever igvm_builder is importable, which it is if this module loaded."""
    return True
