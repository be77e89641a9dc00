"""Checks of an IGVM file's Arm CCA platform against the derived IGVM -> RMI mapping
(``shared/spec/CCA.md`` Part B): what would make its RIM differ from a VMM's, or a realm fail.

:func:`cca_findings` returns ``(severity, message, header index)`` triples; :mod:`igvm_builder.lint`
turns them into its findings (this module does not import it: no cycle between the two)."""

from __future__ import annotations

from igvm_builder.format import headers as H
from igvm_builder.format.defs import PageDataFlags, PageDataType, PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.measure.cca import REC_RUNNABLE, cca_context_fields, cca_policy, file_ipa_bits

#: (severity "error" or "warning", message, header index or None)
Finding = tuple[str, str, int | None]


def _f(severity: str, message: str, index: int | None = None) -> Finding:
    return (severity, message, index)


def cca_findings(f: IgvmFile) -> list[Finding]:
    out: list[Finding] = []
    n_plat = len(f.platforms)
    base = n_plat + len(f.initializations)
    for p in f.platforms:
        if p.platform_type != PlatformType.CCA:
            continue
        mask = p.compatibility_mask
        out.append(_f("warning", "CCA: no IGVM loader supports CCA yet; the RMI calls behind the RIM are "
                                      "derived (spec CCA.md Part B), not taken from a loader"))
        if cca_policy(f, mask) is None:
            out.append(_f("error", "CCA: no CCA_POLICY: the realm's hash algorithm is not given"))
        for i, h in enumerate(f.initializations, start=n_plat):
            if isinstance(h, H.RelocatableRegion | H.PageTableRelocation) and h.compatibility_mask & mask:
                out.append(_f("error", "CCA: relocation changes IPAs and so the RIM; a realm cannot be "
                                            "relocated", i))
        s2sz = file_ipa_bits(f, mask)
        if s2sz is None:
            out.append(_f("warning", f"CCA: shared_gpa_boundary {p.shared_gpa_boundary:#x} is not a power of "
                                          "two (1 << (IPA bits - 1)): the realm's IPA width must come from "
                                          "elsewhere to measure it"))
        limit = 1 << (s2sz - 1) if s2sz else None
        last = -1
        seen: set[int] = set()
        runnable0 = False
        for i, h in enumerate(f.directives, start=base):
            m = h.mask
            if m is not None and not m & mask:
                continue
            if isinstance(h, H.PageData):
                if h.flags & PageDataFlags.SHARED:
                    continue
                if h.data_type != PageDataType.NORMAL:
                    out.append(_f("warning", f"CCA: a {PageDataType(h.data_type).name} page at {h.gpa:#x} "
                                                  "is an SEV-SNP concept; a realm loader does not create it", i))
                    continue
                if limit is not None and h.gpa + 4096 > limit:
                    out.append(_f("error", f"CCA: page at {h.gpa:#x} is outside the protected IPA space "
                                                f"(below {limit:#x})", i))
                if h.gpa in seen:
                    out.append(_f("error", f"CCA: a second page at {h.gpa:#x}: RMI_DATA_CREATE fails on an "
                                                "assigned granule", i))
                seen.add(h.gpa)
                if h.gpa < last:
                    out.append(_f("warning", f"CCA: page at {h.gpa:#x} comes after {last:#x}: VMMs create "
                                                  "realm data in ascending IPA order, a loader following the file "
                                                  "order measures differently", i))
                last = max(last, h.gpa)
                if h.flags & PageDataFlags.UNMEASURED:
                    out.append(_f("warning", f"CCA: unmeasured page at {h.gpa:#x}: the realm cannot trust "
                                                  "its contents", i))
            elif isinstance(h, H.ParameterInsert):
                out.append(_f("warning", f"CCA: a parameter area inserted at {h.gpa:#x} is created "
                                              "unmeasured: the realm cannot trust it (a device tree belongs in "
                                              "measured page data)", i))
            elif isinstance(h, H.CcaVpContext) and h.vp_index == 0:
                runnable0 = bool(cca_context_fields(h)[2] & REC_RUNNABLE)
        if not runnable0:
            out.append(_f("warning", "CCA: vCPU 0 has no runnable VP context: the realm has nothing to run"))
    return out
