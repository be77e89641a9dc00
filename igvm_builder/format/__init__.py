"""The IGVM file format: model, parser, validator, canonical serializer."""

from igvm_builder.format import defs, headers
from igvm_builder.format.blob import FileSlice, as_view
from igvm_builder.format.file import IgvmFile

__all__ = ["FileSlice", "IgvmFile", "as_view", "defs", "headers"]
