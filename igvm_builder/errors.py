"""The igvm-builder error hierarchy: the only place exceptions are defined.

Every error carries enough context to produce one line a person can act on: the
file (``source``), and where it applies the header index, byte offset, GPA,
config key or line.  :meth:`IgvmError.__str__` renders that line; the CLI
prints it and exits non-zero (tracebacks only with ``--debug``).
"""

from __future__ import annotations


class IgvmError(Exception):
    """Root of every error igvm-builder raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        header_index: int | None = None,
        offset: int | None = None,
        gpa: int | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.header_index = header_index
        self.offset = offset
        self.gpa = gpa
        self.key = key
        self.line = line

    def where(self) -> str:
        """Location prefix such as ``guest.igvm: header 12 (offset 0x168)``."""
        parts: list[str] = []
        loc = self.source or ""
        if self.line is not None:
            loc = f"{loc}:{self.line}" if loc else f"line {self.line}"
        if loc:
            parts.append(loc)
        if self.key is not None:
            parts.append(f"key '{self.key}'")
        if self.header_index is not None:
            parts.append(f"header {self.header_index}")
        if self.offset is not None:
            parts.append(f"offset {self.offset:#x}")
        if self.gpa is not None:
            parts.append(f"GPA {self.gpa:#x}")
        return ", ".join(parts)

    def with_source(self, source: str) -> IgvmError:
        """Return self with ``source`` filled in if it was not known yet."""
        if self.source is None:
            self.source = source
        return self

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


class IgvmFormatError(IgvmError, ValueError):
    """Bytes do not follow the IGVM format (or a rule the reference parser enforces)."""


class ConfigError(IgvmError, ValueError):
    """A build configuration is invalid (unknown key, wrong type, bad value)."""


class InputError(IgvmError):
    """An input (ELF, bzImage, UKI, OVMF, blob) cannot be used as asked."""


class LayoutError(IgvmError):
    """The launch plan is impossible: overlapping regions, GPA out of range, ..."""


class OutputError(IgvmError):
    """An output file cannot be written (missing directory, a directory in the way, disk full)."""


class MeasurementError(IgvmError):
    """A launch measurement cannot be computed for this file/platform/loader."""


class SigningError(IgvmError):
    """Signing failed: wrong key type or curve, key source failure, bad signature."""


class VerificationError(IgvmError):
    """A signature, digest, policy or reference value does not verify."""


class ReproducibilityError(IgvmError):
    """Two builds from the same inputs differ."""
