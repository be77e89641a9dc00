"""``igvm-builder verify-release CONFIG --reference REF.json [--igvm FILE]``.

Rebuilds CONFIG from its sources and checks it against the published reference values
(the ``--reference-values`` JSON of ``igvm-builder build``): the SHA-256 of the config and
of every input first (a changed kernel is named as such), then the file SHA-256 and every
platform's measurement; with ``--igvm`` the released file too (and a semantic diff of it
against the rebuild when they differ).  Exit 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from igvm_builder.commands._common import BUILD_LOADERS, add_loader_option, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML build configuration of the release")
    parser.add_argument("--reference", required=True, metavar="REF.json",
                        help="published reference values (igvm-builder build --reference-values)")
    parser.add_argument("--igvm", metavar="FILE", help="the released IGVM file to check as well")
    parser.add_argument("--platforms", help="override the platforms recorded in REF.json (comma separated)")
    add_loader_option(parser, "override the loader recorded in REF.json", choices=BUILD_LOADERS)
    parser.add_argument("--json", action="store_true", help="print every check as JSON (schema: docs/JSON.md)")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.repro import verify_release

    report = verify_release(args.config, args.reference, igvm=args.igvm, platforms=args.platforms,
                            loader=args.loader)
    if args.json:
        print_json(report.as_dict())
    else:
        sys.stdout.write(report.render_text())
    return 0 if report.ok else 1
