"""The TOML build configuration (igvm_builder.config): schema, defaults, includes, errors.

Every error must name the config file, the key and, where the key is written in the file, its
line, so that ``file:line`` can be clicked in an editor.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from igvm_builder.config import (
    BlobSpec,
    BuildConfig,
    KernelSpec,
    SignSpec,
    SnpSpec,
    TdxSpec,
    load_config,
    parse_config,
)
from igvm_builder.errors import ConfigError

MINIMAL = '[image]\nplatforms = ["snp"]\n[firmware]\npath = "OVMF.fd"\n'


def write(directory: Path, text: str, name: str = "build.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(directory: Path, text: str, name: str = "build.toml") -> BuildConfig:
    return load_config(write(directory, text, name))


def error(directory: Path, text: str, name: str = "build.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(directory, text, name)
    return info.value


# --------------------------------------------------------------------------- valid configs


def test_minimal_and_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    assert cfg.source == str(tmp_path / "build.toml")
    assert cfg.platforms == ("snp",)
    assert cfg.loader == "hyperv" and cfg.revision == 1  # the default loader of every command
    assert cfg.firmware == str(tmp_path / "OVMF.fd")
    assert cfg.kernel is None and cfg.blobs == ()
    assert cfg.memory_size == 512 << 20
    assert cfg.snp == SnpSpec() == SnpSpec(policy=0x30000, vcpus=1, vcpu_type="EPYC-v4", guest_features=0x1,
                                           vmm_type="qemu", cr0=0x10)
    assert cfg.tdx == TdxSpec(policy=0, two_pass=False)
    assert cfg.vbs.vtl == 0
    assert cfg.sign == SignSpec()
    assert cfg.includes == ()
    assert cfg.input_files == (str(tmp_path / "OVMF.fd"),)


def test_full_schema(tmp_path: Path) -> None:
    text = """
[image]
platforms = ["TDX", "native", "snp", "vbs", "sev-es", "sev"]
loader = "cloud-hypervisor"
revision = 2

[firmware]
path = "fw/OVMF.fd"

[kernel]
path = "boot/vmlinuz"
format = "bzimage"
cmdline = "console=ttyS0 root=/dev/vda1"
initrd = "boot/initrd.img"

[[blob]]
path = "a.bin"
gpa = 0x200000

[[blob]]
path = "b.bin"
gpa = "0x300000"
measured = false

[memory]
size = "2G"

[snp]
policy = 0x30000
vcpus = 4
vcpu_type = "EPYC-Genoa"
guest_features = 0x21
vmm_type = "gce"
cr0 = 0x30

[tdx]
policy = 0x2
two_pass = true

[vbs]
vtl = 2

