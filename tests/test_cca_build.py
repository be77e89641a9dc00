"""Building Arm CCA realms from a config (igvm_builder.assemble.cca): every shared CCA vector built
from its inputs gives the realm-measurements oracle's RIM for both hashes; configurations made
here are measured live by the oracle (varied VMMs, RAM sizes, vCPU counts, IPA widths, SVE, PMU,
LPA2); every file passes igvm-oracle parse and roundtrip; bad inputs give one clear error."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ccatools import CASES, CCA_VECTORS, HASHES, case, igvm_oracle_accepts, oracle_rim

from igvm_builder.build import build
from igvm_builder.config import load_config
from igvm_builder.errors import ConfigError, IgvmError, InputError, LayoutError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.measure import measure_platform
from igvm_builder.measure.cca import Realm, cca_context_fields

VMM_NAMES = {"kvmtool": "kvmtool", "qemu": "qemu", "cloud-hv": "cloud-hypervisor"}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, kernel: dict[str, Any], cca: dict[str, Any]) -> Path:
    lines = ["[image]", 'platforms = ["cca"]', "[kernel]"]
    lines += [f"{k} = {_toml(v)}" for k, v in kernel.items()]
    lines += ["[cca]"] + [f"{k} = {_toml(v)}" for k, v in cca.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_to(cfg_path: Path, out: Path) -> tuple[IgvmFile, dict[str, Any]]:
    result = build(load_config(cfg_path))
    out.write_bytes(result.data)
    igvm_oracle_accepts(out)
    return IgvmFile.load(out), result.reference_values


def vector_config(name: str, alg: str, tmp_path: Path) -> Path:
    c = case(name)
    d = CCA_VECTORS / name
    rp = c["realm_params"]
    kernel: dict[str, Any] = {"path": str(d / c["inputs"]["kernel"]["file"])}
    if "initrd" in c["inputs"]:
        kernel["initrd"] = str(d / c["inputs"]["initrd"]["file"])
    cca: dict[str, Any] = {
        "vmm": VMM_NAMES[c["vmm"]], "ram_size": int(c["ram"][0]["size"], 16), "hash": alg,
        "breakpoints": rp["num_bps"], "watchpoints": rp["num_wps"], "sve_vl": rp["sve_vl_bits"],
        "pmu": rp["pmu"], "pmu_counters": rp["pmu_num_ctrs"], "lpa2": rp["lpa2"],
        "dtb": str(d / c["inputs"]["dtb"]["file"]),
    }
    return write_config(tmp_path / f"{name}-{alg}.toml", kernel, cca)


@pytest.mark.parametrize("alg", HASHES)
@pytest.mark.parametrize("name", CASES)
def test_vector_built_from_inputs(name: str, alg: str, tmp_path: Path) -> None:
    c = case(name)
    f, refs = build_to(vector_config(name, alg, tmp_path), tmp_path / "realm.igvm")
    entry = refs["platforms"]["cca"]
    assert entry["digest"] == c["results"][alg]["oracle_rim"]
    assert entry["algorithm"] == alg
    # the IPA width the VMM chooses (not given in the config), and the RAM
    assert entry["realm"]["ipa_bits"] == c["realm_params"]["s2sz"]
    assert [(int(r["base"], 16), int(r["size"], 16)) for r in entry["realm"]["ram"]] == \
        [(int(r["base"], 16), int(r["size"], 16)) for r in c["ram"]]
    # the file measured again from disk with the realm in the reference values
    m = measure_platform(f, PlatformType.CCA, cca_realm=Realm.from_json(entry["realm"]))
    assert m.hex == c["results"][alg]["oracle_rim"]
    # pages = the vector's DATA granules; vCPU 0's REC as the vector's
    pages = [h for h in f.directives if isinstance(h, H.PageData)]
    assert len(pages) == c["descriptor_counts"]["data"]
    assert [p.gpa for p in pages] == sorted(p.gpa for p in pages)
    ctx = [h for h in f.directives if isinstance(h, H.CcaVpContext)]
    assert len(ctx) == 1 and ctx[0].vp_index == 0
    gprs, pc, flags = cca_context_fields(ctx[0])
    assert (flags, pc, gprs) == (c["rec"]["flags"], int(c["rec"]["pc"], 16), [int(g, 16) for g in c["rec"]["gprs"]])
    assert f.platforms[0].shared_gpa_boundary == 1 << (c["realm_params"]["s2sz"] - 1)


# --------------------------------------------------------------------------- live oracle


def _image(size: int, *, text_offset: int = 0, image_size: int = 0x200000, seed: bytes = b"k") -> bytes:
    head = struct.pack("<IIQQQQQQII", 0x14000010, 0, text_offset, image_size, 0xA, 0, 0, 0, 0x644D5241, 0)
    body = bytearray()
    block = seed
    while len(head) + len(body) < size:
        block = __import__("hashlib").sha256(block).digest()
        body += block
    return (head + bytes(body))[:size]


def _oracle_args(vmm: str, p: dict[str, Any], initrd: bool, dtb: str) -> list[str]:
    host = ["--num-bps", str(p["breakpoints"]), "--num-wps", str(p["watchpoints"]),
            "--sve-vl", str(p.get("sve_vl", 0)), "--pmu", _toml(p.get("pmu", False)),
            "--pmu-num-ctrs", str(p.get("pmu_counters", 0)), "--lpa2", _toml(p.get("lpa2", False))]
    if "ipa_bits" in p:
        host += ["--ipa-bits", str(p["ipa_bits"])]
    files = ["-k", "Image"] + (["-i", "initrd.img"] if initrd else []) + ["--dtb", dtb]
    mib = p["ram_size"] >> 20
    cpus = p.get("vcpus", 1)
    alg = p["hash"]
    if vmm == "kvmtool":
        tail = ["kvmtool", "--realm", "-c", str(cpus), "-m", str(mib), "-k", "Image",
                *(["-i", "initrd.img"] if initrd else []), "--measurement-algo", alg]
    elif vmm == "qemu":
        tail = ["qemu", "-M", "virt,confidential-guest-support=rme0", "-cpu", "host", "-enable-kvm", "-nographic",
                "-object", f"rme-guest,id=rme0,measurement-algorithm={alg}", "-smp", str(cpus), "-m", f"{mib}M",
                "-kernel", "Image", *(["-initrd", "initrd.img"] if initrd else [])]
    else:
        tail = ["cloud-hv", "--cpus", f"boot={cpus}", "--memory", f"size={mib}M", "--kernel", "Image",
                *(["--initramfs", "initrd.img"] if initrd else []), "--platform", f"measurement_algo={alg}"]
    return host + files + tail


def _dtb_of(f: IgvmFile) -> bytes:
    """The DTB the file carries: the pages from vCPU 0's x0, for the header's totalsize."""
    ctx = next(h for h in f.directives if isinstance(h, H.CcaVpContext))
    gpa = cca_context_fields(ctx)[0][0]
    pages = {h.gpa: bytes(h.data) for h in f.directives if isinstance(h, H.PageData)}
    total = struct.unpack(">I", pages[gpa][4:8])[0]
    data = b"".join(pages[gpa + off] for off in range(0, total, 4096))
    return data[:total]


LIVE = [
    # vmm, RAM MiB, vCPUs, realm parameters, kernel/initrd sizes
    ("kvmtool", 64, 1, {"hash": "sha256", "breakpoints": 6, "watchpoints": 4}, 9000, 0),
    ("kvmtool", 300, 3, {"hash": "sha512", "breakpoints": 16, "watchpoints": 16, "sve_vl": 512}, 40000, 70001),
    ("kvmtool", 2048, 8, {"hash": "sha256", "breakpoints": 2, "watchpoints": 2, "pmu": True, "pmu_counters": 31,
                          "ipa_bits": 33}, 20000, 4096),
    ("kvmtool", 2048, 2, {"hash": "sha256", "breakpoints": 6, "watchpoints": 6}, 5000, 12345),  # RAM up to 2^32
    ("qemu", 128, 1, {"hash": "sha512", "breakpoints": 6, "watchpoints": 6}, 70000, 0),
    ("qemu", 1537, 4, {"hash": "sha256", "breakpoints": 6, "watchpoints": 6, "lpa2": True, "sve_vl": 2048},
     30000, 300000),
    ("qemu", 512, 2, {"hash": "sha512", "breakpoints": 8, "watchpoints": 5, "ipa_bits": 33, "pmu": True,
                      "pmu_counters": 0}, 12000, 9000),
    ("qemu", 3072, 16, {"hash": "sha256", "breakpoints": 6, "watchpoints": 6, "ipa_bits": 36}, 12000, 9000),
    ("cloud-hypervisor", 256, 2, {"hash": "sha512", "breakpoints": 6, "watchpoints": 6, "lpa2": True}, 33000,
     50000),
    ("cloud-hypervisor", 1024, 1, {"hash": "sha256", "breakpoints": 64, "watchpoints": 64, "ipa_bits": 40,
                                   "sve_vl": 128, "pmu": True, "pmu_counters": 6}, 8192, 0),
]


@pytest.mark.parametrize(("vmm", "mib", "cpus", "params", "ksize", "isize"), LIVE,
                         ids=[f"{v}-{m}M-{c}cpu-{i}" for i, (v, m, c, *_r) in enumerate(LIVE)])
def test_live_oracle(vmm: str, mib: int, cpus: int, params: dict[str, Any], ksize: int, isize: int,
                     tmp_path: Path) -> None:
    (tmp_path / "Image").write_bytes(_image(ksize, seed=vmm.encode()))
    kernel: dict[str, Any] = {"path": "Image", "cmdline": f"console=hvc0 mem={mib}M"}
    if isize:
        (tmp_path / "initrd.img").write_bytes(_image(isize, seed=b"initrd")[64:] + b"\x01" * 64)
        kernel["initrd"] = "initrd.img"
    cca = {"vmm": vmm, "ram_size": f"{mib}M", "vcpus": cpus, **params}
    args = _oracle_args(vmm, {**cca, "ram_size": mib << 20}, bool(isize), "gen.dtb")
    if vmm == "cloud-hypervisor":
        # the oracle's cloud-hypervisor model always measures the DTB it generates (it has no --dtb):
        # that DTB (with the command line and initrd range) is the one the config gives
        args[args.index("--dtb")] = "--output-dtb"
        args += ["--cmdline", kernel.pop("cmdline")]
        want = oracle_rim(args, tmp_path, params["hash"])
        cca["dtb"] = "gen.dtb"
        f, refs = build_to(write_config(tmp_path / "guest.toml", kernel, cca), tmp_path / "guest.igvm")
    else:
        f, refs = build_to(write_config(tmp_path / "guest.toml", kernel, cca), tmp_path / "guest.igvm")
        (tmp_path / "gen.dtb").write_bytes(_dtb_of(f))
        want = oracle_rim(args, tmp_path, params["hash"])
    assert refs["platforms"]["cca"]["digest"] == want


def test_generated_dtb_matches_dtc(tmp_path: Path) -> None:
    """The builder's DTB decompiles with dtc to the tree it describes, and recompiles to the same bytes."""
    (tmp_path / "Image").write_bytes(_image(10000))
    (tmp_path / "initrd.img").write_bytes(b"x" * 5000)
    cfg = write_config(tmp_path / "g.toml", {"path": "Image", "initrd": "initrd.img", "cmdline": "console=hvc0 quiet"},
                       {"vmm": "kvmtool", "ram_size": "512M", "vcpus": 20, "breakpoints": 6, "watchpoints": 6})
    f, _ = build_to(cfg, tmp_path / "g.igvm")
    dtb = _dtb_of(f)
    (tmp_path / "g.dtb").write_bytes(dtb)
    dts = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(tmp_path / "g.dtb")], capture_output=True,
                         text=True, check=True).stdout
    assert 'bootargs = "console=hvc0 quiet";' in dts
    assert "linux,initrd-start = <0x00 0x8fdfec74>;" in dts  # 0x8fe00000 - 5000 - 4, 4-aligned
    assert "linux,initrd-end = <0x00 0x8fe00000>;" not in dts
    assert "reg = <0x00 0x80000000 0x00 0x20000000>;" in dts
    assert dts.count('device_type = "cpu";') == 20 and "cpu@103 {" in dts  # vCPU 19: Aff1 1, Aff0 3
    assert 'method = "smc";' in dts
    again = subprocess.run(["dtc", "-I", "dts", "-O", "dtb"], input=dts.encode(), capture_output=True,
                           check=True).stdout
    assert again == dtb


