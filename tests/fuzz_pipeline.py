"""The seeded fuzzer shared by ``tests/test_hostile_fuzz.py`` (bounded, every CI run) and
``benchmarks/fuzz_campaign.py`` (long campaigns).  This module holds no tests.

Inputs are the reference vectors of ``shared/vectors/igvm`` (and a signed SNP file made from one),
mutated two ways: bytes (bit flips, set bytes, extreme u32/u64 values aimed at the fixed header
and the header table, truncation, insertion, deletion, with the checksum and total size fixed up
most of the time so the mutation reaches the header parser) and model fields (a header of the
parsed file gets an extreme value in one of its integer fields, then is serialized again: this
reaches the measurement, lint and diff with values a byte flip rarely makes, such as 4 GiB
parameter areas or error ranges).

Every input goes through parse; every accepted file through dump (JSON and text), measure
(every platform, two loaders), lint (every loader), diff (against the file it came from),
verify and sign (then verify again).  What must hold (:func:`run_pipeline` raises
:class:`PipelineFailure` otherwise):

* nothing raises but the project's errors (:class:`~igvm_builder.errors.IgvmError`), and each
  error is one line;
* an accepted file serializes and parses back to the same model;
* a file the signer signs verifies under the loader it was signed for (files the parser
  warns about are not signed: see :func:`run_pipeline`).
"""

from __future__ import annotations

import dataclasses
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from igvm_builder.errors import IgvmError
from igvm_builder.format import IgvmFile

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "vectors" / "igvm"
ID_PEM = SHARED / "keys" / "test-only-id-p384.pem"

#: Loaders every accepted file is measured, linted and signed for.
LOADERS = ("hyperv", "qemu")
#: Integer values mutations favour: edges of u8/u16/u32/u64, page sizes, 4 GiB.
EXTREMES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x1000, 0xFFF, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
            1 << 32, (1 << 32) - 0x1000, 1 << 52, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 0x1000)

#: Largest parameter area with initial data a model mutation makes: the writer pads the data to
#: the area's size, so a 2 GiB area is a 2 GiB input (seconds and gigabytes per execution, the
#: same code paths as 64 MiB).  Data-less areas, which add nothing to the file, stay unbounded.
MAX_AREA_WITH_DATA = 64 << 20


class PipelineFailure(AssertionError):
    """An invariant of the pipeline broke (the input is in :attr:`data`)."""

    def __init__(self, stage: str, message: str, data: bytes) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.data = data


def seed_files() -> list[bytes]:
    """The accepted reference vectors, snp_v1 signed with the TEST-ONLY ID key, and a file of
    page runs (:func:`runs_seed`)."""
    from igvm_builder.sign import PemFileKey
    from igvm_builder.sign.image import sign_igvm

    seeds = [p.read_bytes() for p in sorted(VECTORS.glob("*.igvm")) if "REJECTED" not in p.name]
    signed, _ = sign_igvm(IgvmFile.from_bytes((VECTORS / "snp_v1.igvm").read_bytes()), id_key=PemFileKey(ID_PEM),
                          loader="hyperv")
    seeds.append(signed.to_bytes())
    seeds.append(runs_seed())
    return seeds


