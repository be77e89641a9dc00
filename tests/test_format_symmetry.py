"""The writer accepts exactly what the reader accepts.

``IgvmFile.validate()`` (run by ``to_bytes()`` / ``write()`` before anything is written) must
reject every model whose bytes ``from_bytes()`` would reject, with an ``IgvmFormatError`` that
names the header and the field (never a bare ``struct.error`` or ``TypeError``), and whatever
it accepts must parse back equal.  The oracle is the round trip itself: the parser applies the
reference crate's verdicts (checked against its vectors in test_format_negative.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_format_property import models, normalized

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H

PT = D.PlatformType


def _base(*directives: H.Header, inits: tuple[H.Header, ...] = (),
          platforms: tuple[H.SupportedPlatform, ...] | None = None) -> IgvmFile:
    plats = platforms or (H.SupportedPlatform(compatibility_mask=1, platform_type=PT.VSM_ISOLATION, highest_vtl=2),)
    return IgvmFile(platforms=plats, initializations=inits, directives=directives)


_VBS = H.VbsVpContext(compatibility_mask=1, vtl=2, registers=(H.VbsRegister(name=0x20010, value=bytes(16)),))


def _reloc(**kw: int) -> H.RelocatableRegion:
    values = dict(compatibility_mask=1, vtl=2, relocation_alignment=0x1000, relocation_region_gpa=0x100000,
                  relocation_region_size=0x1000, minimum_relocation_gpa=0, maximum_relocation_gpa=0x200000)
    return dataclasses.replace(H.RelocatableRegion(**values), **kw)  # type: ignore[arg-type]


# (what, model, header index the error must name, words the message must contain)
REJECTED = [
    ("highest_vtl 5", lambda: _base(platforms=(H.SupportedPlatform(compatibility_mask=1, highest_vtl=5,
                                                                   platform_type=PT.NATIVE),)),
     0, ("SUPPORTED_PLATFORM", "highest_vtl")),
    ("relocation_alignment 0", lambda: _base(_VBS, inits=(_reloc(relocation_alignment=0),)),
     1, ("RELOCATABLE_REGION", "relocation_alignment")),
    ("used_size > size", lambda: _base(_VBS, inits=(H.PageTableRelocation(compatibility_mask=1, vtl=2, gpa=0x1000,
                                                                          size=0x1000, used_size=0x2000),)),
     1, ("PAGE_TABLE_RELOCATION", "used_size")),
    ("compatibility_mask 2**32", lambda: _base(H.PageData(gpa=0, compatibility_mask=1 << 32)),
     1, ("PAGE_DATA", "compatibility_mask")),
    ("negative flags", lambda: _base(H.RequiredMemory(gpa=0, compatibility_mask=1, number_of_bytes=0x1000,
                                                      flags=-1)),
     1, ("REQUIRED_MEMORY", "flags")),
    ("gpa 2**64", lambda: _base(H.ErrorRange(gpa=1 << 64, compatibility_mask=1, size_bytes=1)),
     1, ("ERROR_RANGE", "gpa")),
    ("data_type 4", lambda: _base(H.PageData(gpa=0, compatibility_mask=1, data_type=4)),
     1, ("PAGE_DATA", "data_type")),
    ("a short ld", lambda: _base(H.SnpIdBlock(compatibility_mask=1, ld=bytes(47)), platforms=(
        H.SupportedPlatform(compatibility_mask=1, platform_type=PT.SEV_SNP),)),
     1, ("SNP_ID_BLOCK", "ld")),
    ("CCA hash_algorithm 3", lambda: IgvmFile(
        revision=2, architecture=D.Architecture.AARCH64,
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PT.CCA),),
        initializations=(H.CcaPolicy(compatibility_mask=1, hash_algorithm=3),)),
     1, ("CCA_POLICY", "hash_algorithm")),
    ("VBS register vtl 300", lambda: _base(dataclasses.replace(_VBS, vtl=300)),
     1, ("VP_CONTEXT", "vtl")),
    ("platform_type 9", lambda: _base(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=9),)),  # type: ignore[arg-type]
     0, ("SUPPORTED_PLATFORM", "platform_type")),
]


@pytest.mark.parametrize(("what", "make", "index", "words"), REJECTED, ids=[r[0] for r in REJECTED])
def test_writer_rejects_what_reader_rejects(what: str, make: Any, index: int, words: tuple[str, ...]) -> None:
    f = make()
    with pytest.raises(IgvmFormatError) as info:
        f.to_bytes()
    err = info.value
    assert err.header_index == index, str(err)
    for word in words:
        assert word in str(err), str(err)
    assert f"header {index}" in str(err)


def test_validate_runs_the_header_rules() -> None:
    f = _base(_VBS, inits=(_reloc(relocation_alignment=0),))
    with pytest.raises(IgvmFormatError, match="relocation_alignment is 0"):
        f.validate()


# --------------------------------------------------------------------------- the property

#: Integers around every boundary a field can have, and some anywhere.
WIDE_INT = st.one_of(
    st.sampled_from([-(1 << 64), -4096, -1, 0, 1, 2, 3, 4, 5, 7, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0xFFFF, 0x10000,
                     0xFFFF_F000, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 4096, (1 << 64) - 1, 1 << 64]),
    st.integers(-(1 << 70), 1 << 70),
    st.integers(0, 1 << 20).map(lambda n: n << 12),
)
#: Values of number_of_bytes: small (may be padded up to) or too large to store.
AREA_SIZE = st.one_of(st.integers(0, 16).map(lambda n: n << 12), st.sampled_from([0x1001, 1 << 32, 1 << 64, -4096]))
BLOB = st.one_of(st.binary(max_size=300), st.binary(min_size=4090, max_size=4100))


def _mutated(h: H.Header, name: str, draw: st.DrawFn) -> H.Header:
    current = getattr(h, name)
    if isinstance(current, bool | int) and name == "number_of_bytes" and isinstance(h, H.ParameterArea):
        value: Any = draw(AREA_SIZE)
    elif isinstance(current, int):
        value = draw(WIDE_INT)
    elif name in ("data", "initial_data", "vmsa", "context"):
        value = draw(BLOB)
    elif isinstance(current, bytes):
        value = draw(st.one_of(st.binary(min_size=len(current), max_size=len(current)),
                               st.binary(max_size=len(current) + 2)))
    else:
        return h
    return dataclasses.replace(h, **{name: value})


@st.composite
def mutated_models(draw: st.DrawFn) -> IgvmFile:
    f = draw(models())
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["platforms", "initializations", "directives", "file"]))
        if where == "file":
            f = dataclasses.replace(f, revision=draw(st.sampled_from([0, 1, 2, 3])))
            continue
        hdrs = list(getattr(f, where))
        if not hdrs:
            continue
        i = draw(st.integers(0, len(hdrs) - 1))
        names = [x.name for x in dataclasses.fields(hdrs[i])]
        try:
            hdrs[i] = _mutated(hdrs[i], draw(st.sampled_from(names)), draw)
        except IgvmFormatError:
            continue  # the constructor refused the value: nothing to write
        f = dataclasses.replace(f, **{where: tuple(hdrs)})
    return f


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_models())
def test_what_to_bytes_accepts_from_bytes_accepts_and_returns_equal(f: IgvmFile) -> None:
    try:
        data = f.to_bytes()
    except IgvmFormatError as exc:
        message = str(exc)
        assert "\n" not in message
        assert exc.header_index is not None or "revision" in message, message
        return
    parsed = IgvmFile.from_bytes(data)  # must not raise
    assert parsed == normalized(f)
    assert parsed.to_bytes() == data
