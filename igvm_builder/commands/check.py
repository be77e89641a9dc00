"""``igvm-builder check FILE [--platform P] [--json]``: exit 0 when valid, 1 with a one-line reason.

An invalid file is the check's verdict (exit 1); a file that cannot be read is exit 2
(the exit-code table of :mod:`igvm_builder.cli`).  ``--json``: ``docs/JSON.md``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
from typing import Any

from igvm_builder.commands._common import add_platform_option, print_json, warn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="IGVM file to validate")
    add_platform_option(parser, "validate only the headers of this platform (reference filter semantics)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is valid")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON (schema: docs/JSON.md)")


def _report(args: argparse.Namespace, *, valid: bool, error: str | None = None, f: Any = None) -> dict[str, Any]:
    return {
        "file": args.file,
        "valid": valid,
        "error": error,
        "revision": f.revision if f is not None else None,
        "architecture": f.architecture.name if f is not None else None,
        "headers": len(f.headers) if f is not None else None,
        "platforms": [p.platform_type.name for p in f.platforms] if f is not None else [],
        "warnings": list(f.warnings) if f is not None else [],
    }


def run(args: argparse.Namespace) -> int:
    from igvm_builder.errors import IgvmFormatError
    from igvm_builder.format import IgvmFile
    from igvm_builder.io import open_input

    # unreadable, or not a regular file: InputError, exit 2 (not the check's verdict)
    with open_input(args.file, "IGVM file") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        f = IgvmFile.from_bytes(buf, platform=args.platform, source=args.file)
    except IgvmFormatError as exc:
        if not args.json:
            raise  # the CLI prints it; an invalid file is exit 1
        print_json(_report(args, valid=False, error=str(exc)))
        return 1
    for w in f.warnings:
        warn("check", f"{args.file}: {w}")
    if args.platform is not None and f.platform(args.platform) is None:
        have = ", ".join(p.platform_type.name for p in f.platforms)
        message = f"{args.file}: no {args.platform.name} platform (it has: {have})"
        if args.json:
            print_json(_report(args, valid=False, error=message, f=f))
        else:
            print(f"igvm-builder check: error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print_json(_report(args, valid=True, f=f))
    elif not args.quiet:
        n = len(f.headers)
        plats = ", ".join(p.platform_type.name for p in f.platforms)
        print(f"{args.file}: valid IGVM v{f.revision} ({f.architecture.name}), {n} headers, platforms: {plats}")
    return 0
