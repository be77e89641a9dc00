"""The declarative build configuration: TOML -> validated, frozen :class:`BuildConfig`.

Schema (every key optional unless noted; sizes are integers or strings such as ``"64M"``)::

    include = ["common.toml"]          # merged first; this file's keys win

    [image]
    platforms = ["native", "snp", "tdx", "vbs", "sev", "sev-es"]   # required, any subset
    loader = "hyperv"                  # hyperv (default) | qemu | cloud-hypervisor: the SNP loader
                                       # profile measured and signed (any case; docs/MEASUREMENT.md)
    revision = 1                       # IGVM format version (1 or 2)

    [firmware]                         # an OVMF image mapped to end at 4 GiB
    path = "OVMF.fd"
    igvm_parameters = false            # fill OVMF's IGVM metadata parameter area (memory map,
                                       # VP count) through IGVM parameters; changes the SNP digest

    [kernel]                           # a kernel booted directly (or hashed, with [firmware])
    path = "vmlinuz"                   # required in this table
    format = "auto"                    # auto | elf | bzimage | uki
    cmdline = "console=ttyS0"
    initrd = "initrd.img"

    [[blob]]                           # raw bytes at a GPA
    path = "data.bin"
    gpa = 0x200000
    measured = true

    [memory]
    size = "512M"                      # guest RAM described to the kernel (e820 / PVH memmap)

    [snp]
    policy = 0x30000
    vcpus = 1
    vcpu_type = "EPYC-v4"              # a name or a CPUID(1).EAX signature
    guest_features = 0x1               # SEV_FEATURES of every VMSA
    vmm_type = "qemu"                  # qemu | ec2 | gce (reset-state conventions)
    cr0 = 0x10                         # VMSA CR0 of OVMF launches (MEASUREMENT.md §7.3)

    [tdx]
    policy = 0x0
    two_pass = false                   # MRTD page order of the reference values

    [vbs]
    vtl = 0

    [sign]                             # used by `igvm-builder sign` and the SCons IGVMSign builder
    id_key = "keys/id.pem"             # a key source spec (file path, env:VAR, pkcs11:..., cmd:...)
    author_key = "keys/author.pem"
    family_id = "00112233445566778899aabbccddeeff"
    image_id = "..."
    guest_svn = 0

Errors name the config file, the key and (where it can be found) the line.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from igvm_builder.cca_config import CCA_SCHEMA, CcaSpec, cca_spec
from igvm_builder.errors import ConfigError
from igvm_builder.format.defs import PLATFORM_NAMES
from igvm_builder.hexstr import parse_hex
from igvm_builder.recordclass import field, record

BUILD_LOADERS = ("qemu", "hyperv", "cloud-hypervisor")
#: The loader profile of every command when neither the config nor an option names one
#: (the same value as igvm_builder.measure.profiles.DEFAULT_LOADER, which a test checks).
DEFAULT_LOADER = "hyperv"
KERNEL_FORMATS = ("auto", "elf", "bzimage", "uki")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


@record
class BlobSpec:
    path: str
    gpa: int
    measured: bool = True


@record
class KernelSpec:
    path: str
    format: str = "auto"
    cmdline: str = ""
    initrd: str | None = None


@record
class SnpSpec:
    policy: int = 0x30000
    vcpus: int = 1
    vcpu_type: str | int = "EPYC-v4"
    guest_features: int = 0x1
    vmm_type: str = "qemu"
    cr0: int = 0x10


@record
class TdxSpec:
    policy: int = 0
    two_pass: bool = False


@record
class VbsSpec:
    vtl: int = 0


@record
class SignSpec:
    id_key: str | None = None
    author_key: str | None = None
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0


@record
class BuildConfig:
    """A validated configuration; paths are absolute (resolved against the config's directory)."""

    source: str
    platforms: tuple[str, ...]
    loader: str = DEFAULT_LOADER
    revision: int = 1
    firmware: str | None = None
    firmware_igvm_parameters: bool = False
    kernel: KernelSpec | None = None
    blobs: tuple[BlobSpec, ...] = ()
    memory_size: int = 512 << 20
    #: Kernel launches on SNP and TDX: import every RAM page the image does not carry, data-less
    #: and unmeasured, so the loader validates (SNP) or accepts (TDX) it at launch.
    memory_prevalidate: bool = False
    snp: SnpSpec = field(default_factory=SnpSpec)
    tdx: TdxSpec = field(default_factory=TdxSpec)
    vbs: VbsSpec = field(default_factory=VbsSpec)
    sign: SignSpec = field(default_factory=SignSpec)
    #: Arm CCA realm (``platforms = ["cca"]``): layout, realm parameters, DTB, CCA policy.
    cca: CcaSpec | None = None
    includes: tuple[str, ...] = ()
    #: (absolute path, name): each file's name in reference values (as written, or relative to this config)
    input_names: tuple[tuple[str, str], ...] = ()

    def input_name(self, path: str) -> str:
        """The location-independent name of an input file (see :attr:`input_names`)."""
        for full, name in self.input_names:
            if full == path:
                return name
        return os.path.relpath(path, os.path.dirname(self.source)).replace(os.sep, "/")

    @property
    def input_files(self) -> tuple[str, ...]:
        """Every file this config reads: firmware, kernel, initrd, blobs, included configs."""
        files: list[str] = list(self.includes)
        if self.firmware:
            files.append(self.firmware)
        if self.kernel:
            files.append(self.kernel.path)
            if self.kernel.initrd:
                files.append(self.kernel.initrd)
        files += [b.path for b in self.blobs]
        if self.cca is not None and self.cca.dtb:
            files.append(self.cca.dtb)
        return tuple(dict.fromkeys(files))

    def with_overrides(self, *, platforms: tuple[str, ...] | None = None, loader: str | None = None) -> BuildConfig:
        from igvm_builder.recordclass import replace

        cfg = self
        if platforms is not None:
            cfg = replace(cfg, platforms=_check_platforms(list(platforms), cfg.source, None))
            if ("cca" in cfg.platforms) != (self.cca is not None):
                raise ConfigError("cca is built from a config with a [cca] table and platforms = [\"cca\"] only",
                                  source=cfg.source, key="image.platforms")
        if loader is not None:
            loader = loader.lower()
            if loader not in BUILD_LOADERS:
                raise ConfigError(f"unknown loader '{loader}' (choose from {', '.join(BUILD_LOADERS)})",
                                  source=cfg.source, key="image.loader")
            cfg = replace(cfg, loader=loader)
        return cfg


# --------------------------------------------------------------------------- value checkers


class _Ctx:
    def __init__(self, source: str, text: str, base_dir: str, *, top_dir: str | None = None,
                 names: dict[str, str] | None = None) -> None:
        self.source = source
        self.lines = text.splitlines()
        self.base_dir = base_dir
        self.top_dir = top_dir or base_dir
        self.names: dict[str, str] = {} if names is None else names

    def child(self, source: str, text: str) -> _Ctx:
        """Context of an included config: its own directory, the top config's names."""
        return _Ctx(source, text, os.path.dirname(source), top_dir=self.top_dir, names=self.names)

    def line_of(self, key: str) -> int | None:
        """Best-effort line number of ``section.key`` (or ``[section]``)."""
        parts = key.split(".")
        section, leaf = (parts[0], parts[-1]) if len(parts) > 1 else (None, parts[0])
        in_section = section is None
        for no, line in enumerate(self.lines, 1):
            s = line.strip()
            if s.startswith("["):
                name = s.strip("[]").strip()
                in_section = section is None or name == section
                if len(parts) == 1 and name == leaf:
                    return no
                continue
            if in_section and re.match(rf"^{re.escape(leaf)}\s*=", s):
                return no
        return None

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(msg, source=self.source, key=key, line=self.line_of(key))

    def path(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.err(key, f"expected a file path (string), got {type(value).__name__}")
        written = os.path.expanduser(value)
        full = os.path.normpath(os.path.join(self.base_dir, written))
        # How reference values name the file: as written when absolute, else relative to the
        # top-level config, so the name does not depend on where the checkout lives.
        name = full if os.path.isabs(written) else os.path.relpath(full, self.top_dir)
        self.names.setdefault(full, name.replace(os.sep, "/"))
        return full

    def int_(self, key: str, value: Any, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and len(value) > _MAX_NUMBER_TEXT:
                raise self.err(key, f"expected an integer, got a string of {len(value)} characters")
            if isinstance(value, str):
                try:
                    value = int(value, 0)
                except ValueError:
                    raise self.err(key, f"expected an integer, got '{value}'") from None
            else:
                raise self.err(key, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.err(key, f"value {value:#x} is out of range ({lo:#x}..{hi:#x})")
        return int(value)

    def size(self, key: str, value: Any) -> int:
        if isinstance(value, str) and len(value) > _MAX_NUMBER_TEXT:
            raise self.err(key, f"a size of {len(value)} characters is not a size (e.g. 512M, 2G, 0x100000)")
        if isinstance(value, str):
            m = _SIZE_RE.match(value)
            if m:
                value = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
            else:
                try:
                    value = int(value.strip(), 0)  # "0x100000" (the example the message below gives)
                except ValueError:
                    raise self.err(key, f"'{value}' is not a size (e.g. 512M, 2G, 0x100000)") from None
        return self.int_(key, value, 1)

    def bool_(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.err(key, f"expected true or false, got {value!r}")
        return value

    def str_(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.err(key, f"expected a string, got {type(value).__name__}")
        return value

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        v = self.str_(key, value)
        if v not in choices:
            raise self.err(key, f"'{v}' is not one of {', '.join(choices)}")
        return v

    def hex16(self, key: str, value: Any) -> bytes:
        v = self.str_(key, value)
        try:
            b = parse_hex(v, dashes=True)
        except ValueError:
            raise self.err(key, "expected 32 hexadecimal digits (16 bytes)") from None
        if len(b) != 16:
            raise self.err(key, f"expected 16 bytes, got {len(b)}")
        return b


def _check_platforms(value: Any, source: str, ctx: _Ctx | None) -> tuple[str, ...]:
    def err(msg: str) -> ConfigError:
        if ctx:
            return ctx.err("image.platforms", msg)
        return ConfigError(msg, source=source, key="image.platforms")

    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise err("expected a non-empty list of platform names")
    out = []
    for v in value:
        name = v.lower()
        if name not in PLATFORM_NAMES:
            raise err(f"unknown platform '{v}' (choose from native, snp, tdx, vbs, sev, sev-es, cca)")
        if name in out:
            raise err(f"platform '{v}' listed twice")
        out.append(name)
    order = ["native", "snp", "tdx", "vbs", "sev", "sev-es", "cca"]
    return tuple(sorted(out, key=order.index))


def _snp_policy(ctx: _Ctx, key: str, value: Any) -> int:
    """An SEV-SNP guest policy: bit 17 is reserved must-be-one (SNP firmware ABI); the firmware
    refuses SNP_LAUNCH_START without it."""
    from igvm_builder.format.defs import SnpPolicyBits

    policy = ctx.int_(key, value)
    must = int(SnpPolicyBits.RESERVED_MUST_BE_ONE)
    if not policy & must:
        raise ctx.err(key, f"{policy:#x} has bit 17 (0x20000) clear; the SNP ABI reserves it as must-be-one "
                           f"and the firmware refuses the launch: did you mean {policy | must:#x}?")
    return policy


def _tdx_policy(ctx: _Ctx, key: str, value: Any) -> int:
    """An IGVM ``TdxPolicy``: bit 0 debug_allowed, bit 1 sept_ve_disable, bit 2 migratable; the
    other bits are reserved.  (Not the TD ATTRIBUTES of the TDX module, where SEPT_VE_DISABLE is
    bit 28: the loader derives those from this policy.)"""
    from igvm_builder.format.defs import tdx_policy_reserved

    policy = ctx.int_(key, value)
    reserved = tdx_policy_reserved(policy)
    if reserved:
        hint = " (TD ATTRIBUTES.SEPT_VE_DISABLE is bit 28 there; here it is 0x2)" if reserved & (1 << 28) else ""
        raise ctx.err(key, f"{policy:#x} sets reserved bits {reserved:#x}: the IGVM TdxPolicy defines only "
                           f"0x1 debug_allowed, 0x2 sept_ve_disable and 0x4 migratable{hint}")
    return policy


def _vcpu_type(ctx: _Ctx, key: str, value: Any) -> str | int:
    """A vCPU model name or CPUID(1).EAX signature, checked now so the error names the key and line."""
    from igvm_builder.sev_vmsa import vcpu_signature

    if not (isinstance(value, int) and not isinstance(value, bool)):
        value = ctx.str_(key, value)
    try:
        vcpu_signature(value)
    except ConfigError as exc:
        raise ctx.err(key, exc.message) from None
    return value if isinstance(value, int) else str(value)


_Schema = Mapping[str, Callable[[_Ctx, str, Any], Any]]

_SECTIONS: dict[str, _Schema] = {
    "image": {
        "platforms": lambda c, k, v: _check_platforms(v, c.source, c),
        "loader": lambda c, k, v: c.choice(k, c.str_(k, v).lower(), BUILD_LOADERS),
        "revision": lambda c, k, v: c.int_(k, v, 1, 2),
    },
    "firmware": {"path": lambda c, k, v: c.path(k, v),
                 "igvm_parameters": lambda c, k, v: c.bool_(k, v)},
    "kernel": {
        "path": lambda c, k, v: c.path(k, v),
        "format": lambda c, k, v: c.choice(k, v, KERNEL_FORMATS),
        "cmdline": lambda c, k, v: _cmdline(c, k, v),
        "initrd": lambda c, k, v: c.path(k, v),
    },
    "memory": {"size": lambda c, k, v: c.size(k, v), "prevalidate": lambda c, k, v: c.bool_(k, v)},
    "snp": {
        "policy": lambda c, k, v: _snp_policy(c, k, v),
        "vcpus": lambda c, k, v: c.int_(k, v, 1, 512),
        "vcpu_type": lambda c, k, v: _vcpu_type(c, k, v),
        "guest_features": lambda c, k, v: _guest_features(c, k, v),
        "vmm_type": lambda c, k, v: c.choice(k, v, ("qemu", "ec2", "gce")),
        "cr0": lambda c, k, v: _cr0(c, k, v),
    },
    "tdx": {"policy": lambda c, k, v: _tdx_policy(c, k, v), "two_pass": lambda c, k, v: c.bool_(k, v)},
    "vbs": {"vtl": lambda c, k, v: c.int_(k, v, 0, 2)},
    "cca": CCA_SCHEMA,
    "sign": {
        "id_key": lambda c, k, v: c.str_(k, v),
        "author_key": lambda c, k, v: c.str_(k, v),
        "family_id": lambda c, k, v: c.hex16(k, v),
        "image_id": lambda c, k, v: c.hex16(k, v),
        "guest_svn": lambda c, k, v: c.int_(k, v, 0, 0xFFFFFFFF),
    },
}
_BLOB_KEYS: _Schema = {
    "path": lambda c, k, v: c.path(k, v),
    "gpa": lambda c, k, v: c.int_(k, v),
    "measured": lambda c, k, v: c.bool_(k, v),
}
_TOP_KEYS = ("include", "blob", *_SECTIONS)


def _cmdline(c: _Ctx, key: str, value: Any) -> str:
    text = c.str_(key, value)
    if "\0" in text:  # the kernel reads the command line up to the first NUL: the rest would be lost
        raise c.err(key, f"the command line has a NUL character at offset {text.index(chr(0))}; the kernel "
                         "would stop reading there")
    return text


#: CR0 bits defined by the architecture (PE MP EM TS ET NE WP AM NW CD PG); the rest are reserved
#: and loading them faults (Intel SDM vol. 3 §2.5, AMD APM vol. 2 §3.1.1).
CR0_DEFINED = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x10000 | 0x40000 | 0x20000000 | 0x40000000 | 0x80000000


def _cr0(c: _Ctx, key: str, value: Any) -> int:
    v = c.int_(key, value)
    if v & ~CR0_DEFINED:
        raise c.err(key, f"CR0 {v:#x} sets reserved bits {v & ~CR0_DEFINED:#x} (defined: {CR0_DEFINED:#x})")
    return v


def _guest_features(c: _Ctx, key: str, value: Any) -> int:
    from igvm_builder.format.defs import SevFeatures

    v = c.int_(key, value)
    known = 0
    for flag in SevFeatures:
        known |= int(flag)
    if v & ~known:
        raise c.err(key, f"SEV_FEATURES {v:#x} sets bits igvm-builder does not know ({v & ~known:#x}; known: "
                         f"{known:#x}, docs/CONFIG.md)")
    return v


def _unknown(ctx: _Ctx, key: str, known: tuple[str, ...] | list[str], what: str) -> ConfigError:
    import difflib  # only on this error path

    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
    return ctx.err(key, f"unknown {what}{hint}")


#: How deep ``include`` may nest (a config including one including one ...).
MAX_INCLUDE_DEPTH = 16
#: Longest size or integer string accepted (``"512M"``, ``"0x100000"``): a 5,000-digit string is
#: no size, and Python refuses to convert more than 4,300 digits anyway.
_MAX_NUMBER_TEXT = 64


def _load_toml(path: str) -> tuple[str, dict[str, Any]]:
    from igvm_builder.io import CONFIG_LIMIT, MAX_NESTING, check_nesting, read_input

    # a regular file of at most CONFIG_LIMIT bytes: a FIFO or /dev/zero is refused before any read
    raw = read_input(path, "config", limit=CONFIG_LIMIT, error=ConfigError)
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (some Windows editors write one)
        raw = raw[3:]
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ConfigError(f"the config nests more than {MAX_NESTING} levels deep", source=path) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        line = int(m.group(1)) if m else None
        if line is None and "end of document" in str(exc):
            line = max(1, len(text.splitlines()))  # e.g. an unclosed array: report the last line
        raise ConfigError(f"invalid TOML: {exc}", source=path, line=line) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"invalid TOML: {exc}", source=path) from None
    check_nesting(data, source=path, error=ConfigError, what="config")
    return text, data


def load_config(path: str | os.PathLike[str]) -> BuildConfig:
    """Read, merge (``include``) and validate the config at ``path``."""
    source = os.path.abspath(os.fspath(path))
    text, data = _load_toml(source)
    return parse_config(data, source=source, text=text)


def parse_config(data: Mapping[str, Any], *, source: str, text: str = "", base_dir: str | None = None) -> BuildConfig:
    """Validate an already-decoded TOML document (``source`` names it in errors)."""
    ctx = _Ctx(source, text, base_dir or os.path.dirname(os.path.abspath(source)))
    values, blobs, includes = _collect(data, ctx, (source,))
    if "image.platforms" not in values:
        raise ctx.err("image.platforms", "missing required key 'image.platforms' (e.g. platforms = [\"snp\"])")
    if "firmware.path" not in values and "kernel.path" not in values and not blobs:
        raise ctx.err("image", "nothing to boot: give a [firmware], a [kernel] or [[blob]] tables")
    kernel = None
    if "kernel.path" in values:
        kernel = KernelSpec(path=values["kernel.path"], format=values.get("kernel.format", "auto"),
                            cmdline=values.get("kernel.cmdline", ""), initrd=values.get("kernel.initrd"))
    elif any(k.startswith("kernel.") for k in values):
        raise ctx.err("kernel.path", "the [kernel] table needs a 'path'")
    if values.get("memory.prevalidate") and "firmware.path" in values:
        raise ctx.err("memory.prevalidate", "applies to kernels booted without firmware; OVMF validates "
                                            "and accepts guest memory itself")
    sub = _sub(values)
    cca = cca_spec(ctx, values, values["image.platforms"])
    return BuildConfig(
        source=source,
        platforms=values["image.platforms"],
        loader=values.get("image.loader", DEFAULT_LOADER),
        revision=values.get("image.revision", 2 if cca else 1),
        firmware=values.get("firmware.path"),
        firmware_igvm_parameters=values.get("firmware.igvm_parameters", False),
        kernel=kernel,
        blobs=tuple(blobs),
        memory_size=values.get("memory.size", 512 << 20),
        memory_prevalidate=values.get("memory.prevalidate", False),
        snp=SnpSpec(**sub("snp")),
        tdx=TdxSpec(**sub("tdx")),
        vbs=VbsSpec(**sub("vbs")),
        sign=SignSpec(**sub("sign")),
        cca=cca,
        includes=tuple(dict.fromkeys(includes)),
        input_names=tuple(sorted(ctx.names.items())),
    )


def _collect(data: Mapping[str, Any], ctx: _Ctx, stack: tuple[str, ...]
             ) -> tuple[dict[str, Any], list[BlobSpec], list[str]]:
    """Validated dotted-key values, blobs and included files of one document (includes first)."""
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown(ctx, key, _TOP_KEYS, "top-level key or table")
    values: dict[str, Any] = {}
    includes: list[str] = []
    blobs: list[BlobSpec] = []
    inc = data.get("include", [])
    if isinstance(inc, str):
        inc = [inc]
    if not isinstance(inc, list):
        raise ctx.err("include", "expected a list of config paths")
    for i, item in enumerate(inc):
        p = ctx.path("include", item)
        if p in stack:
            raise ctx.err("include", "include cycle: " + " -> ".join((*stack, p)))
        if len(stack) > MAX_INCLUDE_DEPTH:
            raise ctx.err("include", f"includes nested more than {MAX_INCLUDE_DEPTH} levels deep")
        text, sub_data = _load_toml(p)
        sub_values, sub_blobs, sub_includes = _collect(sub_data, ctx.child(p, text), (*stack, p))
        values.update(sub_values)
        blobs += sub_blobs
        includes += [*sub_includes, p]
        del i

    for section, schema in _SECTIONS.items():
        table = data.get(section)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ctx.err(section, f"'{section}' must be a table ([{section}])")
        for key, value in table.items():
            full = f"{section}.{key}"
            check = schema.get(key)
            if check is None:
                raise _unknown(ctx, full, list(schema), f"key '{full}'")
            values[full] = check(ctx, full, value)

    if "blob" in data:
        items = data["blob"]
        if not isinstance(items, list):
            raise ctx.err("blob", "use [[blob]] tables (an array of tables)")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ctx.err("blob", "each [[blob]] must be a table")
            spec: dict[str, Any] = {}
            for key, value in item.items():
                check = _BLOB_KEYS.get(key)
                if check is None:
                    raise _unknown(ctx, f"blob.{key}", list(_BLOB_KEYS), f"key 'blob[{i}].{key}'")
                spec[key] = check(ctx, f"blob.{key}", value)
            for req in ("path", "gpa"):
                if req not in spec:
                    raise ctx.err("blob", f"[[blob]] number {i + 1} needs '{req}'")
            if spec["gpa"] % 0x1000:
                raise ctx.err("blob.gpa", f"blob GPA {spec['gpa']:#x} is not 4 KiB aligned")
            blobs.append(BlobSpec(**spec))
    return values, blobs, includes


def _sub(values: Mapping[str, Any]) -> Callable[[str], dict[str, Any]]:
    def pick(section: str) -> dict[str, Any]:
        prefix = section + "."
        return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}

    return pick