def runs_seed() -> bytes:
    """A NATIVE + SEV-SNP file made of every kind of PAGE_DATA run the parser folds
    (``format/pages.py``): distinct data pages (one contiguous buffer), one page repeated, zero
    pages, data-less pages, unmeasured and shared ones, pages of one platform at GPAs the other
    platform has too, and runs broken by a GPA gap, so that mutations land inside and at the
    edges of runs."""
    from igvm_builder.format import headers as H
    from igvm_builder.format.defs import PageDataFlags, PlatformType

    page = 0x1000
    rng = random.Random(0x15)
    both, native, snp = 3, 1, 2
    d: list[Any] = []

    def run(gpa: int, count: int, mask: int, data: Callable[[int], bytes], flags: int = 0) -> None:
        d.extend(H.PageData(gpa=gpa + i * page, compatibility_mask=mask, flags=flags, data=data(i))
                 for i in range(count))

    run(0x100000, 24, both, lambda i: rng.randbytes(page))
    run(0x11A000, 4, both, lambda i: rng.randbytes(page))  # after a gap of two pages
    repeated = rng.randbytes(page)
    run(0x200000, 16, both, lambda i: repeated)
    run(0x300000, 8, both, lambda i: bytes(page))
    run(0x400000, 16, snp, lambda i: b"")
    run(0x500000, 4, native, lambda i: rng.randbytes(page))
    run(0x500000, 4, snp, lambda i: rng.randbytes(page))
    run(0x600000, 4, snp, lambda i: b"", int(PageDataFlags.SHARED))
    run(0x700000, 4, snp, lambda i: rng.randbytes(page), int(PageDataFlags.UNMEASURED))
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=native, platform_type=PlatformType.NATIVE),
                            H.SupportedPlatform(compatibility_mask=snp, platform_type=PlatformType.SEV_SNP)),
                 initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=snp),),
                 directives=tuple(d))
    return f.to_bytes()


def _fix_crc(buf: bytearray) -> None:
    if len(buf) < 24:
        return
    version, voff, vsize = struct.unpack_from("<III", buf, 4)
    fixed_size = 32 if version == 2 else 24
    if len(buf) < fixed_size or voff > len(buf):
        return
    fixed = bytearray(buf[:fixed_size])
    fixed[20:24] = bytes(4)
    struct.pack_into("<I", buf, 20, zlib.crc32(buf[voff : voff + vsize], zlib.crc32(fixed)))