[sign]
id_key = "keys/id.pem"
author_key = "env:AUTHOR_KEY"
family_id = "00112233-4455-6677-8899-aabbccddeeff"
image_id = "ffeeddccbbaa99887766554433221100"
guest_svn = 7
"""
    cfg = load(tmp_path, text)
    assert cfg.platforms == ("native", "snp", "tdx", "vbs", "sev", "sev-es")  # canonical order, lower case
    assert (cfg.loader, cfg.revision) == ("cloud-hypervisor", 2)
    assert cfg.firmware == str(tmp_path / "fw" / "OVMF.fd")
    assert cfg.kernel == KernelSpec(path=str(tmp_path / "boot" / "vmlinuz"), format="bzimage",
                                    cmdline="console=ttyS0 root=/dev/vda1",
                                    initrd=str(tmp_path / "boot" / "initrd.img"))
    assert cfg.blobs == (BlobSpec(str(tmp_path / "a.bin"), 0x200000, True),
                         BlobSpec(str(tmp_path / "b.bin"), 0x300000, False))
    assert cfg.memory_size == 2 << 30
    assert cfg.snp == SnpSpec(policy=0x30000, vcpus=4, vcpu_type="EPYC-Genoa", guest_features=0x21, vmm_type="gce",
                              cr0=0x30)
    assert cfg.tdx == TdxSpec(policy=0x2, two_pass=True)
    assert cfg.vbs.vtl == 2
    assert cfg.sign.id_key == "keys/id.pem" and cfg.sign.author_key == "env:AUTHOR_KEY"
    assert cfg.sign.family_id == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert cfg.sign.image_id == bytes.fromhex("ffeeddccbbaa99887766554433221100")
    assert cfg.sign.guest_svn == 7
    assert cfg.input_files == tuple(str(tmp_path / p) for p in
                                    ("fw/OVMF.fd", "boot/vmlinuz", "boot/initrd.img", "a.bin", "b.bin"))


@pytest.mark.parametrize(("text", "size"), [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1T", 1 << 40), ("64K", 64 << 10), ("4096", 4096),
    ("256MiB", 256 << 20), ("1 GB", 1 << 30), ("0x100000", 0x100000), (" 3g ", 3 << 30),
])
def test_memory_sizes(tmp_path: Path, text: str, size: int) -> None:
    assert load(tmp_path, MINIMAL + f'[memory]\nsize = "{text}"\n').memory_size == size


def test_memory_size_integer(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL + "[memory]\nsize = 0x40000000\n").memory_size == 1 << 30


@pytest.mark.parametrize("vcpu_type", ['"EPYC-v4"', '"epyc-milan"', '"0xa10f10"', "0xa00f11", '"EPYC-Turin"'])
def test_vcpu_types(tmp_path: Path, vcpu_type: str) -> None:
    assert load(tmp_path, MINIMAL + f"[snp]\nvcpu_type = {vcpu_type}\n").snp.vcpu_type is not None


def test_kernel_only_and_blob_only(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[image]\nplatforms = ["native"]\n[kernel]\npath = "k"\n')
    assert cfg.kernel == KernelSpec(path=str(tmp_path / "k"))
    assert cfg.firmware is None
    cfg = load(tmp_path, '[image]\nplatforms = ["native"]\n[[blob]]\npath = "x"\ngpa = 0\n')
    assert cfg.blobs == (BlobSpec(str(tmp_path / "x"), 0),)


def test_home_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load(tmp_path, '[image]\nplatforms = ["snp"]\n[firmware]\npath = "~/OVMF.fd"\n')
    assert cfg.firmware == str(tmp_path / "home" / "OVMF.fd")


def test_paths_do_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "conf", MINIMAL)
    monkeypatch.chdir(tmp_path)
    a = load_config("conf/build.toml")
    monkeypatch.chdir("/")
    b = load_config(path)
    assert a == b
    assert a.firmware == str(tmp_path / "conf" / "OVMF.fd")


# --------------------------------------------------------------------------- include


def test_include_merges_and_this_file_wins(tmp_path: Path) -> None:
    write(tmp_path / "common", """
[image]
platforms = ["snp", "tdx"]
loader = "hyperv"
[firmware]
path = "OVMF.fd"
[snp]
vcpus = 8
vcpu_type = "EPYC-Milan"
[[blob]]
path = "common.bin"
gpa = 0x100000
""", "base.toml")
    cfg = load(tmp_path, """include = ["common/base.toml"]
