"""What QEMU 10.2.2's IGVM loader (``backends/igvm.c``) accepts: ``lint --loader qemu``.

Facts, read from QEMU 10.2.2 and checked by running the bundled QEMU (``tests/test_lint_qemu.py``
runs every header type and platform combination below under TCG and compares):

* QEMU links libigvm 0.4.0: a header type 0.4.0 does not know (CoRIM 0x104/0x105, CCA_POLICY
  0x106) makes the whole file unparsable ("Unable to parse IGVM file").
* Every initialization and directive header is dispatched by type, **whatever its compatibility
  mask**; a type without a handler ends the launch ("IGVM: Unknown header type encountered when
  processing file").  Handled: :data:`QEMU_HANDLED`.
* A file without directives is refused ("Invalid directive header count").
* The platform is chosen once: with a confidential-guest object the strongest of SEV-SNP, SEV-ES,
  SEV that the object supports (``sev-snp-guest``: all three; ``sev-guest``: SEV-ES if its policy
  has the ES bit, and SEV), else NATIVE; without one (TCG, or KVM without ``confidential-guest-
  support``) NATIVE only.  No platform left: "IGVM file does not describe a compatible supported
  platform".  The loader has no TDX support: a TDX platform is never chosen, and under a
  ``tdx-guest`` object a NATIVE platform fails at its first page ("Setting confidential guest
  state is not supported for this platform").  The confidential-guest cases are read from
  source (they need SEV or TDX hardware); only ``none`` is run in the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from igvm_builder.format.defs import HeaderType, PlatformType

if TYPE_CHECKING:
    from igvm_builder.format.file import IgvmFile

#: (severity "error" | "warning", message, header index or None): ``lint`` makes Findings of them.
Issue = tuple[str, str, int | None]

#: Header types QEMU 10.2.2 processes (every other one ends the launch).
QEMU_HANDLED = frozenset({
    HeaderType.SUPPORTED_PLATFORM, HeaderType.GUEST_POLICY, HeaderType.PAGE_DATA, HeaderType.VP_CONTEXT,
    HeaderType.PARAMETER_AREA, HeaderType.PARAMETER_INSERT, HeaderType.MEMORY_MAP, HeaderType.VP_COUNT_PARAMETER,
    HeaderType.ENVIRONMENT_INFO_PARAMETER, HeaderType.REQUIRED_MEMORY, HeaderType.SNP_ID_BLOCK,
})

#: Header types libigvm 0.4.0 (QEMU's) cannot parse at all.
UNKNOWN_TO_0_4_0 = frozenset({HeaderType.CORIM_DOCUMENT, HeaderType.CORIM_SIGNATURE, HeaderType.CCA_POLICY})

#: ``--qemu-guest`` values: the confidential-guest object QEMU runs with, and the platforms it can
#: then start, strongest first (QEMU picks the first the file has).
QEMU_GUESTS: dict[str, tuple[PlatformType, ...]] = {
    "none": (PlatformType.NATIVE,),
    "sev-snp": (PlatformType.SEV_SNP, PlatformType.SEV_ES, PlatformType.SEV, PlatformType.NATIVE),
    "sev-es": (PlatformType.SEV_ES, PlatformType.SEV, PlatformType.NATIVE),
    "sev": (PlatformType.SEV, PlatformType.NATIVE),
    "tdx": (),
}
#: What QEMU runs with for each value, for the messages.
_GUEST_TEXT = {
    "none": "without a confidential-guest object (TCG, or KVM without SEV)",
    "sev-snp": "with a sev-snp-guest object",
    "sev-es": "with a sev-guest object whose policy has the ES bit",
    "sev": "with a sev-guest object",
    "tdx": "with a tdx-guest object",
}
_REFUSAL = "IGVM file does not describe a compatible supported platform"


def qemu_findings(f: IgvmFile, guest: str = "any") -> list[Issue]:
    """QEMU 10.2.2's refusals for ``f`` launched with the confidential-guest object ``guest``
    (a :data:`QEMU_GUESTS` key, or ``any``: an error only when no object starts the file)."""
    out: list[Issue] = []
    sections = ((len(f.platforms), f.initializations, "initialization"),
                (len(f.platforms) + len(f.initializations), f.directives, "directive"))
    reported: set[HeaderType] = set()
    for base, headers, section in sections:
        for i, h in enumerate(headers):
            t = HeaderType(int(h.TYPE))
            if t in QEMU_HANDLED or t in reported:
                continue
            reported.add(t)
            if t in UNKNOWN_TO_0_4_0:
                why = (f"QEMU 10.2.2 (libigvm 0.4.0) does not know the {t.name} header (type {int(t):#x}): it "
                       "cannot parse the file")
            else:
                why = (f"QEMU 10.2.2 has no handler for the {t.name} {section} header (type {int(t):#x}) and "
                       "refuses the file whatever the header's compatibility mask")
            out.append(("error", why, base + i))
    if not f.directives:
        out.append(("error", "the file has no directive headers: QEMU 10.2.2 refuses it", None))
    have = [p.platform_type for p in f.platforms]
    names = ", ".join(t.name for t in have) or "none"
    if guest == "any":
        if not any(t in have for t in QEMU_GUESTS["sev-snp"]):
            out.append(("error", f"no platform QEMU 10.2.2 can start (the file has: {names}; QEMU starts NATIVE, "
                                 f"SEV, SEV-ES and SEV-SNP, never TDX, VBS or CCA): it refuses the file: "
                                 f"'{_REFUSAL}'", None))
        return out
    order = QEMU_GUESTS[guest]
    chosen = next((t for t in order if t in have), None)
    if guest == "tdx":
        out.append(("error", "QEMU 10.2.2's IGVM loader has no TDX support: with a tdx-guest object it starts no "
                             f"IGVM file (the file has: {names}; a NATIVE platform fails at its first page: "
                             "'Setting confidential guest state is not supported for this platform')", None))
    elif chosen is None:
        out.append(("error", f"no platform QEMU 10.2.2 can start {_GUEST_TEXT[guest]} (the file has: {names}; it "
                             f"starts {', '.join(t.name for t in order)}): it refuses the file: '{_REFUSAL}'", None))
    else:
        ignored = [t.name for t in have if t != chosen]
        if ignored:
            out.append(("warning", f"QEMU 10.2.2 {_GUEST_TEXT[guest]} starts the {chosen.name} platform; "
                                   f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored", None))
        if chosen == PlatformType.NATIVE and guest != "none":
            out.append(("warning", f"no SEV platform: QEMU {_GUEST_TEXT[guest]} falls back to the NATIVE platform, "
                                   "which is not a confidential launch", None))
    return out
