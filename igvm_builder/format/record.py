"""Declarative little-endian wire structures: one description per structure.

A :class:`Record` lists a structure's fields in layout order, each with its struct code and
the rules its value obeys (alignment, allowed values, an enum, non-zero, exactly one bit,
reserved-must-be-zero).  The same description packs, unpacks, checks what a writer is
given (:meth:`Record.problems`) and what a reader finds (:meth:`Record.unpack`), and names
every field and its byte offset for dumps; so what the writer accepts is what the reader
accepts.  Building a record is a few list operations (no dataclass machinery), so a module
that describes twenty structures still imports in well under a millisecond.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterator, Mapping
from enum import IntEnum
from typing import Any

from igvm_builder.errors import IgvmFormatError

#: Field kinds.  VALUE: a model field.  RESERVED: written as zero, must be zero when read.
#: PAD: written as zero, not read (the reference parser ignores it).  OFFSET: the absolute
#: file offset of the structure's data.  LENGTH: the byte length of that data.
VALUE, RESERVED, PAD, OFFSET, LENGTH = range(5)

_SIZES = {"B": 1, "H": 2, "I": 4, "Q": 8}


class Field:
    """One field of a :class:`Record` (use the constructors :func:`u8` ... :func:`raw`)."""

    __slots__ = ("align", "choices", "code", "enum", "hex", "kind", "limit", "name", "nonzero", "offset", "one_bit",
                 "size")

    def __init__(self, name: str, code: str, kind: int = VALUE, *, hex: bool = False, align: int = 0,
                 choices: tuple[int, ...] = (), enum: type[IntEnum] | None = None, nonzero: str = "",
                 one_bit: bool = False) -> None:
        self.name, self.code, self.kind, self.hex = name, code, kind, hex
        self.align, self.choices, self.enum, self.nonzero, self.one_bit = align, choices, enum, nonzero, one_bit
        if code[-1] == "s":
            self.size = int(code[:-1])
            self.limit = -1  # a byte string
        else:
            self.size = _SIZES[code]
            self.limit = (1 << (8 * self.size)) - 1
        self.offset = 0  # set by the Record

    @property
    def is_bytes(self) -> bool:
        return self.limit < 0

    def zero(self) -> int | bytes:
        return bytes(self.size) if self.limit < 0 else 0

    def problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be this field's value (None if it can)."""
        name = self.name
        if self.limit < 0:
            if not isinstance(value, bytes | bytearray | memoryview):
                return f"{name} must be {self.size} bytes, got {type(value).__name__}"
            if len(value) != self.size:
                return f"{name} must be {self.size} bytes, got {len(value)}"
            return None
        if not isinstance(value, int):
            return f"{name} must be an integer, got {type(value).__name__}"
        if value < 0 or value > self.limit:
            return f"{name} {value:#x} does not fit in {8 * self.size} bits"
        if self.nonzero and not value:
            return f"{name} is 0 ({self.nonzero})"
        if self.align and value % self.align:
            return f"{name} {value:#x} is not aligned to {self.align:#x}"
        if self.choices and value not in self.choices:
            allowed = " or ".join(str(c) for c in self.choices)
            return f"{name} {value} is invalid (must be {allowed})"
        if self.one_bit and (value == 0 or value & (value - 1)):
            return f"{name} {value:#x} must have exactly one bit set"
        if self.enum is not None and value not in self.enum._value2member_map_:
            return f"unknown {name} {value:#x}"
        return None


def u8(name: str, **rules: Any) -> Field:
    return Field(name, "B", **rules)


def u16(name: str, **rules: Any) -> Field:
    return Field(name, "H", **rules)


def u32(name: str, **rules: Any) -> Field:
    return Field(name, "I", **rules)


def u64(name: str, **rules: Any) -> Field:
    return Field(name, "Q", **rules)


def raw(name: str, size: int) -> Field:
    """A byte string of exactly ``size`` bytes."""
    return Field(name, f"{size}s")


def reserved(code: str, name: str = "reserved") -> Field:
    """Written as zero; a reader rejects a non-zero value."""
    return Field(name, code, RESERVED)


def pad(code: str, name: str = "reserved") -> Field:
    """Written as zero; a reader ignores it (the reference parser does not read it)."""
    return Field(name, code, PAD)


def file_offset(name: str = "file_offset") -> Field:
    return Field(name, "I", OFFSET, hex=True)


def data_length(name: str) -> Field:
    return Field(name, "I", LENGTH)


