"""Frozen, slotted record classes, made without the :mod:`dataclasses` machinery.

``@record`` turns a class whose fields are annotated (``name: type [= default]``) into a record:
``__slots__`` for its fields, ``__init__`` (positional or keyword-only arguments, defaults,
``field(default_factory=...)``, ``field(init=False)`` fields set from their default or left unset,
then ``__post_init__`` when the class has one), ``__eq__`` and
``__hash__`` over the compared fields, ``__repr__``, ``__match_args__`` and, frozen (the default),
a ``__setattr__`` / ``__delattr__`` that refuse (``dataclasses.FrozenInstanceError``) with pickling
and copying support.  It is what ``@dataclass(frozen=True, slots=True)`` makes, but costs a few
dictionary operations per class (and one small ``exec``, the ``__init__``, when the first instance
is made) instead of the
``dataclasses`` module and its ``inspect``/``ast``/``copy`` imports and per-class code generation:
the header classes of :mod:`igvm_builder.format.headers` are on the start-up path of every command.

:func:`fields` and :func:`replace` are the equivalents of ``dataclasses.fields`` and
``dataclasses.replace``.  The ``dataclasses`` functions work on records too (``fields``, ``replace``,
``asdict``, ``is_dataclass``): a record's ``__dataclass_fields__`` is built, with ``dataclasses``
imported, the first time something asks for it.

The decorator is marked with :func:`typing.dataclass_transform`, so type checkers see the generated
``__init__`` and the frozen attributes as they do for a dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, TypeVar, dataclass_transform, overload

__all__ = ["MISSING", "Field", "field", "fields", "is_record", "record", "replace"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: No default (a field that must be given).
MISSING: Any = _Missing()


class Field:
    """One field of a record: its name, annotation (as written) and options."""

    __slots__ = ("compare", "default", "default_factory", "init", "kw_only", "name", "repr", "type")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING, compare: bool = True,
                 repr: bool = True, kw_only: bool | None = None, init: bool = True) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot give both default and default_factory")
        self.name = ""
        self.type: Any = None
        self.default = default
        self.default_factory = default_factory
        self.compare = compare
        self.repr = repr
        self.kw_only = kw_only
        self.init = init

    def _copy(self) -> Field:
        new = Field(self.default, self.default_factory, self.compare, self.repr, self.kw_only, self.init)
        new.name, new.type = self.name, self.type
        return new

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING or self.default_factory is not MISSING

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r}, type={self.type!r}, default={self.default!r}, "
                f"default_factory={self.default_factory!r}, compare={self.compare}, repr={self.repr}, "
                f"kw_only={self.kw_only}, init={self.init})")


@overload
def field(*, default: _T, compare: bool = True, repr: bool = True, kw_only: bool | None = None,
          init: bool = True) -> _T: ...
@overload
def field(*, default_factory: Callable[[], _T], compare: bool = True, repr: bool = True,
          kw_only: bool | None = None, init: bool = True) -> _T: ...
@overload
def field(*, compare: bool = True, repr: bool = True, kw_only: bool | None = None, init: bool = True) -> Any: ...
def field(*, default: Any = MISSING, default_factory: Any = MISSING, compare: bool = True, repr: bool = True,
          kw_only: bool | None = None, init: bool = True) -> Any:
    """A field's options: ``compare=False`` leaves it out of ``==`` and ``hash``, ``repr=False`` out
    of the repr, ``kw_only`` makes it keyword-only in a positional record (or not in a keyword-only one),
    ``init=False`` out of ``__init__``'s parameters (``__init__`` sets it from its default or default
    factory, or leaves it unset when it has neither) and of :func:`replace`'s changes."""
    return Field(default, default_factory, compare, repr, kw_only, init)


def _is_classvar(annotation: object) -> bool:
    if isinstance(annotation, str):
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    return annotation is ClassVar or getattr(annotation, "__origin__", None) is ClassVar


def _frozen_error(name: str) -> AttributeError:
    from dataclasses import FrozenInstanceError  # only on this error path

    return FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise _frozen_error(name)


def _frozen_delattr(self: object, name: str) -> None:
    raise _frozen_error(name)


def _setstate(self: object, state: tuple[Any, ...]) -> None:
    for f, value in zip(type(self).__record_fields__, state, strict=True):  # type: ignore[attr-defined]
        object.__setattr__(self, f.name, value)


# The methods every record shares; what differs between classes is in class attributes:
# __record_fields__, __record_compare__ (the compared fields' values as a tuple) and
# __record_repr__ (the names the repr shows).

def _getstate(self: object) -> tuple[Any, ...]:
    return tuple(getattr(self, f.name) for f in type(self).__record_fields__)  # type: ignore[attr-defined]


