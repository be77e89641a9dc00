"""The SCons tool ``igvm`` in-process: loading, scanners, emitters, signatures (SCONS.md §7).

End-to-end behaviour (real ``scons`` runs on the samples) is in test_scons_samples.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import SCons.Action
import SCons.Environment
import SCons.Errors
import SCons.Node.Alias
import SCons.Node.FS
import SCons.Node.Python

import igvm_builder.scons
from igvm_builder.scons import tool

REPO = Path(__file__).resolve().parents[1]
SITE_TOOLS = REPO / "site_scons" / "site_tools"
KEYS = REPO.parent / "shared" / "keys"

HELLO_CONFIG = """\
include = ["common.toml"]
[image]
platforms = ["native", "snp"]
[kernel]
path = "build/k.elf"
format = "elf"
initrd = "../initrd.cpio"
"""


@pytest.fixture
def fresh_scons(tmp_path, monkeypatch):
    """A fresh SCons node namespace rooted at tmp_path (SCons keeps process-wide state)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SCons.Node.FS, "default_fs", None)
    monkeypatch.setattr(SCons.Node.Alias, "default_ans", SCons.Node.Alias.AliasNameSpace())
    monkeypatch.setattr(SCons.Node.Python, "_memo_lookup_map", {})
    return tmp_path


@pytest.fixture
def env(fresh_scons):
    return SCons.Environment.Environment(tools=["igvm"], toolpath=[str(SITE_TOOLS)])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def paths(nodes) -> list[str]:
    return sorted(str(n) for n in nodes)


# ------------------------------------------------------------------------------------ loading


def test_site_tool_shim_does_not_shadow_the_package(env):
    assert {"IGVM", "IGVMSign", "IGVMReproCheck", "Cpio"} <= set(env["BUILDERS"])
    package = sys.modules["igvm_builder"]
    assert hasattr(package, "__path__"), "the tool must not replace the igvm_builder package"
    assert sys.modules["igvm_builder.scons.tool"] is tool


@pytest.mark.parametrize("how", ["callable", "package-toolpath"])
def test_pip_install_forms_load_the_same_tool(fresh_scons, how):
    if how == "callable":
        env = SCons.Environment.Environment(tools=[igvm_builder.scons.generate])
    else:
        env = SCons.Environment.Environment(tools=["igvm"], toolpath=[igvm_builder.scons.TOOLPATH])
    assert env["BUILDERS"]["IGVM"].emitter is tool._igvm_emitter
    assert env["IGVM_ALIAS"] == "igvm"
    assert igvm_builder.scons.exists(env)


def test_generate_keeps_user_settings_and_rejects_unknown_options(fresh_scons):
    env = SCons.Environment.Environment(tools=[tool.generate], IGVM_LOADER="hyperv", IGVMCOMSTR="x $TARGET")
    assert env["IGVM_LOADER"] == "hyperv"
    assert env["IGVMCOMSTR"] == "x $TARGET"
    env2 = SCons.Environment.Environment(
        tools=[("igvm", {"IGVM_PLATFORMS": ["snp"]})], toolpath=[str(SITE_TOOLS)]
    )
    assert env2["IGVM_PLATFORMS"] == ["snp"]
    with pytest.raises(SCons.Errors.UserError, match="IGVM_PLATFROMS"):
        tool.generate(SCons.Environment.Environment(tools=[]), IGVM_PLATFROMS=["snp"])


# ------------------------------------------------------------------------------------ emitters


def test_igvm_emits_reference_values_sidecar_and_alias(env):
    targets = env.IGVM("out/guest", "cfg/guest.toml")
    assert [str(t) for t in targets] == ["out/guest.igvm", "out/guest.igvm.ref.json"]
    assert targets[1].get_builder() is targets[0].get_builder()
    assert paths(env.Alias("igvm")[0].sources) == ["out/guest.igvm", "out/guest.igvm.ref.json"]
    derived = env.IGVM(source="cfg/other.toml", IGVM_REFSUFFIX=".values.json")
    assert [str(t) for t in derived] == ["cfg/other.igvm", "cfg/other.igvm.values.json"]


