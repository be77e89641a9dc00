"""``igvm-builder dump FILE [--platform P] [--json]``: show every header of an IGVM file.

Text output is for people (``igvm_builder.format.dump.dump_text``); ``--json`` prints the
documented, stable schema of ``docs/DUMP_SCHEMA.md`` (keys sorted).  The file is parsed and
validated first, so an invalid file exits 1 with a one-line reason, like ``check``.
"""

from __future__ import annotations

import argparse
import mmap
import sys

from igvm_builder.commands._common import add_platform_option, write_pieces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="IGVM file to dump")
    add_platform_option(parser, "dump only the headers of this platform (reference filter semantics)")
    parser.add_argument("--json", action="store_true", help="print the JSON schema of docs/DUMP_SCHEMA.md")


def _map(path: str) -> bytes | mmap.mmap:
    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.io import map_input

    return map_input(path, "IGVM file", error=IgvmFormatError)  # regular files only


def run(args: argparse.Namespace) -> int:
    from igvm_builder.format import IgvmFile
    from igvm_builder.format.dump import iter_dump_json, iter_dump_text

    buf = _map(args.file)
    f = IgvmFile.from_bytes(buf, platform=args.platform, source=args.file)
    if args.platform is not None and f.platform(args.platform) is None:
        have = ", ".join(p.platform_type.name for p in f.platforms)
        print(f"igvm-builder dump: error: {args.file}: no {args.platform.name} platform (it has: {have})",
              file=sys.stderr)
        return 2  # nothing to dump: the input does not fit the request
    # `igvm-builder dump x.igvm | head`: igvm_builder.cli stops quietly on the closed pipe
    if args.json:  # written as it is made: a large file's dump never exists whole in memory
        write_pieces(iter_dump_json(f, source_bytes=buf, platform=args.platform))
        sys.stdout.write("\n")
    else:
        write_pieces(iter_dump_text(f, source_bytes=buf, platform=args.platform))
    return 0