def test_gzip_kernel(tmp_path: Path) -> None:
    """Image.gz is decompressed (first member), placed and measured as the Image itself."""
    img = _image(50000)
    (tmp_path / "Image").write_bytes(img)
    (tmp_path / "Image.gz").write_bytes(gzip.compress(img, mtime=0))
    common = {"vmm": "qemu", "ram_size": "256M", "breakpoints": 6, "watchpoints": 6}
    a = build(load_config(write_config(tmp_path / "a.toml", {"path": "Image"}, common)))
    b = build(load_config(write_config(tmp_path / "b.toml", {"path": "Image.gz"}, common)))
    assert a.data == b.data
    assert any("gzip-compressed" in n for n in b.reference_values["build"]["notes"])
    # the oracle, given the compressed kernel, gunzips it the same way
    (tmp_path / "dtb").write_bytes(_dtb_of(IgvmFile.from_bytes(b.data)))
    args = _oracle_args("qemu", {**common, "hash": "sha512", "ram_size": 256 << 20}, False, "dtb")
    args = [a if a != "Image" else "Image.gz" for a in args]
    assert b.reference_values["platforms"]["cca"]["digest"] == oracle_rim(args, tmp_path, "sha512")


def _error(tmp_path: Path, kernel: dict[str, Any], cca: dict[str, Any]) -> IgvmError:
    cfg = tmp_path / "bad.toml"
    with pytest.raises(IgvmError) as exc:
        build(load_config(write_config(cfg, kernel, {"breakpoints": 6, "watchpoints": 6, **cca})))
    msg = str(exc.value)
    assert "\n" not in msg
    return exc.value


