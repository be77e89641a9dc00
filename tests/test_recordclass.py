"""igvm_builder.recordclass against the standard library's dataclasses as the oracle.

Each case declares the same class twice, as ``@dataclass(frozen=True, slots=True, ...)`` and as
``@record(...)``, and checks that the two behave alike: construction (positional, keyword-only,
defaults, default factories, ``__post_init__``), the errors of a wrong call, equality and hashing
(``compare=False`` fields left out), repr, frozen attributes, ``__slots__``, ``__match_args__``,
pickling and copying, and ``replace`` / ``fields``; and that the ``dataclasses`` functions work on
records too.  The header classes themselves are exercised by every format test.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any, ClassVar

import pytest

from igvm_builder.format import headers as H
from igvm_builder.recordclass import MISSING, field, fields, is_record, record, replace


def _pair(kw_only: bool) -> tuple[type[Any], type[Any]]:
    """The same class as a dataclass and as a record."""

    def body(dc: bool) -> type[Any]:
        fld: Any = dataclasses.field if dc else field

        class Thing:
            KIND: ClassVar[str] = "thing"
            a: int
            b: int = 2
            c: tuple[int, ...] = fld(default_factory=tuple)
            note: str = fld(default="", compare=False, repr=False)

            def __post_init__(self) -> None:
                if self.a < 0:
                    raise ValueError(f"a is {self.a}")

            def total(self) -> int:
                return self.a + self.b + sum(self.c)

        if dc:
            return dataclasses.dataclass(frozen=True, slots=True, kw_only=kw_only)(Thing)
        return record(kw_only=kw_only)(Thing)

    return body(True), body(False)


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {"a": 1}),
    ((), {"a": 1, "b": 5, "c": (1, 2), "note": "x"}),
    ((), {"a": 1, "note": "other"}),
    ((1,), {}),
    ((1, 2, (3,)), {}),
    ((1, 2, (3,), "n"), {}),
    ((), {}),
    ((), {"a": 1, "d": 4}),
    ((1,), {"a": 1}),
    ((), {"a": -1}),
]


def _outcome(cls: type[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return type(exc)


@pytest.mark.parametrize("kw_only", [False, True])
def test_construction_equality_hash_repr_agree_with_dataclasses(kw_only: bool) -> None:
    dc, rc = _pair(kw_only)
    made = []
    for args, kwargs in CALLS:
        d, r = _outcome(dc, args, kwargs), _outcome(rc, args, kwargs)
        if isinstance(d, type):  # the call is refused: by both, with the same kind of error
            assert r is d, (args, kwargs)
            continue
        assert not isinstance(r, type), (args, kwargs, r)
        assert repr(r) == repr(d)
        assert [getattr(r, f.name) for f in fields(r)] == [getattr(d, f.name) for f in dataclasses.fields(d)]
        assert r.total() == d.total() and r.KIND == "thing"
        made.append((d, r))
    assert made
    for d1, r1 in made:
        for d2, r2 in made:
            assert (r1 == r2) == (d1 == d2)
            assert (hash(r1) == hash(r2)) or not (d1 == d2)
    assert rc(a=1) != dc(a=1) and rc(a=1) != (1, 2, ())  # another class compares unequal
    assert rc.__slots__ == dc.__slots__ == ("a", "b", "c", "note")
    assert rc.__match_args__ == dc.__match_args__
    assert [(p.name, p.kind) for p in inspect.signature(rc).parameters.values()] == \
        [(p.name, p.kind) for p in inspect.signature(dc).parameters.values()]
    assert [(f.name, f.default, f.default_factory, f.compare, f.repr, f.kw_only) for f in fields(rc)] == [
        (f.name, f.default if f.default is not dataclasses.MISSING else MISSING,
         f.default_factory if f.default_factory is not dataclasses.MISSING else MISSING, f.compare, f.repr, f.kw_only)
        for f in dataclasses.fields(dc)]


@record(kw_only=True)
class Pickled:  # at module level: pickle finds a class by its name
    a: int
    c: tuple[int, ...] = field(default_factory=tuple)
    note: str = field(default="", compare=False)


def test_frozen_slotted_and_picklable() -> None:
    rc = Pickled
    r = rc(a=1, c=(4,), note="n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.a = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del r.b
    with pytest.raises(AttributeError):
        r.__dict__  # noqa: B018  (slots: no instance dictionary)
    for other in (pickle.loads(pickle.dumps(r)), copy.copy(r), copy.deepcopy(r)):
        assert other == r and other.note == "n" and type(other) is rc


def test_replace_and_fields() -> None:
    _dc, rc = _pair(False)
    r = rc(1, note="n")
    assert replace(r, b=7) == rc(1, 7) and replace(r, b=7).note == "n"
    assert r.__replace__(b=7) == replace(r, b=7)  # what copy.replace calls (Python >= 3.13)
    with pytest.raises(ValueError, match="a is -1"):  # __post_init__ runs again
        replace(r, a=-1)
    with pytest.raises(TypeError):
        replace(r, nope=1)
    assert fields(rc) == fields(r)
    assert is_record(r) and is_record(rc) and not is_record(1)
    with pytest.raises(TypeError):
        fields(1)


def test_dataclasses_functions_work_on_records() -> None:
    _dc, rc = _pair(True)
    r = rc(a=1, c=(2,))
    assert dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(r)] == ["a", "b", "c", "note"]
    assert dataclasses.replace(r, b=3) == rc(a=1, b=3, c=(2,))
    assert dataclasses.asdict(r) == {"a": 1, "b": 2, "c": (2,), "note": ""}
    page = H.PageData(gpa=0x1000, compatibility_mask=1, data=b"x")
    assert dataclasses.replace(page, gpa=0x2000) == replace(page, gpa=0x2000)
    doc = H.CorimDocument(compatibility_mask=1, data=b"c")  # a subclass that adds no field
    assert [f.name for f in dataclasses.fields(doc)] == [f.name for f in fields(doc)] == ["compatibility_mask", "data"]


def test_inheritance_and_subclasses_without_fields() -> None:
    @record(kw_only=True)
    class Base:
        mask: int
        gpa: int = 0

    @record(kw_only=True)
    class Child(Base):
        gpa: int = 0x1000  # a redefined field keeps its place
        data: bytes

    class Plain(Child):
        __slots__ = ()

    c = Child(mask=1, data=b"d")
    assert [f.name for f in fields(c)] == ["mask", "gpa", "data"] and c.gpa == 0x1000
    assert Child.__slots__ == ("data",)  # the base's slots are not repeated
    p = Plain(mask=1, data=b"d")
    assert p != c and p == Plain(mask=1, data=b"d") and repr(p).endswith(".Plain(mask=1, gpa=4096, data=b'd')")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mask = 2


def test_positional_field_order_rule() -> None:
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument 'a'"):
        @record
        class Bad:
            a: int = 0
            b: int

    @record
    class Fine:  # a keyword-only field may come after one with a default
        a: int = 0
        b: int = field(kw_only=True)

    assert Fine(b=1) == Fine(0, b=1)


def test_header_classes_are_records_with_their_layout_fields() -> None:
    """Every header class's fields (but its file data) are the VALUE fields of its wire layout."""
    classes = {c for c in vars(H).values() if isinstance(c, type) and issubclass(c, H.Header)}
    assert len(classes) > 20
    for cls in classes:
        assert is_record(cls), cls
        names = [f.name for f in fields(cls)]
        layout = [f.name for f in cls.BODY.values] if hasattr(cls, "BODY") else []
        assert set(layout) <= set(names), cls
        assert cls.__dictoffset__ == 0, cls  # slotted: no instance dictionary


