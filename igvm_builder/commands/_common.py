"""Helpers shared by the subcommands (argument types, JSON output)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from igvm_builder.format.defs import PLATFORM_NAMES, PlatformType


def platform_arg(value: str) -> PlatformType:
    try:
        return PLATFORM_NAMES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown platform '{value}' (choose from {', '.join(PLATFORM_NAMES)})") from None


def add_platform_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--platform", type=platform_arg, metavar="|".join(PLATFORM_NAMES), help=help_text)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def warn(command: str, message: str) -> None:
    print(f"igvm-builder {command}: warning: {message}", file=sys.stderr)