def test_sign_and_repro_drop_the_sidecar_from_their_sources(env):
    image = env.IGVM("out/guest", "guest.toml")
    signed = env.IGVMSign("out/guest.signed.igvm", image)
    # the image's config comes along (its loader and [sign] table are the signing stage's), and its
    # reference values, which the signed image's (second target) extend
    assert [str(s) for s in signed[0].sources] == ["out/guest.igvm", "guest.toml", "out/guest.igvm.ref.json"]
    assert [str(t) for t in signed] == ["out/guest.signed.igvm", "out/guest.signed.igvm.ref.json"]
    other = env.IGVMSign("out/other.signed.igvm", ["prebuilt.igvm", "release.toml"])
    assert [str(s) for s in other[0].sources] == ["prebuilt.igvm", "release.toml"]
    assert [str(s) for s in env.IGVMSign("out/p.signed.igvm", "prebuilt.igvm")[0].sources] == ["prebuilt.igvm"]
    assert str(env.IGVMSign(source=image[0])[0]) == "out/guest.signed.igvm"
    stamp = env.IGVMReproCheck("out/guest.repro", ["guest.toml", image])
    assert [str(s) for s in stamp[0].sources] == ["guest.toml", "out/guest.igvm"]
    assert stamp[0].nocache, "a cached stamp would skip the check"
    assert paths(env.Alias("igvm-check")[0].sources) == ["out/guest.repro"]
    assert "out/guest.signed.igvm" in paths(env.Alias("igvm")[0].sources)
    with pytest.raises(SCons.Errors.UserError, match="one target, one image and at most one config"):
        env.IGVMSign("out/x.signed.igvm", ["a.igvm", "b.igvm"])


# ------------------------------------------------------------------------------------ scanners


def test_config_scanner_finds_every_named_file(env, fresh_scons):
    config = write(fresh_scons / "cfg" / "guest.toml", HELLO_CONFIG)
    write(fresh_scons / "cfg" / "common.toml", '[memory]\nsize = "64M"\n')
    deps = env["BUILDERS"]["IGVM"].source_scanner(env.File(str(config)), env)
    # build/k.elf does not exist yet: still a node, so SCons builds it before the image
    assert paths(deps) == ["cfg/build/k.elf", "cfg/common.toml", "initrd.cpio"]


def test_config_scanner_returns_nothing_for_missing_or_broken_configs(env, fresh_scons):
    scanner = env["BUILDERS"]["IGVM"].source_scanner
    assert scanner(env.File("cfg/generated.toml"), env) == []
    write(fresh_scons / "bad.toml", "[image\n")
    assert scanner(env.File("bad.toml"), env) == []  # the action reports it, naming the file


def test_firmware_outside_the_tree_is_a_dependency(env, fresh_scons):
    write(
        fresh_scons / "fw.toml",
        '[image]\nplatforms = ["snp"]\n[firmware]\npath = "/usr/share/ovmf/OVMF.fd"\n',
    )
    deps = env["BUILDERS"]["IGVM"].source_scanner(env.File("fw.toml"), env)
    assert [d.get_abspath() for d in deps] == ["/usr/share/ovmf/OVMF.fd"]


def test_target_scanner_lists_the_package_sources(env):
    image = env.IGVM("out/guest", "guest.toml")[0]
    deps = {d.get_abspath() for d in env["BUILDERS"]["IGVM"].target_scanner(image, env)}
    package = Path(tool.__file__).resolve().parents[1]
    for module in ("scons/tool.py", "config.py", "cpio.py", "io.py"):
        assert str(package / module) in deps
    assert all(d.endswith(".py") for d in deps)
    assert env["BUILDERS"]["IGVM"].target_scanner(image, env.Override({"IGVM_TOOL_DEPS": []})) == []


