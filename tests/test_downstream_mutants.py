"""Mutated reference files that still parse go through every consumer of a parsed file.

The reference crate's verdicts only cover parsing; a file it accepts can still hold values no
real producer writes (huge sizes, odd masks, unknown types in unused fields).  Each mutant here
(random bytes changed, mostly in the variable headers, checksum and size fixed so the parser
looks further) is parsed; those accepted are dumped (text and JSON), linted for every loader,
measured on every platform, diffed against their original, re-serialized and stripped of their
ID block.  Every failure must be an ``IgvmError`` (a one-line message), never another exception.
A fixed seed keeps the run reproducible; a longer campaign (55,471 mutants, 13,071 parsed) found
the 2^64-byte parameter area that ``measure`` hashed forever.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest

from igvm_builder.diff import diff_files
from igvm_builder.errors import IgvmError
from igvm_builder.format import IgvmFile
from igvm_builder.format.dump import dump_json, dump_text
from igvm_builder.lint import lint
from igvm_builder.measure import measure_platform
from igvm_builder.measure.profiles import PROFILES
from igvm_builder.sign.image import remove_id_block

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "igvm"
MUTANTS_PER_FILE = 150


def _fix_header(b: bytearray) -> bytes:
    """Make total_file_size and the checksum right again (so the parser looks at the headers)."""
    if len(b) < 24:
        return bytes(b)
    version, voff, vsize = struct.unpack_from("<III", b, 4)
    b[16:20] = struct.pack("<I", len(b))
    fixed = 24 if version == 1 else 32
    if fixed <= len(b) and voff + vsize <= len(b):
        head = bytearray(b[:fixed])
        head[20:24] = bytes(4)
        b[20:24] = struct.pack("<I", zlib.crc32(b[voff : voff + vsize], zlib.crc32(head)))
    return bytes(b)


def _mutants(seed: bytes, rng: random.Random) -> list[bytes]:
    voff, vsize = struct.unpack_from("<II", seed, 8)
    out = []
    for _ in range(MUTANTS_PER_FILE):
        b = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(voff, voff + vsize) if rng.random() < 0.85 else rng.randrange(len(b))
            op = rng.random()
            if op < 0.6:
                b[pos] = rng.randrange(256)
            elif op < 0.8:
                b[pos] ^= 1 << rng.randrange(8)
            elif pos + 4 <= len(b):
                b[pos : pos + 4] = struct.pack("<I", rng.choice([0, 1, 0xFFFFFFFF, 0x1000, 0x7FFFFFFF]))
        out.append(_fix_header(b))
    return out


# the vectors the reference parser accepts (a rejected one has no file data: no mutant of it parses)
@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("*.igvm") if "_REJECTED" not in p.name))
def test_parsed_mutants_fail_only_with_igvm_errors(name: str) -> None:
    seed = (VECTORS / name).read_bytes()
    original = IgvmFile.from_bytes(seed)
    rng = random.Random(name)
    parsed = 0
    for data in _mutants(seed, rng):
        try:
            f = IgvmFile.from_bytes(data)
        except IgvmError:
            continue
        parsed += 1
        steps = {
            "dump": lambda f=f, data=data: (dump_json(f, source_bytes=data), dump_text(f, source_bytes=data)),
            "lint": lambda f=f: [lint(f, loader) for loader in PROFILES],
            "measure": lambda f=f: [measure_platform(f, p.platform_type, loader=loader)
                                    for p in f.platforms for loader in ("hyperv", "qemu")],
            "diff": lambda f=f: diff_files(original, f),
            "round trip": lambda f=f: IgvmFile.from_bytes(f.to_bytes()),
            "remove ID block": lambda f=f: remove_id_block(f),
        }
        for step, run in steps.items():
            try:
                run()
            except IgvmError:
                pass
            except Exception as exc:  # the point of the test
                pytest.fail(f"{name} mutant {parsed}: {step} raised {type(exc).__name__}: {exc}")
    assert parsed, "no mutant parsed: the test would check nothing"
