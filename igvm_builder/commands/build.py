"""``igvm-builder build CONFIG -o OUT.igvm [--reference-values OUT.json]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable


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
    parser.add_argument("--loader", choices=("qemu", "hyperv", "cloud-hypervisor"), help="override image.loader")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.build import build
    from igvm_builder.config import load_config
    from igvm_builder.io import STDOUT, atomic_outputs

    cfg = load_config(args.config)
    platforms = tuple(p.strip() for p in args.platforms.split(",")) if args.platforms else None
    # the file is written while it is measured; it appears (with its reference values) only
    # once everything succeeded.  An output that is an input, or two outputs that are one
    # file, are refused before any work.
    inputs = (cfg.source, *cfg.input_files)
    with atomic_outputs(args.output, args.reference_values, args.depfile, inputs=inputs) as (out, refs_out, dep_out):
        result = build(cfg, platforms=platforms, loader=args.loader, output=out)
        if refs_out is not None:
            refs_out.write((json.dumps(result.reference_values, indent=2, sort_keys=True) + "\n").encode())
        if dep_out is not None:
            dep_out.write(depfile_text(args.output, (cfg.source, *cfg.input_files)).encode())
    if not args.quiet:
        # an output on standard output: the summary goes to standard error, not into it
        report = sys.stderr if STDOUT in (args.output, args.reference_values, args.depfile) else sys.stdout
        print(f"{args.output}: {result.size} bytes, sha256 {result.sha256}", file=report)
        for name, entry in sorted(result.reference_values.get("platforms", {}).items()):
            digest = entry.get("digest") if isinstance(entry, dict) else None
            if digest:
                print(f"  {name}: {digest}", file=report)
        for w in result.file.warnings:
            print(f"igvm-builder build: warning: {w}", file=sys.stderr)
        for note in result.reference_values.get("build", {}).get("notes", ()):
            print(f"igvm-builder build: note: {note}", file=sys.stderr)
    return 0


def depfile_text(target: str, prerequisites: Iterable[str]) -> str:
    """A dependency file in the format of ``gcc -MD -MP``, which Make and Ninja read: ``target``
    depends on every prerequisite, and each prerequisite is a target without recipe, so a file
    later dropped from the config does not stop Make.  Characters Make treats specially are
    escaped (space, ``#``, ``$``)."""
    def esc(path: str) -> str:
        return path.replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")

    deps = list(dict.fromkeys(prerequisites))
    lines = [f"{esc(target)}: " + " \\\n  ".join(esc(d) for d in deps), ""]
    lines += [f"{esc(d)}:\n" for d in deps]
    return "\n".join(lines)
