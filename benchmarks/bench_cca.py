"""Benchmark: building an Arm CCA realm with a 256 MiB initrd and computing its RIM.

Run from the repository root::

    python benchmarks/bench_cca.py [--initrd-mib 256] [--json]

Writes a synthetic arm64 Image (1 MiB) and an initrd of random bytes to a temporary directory,
then, each in a fresh subprocess (so the peak RSS is that run's alone):

* ``build``: ``build()`` of a QEMU-layout realm (4 GiB RAM, SHA-512) into a file: wall time and
  peak RSS;
* ``measure``: ``IgvmFile.load`` + ``measure_platform(CCA)`` of that file;
* ``floor``: what the RIM cannot do without: H(page) of every 4 KiB page plus H(256-byte DATA
  descriptor) per page, in a plain Python loop over an mmap of the inputs.

The RIM is one chain (each step needs the previous RIM), so it runs on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = """[image]
platforms = ["cca"]
[kernel]
path = "Image"
initrd = "initrd.img"
cmdline = "console=hvc0"
[cca]
vmm = "qemu"
ram_size = "4G"
hash = "sha512"
breakpoints = 6
watchpoints = 6
"""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(job: str, work: Path) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    if job == "build":
        from igvm_builder.build import build
        from igvm_builder.config import load_config
        from igvm_builder.io import AtomicFile

        with AtomicFile(work / "realm.igvm") as out:
            build(load_config(work / "realm.toml"), output=out)
    elif job == "measure":
        from igvm_builder.assemble.cca import realm_of
        from igvm_builder.config import load_config
        from igvm_builder.format import IgvmFile
        from igvm_builder.format.defs import PlatformType
        from igvm_builder.measure import measure_platform

        f = IgvmFile.load(work / "realm.igvm")
        measure_platform(f, PlatformType.CCA, cca_realm=realm_of(load_config(work / "realm.toml")))
    else:  # floor
        h = hashlib.sha512
        desc = bytearray(256)
        for name in ("Image", "initrd.img"):
            with open(work / name, "rb") as fh:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                view = memoryview(buf)
                for off in range(0, len(buf) - 4095, 4096):
                    desc[0x60:0xA0] = h(view[off:off + 4096]).digest()
                    desc[0x10:0x50] = h(desc).digest()
                del view
                buf.close()
    return {"seconds": time.perf_counter() - t0, "rss_mib": _rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--initrd-mib", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        head = struct.pack("<IIQQQQQQII", 0x14000010, 0, 0, 2 << 20, 0xA, 0, 0, 0, 0x644D5241, 0)
        (work / "Image").write_bytes(head + os.urandom((1 << 20) - len(head)))
        with open(work / "initrd.img", "wb") as fh:
            for _ in range(args.initrd_mib):
                fh.write(os.urandom(1 << 20))
        (work / "realm.toml").write_text(CONFIG)
        results = {}
        for job in ("build", "measure", "floor"):
            out = subprocess.run([sys.executable, __file__, "--child", job, str(work)], check=True,
                                 capture_output=True, text=True).stdout
            results[job] = json.loads(out)
    results["ratio_measure_to_floor"] = results["measure"]["seconds"] / results["floor"]["seconds"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for job in ("build", "measure", "floor"):
            r = results[job]
            print(f"{job:8} {r['seconds']:6.2f} s  peak RSS {r['rss_mib']:6.1f} MiB")
        print(f"measure / floor: {results['ratio_measure_to_floor']:.2f}")


if __name__ == "__main__":
    main()
