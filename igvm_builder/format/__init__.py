"""The IGVM file format: model, parser, validator, canonical serializer.

``IgvmFile``, ``FileSlice``, ``as_view``, ``defs`` and ``headers`` are re-exported lazily: importing
``igvm_builder.format.defs`` (the constants, all that the config loader, the SCons scanner and the
CLI's argument types need) does not build the header classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FileSlice", "IgvmFile", "as_view", "defs", "headers"]

_EXPORTS = {
    "FileSlice": "igvm_builder.format.blob",
    "as_view": "igvm_builder.format.blob",
    "IgvmFile": "igvm_builder.format.file",
}


def __getattr__(name: str) -> Any:
    if name in ("defs", "headers"):
        value: Any = importlib.import_module(f"{__name__}.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


if TYPE_CHECKING:
    from igvm_builder.format import defs, headers
    from igvm_builder.format.blob import FileSlice, as_view
    from igvm_builder.format.file import IgvmFile
