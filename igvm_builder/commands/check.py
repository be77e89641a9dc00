"""``igvm-builder check FILE [--platform P]``: exit 0 when valid, 1 with a one-line reason."""

from __future__ import annotations

import argparse
import sys

from igvm_builder.commands._common import add_platform_option, warn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="IGVM file to validate")
    add_platform_option(parser, "validate only the headers of this platform (reference filter semantics)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is valid")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.format import IgvmFile

    f = IgvmFile.load(args.file, platform=args.platform)
    for w in f.warnings:
        warn("check", f"{args.file}: {w}")
    if args.platform is not None and f.platform(args.platform) is None:
        have = ", ".join(p.platform_type.name for p in f.platforms)
        print(f"igvm-builder check: error: {args.file}: no {args.platform.name} platform (it has: {have})",
              file=sys.stderr)
        return 1
    if not args.quiet:
        n = len(f.headers)
        plats = ", ".join(p.platform_type.name for p in f.platforms)
        print(f"{args.file}: valid IGVM v{f.revision} ({f.architecture.name}), {n} headers, platforms: {plats}")
    return 0
