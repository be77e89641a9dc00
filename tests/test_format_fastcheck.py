"""The cheap field checks of ``IgvmFile.validate()`` decide as the generic ones do.

``validate()`` tests PAGE_DATA's fields with one integer expression and every other header with
:meth:`Record.accepts` (precompiled rules, no message), and only asks the message-producing
:meth:`Record.problems` / :meth:`Header.problems` when those fail.  The oracle here is that
generic check: ``accepts`` must agree with ``problems`` on every value, and every PAGE_DATA value
the generic check rejects must still fail ``validate()`` naming the header index and the field.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igvm_builder.errors import IgvmFormatError
from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H
from igvm_builder.format.record import Record

RECORDS = sorted({r.name: r for r in [
    *(cls.__dict__["BODY"] for cls in vars(H).values()
      if isinstance(cls, type) and issubclass(cls, H.Header) and "BODY" in cls.__dict__),
    *(r for r in vars(H).values() if isinstance(r, Record)),
]}.items())
INT_RECORDS = [(name, r) for name, r in RECORDS if r.quick is not None]

EDGES = [-(1 << 64), -4096, -1, 0, 1, 2, 3, 4, 5, 8, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0xFFFF, 0x10000,
         0xFFFF_FFFF, 1 << 32, 0xFFFF_FFFF_FFFF_F000, (1 << 64) - 1, 1 << 64]
VALUE = st.one_of(st.sampled_from(EDGES), st.integers(-(1 << 70), 1 << 70), st.integers(0, 1 << 20).map(lambda n: n << 12),
                  st.sampled_from([True, False, 1.0, 0.0, "1", None, D.PageDataType.SECRETS, D.PlatformType.SEV_SNP]))


def test_every_integer_record_has_quick_rules() -> None:
    # the structures validate() meets in bulk must take the cheap path
    names = {name for name, _ in INT_RECORDS}
    assert {"PAGE_DATA", "PARAMETER_INSERT", "PARAMETER_AREA", "REQUIRED_MEMORY", "SUPPORTED_PLATFORM"} <= names
    assert len(INT_RECORDS) >= 10


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_accepts_agrees_with_problems(data: st.DataObject) -> None:
    name, record = data.draw(st.sampled_from(INT_RECORDS))
    values = {f.name: data.draw(VALUE) for f in record.values}
    source = SimpleNamespace(**values)
    problems = [message for _field, message in record.problems(source)]
    assert record.accepts(source) == (not problems), (name, values, problems)


def test_accepts_is_false_for_byte_string_records() -> None:
    # (their check is the generic one; accepts() only ever says "ask problems()")
    with_bytes = [r for _name, r in RECORDS if r.quick is None]
    assert with_bytes
    for r in with_bytes:
        assert not r.accepts(SimpleNamespace(**{f.name: f.zero() for f in r.values}))


def _model(page: H.PageData, pages_before: int = 3) -> IgvmFile:
    good = tuple(H.PageData(gpa=0x10000 + i * 0x1000, compatibility_mask=1) for i in range(pages_before))
    plats = (H.SupportedPlatform(compatibility_mask=1, platform_type=D.PlatformType.NATIVE),)
    return IgvmFile(platforms=plats, directives=(*good, page))


# PageData's constructor refuses an unaligned or non-integer GPA: these reach validate()
PAGE_BAD: list[tuple[str, dict[str, Any]]] = [
    ("gpa", {"gpa": 1 << 64}),
    ("gpa", {"gpa": -4096}),
    ("compatibility_mask", {"compatibility_mask": 1 << 32}),
    ("compatibility_mask", {"compatibility_mask": -1}),
    ("compatibility_mask", {"compatibility_mask": 1.0}),
    ("flags", {"flags": 1 << 32}),
    ("flags", {"flags": -1}),
    ("flags", {"flags": 2.0}),
    ("data_type", {"data_type": 4}),
    ("data_type", {"data_type": -1}),
    ("data_type", {"data_type": 1.0}),
    ("data_type", {"data_type": "1"}),
]


@pytest.mark.parametrize(("field", "change"), PAGE_BAD, ids=[f"{f}={v}" for f, c in PAGE_BAD for v in c.values()])
def test_bad_page_data_field_named_with_header_index(field: str, change: dict[str, Any]) -> None:
    page = dataclasses.replace(H.PageData(gpa=0, compatibility_mask=1), **change)
    f = _model(page)
    for run in (f.validate, f.to_bytes):
        with pytest.raises(IgvmFormatError) as info:
            run()
        assert info.value.header_index == 4
        assert "PAGE_DATA" in str(info.value) and field in str(info.value)


@pytest.mark.parametrize("change", [{"gpa": 0xFFFF_FFFF_FFFF_F000}, {"compatibility_mask": 1, "flags": 0xFFFF_FFFF},
                                    {"data_type": 3}, {"data_type": True}, {"flags": D.PageDataFlags.UNMEASURED}])
def test_edge_page_data_values_accepted_and_round_trip(change: dict[str, Any]) -> None:
    page = dataclasses.replace(H.PageData(gpa=0, compatibility_mask=1), **change)
    f = _model(page)
    f.validate()
    back = IgvmFile.from_bytes(f.to_bytes())
    got = back.directives[-1]
    assert isinstance(got, H.PageData)
    assert (got.gpa, got.compatibility_mask, got.flags, got.data_type) == (
        page.gpa, page.compatibility_mask, int(page.flags), int(page.data_type))


def test_misplaced_header_still_named() -> None:
    plats = (H.SupportedPlatform(compatibility_mask=1, platform_type=D.PlatformType.NATIVE),)
    pages = tuple(H.PageData(gpa=i * 0x1000, compatibility_mask=1) for i in range(3))
    f = IgvmFile(platforms=plats, directives=(*pages, H.ParameterArea(parameter_area_index=0, number_of_bytes=0x1000),
                                              plats[0]))
    with pytest.raises(IgvmFormatError, match="SupportedPlatform is not a directive header") as info:
        f.validate()
    assert info.value.header_index == 5
