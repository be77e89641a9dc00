"""Property tests (hypothesis) for the IGVM model, parser and writers.

1. Random *valid* models (platform sets, pages with and without data including duplicates,
   parameter areas with usages and inserts, per-platform VP contexts, ID block, required
   memory, relocation regions) round-trip byte-identically: model -> bytes -> model -> bytes,
   through ``to_bytes()``, the streaming ``write()`` and ``iter_chunks()``.
2. Random mutations and truncations of valid files either parse or raise ``IgvmFormatError``
   (never another exception), and what parses re-serializes to an equivalent file.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H
from igvm_builder.format.file import AARCH64_VBS_REGISTERS, X64_VBS_REGISTERS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "vectors" / "igvm"

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PT = D.PlatformType
X64_TYPES = [PT.NATIVE, PT.VSM_ISOLATION, PT.SEV_SNP, PT.TDX, PT.SEV, PT.SEV_ES]
AARCH64_TYPES = [PT.VSM_ISOLATION, PT.CCA]

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
#: Inserts and pages live below 1 TiB; page-table regions above, so inserts never start inside one.
low_page = st.integers(0, (1 << 28) - 1).map(lambda n: n << 12)
#: A small pool of blobs so duplicates (and hence dedup) are common.
BLOB_POOL = [b"", b"\x00", b"A" * 27, bytes(range(256)) * 16, b"\x00" * 4096, b"B" * 4096, b"console=ttyS0\x00"]
page_data = st.one_of(st.sampled_from(BLOB_POOL), st.binary(max_size=4096))


def _mask_of(draw: st.DrawFn, bits: list[int]) -> int:
    """A non-empty subset of the platform bits (occasionally with an undeclared bit)."""
    chosen = draw(st.lists(st.sampled_from(bits), min_size=1, unique=True))
    mask = 0
    for b in chosen:
        mask |= b
    if draw(st.integers(0, 9)) == 0:
        mask |= 1 << 31 if not mask & (1 << 31) else 0
    return mask


@st.composite
def platforms(draw: st.DrawFn) -> tuple[int, D.Architecture, tuple[H.SupportedPlatform, ...]]:
    revision = draw(st.sampled_from([1, 2]))
    arch = D.Architecture.X64 if revision == 1 else draw(st.sampled_from(list(D.Architecture)))
    types = draw(st.lists(st.sampled_from(X64_TYPES if arch == D.Architecture.X64 else AARCH64_TYPES),
                          min_size=1, max_size=4, unique=True))
    bits = draw(st.lists(st.integers(0, 30), min_size=len(types), max_size=len(types), unique=True))
    out = []
    for ptype, bit in zip(types, bits, strict=True):
        enlightened = ptype in (PT.NATIVE, PT.VSM_ISOLATION)
        out.append(H.SupportedPlatform(compatibility_mask=1 << bit, highest_vtl=draw(st.sampled_from([0, 2])),
                                       platform_type=ptype,
                                       shared_gpa_boundary=0 if enlightened else draw(u64)))
    return revision, arch, tuple(out)


@st.composite
def vp_context(draw: st.DrawFn, p: H.SupportedPlatform, arch: D.Architecture) -> H.Header | None:
    mask = p.compatibility_mask
    if p.platform_type in D.VMSA_PLATFORMS:
        vmsa = draw(st.one_of(st.binary(min_size=0, max_size=1648), st.binary(min_size=4096, max_size=4096)))
        return H.SnpVpContext(gpa=draw(low_page), compatibility_mask=mask, vp_index=draw(u16), vmsa=vmsa)
    if p.platform_type in D.NATIVE_CONTEXT_PLATFORMS:
        return H.NativeVpContext(compatibility_mask=mask, vp_index=draw(u16),
                                 context=draw(st.binary(min_size=232, max_size=232)))
    if p.platform_type == PT.CCA:
        return H.CcaVpContext(compatibility_mask=mask, vp_index=draw(u16),
                              context=draw(st.binary(min_size=80, max_size=80)))
    if p.platform_type == PT.VSM_ISOLATION:
        allowed = sorted(X64_VBS_REGISTERS if arch == D.Architecture.X64 else AARCH64_VBS_REGISTERS)
        x64 = arch == D.Architecture.X64
        # values as the register's type holds them (the writer refuses bytes it does not use)
        regs = draw(st.lists(st.builds(lambda n, v: H.VbsRegister(name=n, value=H.vbs_register_value(n, v, x64)),
                                       st.sampled_from(allowed), st.binary(min_size=16, max_size=16)),
                             min_size=1, max_size=6))
        return H.VbsVpContext(compatibility_mask=mask, vp_index=0, vtl=draw(st.sampled_from([0, 2])),
                              registers=tuple(regs))
    return None  # TDX: no VP context


@st.composite
def models(draw: st.DrawFn) -> IgvmFile:
    revision, arch, plats = draw(platforms())
    bits = [p.compatibility_mask for p in plats]
    inits: list[H.Header] = []
    for p in plats:
        if p.platform_type in (PT.SEV_SNP, PT.TDX, PT.SEV_ES) or draw(st.integers(0, 4)) == 0:
            inits.append(H.GuestPolicy(policy=draw(u64), compatibility_mask=p.compatibility_mask))
        if p.platform_type == PT.CCA and draw(st.booleans()):
            zeroes = draw(u64)
            inits.append(H.CcaPolicy(compatibility_mask=p.compatibility_mask, attributes_required_zeroes=zeroes,
                                     attributes_required_ones=draw(u64) & ~zeroes, hash_algorithm=draw(st.integers(0, 2)),
                                     lfa_policy=draw(st.integers(0, 1))))

    # Directive building blocks, shuffled as whole blocks (a parameter area's lifecycle stays in order).
    blocks: list[list[H.Header]] = []
    for _ in range(draw(st.integers(0, 12))):
        blocks.append([H.PageData(gpa=draw(low_page), compatibility_mask=_mask_of(draw, bits),
                                  flags=draw(st.sampled_from([0, 2, 4, 6, 1, 0x80000000])),
                                  data_type=draw(st.integers(0, 3)), data=draw(page_data))])
    for index in range(draw(st.integers(0, 3))):
        size = draw(st.integers(1, 3)) * 0x1000
        block: list[H.Header] = [H.ParameterArea(number_of_bytes=size, parameter_area_index=index,
                                                 initial_data=draw(st.sampled_from([b"", b"console=ttyS0\x00",
                                                                                   b"\x00" * size])))]
        for usage in draw(st.lists(st.sampled_from(list(H.PARAMETER_USAGES.values())), max_size=3)):
            block.append(usage(parameter_area_index=index, byte_offset=draw(st.integers(0, size - 1))))
        if draw(st.booleans()):
            block.append(H.ParameterInsert(gpa=draw(low_page), compatibility_mask=_mask_of(draw, bits),
                                           parameter_area_index=index))
        blocks.append(block)
    if draw(st.booleans()):
        blocks.append([H.RequiredMemory(gpa=draw(low_page), compatibility_mask=_mask_of(draw, bits),
                                        number_of_bytes=draw(st.integers(0, 0xFFFFF)) << 12,
                                        flags=draw(st.integers(0, 1)))])
    if draw(st.integers(0, 3)) == 0:
        blocks.append([H.ErrorRange(gpa=draw(u64) & ~0xFFF, compatibility_mask=_mask_of(draw, bits), size_bytes=draw(u32))])
    vbs_vtls: dict[int, int] = {}
    for p in plats:
        if draw(st.integers(0, 5)) == 0:
            continue
        ctx = draw(vp_context(p, arch))
        if ctx is not None:
            blocks.append([ctx])
            if isinstance(ctx, H.VbsVpContext):
                vbs_vtls[p.compatibility_mask] = ctx.vtl
    snp = [p.compatibility_mask for p in plats if p.platform_type == PT.SEV_SNP]
    if snp and draw(st.booleans()):
        blocks.append([H.SnpIdBlock(compatibility_mask=snp[0], ld=draw(st.binary(min_size=48, max_size=48)),
                                    family_id=draw(st.binary(min_size=16, max_size=16)), guest_svn=draw(u32),
                                    id_key_signature=draw(st.binary(min_size=144, max_size=144)),
                                    id_public_key=draw(st.binary(min_size=152, max_size=152)))])
    vbs = [p.compatibility_mask for p in plats if p.platform_type == PT.VSM_ISOLATION]
    if vbs and draw(st.booleans()):
        blocks.append([H.VbsMeasurement(compatibility_mask=vbs[0], product_id=draw(u32), security_version=draw(u32),
                                        boot_measurement_digest=draw(st.binary(min_size=64, max_size=64)))])
    order = draw(st.permutations(range(len(blocks))))
    directives = [h for i in order for h in blocks[i]]

    # Relocation needs a matching VBS VP context (same mask bit, vp 0, same vtl).
    for mask, vtl in vbs_vtls.items():
        if draw(st.booleans()):
            align = 0x1000 << draw(st.integers(0, 9))
            inits.append(H.RelocatableRegion(
                compatibility_mask=mask, vtl=vtl, flags=draw(st.integers(0, 7)), relocation_alignment=align,
                relocation_region_gpa=draw(st.integers(0, 1000)) * align,
                relocation_region_size=draw(st.integers(1, 16)) * 0x1000,
                minimum_relocation_gpa=0, maximum_relocation_gpa=draw(st.integers(0, 4000)) * align))
        if draw(st.booleans()):
            size = draw(st.integers(1, 16)) * 0x1000
            inits.append(H.PageTableRelocation(compatibility_mask=mask, vtl=vtl, gpa=(1 << 45) + (1 << 40),
                                               size=size, used_size=draw(st.integers(0, size >> 12)) << 12))
    if draw(st.integers(0, 5)) == 0:
        inits.append(H.CorimDocument(compatibility_mask=bits[0], data=draw(st.binary(min_size=1, max_size=200))))
        if draw(st.booleans()):
            inits.append(H.CorimSignature(compatibility_mask=bits[0], data=draw(st.binary(max_size=100))))
    return IgvmFile(revision=revision, architecture=arch, platforms=plats, initializations=tuple(inits),
                    directives=tuple(directives))


def normalized(f: IgvmFile) -> IgvmFile:
    """``f`` with data padded the way the parser returns it (pages 4 KiB, areas full size)."""

    def norm(h: H.Header) -> H.Header:
        if isinstance(h, H.PageData):
            return dataclasses.replace(h, data=bytes(h.blob() or b""))
        if isinstance(h, H.ParameterArea):
            return dataclasses.replace(h, initial_data=bytes(h.blob() or b""))
        if isinstance(h, H.SnpVpContext):
            return dataclasses.replace(h, vmsa=bytes(h.blob()))
        return h

    return dataclasses.replace(f, directives=tuple(norm(h) for h in f.directives))


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(models())
def test_model_round_trip(f: IgvmFile) -> None:
    data = f.to_bytes()
    sink = io.BytesIO()
    assert f.write(sink) == len(data)
    assert sink.getvalue() == data
    assert b"".join(bytes(c) for c in f.iter_chunks()) == data

    parsed = IgvmFile.from_bytes(data)
    assert parsed == normalized(f)
    assert parsed.to_bytes() == data
    sink = io.BytesIO()
    parsed.write(sink)
    assert sink.getvalue() == data
    assert IgvmFile.from_bytes(bytearray(data)) == parsed

    # Dedup: identical blobs are stored once, so the file is no larger than its distinct blobs.
    blobs = {bytes(b) for h in f.headers if (b := h.blob()) is not None}
    fixed = 24 if f.revision == 1 else 32
    var = sum(8 + (h.SIZE + 7) // 8 * 8 for h in f.headers)
    assert len(data) == fixed + var + (sum(len(b) for b in blobs) or 1)


@SETTINGS
@given(models())
def test_round_trip_through_mmap(tmp_path_factory, f: IgvmFile) -> None:
    path = tmp_path_factory.mktemp("rt") / "x.igvm"
    with open(path, "wb") as fh:
        f.write(fh)
    loaded = IgvmFile.load(path)
    assert loaded == normalized(f)
    assert loaded.to_bytes() == path.read_bytes()


# --------------------------------------------------------------------------- mutations


def _fix_crc(buf: bytearray) -> None:
    """Recompute the checksum so mutations reach the header parser (best effort)."""
    if len(buf) < 24:
        return
    version, voff, vsize = struct.unpack_from("<III", buf, 4)
    fixed_size = 32 if version == 2 else 24
    if len(buf) < fixed_size:
        return
    fixed = bytearray(buf[:fixed_size])
    fixed[20:24] = bytes(4)
    struct.pack_into("<I", buf, 20, zlib.crc32(buf[voff : voff + vsize], zlib.crc32(fixed)))


def _vector_bytes() -> list[bytes]:
    return [p.read_bytes() for p in sorted(VECTORS.glob("*.igvm")) if "REJECTED" not in p.name]


VECTOR_BYTES = _vector_bytes()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        data = bytearray(draw(st.sampled_from(VECTOR_BYTES)))
    else:
        data = bytearray(draw(models()).to_bytes())
    voff, vsize = struct.unpack_from("<II", data, 8)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "u32", "truncate", "insert", "delete"]))
        # Mostly aim at the fixed header and the TLV area, where the structure is.
        hot = draw(st.booleans())
        hi = max(1, (voff + vsize) if hot else len(data))
        # Keep magic and version intact most of the time: they stop the parser at once.
        lo = 0 if draw(st.integers(0, 9)) == 0 else min(8, hi - 1)
        pos = draw(st.integers(lo, hi - 1)) if data else 0
        if draw(st.booleans()):
            pos = hi - 1 - (pos - lo)  # hypothesis favours small integers: mirror half of them
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[min(pos, len(data) - 1)] = draw(u8)
        elif kind == "u32" and len(data) >= 4:
            pos = min(pos, len(data) - 4) & ~3
            value = draw(st.sampled_from([0, 1, 0x1000, 0xFFFF_FFFF, 0x8000_0000, len(data), len(data) - 1]) | u32)
            struct.pack_into("<I", data, pos, value)
        elif kind == "truncate":
            del data[len(data) - draw(st.integers(0, len(data))) :]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    if draw(st.integers(0, 3)) > 0 and len(data) >= 20:
        struct.pack_into("<I", data, 16, len(data))  # keep total_file_size consistent
    if draw(st.integers(0, 3)) > 0:
        _fix_crc(data)
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_raise_only_format_errors(data: bytes) -> None:
    try:
        f = IgvmFile.from_bytes(data)
    except IgvmFormatError as exc:
        assert str(exc)
        return
    # Accepted: re-serializing must work and give back the same model.
    again = IgvmFile.from_bytes(f.to_bytes())
    assert again == f


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(VECTOR_BYTES), st.data())
def test_truncations_raise_only_format_errors(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data) - 1))
    short = bytearray(data[:cut])
    if draw.draw(st.booleans()) and len(short) >= 24:
        struct.pack_into("<I", short, 16, len(short))
        _fix_crc(short)
    try:
        IgvmFile.from_bytes(bytes(short))
    except IgvmFormatError:
        return
