"""The IGVM file format: model, parser, validator, canonical serializer.

``IgvmFile``, ``FileSlice``, ``as_view``, ``defs`` and ``headers`` are re-exported lazily: importing
``igvm_builder.format.defs`` (the constants, all that the config loader, the SCons scanner and the
CLI's argument types need) does not build the header classes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

__all__ = ["FileSlice", "IgvmFile", "as_view", "defs", "headers"]

_EXPORTS = {
    "FileSlice": "igvm_builder.format.blob",
    "as_view": "igvm_builder.format.blob",
    "IgvmFile": "igvm_builder.format.file",
}


def __getattr__(name: str) -> Any:
    # __import__, not importlib.import_module: the import statement's path, which
    # ``python -X importtime`` reports
    if name in ("defs", "headers"):
        __import__(f"{__name__}.{name}")
        value: Any = sys.modules[f"{__name__}.{name}"]
    elif name in _EXPORTS:
        __import__(_EXPORTS[name])
        value = getattr(sys.modules[_EXPORTS[name]], name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


if TYPE_CHECKING:
    from igvm_builder.format import defs, headers
    from igvm_builder.format.blob import FileSlice, as_view
    from igvm_builder.format.file import IgvmFile
