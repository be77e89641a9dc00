"""``igvm-builder build CONFIG -o OUT.igvm [--reference-values OUT.json]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from igvm_builder.commands._common import BUILD_LOADERS, add_loader_option, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML build configuration (schema: docs/CONFIG.md)")
    parser.add_argument("-o", "--output", required=True,
                        help="IGVM file to write (atomically; '-', a character device or a FIFO is written directly)")
    parser.add_argument("--reference-values", metavar="OUT.json",
                        help="also write the reference values a verifier needs (docs/MEASUREMENT.md)")
    parser.add_argument("--depfile", metavar="OUT.d",
                        help="also write a Make/Ninja dependency file: the output depends on the config, its "
                             "includes and every input it names")
    parser.add_argument("--platforms", help="override image.platforms, comma separated (e.g. snp,tdx)")
    add_loader_option(parser, "override image.loader (default: the config's, else hyperv)", choices=BUILD_LOADERS)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (schema: docs/JSON.md)")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.assemble import build
    from igvm_builder.config import load_config
    from igvm_builder.io import STDOUT, atomic_outputs

    cfg = load_config(args.config)
    platforms = tuple(p.strip() for p in args.platforms.split(",")) if args.platforms else None
    # the file is written while it is measured; it appears (with its reference values) only
    # once everything succeeded.  An output that is an input, or two outputs that are one
    # file, are refused before any work.
    inputs = (cfg.source, *cfg.input_files)
    # made before the build: a path Make cannot name is refused before any work
    dep_text = depfile_text(args.output, inputs) if args.depfile else ""
    with atomic_outputs(args.output, args.reference_values, args.depfile, inputs=inputs) as (out, refs_out, dep_out):
        result = build(cfg, platforms=platforms, loader=args.loader, output=out)
        if refs_out is not None:
            refs_out.write(result.reference_values.to_json().encode())
        if dep_out is not None:
            dep_out.write(dep_text.encode())
    refs = result.reference_values
    notes = list(refs.build.notes) if refs.build else []
    # an output on standard output: the summary (or the JSON) goes to standard error, not into it
    report = sys.stderr if STDOUT in (args.output, args.reference_values, args.depfile) else sys.stdout
    if args.json:
        print_json({
            "output": args.output,
            "size": result.size,
            "sha256": result.sha256,
            "loader": refs.loader,
            "platforms": {name: {"platform": p.platform, "algorithm": p.algorithm, "digest": p.digest}
                          for name, p in refs.platforms.items()},
            "reference_values": args.reference_values,
            "depfile": args.depfile,
            "warnings": list(result.file.warnings),
            "notes": notes,
        }, file=report)
    elif not args.quiet:
        print(f"{args.output}: {result.size} bytes, sha256 {result.sha256}", file=report)
        for name, p in sorted(refs.platforms.items()):
            if p.digest:
                loader = f" (loader {p.loader})" if p.loader else ""
                print(f"  {name}: {p.digest}{loader}", file=report)
    if not args.quiet:
        for w in result.file.warnings:
            print(f"igvm-builder build: warning: {w}", file=sys.stderr)
        for note in notes:
            print(f"igvm-builder build: note: {note}", file=sys.stderr)
    return 0


def depfile_text(target: str, prerequisites: Iterable[str]) -> str:
    """A dependency file in the format of ``gcc -MD -MP``, which Make and Ninja read: ``target``
    depends on every prerequisite, and each prerequisite is a target without recipe, so a file
    later dropped from the config does not stop Make.  Characters Make treats specially are
    escaped (space, ``#``, ``$``, ``:``); a path with a newline cannot be written in a
    dependency file at all and is an :class:`~igvm_builder.errors.OutputError`."""
    from igvm_builder.errors import OutputError

    def esc(path: str) -> str:
        if "\n" in path or "\r" in path:
            raise OutputError(f"cannot write a dependency file: the path {path!r} has a line break, which "
                              "Make and Ninja cannot read; rename it or drop --depfile")
        return path.replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$").replace(":", "\\:")

    deps = list(dict.fromkeys(prerequisites))
    lines = [f"{esc(target)}: " + " \\\n  ".join(esc(d) for d in deps), ""]
    lines += [f"{esc(d)}:\n" for d in deps]
    return "\n".join(lines)