def _init_false_pair() -> tuple[type[Any], type[Any]]:
    """A class with ``init=False`` fields (from a factory, from a default, and with neither), as a
    dataclass and as a record."""

    def body(dc: bool) -> type[Any]:
        fld: Any = dataclasses.field if dc else field

        class Cached:
            a: int
            b: int = 2
            cache: dict[str, int] = fld(default_factory=dict, init=False, compare=False, repr=False)
            count: int = fld(default=0, init=False)
            late: int = fld(init=False, repr=False, compare=False)  # no default after defaults: no parameter

            def __post_init__(self) -> None:
                self.cache["a"] = self.a  # the factory's value is there before __post_init__

        if dc:
            return dataclasses.dataclass(frozen=True, slots=True)(Cached)
        return record(Cached)

    return body(True), body(False)


def test_init_false_fields_agree_with_dataclasses() -> None:
    dc, rc = _init_false_pair()
    assert [(p.name, p.kind, p.default) for p in inspect.signature(rc).parameters.values()] == \
        [(p.name, p.kind, p.default) for p in inspect.signature(dc).parameters.values()]
    assert rc.__match_args__ == dc.__match_args__ == ("a", "b")
    assert rc.__slots__ == dc.__slots__
    d, r = dc(1), rc(1)
    assert repr(r) == repr(d).replace(dc.__qualname__, rc.__qualname__)
    assert (r.cache, r.count) == (d.cache, d.count) == ({"a": 1}, 0)
    assert r.cache is not rc(1).cache  # one dict per instance
    for obj in (d, r):
        with pytest.raises(AttributeError):
            obj.late  # noqa: B018  (left unset by both)
    assert r == rc(1) and r != rc(1, 3) and hash(r) == hash(rc(1))
    for cls in (dc, rc):
        with pytest.raises(TypeError):
            cls(1, 2, {})  # not a parameter
        with pytest.raises(TypeError):
            cls(1, count=3)
    with pytest.raises(ValueError, match="init=False"):
        dataclasses.replace(d, count=1)
    with pytest.raises(ValueError, match="init=False"):
        replace(r, count=1)
    moved = replace(r, b=5)
    assert (moved.a, moved.b, moved.cache, moved.count) == (1, 5, {"a": 1}, 0)
    assert [(f.name, f.init) for f in fields(rc)] == [(f.name, f.init) for f in dataclasses.fields(dc)]
    assert [(f.name, f.init) for f in dataclasses.fields(r)] == [(f.name, f.init) for f in dataclasses.fields(d)]
    assert dataclasses.replace(r, b=5) == moved


