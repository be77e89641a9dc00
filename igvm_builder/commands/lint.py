"""``igvm-builder lint FILE --loader L``: what a loader will reject or ignore in a file."""

from __future__ import annotations

import argparse

from igvm_builder.commands._common import DEFAULT_LOADER, add_loader_option, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="IGVM file")
    add_loader_option(parser, f"target loader (default: {DEFAULT_LOADER})", default=DEFAULT_LOADER)
    parser.add_argument("--qemu-guest", choices=["any", "none", "sev", "sev-es", "sev-snp", "tdx"], default="any",
                        help="with --loader qemu: the confidential-guest object QEMU runs with (none: TCG or KVM "
                             "without SEV); an error when no platform of the file starts with it (default any: "
                             "an error only when none starts with any)")
    parser.add_argument("--json", action="store_true", help="machine-readable findings (schema: docs/JSON.md)")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.format import IgvmFile
    from igvm_builder.lint import lint

    f = IgvmFile.load(args.file)
    findings = lint(f, args.loader, qemu_guest=args.qemu_guest)
    if args.json:
        print_json([fd.as_dict() for fd in findings])
    else:
        for fd in findings:
            print(f"{args.file}: {fd.severity}: {fd.message}")
        if not findings:
            print(f"{args.file}: no findings for loader {args.loader}")
    return 1 if any(fd.severity == "error" for fd in findings) else 0