[image]
platforms = ["snp"]
[snp]
vcpus = 2
[[blob]]
path = "mine.bin"
gpa = 0x200000
""")
    assert cfg.platforms == ("snp",)  # this file's value
    assert cfg.loader == "hyperv"  # from the include
    assert cfg.snp.vcpus == 2 and cfg.snp.vcpu_type == "EPYC-Milan"  # merged key by key
    assert cfg.firmware == str(tmp_path / "common" / "OVMF.fd")  # relative to the included file
    assert [b.path for b in cfg.blobs] == [str(tmp_path / "common" / "common.bin"), str(tmp_path / "mine.bin")]
    assert cfg.includes == (str(tmp_path / "common" / "base.toml"),)
    assert cfg.input_files[0] == str(tmp_path / "common" / "base.toml")


def test_nested_include_and_string_form(tmp_path: Path) -> None:
    write(tmp_path, '[memory]\nsize = "1G"\n', "c.toml")
    write(tmp_path, 'include = "c.toml"\n[snp]\nvcpus = 3\n', "b.toml")
    cfg = load(tmp_path, 'include = "b.toml"\n' + MINIMAL)
    assert cfg.memory_size == 1 << 30 and cfg.snp.vcpus == 3
    assert cfg.includes == (str(tmp_path / "c.toml"), str(tmp_path / "b.toml"))


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path, 'include = ["build.toml"]\n', "other.toml")
    err = error(tmp_path, 'include = ["other.toml"]\n' + MINIMAL)
    assert "include cycle" in str(err)
    assert str(tmp_path / "other.toml") in str(err)


def test_include_missing(tmp_path: Path) -> None:
    err = error(tmp_path, 'include = ["nope.toml"]\n' + MINIMAL)
    assert str(tmp_path / "nope.toml") in str(err) and "cannot read config" in str(err)


def test_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    write(tmp_path, '\n\n[snp]\nvcpu_typ = "EPYC-v4"\n', "inc.toml")
    err = error(tmp_path, 'include = ["inc.toml"]\n' + MINIMAL)
    assert err.source == str(tmp_path / "inc.toml")
    assert err.line == 4
    assert "did you mean 'vcpu_type'" in str(err)


# --------------------------------------------------------------------------- overrides


def test_with_overrides(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    over = cfg.with_overrides(platforms=("tdx", "SNP"), loader="hyperv")
    assert over.platforms == ("snp", "tdx") and over.loader == "hyperv"
    assert cfg.platforms == ("snp",)  # frozen: the original is unchanged
    assert cfg.with_overrides() == cfg
    with pytest.raises(ConfigError, match="unknown loader 'kvm'"):
        cfg.with_overrides(loader="kvm")
    with pytest.raises(ConfigError, match="unknown platform 'arm'"):
        cfg.with_overrides(platforms=("arm",))


def test_parse_config_from_a_mapping(tmp_path: Path) -> None:
    cfg = parse_config({"image": {"platforms": ["native"]}, "kernel": {"path": "k"}},
                       source=str(tmp_path / "virtual.toml"))
    assert cfg.kernel is not None and cfg.kernel.path == str(tmp_path / "k")
    cfg = parse_config({"image": {"platforms": ["native"]}, "kernel": {"path": "k"}}, source="x.toml",
                       base_dir=str(tmp_path / "elsewhere"))
    assert cfg.kernel is not None and cfg.kernel.path == str(tmp_path / "elsewhere" / "k")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("text", "key", "line", "needle"), [
    ('[image]\nplatforms = ["snp"]\nloadr = "qemu"\n[firmware]\npath = "f"\n', "image.loadr", 3,
     "did you mean 'loader'"),
    (MINIMAL + "[tdx]\ntwopass = true\n", "tdx.twopass", 6, "did you mean 'two_pass'"),
    (MINIMAL + "[memroy]\nsize = 1\n", "memroy", 5, "did you mean 'memory'"),
    (MINIMAL + "[kernel]\npath = 'k'\ncmd_line = 'x'\n", "kernel.cmd_line", 7, "did you mean 'cmdline'"),
    (MINIMAL + "[[blob]]\npath = 'b'\ngpa = 0x1000\nmeasure = false\n", "blob.measure", 8,
     "did you mean 'measured'"),
    (MINIMAL + "[snp]\nzzz = 1\n", "snp.zzz", 6, "known: policy, vcpus"),
])
def test_unknown_keys(tmp_path: Path, text: str, key: str, line: int, needle: str) -> None:
    err = error(tmp_path, text)
    assert err.source == str(tmp_path / "build.toml")
    assert err.key == key
    assert err.line == line
    assert needle in str(err)
    assert str(err).startswith(f"{tmp_path / 'build.toml'}:{line}, key '{key}': ")


@pytest.mark.parametrize(("text", "key", "needle"), [
    ('[image]\nplatforms = []\n[firmware]\npath = "f"\n', "image.platforms", "non-empty list"),
    ('[image]\nplatforms = "snp"\n[firmware]\npath = "f"\n', "image.platforms", "non-empty list"),
    ('[image]\nplatforms = ["arm64"]\n[firmware]\npath = "f"\n', "image.platforms", "unknown platform 'arm64'"),
    ('[image]\nplatforms = ["cca"]\n[firmware]\npath = "f"\n', "firmware.path", "does not apply to a CCA realm"),
    ('[image]\nplatforms = ["cca", "snp"]\n[kernel]\npath = "k"\n', "image.platforms", "cannot be combined"),
    ('[image]\nplatforms = ["snp"]\n[kernel]\npath = "k"\n[cca]\nvmm = "qemu"\n', "cca", "needs platforms"),
    ('[image]\nplatforms = ["cca"]\n[kernel]\npath = "k"\n[cca]\nbreakpoints = 6\n', "cca.watchpoints",
     "missing required key 'cca.watchpoints'"),
    ('[image]\nplatforms = ["cca"]\n[kernel]\npath = "k"\n[cca]\nbreakpoints = 6\nwatchpoints = 6\nhash = "sha1"\n',
     "cca.hash", "'sha1' is not one of sha256, sha512, sha384"),
    ('[image]\nplatforms = ["cca"]\n[kernel]\npath = "k"\n[cca]\nbreakpoints = 6\nwatchpoints = 6\nsve_vl = 100\n',
     "cca.sve_vl", "not a multiple of 128"),
    ('[image]\nplatforms = ["cca"]\n[kernel]\npath = "k"\n[cca]\nbreakpoints = 6\nwatchpoints = 6\n'
     'vmm = "xen"\n', "cca.vmm", "'xen' is not one of kvmtool, qemu, cloud-hypervisor"),
    ('[image]\nplatforms = ["snp", "SNP"]\n[firmware]\npath = "f"\n', "image.platforms", "listed twice"),
    ('[image]\nplatforms = ["snp"]\nloader = "kvm"\n[firmware]\npath = "f"\n', "image.loader",
     "'kvm' is not one of qemu, hyperv, cloud-hypervisor"),
    ('[image]\nplatforms = ["snp"]\nrevision = 3\n[firmware]\npath = "f"\n', "image.revision", "out of range"),
    (MINIMAL + "[snp]\nvcpus = 0\n", "snp.vcpus", "out of range"),
    (MINIMAL + "[snp]\nvcpus = true\n", "snp.vcpus", "expected an integer"),
    (MINIMAL + "[snp]\npolicy = 'lots'\n", "snp.policy", "expected an integer, got 'lots'"),
    (MINIMAL + "[snp]\npolicy = -1\n", "snp.policy", "out of range"),
    (MINIMAL + "[snp]\npolicy = 0x10000\n", "snp.policy", "bit 17 (0x20000) clear"),
    (MINIMAL + "[snp]\npolicy = 0x1\n", "snp.policy", "did you mean 0x20001?"),
    (MINIMAL + "[tdx]\npolicy = 0x10000000\n", "tdx.policy", "reserved bits 0x10000000"),
    (MINIMAL + "[tdx]\npolicy = 0x10000000\n", "tdx.policy", "here it is 0x2"),
    (MINIMAL + "[tdx]\npolicy = 0x8\n", "tdx.policy", "0x1 debug_allowed, 0x2 sept_ve_disable and 0x4 migratable"),
    (MINIMAL + "[snp]\nvmm_type = 'azure'\n", "snp.vmm_type", "not one of qemu, ec2, gce"),
    (MINIMAL + "[snp]\nvcpu_type = 'EPYC-v9'\n", "snp.vcpu_type", "unknown vCPU type 'EPYC-v9'"),
    (MINIMAL + "[snp]\nvcpu_type = 1.5\n", "snp.vcpu_type", "expected a string"),
    (MINIMAL + "[tdx]\ntwo_pass = 1\n", "tdx.two_pass", "expected true or false"),
    (MINIMAL + "[vbs]\nvtl = 3\n", "vbs.vtl", "out of range"),
    (MINIMAL + '[memory]\nsize = "lots"\n', "memory.size", "is not a size"),
    (MINIMAL + "[memory]\nsize = 0\n", "memory.size", "out of range"),
    (MINIMAL + '[kernel]\npath = "k"\nformat = "pe"\n', "kernel.format", "not one of auto, elf, bzimage, uki"),
    (MINIMAL + '[kernel]\ncmdline = "x"\n', "kernel.path", "needs a 'path'"),
    (MINIMAL + "[kernel]\npath = 3\n", "kernel.path", "expected a file path"),
    (MINIMAL + "[[blob]]\npath = 'b'\n", "blob", "needs 'gpa'"),
    (MINIMAL + "[[blob]]\ngpa = 0\n", "blob", "needs 'path'"),
    (MINIMAL + "[[blob]]\npath = 'b'\ngpa = 0x1234\n", "blob.gpa", "not 4 KiB aligned"),
    ("blob = 3\n" + MINIMAL, "blob", "[[blob]] tables"),
    (MINIMAL + "[sign]\nfamily_id = 'xyz'\n", "sign.family_id", "32 hexadecimal digits"),
    (MINIMAL + "[sign]\nimage_id = '0011'\n", "sign.image_id", "expected 16 bytes, got 2"),
    (MINIMAL + "[sign]\nguest_svn = 0x100000000\n", "sign.guest_svn", "out of range"),
    ('[firmware]\npath = "f"\n', "image.platforms", "missing required key 'image.platforms'"),
    ('[image]\nplatforms = ["snp"]\n', "image", "nothing to boot"),
    ('image = 3\n[firmware]\npath = "f"\n', "image", "must be a table"),
    ("include = 3\n" + MINIMAL, "include", "expected a list of config paths"),
])
def test_invalid_values(tmp_path: Path, text: str, key: str, needle: str) -> None:
    err = error(tmp_path, text)
    assert err.key == key, str(err)
    assert needle in str(err), str(err)
    assert err.source == str(tmp_path / "build.toml")
    assert str(tmp_path / "build.toml") in str(err)


def test_value_error_has_the_line_of_the_key(tmp_path: Path) -> None:
    err = error(tmp_path, MINIMAL + "\n[snp]\n# comment\nvcpus = 1000\n")
    assert (err.key, err.line) == ("snp.vcpus", 8)
    # a key of the same name in another table is not mistaken for it
    err = error(tmp_path, '[image]\nplatforms = ["snp"]\n[firmware]\npath = "f"\n[tdx]\npolicy = 1\n[snp]\npolicy = -1\n')
    assert (err.key, err.line) == ("snp.policy", 8)


@pytest.mark.parametrize(("text", "line"), [
    ('[image]\nplatforms = ["snp"]\nloader = qemu\n', 3),
    ('[image]\nplatforms = ["snp"\n', 2),
    ('[image]\n[image]\n', 2),
    ('[image\nplatforms = ["snp"]\n', 1),
])
def test_toml_syntax_errors(tmp_path: Path, text: str, line: int) -> None:
    err = error(tmp_path, text)
    assert "invalid TOML" in str(err)
    assert err.line == line, str(err)
    assert str(err).startswith(f"{tmp_path / 'build.toml'}:{line}: ")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.source == str(tmp_path / "absent.toml")
    assert "cannot read config" in str(info.value)


def test_config_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load(tmp_path, "[image]\n")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    with pytest.raises(AttributeError):
        cfg.loader = "hyperv"  # type: ignore[misc]
    assert hash(cfg.snp) == hash(SnpSpec())


def test_source_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("build.toml")
    assert os.path.isabs(cfg.source) and cfg.source == str(tmp_path / "build.toml")


# --------------------------------------------------------------------------- docs/CONFIG.md


def test_every_example_in_config_md_loads(tmp_path: Path) -> None:
    """Each ```toml block of docs/CONFIG.md starts with '# file: NAME'; all of them must load."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 7
    names = []
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith("# file: "), first
        names.append(first.removeprefix("# file: ").strip())
        write(tmp_path, block, names[-1])
    loaded = {name: load_config(tmp_path / name) for name in names}
    assert loaded["ovmf.toml"].platforms == ("snp", "tdx")
    assert loaded["uki.toml"].kernel is not None and loaded["uki.toml"].kernel.format == "uki"
    guest = loaded["guest.toml"]
    assert guest.platforms == ("snp",) and guest.loader == "hyperv"
    assert (guest.snp.vcpus, guest.snp.vcpu_type) == (2, "EPYC-Milan")
    assert [b.gpa for b in guest.blobs] == [0x7000000, 0x7100000]
    assert [b.measured for b in guest.blobs] == [True, False]