def mutate_bytes(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    voff, vsize = struct.unpack_from("<II", data, 8)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(("flip", "set", "u32", "u64", "truncate", "insert", "delete"))
        hi = max(1, (voff + vsize) if rng.random() < 0.8 else len(data))  # mostly the header table
        lo = 0 if rng.random() < 0.05 else min(8, hi - 1)  # magic and version rarely
        pos = rng.randrange(lo, hi) if data else 0
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif kind == "set" and data:
            data[min(pos, len(data) - 1)] = rng.choice((0, 0xFF, 0x80, rng.randrange(256)))
        elif kind in ("u32", "u64") and len(data) >= 8:
            size = 4 if kind == "u32" else 8
            pos = min(pos, len(data) - size) & ~3
            value = rng.choice((*EXTREMES, len(data), rng.getrandbits(size * 8))) & ((1 << (size * 8)) - 1)
            data[pos : pos + size] = value.to_bytes(size, "little")
        elif kind == "truncate":
            del data[rng.randrange(len(data) + 1):]
        elif kind == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif kind == "delete":
            del data[pos : pos + rng.randint(1, 16)]
    if rng.random() < 0.75 and len(data) >= 20:
        struct.pack_into("<I", data, 16, len(data))  # keep total_file_size consistent
    if rng.random() < 0.8:
        _fix_crc(data)
    return bytes(data)


def mutate_model(rng: random.Random, seed: bytes) -> bytes | None:
    """One integer field of one header set to an extreme value, serialized again (None if the
    model refuses the value: that is the constructor's own check, not a finding)."""
    f = IgvmFile.from_bytes(seed)
    sections = [s for s in ("platforms", "initializations", "directives") if getattr(f, s)]
    section = rng.choice(sections)
    headers = list(getattr(f, section))
    i = rng.randrange(len(headers))
    h = headers[i]
    fields = [x.name for x in dataclasses.fields(h) if isinstance(getattr(h, x.name), int)]
    if not fields:
        return None
    name = rng.choice(fields)
    value = rng.choice(EXTREMES) if rng.random() < 0.8 else getattr(h, name) ^ (1 << rng.randrange(64))
    if name == "number_of_bytes" and len(getattr(h, "initial_data", b"")) and value > MAX_AREA_WITH_DATA:
        return None  # a file of gigabytes (the initial data padded to the area): memory, not code
    try:
        headers[i] = dataclasses.replace(h, **{name: value})
        return dataclasses.replace(f, **{section: tuple(headers)}).to_bytes()
    except (IgvmError, ValueError, OverflowError, struct.error, TypeError):
        return None


def _one_line(stage: str, exc: IgvmError, data: bytes) -> None:
    text = str(exc)
    if not text or "\n" in text:
        raise PipelineFailure(stage, f"error is not one line: {text!r}", data)


def _guard(stage: str, data: bytes, fn: Callable[[], Any]) -> Any:
    """Run ``fn``: a project error is an expected refusal (one line), anything else a crash."""
    try:
        return fn()
    except IgvmError as exc:
        _one_line(stage, exc, data)
        return None
    except PipelineFailure:
        raise
    except Exception as exc:
        raise PipelineFailure(stage, f"{type(exc).__name__}: {exc}", data) from exc


def run_pipeline(data: bytes, original: IgvmFile, *, sign: bool = True) -> bool:
    """parse -> dump -> measure -> lint -> diff -> verify -> sign/verify; True if ``data`` parsed."""
    from igvm_builder.diff import diff_files
    from igvm_builder.format.dump import dump_json, dump_text
    from igvm_builder.lint import lint
    from igvm_builder.measure import measure_platform
    from igvm_builder.sign import PemFileKey
    from igvm_builder.sign.image import sign_igvm, verify_igvm

    f = _guard("parse", data, lambda: IgvmFile.from_bytes(data))
    if f is None:
        return False
    again = _guard("round-trip", data, lambda: IgvmFile.from_bytes(f.to_bytes()))
    if again is None or again != f:
        raise PipelineFailure("round-trip", "an accepted file does not serialize back to the same model", data)
    _guard("dump", data, lambda: (dump_json(f, source_bytes=data), dump_text(f, source_bytes=data)))
    for p in f.platforms:
        for loader in LOADERS:
            _guard("measure", data, lambda p=p, loader=loader: measure_platform(f, p.platform_type, loader=loader))
    for loader in LOADERS:
        _guard("lint", data, lambda loader=loader: lint(f, loader))
    _guard("diff", data, lambda: diff_files(original, f).render_text())
    _guard("verify", data, lambda: verify_igvm(f))
    # Signed: files the parser accepts without a warning.  A signed file is a library output,
    # which the test session's oracle recorder (tests/oracles.py) cross-checks against COCONUT
    # igvmmeasure; on a page with IS_2MB_PAGE set (warned: the reference parser reads it as
    # 4 KiB) igvmmeasure's digest differs from our igvmmeasure profile, a known gap left to the
    # measurement profiles, not something the fuzzer should report on every run.
    if sign and not f.warnings:
        for loader in LOADERS[: 1 + (len(data) & 1)]:
            signed = _guard("sign", data, lambda loader=loader: sign_igvm(f, id_key=PemFileKey(ID_PEM), loader=loader))
            if signed is None:
                continue
            out = signed[0]
            reparsed = _guard("sign", data, lambda out=out: IgvmFile.from_bytes(out.to_bytes()))
            if reparsed is None:
                raise PipelineFailure("sign", "a signed file does not parse", data)
            try:
                verify_igvm(reparsed, loader=loader)
            except IgvmError as exc:
                raise PipelineFailure("sign/verify", f"a file just signed does not verify: {exc}", data) from exc
    return True


@dataclasses.dataclass
class Campaign:
    executions: int = 0
    parsed: int = 0
    pipelines: int = 0
    failures: list[PipelineFailure] = dataclasses.field(default_factory=list)


class OracleCheck:
    """The differential check against the reference crate (``igvm-oracle`` in ../shared/tools):
    for an input, the crate's verdict (parse) must be ours, and for an accepted one the crate
    must re-serialize the file we write from it to the same bytes (so it reads it as we do).  A
    panic inside the crate on an input we reject counts in :attr:`crate_panics`, not as a
    failure (that is the crate's bug).  One subprocess per call: a few milliseconds."""

    def __init__(self, directory: Path) -> None:
        from oracles import IGVM_ORACLE

        self.tool = str(IGVM_ORACLE)
        self.path = directory / "oracle-input.igvm"
        self.checked = 0
        self.crate_panics = 0
        #: known, deliberate differences seen (not failures), by kind
        self.known: dict[str, int] = {}

    def _run(self, command: str, data: bytes) -> tuple[int, str]:
        import subprocess

        self.path.write_bytes(data)
        proc = subprocess.run([self.tool, command, str(self.path)], capture_output=True, text=True, timeout=120)
        return proc.returncode, (proc.stdout.strip().splitlines() or [proc.stderr.strip()])[-1][:200]

    def __call__(self, data: bytes) -> None:
        self.checked += 1
        try:
            ours: IgvmFile | None = IgvmFile.from_bytes(data)
        except IgvmError as exc:
            ours, why = None, str(exc)
        rc, said = self._run("parse", data)
        if rc == 3 and ours is None:
            self.crate_panics += 1
            return
        if rc == 0 and ours is None and "both use compatibility_mask" in why:
            # deliberate: the crate accepts two platforms with one mask bit, then decodes VP contexts
            # by the last one (shared/vectors/igvm/negative/duplicate_platform_mask); we refuse them
            self.known["duplicate platform mask"] = self.known.get("duplicate platform mask", 0) + 1
            return
        if (rc == 0) != (ours is not None):
            raise PipelineFailure("oracle/parse", f"the crate {'accepts' if rc == 0 else 'rejects'} ({said}), we "
                                  f"{'accept' if ours is not None else 'reject: ' + why}", data)
        if ours is None:
            return
        written = ours.to_bytes()
        rc, said = self._run("roundtrip", written)
        voff, vsize = struct.unpack_from("<II", written, 8)
        if rc != 0 and voff + vsize == len(written) - 1 and said.endswith(
                f"input {len(written)} bytes, serialized {len(written) - 1} bytes"):
            # deliberate: a file without file data gets the one byte the crate's parser needs after
            # the headers and its writer omits (format/file.py, IgvmFile.layout)
            self.known["no file data"] = self.known.get("no file data", 0) + 1
            return
        if rc != 0:
            raise PipelineFailure("oracle/roundtrip", f"the crate re-serializes the file we write differently: "
                                  f"{said}", data)


def campaign(seed: int, executions: int, *, pipeline_every: int = 1, sign_every: int = 4,
             stop_on_failure: bool = True, check: Callable[[bytes], None] | None = None,
             check_every: int = 1) -> Campaign:
    """``executions`` mutated inputs from ``seed`` (same seed, same inputs); every accepted one
    runs the pipeline (signing on one in ``sign_every``); ``check`` (e.g. :class:`OracleCheck`)
    sees one input in ``check_every``."""
    rng = random.Random(seed)
    seeds = seed_files()
    originals = [IgvmFile.from_bytes(s) for s in seeds]
    out = Campaign()
    while out.executions < executions:
        k = rng.randrange(len(seeds))
        data = mutate_model(rng, seeds[k]) if rng.random() < 0.3 else mutate_bytes(rng, seeds[k])
        if data is None:
            continue
        out.executions += 1
        try:
            accepted = run_pipeline(data, originals[k], sign=out.executions % sign_every == 0) \
                if out.executions % pipeline_every == 0 else _guard("parse", data,
                                                                    lambda d=data: IgvmFile.from_bytes(d)) is not None
            if check is not None and out.executions % check_every == 0:
                check(data)
        except PipelineFailure as failure:
            out.failures.append(failure)
            if stop_on_failure:
                raise
            continue
        if accepted:
            out.parsed += 1
            out.pipelines += out.executions % pipeline_every == 0
    return out
