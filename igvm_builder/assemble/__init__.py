"""Build an IGVM file from a :class:`~igvm_builder.config.BuildConfig`.

The flow is config -> inputs -> one launch plan per platform -> merge -> IgvmFile:

1. Each platform gets its own ordered list of directives (what that platform's loader must
   import, in order), built from the inputs by :class:`_PlatformPlan`.
2. The lists are merged into one directive sequence in which a header identical on several
   platforms is stored once with a multi-bit compatibility mask, and every platform's
   projection is exactly its own list.  Each platform's launch digest is therefore the
   same as that of a single-platform build.
3. The result is measured (reference values) and serialized canonically.

OVMF launches follow ``shared/spec/MEASUREMENT.md`` §7.1 (SNP) and §8.3 (TDX) so that the
SNP digest equals sev-snp-measure's on ZERO-type loaders and the TDX MRTD equals td-shim's.
Kernel launches (ELF with or without a PVH note, bzImage, UKI) boot without firmware:
boot structures live in low memory, and TDX gets a reset-vector trampoline.

Modules: :mod:`.mapped` (inputs mapped once, their SHA-256s in the background, zero-copy
windows), :mod:`.plan` (a platform's launch plan, page runs, the low-memory layout),
:mod:`.launch` (firmware and kernel launches), :mod:`.merge` (one directive list with
compatibility masks), :mod:`.pipeline` (layout, streamed write and measurement in threads,
reference values).
"""

from __future__ import annotations

from igvm_builder.assemble.mapped import WINDOW
from igvm_builder.assemble.merge import merge_directives
from igvm_builder.assemble.pipeline import (
           BUILD_SWITCH_INTERVAL,
           BuildResult,
           build,
           build_file,
           reference_values_for,
)
from igvm_builder.assemble.plan import page_headers

__all__ = ["BUILD_SWITCH_INTERVAL", "WINDOW", "BuildResult", "build", "build_file", "merge_directives", "page_headers",
           "reference_values_for"]
