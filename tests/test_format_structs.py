"""Three-way checks for every IGVM header struct: pack -> bytes at spec offsets -> unpack -> equal.

In the style of construct's declarative unit tests: for every header class, seeded random field
values are packed, every field is read back at the offset and size that
``shared/spec/IGVM_FORMAT.md`` Appendix A gives for it (reserved bytes must be zero), the body
is unpacked again (directly, or through the file parser for headers that carry file data) and
compared with the original, and ``STRUCT.size == SIZE ==`` the spec size.  The TLV bodies of the
reference vectors serve as known byte samples.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H
from igvm_builder.format.dump import CCA_CONTEXT_FIELDS, NATIVE_CONTEXT_FIELDS, decode_vbs_register

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "vectors" / "igvm"
SEEDS = range(200)

# --------------------------------------------------------------------------- Appendix A layouts
# class -> (spec size, {field: (offset, size)}); "file_offset" is the argument of pack_body.

MASK = {"compatibility_mask": (0, 4)}
LAYOUT: dict[type[H.Header], tuple[int, dict[str, tuple[int, int]]]] = {
    H.SupportedPlatform: (16, {**MASK, "highest_vtl": (4, 1), "platform_type": (5, 1),
                               "platform_version": (6, 2), "shared_gpa_boundary": (8, 8)}),
    H.GuestPolicy: (16, {"policy": (0, 8), "compatibility_mask": (8, 4)}),
    H.RelocatableRegion: (48, {**MASK, "vp_index": (4, 2), "vtl": (6, 1), "flags": (7, 1),
                               "relocation_alignment": (8, 8), "relocation_region_gpa": (16, 8),
                               "relocation_region_size": (24, 8), "minimum_relocation_gpa": (32, 8),
                               "maximum_relocation_gpa": (40, 8)}),
    H.PageTableRelocation: (32, {**MASK, "vp_index": (4, 2), "vtl": (6, 1), "gpa": (8, 8), "size": (16, 8),
                                 "used_size": (24, 8)}),
    H.CcaPolicy: (32, {**MASK, "attributes_required_zeroes": (8, 8), "attributes_required_ones": (16, 8),
                       "hash_algorithm": (24, 1), "lfa_policy": (25, 1)}),
    H.CorimDocument: (16, {**MASK, "file_offset": (4, 4), "size_bytes": (8, 4)}),
    H.CorimSignature: (16, {**MASK, "file_offset": (4, 4), "size_bytes": (8, 4)}),
    H.ParameterArea: (16, {"number_of_bytes": (0, 8), "parameter_area_index": (8, 4), "file_offset": (12, 4)}),
    H.PageData: (24, {"gpa": (0, 8), "compatibility_mask": (8, 4), "file_offset": (12, 4), "flags": (16, 4),
                      "data_type": (20, 2)}),
    H.ParameterInsert: (16, {"gpa": (0, 8), "compatibility_mask": (8, 4), "parameter_area_index": (12, 4)}),
    H.RequiredMemory: (24, {"gpa": (0, 8), "compatibility_mask": (8, 4), "number_of_bytes": (12, 4),
                            "flags": (16, 4)}),
    H.ErrorRange: (16, {"gpa": (0, 8), "compatibility_mask": (8, 4), "size_bytes": (12, 4)}),
    H.SnpIdBlock: (696, {**MASK, "author_key_enabled": (4, 1), "reserved": (5, 3), "ld": (8, 48),
                         "family_id": (56, 16), "image_id": (72, 16), "version": (88, 4), "guest_svn": (92, 4),
                         "id_key_algorithm": (96, 4), "author_key_algorithm": (100, 4),
                         "id_key_signature": (104, 144), "id_public_key": (248, 152),
                         "author_key_signature": (400, 144), "author_public_key": (544, 152)}),
    H.VbsMeasurement: (864, {**MASK, "version": (4, 4), "product_id": (8, 4), "module_id": (12, 4),
                             "security_version": (16, 4), "policy_flags": (20, 4), "boot_digest_algo": (24, 4),
                             "signing_algo": (28, 4), "boot_measurement_digest": (32, 64), "signature": (96, 256),
                             "public_key": (352, 512)}),
    **{cls: (8, {"parameter_area_index": (0, 4), "byte_offset": (4, 4)}) for cls in H.PARAMETER_USAGES.values()},
}
VP_LAYOUT = (20, {"gpa": (0, 8), "compatibility_mask": (8, 4), "file_offset": (12, 4), "vp_index": (16, 2)})
for _cls in (H.SnpVpContext, H.NativeVpContext, H.CcaVpContext, H.VbsVpContext):
    LAYOUT[_cls] = VP_LAYOUT

# --------------------------------------------------------------------------- random valid values

R = random.Random


def u(rng: R, bits: int) -> int:
    return rng.getrandbits(bits)


def page(rng: R, bits: int = 64) -> int:
    return u(rng, bits - 12) << 12


def blob(rng: R, n: int) -> bytes:
    return rng.randbytes(n)


def _reloc(rng: R) -> dict[str, Any]:
    align = 0x1000 << rng.randrange(20)
    lim = (1 << 64) // align
    # flags: bits 0-2 (the writer refuses the others, which the reference model has no place for)
    return dict(compatibility_mask=u(rng, 32), vp_index=u(rng, 16), vtl=rng.randrange(3), flags=rng.randrange(8),
                relocation_alignment=align, relocation_region_gpa=rng.randrange(lim) * align,
                relocation_region_size=rng.randrange(1, 1 << 20) * 0x1000,
                minimum_relocation_gpa=rng.randrange(lim) * align, maximum_relocation_gpa=rng.randrange(lim) * align)


def _pt_reloc(rng: R) -> dict[str, Any]:
    size = rng.randrange(1, 1 << 20) * 0x1000
    return dict(compatibility_mask=u(rng, 32), vp_index=u(rng, 16), vtl=rng.randrange(3), gpa=page(rng),
                size=size, used_size=rng.randrange(0, size + 1, 0x1000))


def _cca(rng: R) -> dict[str, Any]:
    zeroes = u(rng, 64)
    return dict(compatibility_mask=u(rng, 32), attributes_required_zeroes=zeroes,
                attributes_required_ones=u(rng, 64) & ~zeroes, hash_algorithm=rng.randrange(3),
                lfa_policy=rng.randrange(2))


def _platform(rng: R) -> dict[str, Any]:
    ptype = rng.choice(list(D.PlatformType))
    enlightened = ptype in (D.PlatformType.NATIVE, D.PlatformType.VSM_ISOLATION)
    return dict(compatibility_mask=1 << rng.randrange(32), highest_vtl=rng.choice((0, 2)), platform_type=ptype,
                platform_version=1, shared_gpa_boundary=0 if enlightened else u(rng, 64))


GEN: dict[type[H.Header], Callable[[R], dict[str, Any]]] = {
    H.SupportedPlatform: _platform,
    H.GuestPolicy: lambda r: dict(policy=u(r, 64), compatibility_mask=u(r, 32)),
    H.RelocatableRegion: _reloc,
    H.PageTableRelocation: _pt_reloc,
    H.CcaPolicy: _cca,
    H.CorimDocument: lambda r: dict(compatibility_mask=1, data=blob(r, r.randrange(1, 300))),
    H.CorimSignature: lambda r: dict(compatibility_mask=1, data=blob(r, r.randrange(1, 300))),
    H.ParameterArea: lambda r: dict(number_of_bytes=r.randrange(1, 4) * 0x1000, parameter_area_index=u(r, 32),
                                    initial_data=blob(r, r.choice((0, 1, 100, 0x1000)))),
    H.PageData: lambda r: dict(gpa=page(r), compatibility_mask=1, flags=u(r, 32), data_type=r.randrange(4),
                               data=blob(r, r.choice((0, 1, 27, 4096)))),
    H.ParameterInsert: lambda r: dict(gpa=page(r), compatibility_mask=u(r, 32), parameter_area_index=u(r, 32)),
    H.RequiredMemory: lambda r: dict(gpa=page(r), compatibility_mask=u(r, 32), number_of_bytes=page(r, 32),
                                     flags=r.randrange(2)),  # (other bits: no place in the reference model)
    H.ErrorRange: lambda r: dict(gpa=page(r), compatibility_mask=u(r, 32), size_bytes=u(r, 32)),
    H.SnpIdBlock: lambda r: dict(compatibility_mask=u(r, 32), author_key_enabled=u(r, 8), reserved=blob(r, 3),
                                 ld=blob(r, 48), family_id=blob(r, 16), image_id=blob(r, 16), version=u(r, 32),
                                 guest_svn=u(r, 32), id_key_algorithm=u(r, 32), author_key_algorithm=u(r, 32),
                                 id_key_signature=blob(r, 144), id_public_key=blob(r, 152),
                                 author_key_signature=blob(r, 144), author_public_key=blob(r, 152)),
    H.VbsMeasurement: lambda r: dict(compatibility_mask=u(r, 32), version=u(r, 32), product_id=u(r, 32),
                                     module_id=u(r, 32), security_version=u(r, 32), policy_flags=u(r, 32),
                                     boot_digest_algo=u(r, 32), signing_algo=u(r, 32),
                                     boot_measurement_digest=blob(r, 64), signature=blob(r, 256),
                                     public_key=blob(r, 512)),
    **{cls: (lambda r: dict(parameter_area_index=u(r, 32), byte_offset=u(r, 32))) for cls in H.PARAMETER_USAGES.values()},
    H.SnpVpContext: lambda r: dict(gpa=page(r), compatibility_mask=1, vp_index=u(r, 16),
                                   vmsa=blob(r, 1648) + bytes(r.choice((0, 2448)))),
    H.NativeVpContext: lambda r: dict(gpa=0, compatibility_mask=1, vp_index=u(r, 16), context=blob(r, 232)),
    H.CcaVpContext: lambda r: dict(gpa=0, compatibility_mask=1, vp_index=u(r, 16), context=blob(r, 80)),
    H.VbsVpContext: lambda r: dict(gpa=0, compatibility_mask=1, vp_index=0, vtl=r.choice((0, 2)),
                                   registers=tuple(H.VbsRegister(name=n, value=H.vbs_register_value(n, blob(r, 16),
                                                                                                    True))
                                                   for n in r.sample(sorted(_x64_regs()), r.randrange(1, 8)))),
}


def _x64_regs() -> frozenset[int]:
    from igvm_builder.format.file import X64_VBS_REGISTERS

    return X64_VBS_REGISTERS


#: Platform a data-carrying header is parsed under (mask 1), and the file's architecture.
HOST_PLATFORM = {
    H.CorimDocument: (D.PlatformType.NATIVE, D.Architecture.X64),
    H.CorimSignature: (D.PlatformType.NATIVE, D.Architecture.X64),
    H.ParameterArea: (D.PlatformType.NATIVE, D.Architecture.X64),
    H.PageData: (D.PlatformType.NATIVE, D.Architecture.X64),
    H.SnpVpContext: (D.PlatformType.SEV_SNP, D.Architecture.X64),
    H.NativeVpContext: (D.PlatformType.NATIVE, D.Architecture.X64),
    H.CcaVpContext: (D.PlatformType.CCA, D.Architecture.AARCH64),
    H.VbsVpContext: (D.PlatformType.VSM_ISOLATION, D.Architecture.X64),
}

ALL_CLASSES = sorted(LAYOUT, key=lambda c: (int(c.TYPE), c.__name__))


def field_value(obj: H.Header, name: str, file_offset: int) -> Any:
    if name == "file_offset":
        return file_offset
    if name == "size_bytes" and isinstance(obj, H.CorimDocument | H.CorimSignature):
        return len(obj.data)
    return getattr(obj, name)


def reparse(obj: H.Header) -> H.Header:
    """Unpack ``obj`` back through the file parser (for headers whose body points at file data)."""
    ptype, arch = HOST_PLATFORM[type(obj)]
    platform = H.SupportedPlatform(compatibility_mask=1, platform_type=ptype)
    inits: tuple[H.Header, ...] = ()
    directives: tuple[H.Header, ...] = ()
    if isinstance(obj, H.CorimSignature):
        inits = (H.CorimDocument(compatibility_mask=1, data=b"doc"), obj)
    elif obj.SECTION == D.Section.INITIALIZATION:
        inits = (obj,)
    else:
        directives = (obj,)
    f = IgvmFile(revision=2 if arch == D.Architecture.AARCH64 else 1, architecture=arch, platforms=(platform,),
                 initializations=inits, directives=directives)
    parsed = IgvmFile.from_bytes(f.to_bytes())
    return (parsed.initializations + parsed.directives)[-1]


def normalized(obj: H.Header) -> H.Header:
    """``obj`` with its data padded the way the reference parser returns it."""
    import dataclasses

    if isinstance(obj, H.PageData | H.ParameterArea):
        name = "data" if isinstance(obj, H.PageData) else "initial_data"
        return dataclasses.replace(obj, **{name: bytes(obj.blob() or b"")})
    if isinstance(obj, H.SnpVpContext):
        return dataclasses.replace(obj, vmsa=bytes(obj.blob()))
    return obj


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_struct_size_matches_spec(cls: type[H.Header]) -> None:
    spec_size, fields = LAYOUT[cls]
    assert cls.SIZE == spec_size
    assert cls.STRUCT.size == spec_size
    assert D.section_of(int(cls.TYPE)) == cls.SECTION
    covered = sorted(fields.values())
    for (o1, s1), (o2, _s2) in itertools.pairwise(covered):
        assert o1 + s1 <= o2, f"{cls.__name__}: spec table overlaps"
    assert covered[-1][0] + covered[-1][1] <= spec_size
    if cls in H.SIMPLE_HEADERS.values() or cls in (H.ParameterArea, H.PageData, H.VpContextBase):
        assert H.BODY_SIZES[int(cls.TYPE)] == spec_size


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_three_way(cls: type[H.Header]) -> None:
    spec_size, fields = LAYOUT[cls]
    simple = H.SIMPLE_HEADERS.get(int(cls.TYPE)) is cls
    seeds = SEEDS if simple else range(25)  # the file round trip is slower
    for seed in seeds:
        rng = random.Random(f"{cls.__name__}:{seed}")
        obj = cls(**GEN[cls](rng))
        file_offset = u(rng, 32)
        body = obj.pack_body(file_offset)
        assert len(body) == spec_size
        covered = bytearray(spec_size)
        for name, (offset, size) in fields.items():
            raw = body[offset : offset + size]
            value = field_value(obj, name, file_offset)
            if isinstance(value, bytes):
                assert raw == value, f"{cls.__name__}.{name} (seed {seed})"
            else:
                assert int.from_bytes(raw, "little") == int(value), f"{cls.__name__}.{name} (seed {seed})"
            covered[offset : offset + size] = b"\x01" * size
        reserved = bytes(b for b, c in zip(body, covered, strict=True) if not c)
        assert not any(reserved), f"{cls.__name__}: reserved bytes not zero (seed {seed})"
        if simple:
            again = cls.unpack_body(memoryview(body))
            assert again == obj
            assert again.pack_body(file_offset) == body
        else:
            again = reparse(obj)
            assert type(again) is cls
            assert again == normalized(obj)


def test_unpack_rejects_nonzero_reserved() -> None:
    from igvm_builder.errors import IgvmFormatError

    cases = [
        (H.GuestPolicy, H.GuestPolicy(policy=1, compatibility_mask=1), 12, 4),
        (H.PageTableRelocation, H.PageTableRelocation(compatibility_mask=1, gpa=0, size=0x1000, used_size=0), 7, 1),
        (H.RequiredMemory, H.RequiredMemory(gpa=0, compatibility_mask=1, number_of_bytes=0x1000), 20, 4),
        (H.CcaPolicy, H.CcaPolicy(compatibility_mask=1), 4, 4),
        (H.CcaPolicy, H.CcaPolicy(compatibility_mask=1), 26, 6),
    ]
    for cls, obj, offset, size in cases:
        body = bytearray(obj.pack_body())
        body[offset + size - 1] = 1
        with pytest.raises(IgvmFormatError):
            cls.unpack_body(memoryview(bytes(body)))


def test_vbs_register_records_match_appendix_a3() -> None:
    """The exact 32-byte records of IGVM_FORMAT.md Appendix A.3 (VTL 2), both directions."""
    samples = [
        (0x60001, struct.pack("<QIHH", 1234605616436508552, 2864434397, 8, 41115),
         "020100060000000000000000000000008877665544332211ddccbbaa08009ba0",
         {"segment": {"base": hex(1234605616436508552), "limit": hex(2864434397), "selector": "0x8",
                      "attributes": hex(41115)}}),
        (0x70001, struct.pack("<3HHQ", 0, 0, 0, 4095, 1234605616436508552),
         "02010007000000000000000000000000000000000000ff0f8877665544332211",
         {"table": {"base": hex(1234605616436508552), "limit": "0xfff"}}),
        (0x20010, (65520).to_bytes(16, "little"),
         "02100002000000000000000000000000f0ff0000000000000000000000000000", {"value": "0xfff0"}),
        (0x40000, (2147483665).to_bytes(16, "little"),
         "0200000400000000000000000000000011000080000000000000000000000000", {"value": "0x80000011"}),
    ]
    for name, value, record, decoded in samples:
        ctx = H.VbsVpContext(compatibility_mask=1, vtl=2, registers=(H.VbsRegister(name=name, value=value),))
        blob = ctx.blob()
        assert blob[:4] == (1).to_bytes(4, "little")
        assert blob[4:].hex() == record
        vtl, rname, mbz, rvalue = H.VBS_REGISTER_STRUCT.unpack(blob[4:])
        assert (vtl, rname, mbz, rvalue) == (2, name, bytes(11), value)
        got = decode_vbs_register(name, value, D.Architecture.X64)
        for key, expected in decoded.items():
            assert got[key] == expected
    pc = decode_vbs_register(0x20022, (4660).to_bytes(16, "little"), D.Architecture.AARCH64)
    assert (pc["name"], pc["value"]) == ("XPc", "0x1234")
    pc_record = H.VbsVpContext(compatibility_mask=1, vtl=0,
                               registers=(H.VbsRegister(name=0x20022, value=(4660).to_bytes(16, "little")),))
    assert pc_record.blob()[4:].hex() == "0022000200000000000000000000000034120000000000000000000000000000"


def test_context_blobs_and_tables() -> None:
    assert H.VBS_REGISTER_STRUCT.size == D.VBS_REGISTER_SIZE == 32
    assert H.VP_CONTEXT_STRUCT.size == 20
    assert sum(size for _n, _o, size in NATIVE_CONTEXT_FIELDS) == D.NATIVE_CONTEXT_SIZE == 232
    assert sum(size for _n, _o, size in CCA_CONTEXT_FIELDS) == D.CCA_CONTEXT_SIZE == 80
    offsets = {n: o for n, o, _s in NATIVE_CONTEXT_FIELDS}
    appendix = {"rax": 0, "r15": 120, "rip": 128, "rflags": 136, "idtr_base": 144, "idtr_limit": 152,
                "gdtr_limit": 158, "gdtr_base": 160, "code_selector": 168, "code_attributes": 170,
                "code_base": 172, "code_limit": 176, "data_selector": 180, "data_attributes": 182,
                "data_base": 184, "data_limit": 188, "gs_base": 192, "cr0": 200, "cr3": 208, "cr4": 216,
                "efer": 224}
    assert {k: offsets[k] for k in appendix} == appendix
    rng = random.Random(7)
    assert len(H.NativeVpContext(compatibility_mask=1, context=blob(rng, 232)).blob()) == 4096
    assert len(H.CcaVpContext(compatibility_mask=1, context=blob(rng, 80)).blob()) == 4096
    assert len(H.SnpVpContext(compatibility_mask=1, vmsa=blob(rng, 100)).blob()) == 4096


def test_fixed_header_structs() -> None:
    from igvm_builder.format import file as F

    assert F._FIXED_V1.size == D.FIXED_HEADER_SIZE_V1 == 24
    assert F._FIXED_V2.size == D.FIXED_HEADER_SIZE_V2 == 32
    assert F._TLV.size == 8
    assert D.IGVM_MAGIC_VALUE == 0x4D564749 == int.from_bytes(b"IGVM", "little")


def test_vector_bodies_are_packed_bodies() -> None:
    """Known samples: every TLV body in the reference vectors equals the model header packed."""
    checked = 0
    for path in sorted(VECTORS.glob("*.igvm")):
        if "REJECTED" in path.name:
            continue
        data = path.read_bytes()
        f = IgvmFile.from_bytes(data)
        voff, vsize = struct.unpack_from("<II", data, 8)
        pos = voff
        for h in f.headers:
            typ, length = struct.unpack_from("<II", data, pos)
            assert (typ, length) == (int(h.TYPE), h.SIZE)
            body = data[pos + 8 : pos + 8 + length]
            foff = struct.unpack_from("<I", body, 12)[0] if typ in (0x301, 0x302, 0x304) else 0
            assert h.pack_body(foff) == body, f"{path.name} header at {pos:#x}"
            if H.SIMPLE_HEADERS.get(typ) is type(h):
                assert type(h).unpack_body(memoryview(body)) == h
            pos += 8 + (length + 7) // 8 * 8
            checked += 1
        assert pos == voff + vsize
    assert checked > 60
