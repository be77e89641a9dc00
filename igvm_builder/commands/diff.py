"""``igvm-builder diff A B [--json] [--loader L]``: semantic diff of two IGVM files.

Exit status: 0 when the files are identical (byte-identical, or semantically identical:
same headers, pages and measurements with the file data laid out differently; the output
says which), 1 when they differ, 2 on errors (unreadable or invalid file, bad option).
Both files are mmap'd; pages are compared in place.
"""

from __future__ import annotations

import argparse
import mmap
import sys

from igvm_builder.commands._cca import add_cca_options, realm_from_args
from igvm_builder.commands._common import DEFAULT_LOADER, add_loader_option, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="first (old) IGVM file")
    parser.add_argument("b", metavar="B", help="second (new) IGVM file")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON diff (schema: docs/REPRODUCIBLE_RELEASES.md)")
    add_loader_option(parser, f"SEV-SNP loader profile of the measurements (default: {DEFAULT_LOADER})")
    parser.add_argument("--no-measure", action="store_true", help="do not compare launch measurements")
    parser.add_argument("--max-ranges", type=int, default=200,
                        help="text output: page ranges to show at most (default 200; 0 = all)")
    add_cca_options(parser)


def _map(path: str) -> bytes | mmap.mmap:
    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.io import map_input

    return map_input(path, "IGVM file", error=IgvmFormatError)  # regular files only


def same_bytes(a: bytes | mmap.mmap, b: bytes | mmap.mmap, chunk: int = 1 << 20) -> bool:
    """Byte-for-byte equality of two buffers, a chunk at a time (no copies)."""
    if len(a) != len(b):
        return False
    va, vb = memoryview(a), memoryview(b)
    for off in range(0, len(va), chunk):
        if va[off : off + chunk] != vb[off : off + chunk]:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    from igvm_builder.diff import diff_files
    from igvm_builder.format import IgvmFile

    # errors (unreadable or invalid file) are exit 2, in igvm_builder.cli like every command's
    buf_a, buf_b = _map(args.a), _map(args.b)
    fa = IgvmFile.from_bytes(buf_a, source=args.a)
    fb = IgvmFile.from_bytes(buf_b, source=args.b)
    identical_bytes = same_bytes(buf_a, buf_b)
    result = diff_files(fa, fb, a_name=args.a, b_name=args.b, loader=args.loader,
                        measure=not args.no_measure, byte_identical=identical_bytes,
                        cca_realm=realm_from_args(args, fa) or realm_from_args(args, fb))
    if args.json:
        print_json(result.as_dict())
    else:
        sys.stdout.write(result.render_text(max_ranges=args.max_ranges or None))
    return 0 if result.identical else 1
