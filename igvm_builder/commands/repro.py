"""``igvm-builder repro CONFIG [--platforms P,..] [--loader L]``: build twice, compare.

Each build runs in a fresh ``python -m igvm_builder build`` from its own copy of the
config and inputs, under other paths, working directory, TZ, locale, umask, hash seed,
environment order, mtimes and file creation order (``igvm_builder.repro``).  Exit 0 with
a one-line report when the two builds are byte-identical, 1 with the semantic diff when
they are not (or when a build fails).
"""

from __future__ import annotations

import argparse
import sys

from igvm_builder.commands._common import BUILD_LOADERS, add_loader_option, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML build configuration")
    parser.add_argument("--platforms", help="override image.platforms, comma separated (e.g. snp,tdx)")
    add_loader_option(parser, "override image.loader (default: the config's, else hyperv)", choices=BUILD_LOADERS)
    parser.add_argument("--in-process", action="store_true",
                        help="build both copies in this process (cheaper; varies paths, mtimes and file order "
                             "only)")
    parser.add_argument("--keep", metavar="DIR", help="copy both builds and their reference values to DIR")
    parser.add_argument("--json", action="store_true", help="print the report (or the diff) as JSON (schema: docs/JSON.md)")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.errors import ReproducibilityError
    from igvm_builder.repro import check_config_reproducible

    try:
        report = check_config_reproducible(args.config, platforms=args.platforms, loader=args.loader,
                                           isolation="in-process" if args.in_process else "subprocess",
                                           keep=args.keep)
    except ReproducibilityError as exc:
        if args.json:
            diff = getattr(exc, "diff", None)
            print_json({"config": args.config, "result": "not-reproducible", "message": exc.message,
                        "reference_differences": getattr(exc, "reference_differences", []),
                        "diff": diff.as_dict() if diff is not None else None})
        else:
            sys.stdout.write(str(exc).rstrip("\n") + "\n")
        return 1
    if args.json:
        print_json(report.as_dict())
    else:
        print(report.line())
    return 0