def test_signing_key_dependency_is_the_public_key(env, monkeypatch, tmp_path):
    scanner = env["BUILDERS"]["IGVMSign"].target_scanner
    node = env.IGVMSign("out/g.signed.igvm", "out/g.igvm")[0]

    def key_deps(spec: str) -> list[str]:
        deps = scanner(node, env.Override({"IGVM_SIGNING_KEY": spec, "IGVM_TOOL_DEPS": []}))
        return [str(d) for d in deps]

    sec1 = key_deps(f"file:{KEYS / 'test-only-id-p384.pem'}")
    assert len(sec1) == 1 and sec1[0].startswith("igvm-public-key-sha256:")
    assert key_deps(str(KEYS / "test-only-id-p384.pkcs8.pem")) == sec1  # same key, other encoding
    assert key_deps(f"file:{KEYS / 'test-only-author-p384.pem'}") != sec1
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id.pem").write_bytes((KEYS / "test-only-id-p384.pem").read_bytes())
    assert key_deps("keys/id.pem") == sec1  # relative to the top directory
    monkeypatch.setenv("IGVM_TEST_KEY", (KEYS / "test-only-id-p384.pem").read_text())
    assert key_deps("env:IGVM_TEST_KEY") == sec1
    assert key_deps("pkcs11:token=t;object=k") == []  # not asked at scan time: the spec is in the signature
    (tmp_path / "keys" / "broken.pem").write_text("not a key\n")
    assert key_deps("keys/broken.pem") == []  # signing reports it
    assert key_deps("") == []
    assert all("PRIVATE" not in d for d in sec1)


def test_cpio_scanner_tracks_files_and_tree_shape(env, fresh_scons):
    root = fresh_scons / "initrd"
    write(root / "init", "#!/bin/sh\n")
    write(root / "etc" / "hostname", "guest\n")
    scanner = env["BUILDERS"]["Cpio"].source_scanner
    deps = scanner(env.Dir("initrd"), env)
    assert paths(d for d in deps if not str(d).startswith("cpio-tree")) == [
        "initrd/etc/hostname",
        "initrd/init",
    ]
    shape = [str(d) for d in deps if str(d).startswith("cpio-tree-sha256:")]
    assert len(shape) == 1
    (root / "init").chmod(0o755)
    assert str(scanner(env.Dir("initrd"), env)[-1]) != shape[0]


# ------------------------------------------------------------------------------------ signatures


def action_contents(env, builder: str, **overrides) -> bytes:
    target = [env.File("out/guest.igvm")]
    source = [env.File("guest.toml")]
    return env["BUILDERS"][builder].action.get_contents(target, source, env.Override(overrides))


@pytest.mark.parametrize(
    ("variable", "a", "b"),
    [
        ("IGVM_PLATFORMS", ["snp"], ["snp", "tdx"]),
        ("IGVM_LOADER", "qemu", "hyperv"),
    ],
)
def test_build_variables_are_in_the_signature(env, variable, a, b):
    assert variable in tool.SIGNATURE_VARS
    assert action_contents(env, "IGVM", **{variable: a}) != action_contents(env, "IGVM", **{variable: b})
    assert action_contents(env, "IGVMReproCheck", **{variable: a}) != action_contents(
        env, "IGVMReproCheck", **{variable: b}
    )


def test_unrelated_variables_are_not_in_the_signature(env):
    assert action_contents(env, "IGVM", CCFLAGS="-O0") == action_contents(env, "IGVM", CCFLAGS="-O2")
    assert action_contents(env, "IGVM", IGVMCOMSTR="a") == action_contents(env, "IGVM", IGVMCOMSTR="b")


