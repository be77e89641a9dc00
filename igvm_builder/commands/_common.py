"""Helpers shared by the subcommands (argument types, JSON output)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from igvm_builder.format.defs import PLATFORM_NAMES, PlatformType


def platform_arg(value: str) -> PlatformType:
    try:
        return PLATFORM_NAMES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown platform '{value}' (choose from {', '.join(PLATFORM_NAMES)})") from None


#: Every SEV-SNP loader profile (igvm_builder.measure.profiles.PROFILES, which a test checks),
#: listed here so that parsing the options does not import the measurement engine.
LOADERS: tuple[str, ...] = ("hyperv", "qemu", "cloud-hypervisor", "cloud-hypervisor-mshv", "igvmmeasure",
                            "igvmmeasure-native-zero")
#: The loaders a build targets (config image.loader).
BUILD_LOADERS: tuple[str, ...] = ("hyperv", "qemu", "cloud-hypervisor")
#: The default loader of every command (igvm_builder.measure.profiles.DEFAULT_LOADER).
DEFAULT_LOADER = "hyperv"


def loader_arg(choices: tuple[str, ...] = LOADERS) -> Any:
    """An argparse type for a loader profile name, case-insensitive."""

    def parse(value: str) -> str:
        name = value.strip().lower()
        if name not in choices:
            raise argparse.ArgumentTypeError(f"unknown loader '{value}' (choose from {', '.join(choices)})")
        return name

    parse.__name__ = "loader"
    return parse


def add_loader_option(parser: Any, help_text: str, *, choices: tuple[str, ...] = LOADERS, **kwargs: Any) -> None:
    """``--loader`` taking any profile name in any case; ``help_text`` should say what the default is."""
    parser.add_argument("--loader", type=loader_arg(choices), metavar="LOADER",
                        help=f"{help_text}; one of {', '.join(choices)} (any case)", **kwargs)


def add_platform_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--platform", type=platform_arg, metavar="|".join(PLATFORM_NAMES), help=help_text)


#: Characters of JSON text collected before each write to standard output.
_JSON_CHUNK = 1 << 20


def print_json(obj: Any, file: TextIO | None = None) -> None:
    """``obj`` as indented JSON with sorted keys, on standard output (or ``file``)."""
    import json  # not at the top: most runs print no JSON

    out = sys.stdout if file is None else file
    write_pieces(json.JSONEncoder(indent=2, sort_keys=True).iterencode(obj), out)
    out.write("\n")


def write_pieces(pieces: Iterable[str], out: TextIO | None = None) -> None:
    """Write ``pieces`` of text to standard output, collected into writes of about 1 MiB.

    ``json.dump`` writes every token separately: with ``PYTHONUNBUFFERED`` set (common in CI
    and container images) that is one system call per token, and the 48 MB JSON dump of a
    283 MB file took 13 s instead of 4 s.
    """
    stream = sys.stdout if out is None else out
    batch: list[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= _JSON_CHUNK:
            stream.write("".join(batch))
            batch.clear()
            size = 0
    stream.write("".join(batch))


def warn(command: str, message: str) -> None:
    print(f"igvm-builder {command}: warning: {message}", file=sys.stderr)