def _eq(self: object, other: object) -> object:  # bool, or NotImplemented for another class
    if other.__class__ is self.__class__:
        compared = type(self).__record_compare__  # type: ignore[attr-defined]
        return compared(self) == compared(other)
    return NotImplemented


def _hash(self: object) -> int:
    return hash(type(self).__record_compare__(self))  # type: ignore[attr-defined]


def _repr(self: object) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self).__record_repr__)  # type: ignore[attr-defined]
    return f"{self.__class__.__qualname__}({inner})"


_eq.__name__, _hash.__name__, _repr.__name__ = "__eq__", "__hash__", "__repr__"
_getstate.__name__, _setstate.__name__ = "__getstate__", "__setstate__"


class _DataclassFields:
    """A record's ``__dataclass_fields__`` for the ``dataclasses`` functions, made when first asked
    for (from a throwaway dataclass of the same fields) and then kept on the class."""

    def __get__(self, obj: object, owner: type) -> dict[str, Any]:
        import dataclasses

        spec = []
        for f in owner.__record_fields__:  # type: ignore[attr-defined]
            options: dict[str, Any] = {"compare": f.compare, "repr": f.repr, "kw_only": f.kw_only, "init": f.init}
            if f.default is not MISSING:
                options["default"] = f.default
            elif f.default_factory is not MISSING:
                options["default_factory"] = f.default_factory
            spec.append((f.name, f.type, dataclasses.field(**options)))
        shadow: Any = dataclasses.make_dataclass(owner.__name__, spec)
        found: dict[str, Any] = shadow.__dataclass_fields__
        type.__setattr__(owner, "__dataclass_fields__", found)
        return found


_DATACLASS_FIELDS = _DataclassFields()


def _collect(cls: type, kw_only: bool) -> tuple[tuple[Field, ...], list[str]]:
    """Every field of ``cls`` (its record bases' first, a redefined one where it first appeared)
    and the names of those ``cls`` itself annotates."""
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in base.__dict__.get("__record_fields__", ()):
            found[f.name] = f
    annotations: dict[str, Any] = cls.__annotations__  # its own (Python >= 3.10), not inherited
    own = []
    for name, annotation in annotations.items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, MISSING)
        f = value._copy() if isinstance(value, Field) else Field(default=value)
        f.name, f.type = name, annotation
        if f.kw_only is None:
            f.kw_only = kw_only
        found[name] = f
        own.append(name)
    return tuple(found.values()), own


def _init_source(all_fields: tuple[Field, ...], post_init: bool, setters: list[Callable[[object, Any], None]] | None
                 ) -> tuple[str, dict[str, Any]]:
    """``__init__``'s text and the names it uses; ``setters``: those of the slots of a frozen record."""
    self = "__record_self__" if any(f.name == "self" for f in all_fields) else "self"
    names: dict[str, Any] = {"__record_missing__": MISSING}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for i, f in enumerate(all_fields):
        if f.default_factory is not MISSING:
            names[f"__record_factory{i}__"] = f.default_factory
            param = f"{f.name}=__record_missing__"
            value = f"__record_factory{i}__() if {f.name} is __record_missing__ else {f.name}"
            if not f.init:
                value = f"__record_factory{i}__()"
        elif f.default is not MISSING:
            names[f"__record_default{i}__"] = f.default
            param, value = f"{f.name}=__record_default{i}__", f.name
            if not f.init:
                value = f"__record_default{i}__"
        elif not f.init:
            continue  # not a parameter and no default: left unset, as a dataclass leaves it
        else:
            param, value = f.name, f.name
        if f.init:
            (keyword if f.kw_only else positional).append(param)
        if setters is None:
            body.append(f"{self}.{f.name} = {value}")
        else:
            names[f"__record_set{i}__"] = setters[i]
            body.append(f"__record_set{i}__({self}, {value})")
    if post_init:
        body.append(f"{self}.__post_init__()")
    params = ", ".join([self, *positional, *(["*", *keyword] if keyword else [])])
    text = f"def __init__({params}) -> None:\n    " + "\n    ".join(body or ["pass"]) + "\n"
    return text, names