class Record:
    """A fixed-size little-endian structure described field by field.

    ``size`` is the size the specification gives; a description that does not add up to it
    fails at import time (the check survives ``python -O``).
    """

    __slots__ = ("by_name", "fields", "inserts", "name", "plan", "quick", "read_values", "size", "struct",
                 "struct_values", "values")

    def __init__(self, name: str, *fields: Field, size: int) -> None:
        self.name = name
        self.fields = fields
        self.struct = struct.Struct("<" + "".join(f.code for f in fields))
        offset = 0
        for f in fields:
            f.offset = offset
            offset += f.size
        if offset != size or self.struct.size != size:
            raise ImportError(f"{name} is described as {offset} bytes; the specification says {size}")
        self.size = size
        self.values = tuple(f for f in fields if f.kind == VALUE)
        self.by_name = {f.name: f for f in fields}
        #: (kind, name, zero, is a byte string) of every field, for :meth:`pack` of a mapping.
        self.plan = tuple((f.kind, f.name, f.zero(), f.limit < 0) for f in fields)
        #: For :meth:`pack` of an object whose VALUE fields are all integers: the same layout with
        #: RESERVED and PAD fields as struct pad bytes (written as zero, no argument), the VALUE
        #: fields read in one call, and where the OFFSET/LENGTH arguments go among them.
        self.struct_values: struct.Struct | None = None
        self.read_values: Callable[[object], tuple[Any, ...]] | None = None
        self.inserts: tuple[tuple[int, int], ...] = ()
        if self.values and all(f.limit >= 0 for f in self.values):
            self.struct_values = struct.Struct("<" + "".join(
                f"{f.size}x" if f.kind in (RESERVED, PAD) else f.code for f in fields))
            names = [f.name for f in self.values]
            getter = operator.attrgetter(*names)
            self.read_values = getter if len(names) > 1 else (lambda source: (getter(source),))
            args = [f.kind for f in fields if f.kind not in (RESERVED, PAD)]
            self.inserts = tuple((i, kind) for i, kind in enumerate(args) if kind in (OFFSET, LENGTH))
        #: The rules of the integer VALUE fields as (name, limit, align, allowed values, nonzero,
        #: one bit) for :meth:`accepts`; None when a VALUE field is a byte string.
        self.quick: tuple[tuple[str, int, int, frozenset[int] | None, bool, bool], ...] | None = None
        if all(f.limit >= 0 for f in self.values):
            self.quick = tuple(
                (f.name, f.limit, f.align,
                 frozenset(f.choices) if f.choices else
                 frozenset(f.enum._value2member_map_) if f.enum is not None else None,
                 bool(f.nonzero), f.one_bit)
                for f in self.values)

    # ------------------------------------------------------------------ writing

    def pack(self, source: object, *, file_offset: int = 0, length: int = 0) -> bytes:
        """Pack the VALUE fields read from ``source`` (a mapping, missing names are zero, or an
        object's attributes); OFFSET and LENGTH fields take ``file_offset`` and ``length``."""
        mapping = isinstance(source, Mapping)
        if not mapping and self.read_values is not None:
            try:
                if not self.inserts:
                    return self.struct_values.pack(*self.read_values(source))  # type: ignore[union-attr]
                args = list(self.read_values(source))
                for i, kind in self.inserts:
                    args.insert(i, file_offset if kind == OFFSET else length)
                return self.struct_values.pack(*args)  # type: ignore[union-attr]
            except struct.error:  # a value the caller did not check: name it
                for _field, message in self.problems(source):
                    raise IgvmFormatError(f"{self.name} {message}") from None
                raise
        out: list[Any] = []
        for kind, name, zero, is_bytes in self.plan:
            if kind == VALUE:
                value = source.get(name, zero) if mapping else getattr(source, name)  # type: ignore[attr-defined]
                out.append(bytes(value) if is_bytes else value)
            elif kind == OFFSET:
                out.append(file_offset)
            elif kind == LENGTH:
                out.append(length)
            else:
                out.append(zero)
        try:
            return self.struct.pack(*out)
        except struct.error:  # a value the caller did not check: name it
            for _field, message in self.problems(source):
                raise IgvmFormatError(f"{self.name} {message}") from None
            raise

    def problems(self, source: object) -> Iterator[tuple[Field, str]]:
        """Every VALUE field of ``source`` that the structure cannot hold, with the reason."""
        get = _getter(source)
        for f in self.values:
            message = f.problem(get(f))
            if message is not None:
                yield f, message

    def accepts(self, source: object) -> bool:
        """True when :meth:`problems` would find nothing in ``source`` (an object's attributes),
        tested without making a message: the writer's check of every header of a file.  False
        means "ask :meth:`problems`" (always so for a structure with byte-string fields)."""
        quick = self.quick
        if quick is None:
            return False
        for name, limit, align, allowed, nonzero, one_bit in quick:
            v = getattr(source, name)
            if (not isinstance(v, int) or v < 0 or v > limit or (align and v % align)
                    or (allowed is not None and v not in allowed) or (nonzero and not v)
                    or (one_bit and (not v or v & (v - 1)))):
                return False
        return True

    # ------------------------------------------------------------------ reading

    def unpack(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> dict[str, Any]:
        """Every field but the RESERVED and PAD ones by name; a VALUE field with an ``enum``
        becomes its member.  Raises IgvmFormatError (naming the field) for a non-zero
        reserved field or a value its rules forbid."""
        out: dict[str, Any] = {}
        for f, value in zip(self.fields, self.struct.unpack_from(buf, offset), strict=True):
            kind = f.kind
            if kind == VALUE:
                message = f.problem(value)
                if message is not None:
                    raise IgvmFormatError(f"{self.name} {message}")
                out[f.name] = f.enum(value) if f.enum is not None else value
            elif kind == RESERVED:
                if value if f.limit >= 0 else any(value):
                    shown = f"{value:#x}" if f.limit >= 0 else bytes(value).hex()
                    raise IgvmFormatError(f"{self.name} {f.name} must be zero, found {shown}")
            elif kind != PAD:
                out[f.name] = value
        return out

    def decode(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> dict[str, int | bytes]:
        """Every field by name, as stored (no rule applied): for dumps of what a file holds."""
        return {f.name: value for f, value in zip(self.fields, self.struct.unpack_from(buf, offset), strict=True)}

    def table(self) -> tuple[tuple[str, int, int], ...]:
        """(name, offset, size) of every field."""
        return tuple((f.name, f.offset, f.size) for f in self.fields)


def _getter(source: object) -> Any:
    if isinstance(source, Mapping):
        return lambda f: source.get(f.name, f.zero())
    return lambda f: getattr(source, f.name)