def test_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "Image").write_bytes(_image(10000))
    shared = Path(__file__).resolve().parents[1].parent / "shared"
    # a non-arm64 kernel: an x86 bzImage
    e = _error(tmp_path, {"path": str(shared / "inputs" / "ipxe.lkrn")}, {})
    assert isinstance(e, InputError) and "not an arm64 Linux kernel" in str(e) and "x86 Linux bzImage" in str(e)
    assert "ipxe.lkrn" in str(e)
    # an Image whose image_size reaches the DTB (kvmtool, 64 MiB: DTB at base + 62 MiB)
    (tmp_path / "Big").write_bytes(_image(10000, image_size=63 << 20))
    e = _error(tmp_path, {"path": "Big"}, {"vmm": "kvmtool", "ram_size": "64M"})
    assert isinstance(e, LayoutError) and "image_size 0x3f00000" in str(e) and "overlaps the DTB at 0x83e00000" in str(e)
    # ... or the initrd (cloud-hypervisor: at the end of RAM)
    (tmp_path / "initrd.img").write_bytes(b"i" * 100000)
    (tmp_path / "Big2").write_bytes(_image(10000, image_size=60 << 20))
    e = _error(tmp_path, {"path": "Big2", "initrd": "initrd.img"}, {"vmm": "cloud-hypervisor", "ram_size": "64M"})
    assert "overlaps the initrd" in str(e)
    # RAM too small for the kernel
    e = _error(tmp_path, {"path": "Big2"}, {"vmm": "qemu", "ram_size": "32M"})
    assert "RAM too small" in str(e) and e.key == "cca.ram_size"
    # an IPA width that cannot hold the RAM
    e = _error(tmp_path, {"path": "Image"}, {"vmm": "kvmtool", "ram_size": "256M", "ipa_bits": 32})
    assert "32-bit IPAs" in str(e) and "does not fit" in str(e) and e.key == "cca.ipa_bits"
    # kvmtool's own IPA width (the oracle's model: max(bits of the last RAM address, 33)) leaves RAM above
    # 4 GiB in the unprotected half
    e = _error(tmp_path, {"path": "Image"}, {"vmm": "kvmtool", "ram_size": "6200M"})
    assert "34-bit IPAs" in str(e) and "does not fit" in str(e) and e.key == "cca.ram_size"
    # an unknown hash
    with pytest.raises(ConfigError, match="'sha1' is not one of sha256, sha512, sha384"):
        load_config(write_config(tmp_path / "h.toml", {"path": "Image"},
                                 {"breakpoints": 6, "watchpoints": 6, "hash": "sha1"}))
    # a given DTB whose /chosen initrd range is not where the VMM puts the initrd
    d = CCA_VECTORS / "kvmtool_ki_512M_2cpu"
    e = _error(tmp_path, {"path": str(d / "Image"), "initrd": "initrd.img"},
               {"vmm": "kvmtool", "ram_size": "512M", "dtb": str(d / "guest.dtb")})
    assert isinstance(e, InputError) and "initrd range" in str(e)
    # not a DTB
    e = _error(tmp_path, {"path": "Image"}, {"dtb": "Image"})
    assert "not a flattened device tree" in str(e)


def test_deterministic_and_sha384(tmp_path: Path) -> None:
    (tmp_path / "Image").write_bytes(_image(10000))
    cfg = write_config(tmp_path / "g.toml", {"path": "Image"},
                       {"vmm": "cloud-hypervisor", "breakpoints": 6, "watchpoints": 6, "hash": "sha384",
                        "attributes_required_ones": ["debug"], "lfa": "allow"})
    f, refs = build_to(cfg, tmp_path / "g.igvm")
    assert len(bytes.fromhex(refs["platforms"]["cca"]["digest"])) == 48
    assert any("RMM 2.0" in n for n in refs["build"]["notes"])
    pol = f.initializations[0]
    assert isinstance(pol, H.CcaPolicy)
    assert (pol.hash_algorithm, pol.attributes_required_ones, pol.lfa_policy) == (2, 1, 1)
    assert build(load_config(cfg)).data == (tmp_path / "g.igvm").read_bytes()
