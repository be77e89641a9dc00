"""``igvm-builder measure FILE``: each platform's launch measurement of an IGVM file.

Text output, one line per platform: ``PLATFORM ALGORITHM DIGEST [loader=L | order=O]``
(``-`` for platforms without a launch measurement).  ``--all-loaders`` prints the SEV-SNP
digest under every loader profile instead, and warns on stderr when they differ.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from igvm_builder.commands._cca import add_cca_options, realm_from_args
from igvm_builder.commands._common import add_platform_option, loader_arg, print_json, warn
from igvm_builder.commands._vcpus import add_vcpu_options
from igvm_builder.errors import IgvmError, MeasurementError
from igvm_builder.measure.profiles import DEFAULT_LOADER, PROFILES

if TYPE_CHECKING:
    from igvm_builder.format import IgvmFile
    from igvm_builder.measure import Measurement

_CMD = "measure"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compute the launch measurement of every platform in an IGVM file: the SEV-SNP launch "
        "digest, the TDX MRTD, the VBS boot digest, SEV/SEV-ES digests."
    )
    parser.add_argument("file", help="IGVM file to measure")
    add_platform_option(parser, "measure only this platform (error if the file lacks it)")
    loaders = parser.add_mutually_exclusive_group()
    loaders.add_argument(
        "--loader", type=loader_arg(), default=DEFAULT_LOADER, metavar="LOADER",
        help=("SEV-SNP loader profile, any case (default: " + DEFAULT_LOADER + "). Loaders measure data-less "
              "pages, 'shared' pages, parameter areas and VMSAs differently (docs/MEASUREMENT.md); each "
              "profile models one real stack: "
              + "; ".join(f"{p.name} = {p.description}" for p in PROFILES.values())).replace("%", "%%"),
    )
    loaders.add_argument(
        "--all-loaders", action="store_true",
        help="print the SEV-SNP digest under every loader profile and warn when they differ",
    )
    add_vcpu_options(parser)
    parser.add_argument(
        "--dump-vmsas", metavar="DIR",
        help=("also write the SEV-SNP VMSA pages the loader measures, in order, as DIR/vmsa0.bin, vmsa1.bin, ... "
              "(qemu / cloud-hypervisor: as KVM rebuilds them, to compare with the host's sev_es_sync_vmsa "
              "dynamic-debug dump; other loaders: the file's pages)"),
    )
    parser.add_argument(
        "--tdx-two-pass", action="store_true",
        help=("TDX MRTD in two-pass order (per region all PAGE.ADDs, then all MR.EXTENDs: older Intel "
              "host stacks); default single pass (upstream KVM/QEMU, microsoft/igvm)"),
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_cca_options(parser)
    parser.add_argument(
        "--reference-values", metavar="OUT.json",
        help=("also write the reference values a verifier needs (digests, policies, guest features, "
              "vCPU count, ID-block key digests, file SHA-256) to OUT.json"),
    )


def _load(path: str) -> IgvmFile:
    from igvm_builder.format import IgvmFile

    f = IgvmFile.load(path)
    for w in f.warnings:
        warn(_CMD, f"{path}: {w}")
    return f


def _usage_error(message: str) -> int:
    print(f"igvm-builder {_CMD}: error: {message}", file=sys.stderr)
    return 2


def _require_platform(f: IgvmFile, platform: Any, path: str) -> None:
    if f.platform(platform) is None:
        have = ", ".join(p.platform_type.name for p in f.platforms)
        raise MeasurementError(f"no {platform.name} platform in the file (it has: {have})", source=path)


def _line(m: Measurement) -> str:
    if m.digest is None:
        note = f"  ({'; '.join(m.notes)})" if m.notes else ""
        return f"{m.platform.name} - -{note}"
    # the SNP line says which real stack its loader profile models
    extra = (f"loader={m.loader} ({PROFILES[m.loader].description})" if m.loader in PROFILES
             else f"loader={m.loader}" if m.loader else f"order={m.variant}" if m.variant else "")
    if m.vcpus is not None:
        extra += f" vcpus={m.vcpus}"
        if m.loader == "qemu" and m.vcpus > (m.vp_contexts or 0):
            extra += f" vcpu_type={m.vcpu_type}"
        if m.vcpus_source == "file":
            extra += "  (vcpus = the file's VP contexts; --vcpus N for -smp N)"
    return f"{m.platform.name} {m.algorithm} {m.hex}" + (f" {extra}" if extra else "")


def _json_entry(m: Measurement) -> dict[str, Any]:
    from igvm_builder.format.defs import PLATFORM_SHORT

    out: dict[str, Any] = {
        "platform": m.platform.name,
        "name": PLATFORM_SHORT[m.platform],
        "compatibility_mask": f"{m.compatibility_mask:#x}",
        "algorithm": m.algorithm,
        "digest": m.hex,
    }
    if m.loader:
        out["loader"] = m.loader
    if m.variant:
        out["pass_order"] = m.variant
    if m.vcpus is not None:
        out |= {"vcpus": m.vcpus, "vcpus_source": m.vcpus_source, "vp_contexts": m.vp_contexts,
                "vcpu_type": m.vcpu_type if m.loader == "qemu" and m.vcpus > (m.vp_contexts or 0) else None}
    if m.notes:
        out["notes"] = list(m.notes)
    return out


def _all_loaders(f: IgvmFile, args: argparse.Namespace) -> int:
    from igvm_builder.format.defs import PlatformType
    from igvm_builder.measure.engine import all_loader_digests

    if args.platform is not None and args.platform != PlatformType.SEV_SNP:
        return _usage_error(f"--all-loaders measures the SEV-SNP platform only, not {args.platform.name}")
    _require_platform(f, PlatformType.SEV_SNP, args.file)
    results = all_loader_digests(f, PROFILES, vcpus=args.vcpus, vcpu_type=args.vcpu_type)
    digests = {name: r for name, r in results.items() if isinstance(r, bytes)}
    distinct = set(digests.values())
    agree = len(distinct) <= 1 and len(digests) == len(results)
    if args.json:
        print_json({
            "file": args.file,
            "platform": "SEV_SNP",
            "default_loader": DEFAULT_LOADER,
            "loaders": {name: ({"digest": r.hex()} if isinstance(r, bytes) else {"error": r.message})
                        | {"models": PROFILES[name].description}
                        for name, r in results.items()},
            "loaders_agree": agree,
        })
    else:
        width = max(map(len, results))
        print(f"SEV_SNP sha384 digest per loader profile ({args.file}):")
        for name, r in results.items():
            default = "  (default)" if name == DEFAULT_LOADER else ""
            text = r.hex() if isinstance(r, bytes) else f"rejected: {r.message}"
            print(f"  {name:<{width}}  {text}{default}")
        print("loader profiles (the real stack each one models):")
        for name in results:
            print(f"    {name:<{width}}  {PROFILES[name].description}")
    if not agree:
        groups: dict[str, list[str]] = {}
        for name, r in results.items():
            key = r.hex()[:16] + "..." if isinstance(r, bytes) else "rejects the file"
            groups.setdefault(key, []).append(name)
        detail = "; ".join(f"{', '.join(names)}: {key}" for key, names in groups.items())
        warn(_CMD, f"{args.file}: the SEV-SNP digest differs between loaders ({detail}): a signed ID block "
                   "then verifies on only some loaders")
    return 0


def _dump_vmsas(f: IgvmFile, args: argparse.Namespace) -> None:
    from igvm_builder.io import atomic_outputs
    from igvm_builder.measure.engine import measured_vmsa_pages

    try:
        pages = measured_vmsa_pages(f, loader=args.loader, vcpus=args.vcpus, vcpu_type=args.vcpu_type)
    except IgvmError as exc:
        raise exc.with_source(args.file) from None
    try:
        os.makedirs(args.dump_vmsas, exist_ok=True)
    except OSError as exc:
        raise MeasurementError(f"cannot create the directory: {exc.strerror}", source=args.dump_vmsas) from None
    paths = [os.path.join(args.dump_vmsas, f"vmsa{i}.bin") for i in range(len(pages))]
    with atomic_outputs(*paths, inputs=(args.file,)) as outs:
        for out, page in zip(outs, pages, strict=True):
            assert out is not None
            out.write(page)


def _sha256_file(path: str) -> tuple[str, int]:
    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.io import sha256_input

    return sha256_input(path, "IGVM file", error=IgvmFormatError)


def run(args: argparse.Namespace) -> int:
    from igvm_builder.measure import measure_file

    if args.reference_values:  # before any work: the output must not be the file measured
        from igvm_builder.io import check_distinct

        check_distinct([args.reference_values], [args.file])
    f = _load(args.file)
    if args.all_loaders:
        if args.reference_values:
            return _usage_error("--reference-values needs one loader; use --loader instead of --all-loaders")
        return _all_loaders(f, args)
    if (args.vcpus is not None or args.vcpu_type is not None) and not PROFILES[args.loader].kvm_vmm:
        warn(_CMD, f"--vcpus/--vcpu-type apply to the KVM loaders (qemu, cloud-hypervisor); loader {args.loader} "
                   "measures the file's VMSAs as they are and ignores them")
    if args.platform is not None:
        _require_platform(f, args.platform, args.file)
    targets = [args.platform] if args.platform is not None else None
    try:
        realm = realm_from_args(args, f)
        ms = measure_file(f, platforms=targets, loader=args.loader, tdx_two_pass=args.tdx_two_pass,
                          vcpus=args.vcpus, vcpu_type=args.vcpu_type, cca_realm=realm)
    except IgvmError as exc:
        raise exc.with_source(args.file) from None
    if args.dump_vmsas:
        _dump_vmsas(f, args)
    if args.reference_values:
        from igvm_builder.io import atomic_write
        from igvm_builder.measure.report import reference_values

        sha256, size = _sha256_file(args.file)
        full = ms if targets is None else None  # measure every platform for the reference values
        refs = reference_values(f, sha256, loader=args.loader, tdx_two_pass=args.tdx_two_pass,
                                file_size=size, measurements=full, vcpus=args.vcpus, vcpu_type=args.vcpu_type)
        from igvm_builder.reference import ReferenceValues

        if realm is not None and "cca" in refs.get("platforms", {}):
            refs["platforms"]["cca"]["realm"] = realm.to_json()
        atomic_write(args.reference_values, ReferenceValues.from_dict(refs).to_json().encode(),
                     inputs=(args.file,))
    if args.reference_values == "-":  # the reference values are on standard output: nothing else goes there
        sys.stdout.flush()
        return 0
    if args.json:
        print_json({"file": args.file, "platforms": [_json_entry(m) for m in ms]})
    else:
        for m in ms:
            print(_line(m))
    return 0
