"""igvm-builder: build, measure, sign and verify IGVM confidential-VM launch images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["IgvmError", "IgvmFile", "__version__"]


def __getattr__(name: str) -> Any:  # lazy re-exports keep `import igvm_builder` cheap
    if name == "IgvmFile":
        from igvm_builder.format.file import IgvmFile

        return IgvmFile
    if name == "IgvmError":
        from igvm_builder.errors import IgvmError

        return IgvmError
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("igvm-builder")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(name)


if TYPE_CHECKING:
    from igvm_builder.errors import IgvmError
    from igvm_builder.format.file import IgvmFile