def _make_init(cls: type, all_fields: tuple[Field, ...], frozen: bool) -> Callable[..., None]:
    # a frozen record's __init__ stores through the slots' own descriptors (around its __setattr__)
    setters = [getattr(cls, f.name).__set__ for f in all_fields] if frozen else None
    text, names = _init_source(all_fields, hasattr(cls, "__post_init__"), setters)
    exec(text, names)  # the one generated function: its arguments are the fields
    init: Callable[..., None] = names["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return init


class _LazyInit:
    """A record's ``__init__`` until first looked up (the first instance, or ``inspect.signature``):
    then the generated function, which replaces it on the class.  Classes a command never
    instantiates (most header types) never compile theirs."""

    __slots__ = ("cls", "fields", "frozen")

    def __init__(self, cls: type, all_fields: tuple[Field, ...], frozen: bool) -> None:
        self.cls, self.fields, self.frozen = cls, all_fields, frozen

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        init = _make_init(self.cls, self.fields, self.frozen)
        type.__setattr__(self.cls, "__init__", init)
        return init if obj is None else init.__get__(obj, owner)


def _check_order(all_fields: tuple[Field, ...]) -> None:
    """Refuse, as a dataclass does, a positional field without a default after one with a default."""
    seen_default = None
    for f in all_fields:
        if f.kw_only or not f.init:
            continue
        if f.has_default:
            seen_default = f.name
        elif seen_default is not None:
            raise TypeError(f"non-default argument {f.name!r} follows default argument {seen_default!r}")


def _getter(names: list[str]) -> Callable[[object], tuple[Any, ...]]:
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _process(cls: type[_R], kw_only: bool, frozen: bool) -> type[_R]:
    if "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: a record makes its own __slots__")
    all_fields, own = _collect(cls, kw_only)
    _check_order(all_fields)
    slotted: set[str] = set()
    for base in cls.__mro__[1:]:
        slots = base.__dict__.get("__slots__", ())
        slotted.update((slots,) if isinstance(slots, str) else slots)
    ns = dict(cls.__dict__)
    for name in own:
        ns.pop(name, None)  # the defaults live in __record_fields__ and __init__
    ns.pop("__dict__", None)
    ns.pop("__weakref__", None)
    ns["__slots__"] = tuple(name for name in own if name not in slotted)
    ns["__record_fields__"] = all_fields
    ns["__match_args__"] = tuple(f.name for f in all_fields if f.init and not f.kw_only)
    ns["__dataclass_fields__"] = _DATACLASS_FIELDS
    ns["__replace__"] = replace  # copy.replace (Python >= 3.13)
    ns["__record_compare__"] = _getter([f.name for f in all_fields if f.compare])
    ns["__record_repr__"] = tuple(f.name for f in all_fields if f.repr)
    if "__eq__" not in cls.__dict__:
        ns["__eq__"] = _eq
        if frozen:
            ns["__hash__"] = _hash
        elif cls.__dict__.get("__hash__", None) is None:
            ns["__hash__"] = None
    if "__repr__" not in cls.__dict__:
        ns["__repr__"] = _repr
    if frozen:
        ns["__setattr__"] = _frozen_setattr
        ns["__delattr__"] = _frozen_delattr
        ns["__getstate__"] = _getstate
        ns["__setstate__"] = _setstate
    metaclass: Any = type(cls)
    new: type[_R] = metaclass(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    if "__init__" not in cls.__dict__:
        type.__setattr__(new, "__init__", _LazyInit(new, all_fields, frozen))
    return new


@overload
def record(cls: type[_R], /) -> type[_R]: ...
@overload
def record(*, kw_only: bool = False, frozen: bool = True) -> Callable[[type[_R]], type[_R]]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def record(cls: type[_R] | None = None, /, *, kw_only: bool = False, frozen: bool = True
           ) -> type[_R] | Callable[[type[_R]], type[_R]]:
    """Make ``cls`` a record (``@record`` or ``@record(kw_only=True)``); see the module's text.

    A subclass of a record that adds no field need not be decorated: it inherits everything
    (give it ``__slots__ = ()`` to keep it slotted).  The class is made anew (as
    ``dataclass(slots=True)`` does), so its methods cannot use zero-argument ``super()``.
    """
    if cls is None:
        return lambda c: _process(c, kw_only, frozen)
    return _process(cls, kw_only, frozen)


def is_record(obj: object) -> bool:
    """True for a record class or instance."""
    return hasattr(obj if isinstance(obj, type) else type(obj), "__record_fields__")


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record class or instance, in ``__init__`` order."""
    found: tuple[Field, ...] | None = getattr(obj if isinstance(obj, type) else type(obj), "__record_fields__",
                                             None)
    if found is None:
        raise TypeError(f"{obj!r} is not a record")
    return found


def replace(obj: _R, /, **changes: Any) -> _R:
    """A copy of the record ``obj`` with ``changes``, made by its ``__init__`` (so
    ``__post_init__`` checks it again); an ``init=False`` field cannot be changed (``ValueError``,
    as ``dataclasses.replace`` says) and the copy gets it from ``__init__``."""
    for f in fields(obj):
        if not f.init:
            if f.name in changes:
                raise ValueError(f"field {f.name} is declared with init=False, it cannot be specified with replace()")
            continue
        if f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return obj.__class__(**changes)
