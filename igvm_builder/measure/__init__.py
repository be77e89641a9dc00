"""Launch measurements of IGVM files: SEV-SNP, TDX MRTD, VBS, SEV and SEV-ES.

Every function takes an :class:`~igvm_builder.format.IgvmFile` and returns bytes or
frozen records; nothing here prints.  All platforms present in a file are measured
in one pass over its pages (:func:`measure_file`), so a large file is read once.
"""

from igvm_builder.measure.engine import measure_file, measure_platform
from igvm_builder.measure.profiles import DEFAULT_LOADER, PROFILES, LoaderProfile, get_profile
from igvm_builder.measure.result import Measurement

__all__ = ["DEFAULT_LOADER", "PROFILES", "LoaderProfile", "Measurement", "get_profile", "measure_file",
           "measure_platform"]
