"""The samples/cca sample: `scons igvm SAMPLES=cca` cross-compiles the tiny arm64 kernel with
Debian's gcc-aarch64-linux-gnu and packages it for the three VMM layouts; each image passes
igvm-oracle, and its RIM is the realm-measurements oracle's for the same kernel, initrd and DTB."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from ccatools import igvm_oracle_accepts, oracle_rim
from test_cca_build import _dtb_of, _oracle_args
from test_scons_samples import make_checkout, scons

from igvm_builder.format import IgvmFile
from igvm_builder.inputs.arm64 import parse_arm64_image

LAYOUTS = {
    "kvmtool": {"ram_size": 256 << 20, "hash": "sha256", "breakpoints": 6, "watchpoints": 4},
    "qemu": {"ram_size": 512 << 20, "vcpus": 2, "hash": "sha512", "breakpoints": 6, "watchpoints": 4, "pmu": True,
             "pmu_counters": 4},
    "cloud-hypervisor": {"ram_size": 1 << 30, "vcpus": 2, "hash": "sha512", "breakpoints": 6, "watchpoints": 4,
                         "sve_vl": 256},
}


def test_cca_sample(tmp_path: Path) -> None:
    root = make_checkout(tmp_path / "co")
    scons(root, "igvm", "SAMPLES=cca")
    build = root / "samples" / "cca" / "build"
    kernel = (build / "Image").read_bytes()
    img = parse_arm64_image(kernel, "Image")
    assert struct.unpack_from("<I", kernel, 0)[0] >> 26 == 0b000101  # code0 is an AArch64 branch (B)
    assert img.text_offset == 0 and img.image_size >= len(kernel) and img.flags == 0xA
    assert (build / "initrd.cpio").read_bytes().startswith(b"070701")
    for vmm, params in LAYOUTS.items():
        path = root / "build" / f"cca-{vmm}.igvm"
        igvm_oracle_accepts(path)
        refs = json.loads(path.with_name(path.name + ".ref.json").read_text())
        entry = refs["platforms"]["cca"]
        assert entry["vmm"] == vmm and entry["algorithm"] == params["hash"]
        if vmm == "cloud-hypervisor":
            continue  # the oracle's cloud-hypervisor model measures only the DTB it generates itself
        work = tmp_path / vmm
        work.mkdir()
        shutil.copy(build / "Image", work / "Image")
        shutil.copy(build / "initrd.cpio", work / "initrd.img")
        (work / "gen.dtb").write_bytes(_dtb_of(IgvmFile.load(path)))
        assert entry["digest"] == oracle_rim(_oracle_args(vmm, params, True, "gen.dtb"), work, params["hash"])
    # a second run builds nothing
    assert scons(root, "-q", "igvm", "SAMPLES=cca", check=False).returncode == 0