@pytest.mark.parametrize("variable", tool.SIGN_SIGNATURE_VARS)
def test_signing_variables_are_in_the_sign_signature(env, variable):
    assert action_contents(env, "IGVMSign", **{variable: "1"}) != action_contents(
        env, "IGVMSign", **{variable: "2"}
    )


def test_build_parameters_parse_lists_and_strings(env):
    t, s = [env.File("x.igvm")], [env.File("x.toml")]
    assert tool._build_params(env, t, s) == (None, None)
    assert tool._build_params(env.Override({"IGVM_PLATFORMS": "snp, tdx"}), t, s) == (["snp", "tdx"], None)
    assert tool._build_params(env.Override({"IGVM_PLATFORMS": ["native"], "IGVM_LOADER": "qemu"}), t, s) == (
        ["native"],
        "qemu",
    )


def test_verbose_lines_name_files_but_never_keys(env):
    node = env.IGVMSign("out/g.signed.igvm", "out/g.igvm")[0]
    key = str(KEYS / "test-only-id-p384.pem")
    quiet = env.Override({"IGVM_SIGNING_KEY": f"file:{key}"})
    verbose = env.Override({"IGVM_SIGNING_KEY": f"file:{key}", "IGVMSIGNCOMSTR": ""})
    action = env["BUILDERS"]["IGVMSign"].action
    assert action.strfunction([node], node.sources, quiet) == "  SIGN    out/g.signed.igvm"
    line = action.strfunction([node], node.sources, verbose)
    assert line == "igvm_sign([out/g.signed.igvm], [out/g.igvm])"
    assert "test-only" not in line


# ------------------------------------------------------------------------------------ messages


def test_library_errors_become_one_line_with_a_relative_file_name(env, fresh_scons, capsys):
    from igvm_builder.errors import ConfigError, ReproducibilityError

    config = env.File("cfg/guest.toml")
    err = tool._fail(
        env, ConfigError("bad value", source=str(fresh_scons / "cfg/guest.toml"), line=3), config
    )
    assert isinstance(err, SCons.Errors.UserError)
    assert str(err) == "cfg/guest.toml:3: bad value"
    assert str(tool._fail(env, ConfigError("no file named"), config)) == "cfg/guest.toml: no file named"
    outside = tool._fail(env, ConfigError("x", source="/usr/share/ovmf/OVMF.fd"), config)
    assert str(outside) == "/usr/share/ovmf/OVMF.fd: x"
    diff = tool._fail(env, ReproducibilityError("builds differ\n- a\n+ b"), config)
    assert str(diff) == "cfg/guest.toml: builds differ"
    assert capsys.readouterr().err == "- a\n+ b\n"


def test_long_stages_print_progress(env, capsys, monkeypatch):
    monkeypatch.setattr(SCons.Action, "print_actions", True)
    with tool._progress(env.Override({"IGVM_PROGRESS_INTERVAL": 0.05}), "build/x.igvm"):
        time.sleep(0.18)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  ...     build/x.igvm: ") for line in lines)
    assert lines[-1].startswith("  done    build/x.igvm in ")
    with tool._progress(env.Override({"IGVM_PROGRESS_INTERVAL": 0}), "build/x.igvm"):
        time.sleep(0.01)
    monkeypatch.setattr(SCons.Action, "print_actions", False)  # scons -s
    with tool._progress(env.Override({"IGVM_PROGRESS_INTERVAL": 0.01}), "build/x.igvm"):
        time.sleep(0.05)
    assert capsys.readouterr().out == ""


def test_sign_options_carry_the_launch_vcpus(env):
    """$IGVM_VCPUS / $IGVM_VCPU_TYPE reach the signer (the KVM loaders' digest depends on them)."""
    assert "vcpus" not in tool._sign_options(env)
    opts = tool._sign_options(env.Override({"IGVM_VCPUS": "0x4", "IGVM_VCPU_TYPE": "EPYC-Milan"}))
    assert (opts["vcpus"], opts["vcpu_type"]) == (4, "EPYC-Milan")
