"""Command-line options giving what a CCA file's RIM needs and the file does not carry: the realm
parameters (but the hash) and the guest RAM.  Light at import: the CLI's ``--help`` stays fast."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from igvm_builder.format import IgvmFile
    from igvm_builder.measure.cca import Realm


def _size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(t[:-1], 0) << units[t[-1]]
    return int(t, 0)


def _ram(text: str) -> tuple[int, int]:
    try:
        base, size = text.split(":", 1)
        return int(base, 0), _size(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not BASE:SIZE (e.g. 0x40000000:512M)") from None


def add_cca_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "Arm CCA realm (the RIM needs these; an IGVM file does not carry them)",
        "Give --cca-realm with the reference values of the build (or a JSON realm), or --cca-ram with "
        "--cca-breakpoints and --cca-watchpoints; the IPA width defaults to the file's shared_gpa_boundary "
        "(1 << (bits - 1)). The hash algorithm is always the file's CCA_POLICY.")
    g.add_argument("--cca-realm", metavar="REF.json",
                   help="reference values with a platforms.cca.realm entry (igvm-builder build), or that realm")
    g.add_argument("--cca-ram", metavar="BASE:SIZE", type=_ram, action="append",
                   help="guest RAM range (repeatable), e.g. 0x80000000:512M")
    g.add_argument("--cca-ipa-bits", metavar="N", type=int, help="the realm's IPA width (s2sz)")
    g.add_argument("--cca-breakpoints", metavar="N", type=int, help="hardware breakpoints (2..64)")
    g.add_argument("--cca-watchpoints", metavar="N", type=int, help="hardware watchpoints (2..64)")
    g.add_argument("--cca-sve-vl", metavar="BITS", type=int, default=0, help="SVE vector length (0 = off)")
    g.add_argument("--cca-pmu-counters", metavar="N", type=int,
                   help="enable the PMU with N event counters (default: PMU off)")
    g.add_argument("--cca-lpa2", action="store_true", help="LPA2 (52-bit IPAs)")


def realm_from_args(args: argparse.Namespace, f: IgvmFile) -> Realm | None:
    """The realm the options describe, or None when none was given (or the file has no CCA platform).

    Raises:
        MeasurementError: incomplete or invalid realm parameters, an unreadable --cca-realm file.
    """
    from igvm_builder.errors import MeasurementError
    from igvm_builder.format.defs import PlatformType

    given = args.cca_realm or args.cca_ram or args.cca_ipa_bits or args.cca_breakpoints or args.cca_watchpoints
    p = f.platform(PlatformType.CCA)
    if p is None or not given:
        return None
    from igvm_builder.measure.cca import Realm, RealmParams, file_ipa_bits  # a CCA file only

    if args.cca_realm:
        from igvm_builder.io import load_json

        doc: Any = load_json(args.cca_realm, "realm", error=MeasurementError)
        if isinstance(doc, dict) and "platforms" in doc:
            doc = (doc["platforms"].get("cca") or {}).get("realm")
            if doc is None:
                raise MeasurementError("no platforms.cca.realm in these reference values", source=args.cca_realm)
        if not isinstance(doc, dict):
            raise MeasurementError("expected a JSON object with the realm", source=args.cca_realm)
        try:
            return Realm.from_json(doc)
        except MeasurementError as exc:
            raise exc.with_source(args.cca_realm) from None
    missing = [opt for opt, v in (("--cca-ram", args.cca_ram), ("--cca-breakpoints", args.cca_breakpoints),
                                  ("--cca-watchpoints", args.cca_watchpoints)) if not v]
    if missing:
        raise MeasurementError(f"the CCA RIM also needs {', '.join(missing)}")
    ipa = args.cca_ipa_bits or file_ipa_bits(f, p.compatibility_mask)
    if ipa is None:
        raise MeasurementError(f"shared_gpa_boundary {p.shared_gpa_boundary:#x} does not give the IPA width: "
                               "pass --cca-ipa-bits")
    params = RealmParams(s2sz=ipa, num_bps=args.cca_breakpoints, num_wps=args.cca_watchpoints,
                         sve_vl=args.cca_sve_vl, pmu=args.cca_pmu_counters is not None,
                         pmu_num_ctrs=args.cca_pmu_counters or 0, lpa2=args.cca_lpa2)
    return Realm(params, tuple(args.cca_ram))