def test_mutable_record_agrees_with_a_plain_dataclass() -> None:
    """``frozen=False``: assignable fields, equality, and no hash (as ``@dataclass`` with eq)."""

    @dataclasses.dataclass
    class D:
        start: int
        what: str = ""

    @record(frozen=False)
    class R:
        start: int
        what: str = ""

    d, r = D(1, "x"), R(1, "x")
    d.start, r.start = 2, 2
    assert (r.start, r.what) == (d.start, d.what) and r == R(2, "x") and r != R(2)
    assert repr(r).endswith("R(start=2, what='x')") and repr(d).endswith("D(start=2, what='x')")
    assert R.__hash__ is D.__hash__ is None
    with pytest.raises(TypeError):
        hash(r)


def test_record_over_an_abstract_mapping() -> None:
    """A record can be a :class:`collections.abc.Mapping` (whose bases are slotted), with an
    ``init=False`` store filled by ``__post_init__`` (what ``reference.ReferenceValues`` is)."""
    from collections.abc import Iterator, Mapping

    @record
    class Doc(Mapping[str, int]):
        a: int
        _doc: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

        def __post_init__(self) -> None:
            self._doc["a"] = self.a

        def __getitem__(self, key: str) -> int:
            return self._doc[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self._doc)

        def __len__(self) -> int:
            return len(self._doc)

    doc = Doc(3)
    assert dict(doc) == {"a": 3} and doc == Doc(3) and doc != Doc(4) and isinstance(doc, Mapping)
    assert repr(doc).endswith("Doc(a=3)") and Doc.__dictoffset__ == 0
    assert hash(doc) == hash(Doc(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        doc.a = 1  # type: ignore[misc]
