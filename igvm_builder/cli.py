"""The ``igvm-builder`` command line: argparse front end over the pure library.

Each subcommand lives in ``igvm_builder/commands/<name>.py`` with ``add_arguments(parser)``
and ``run(args) -> int``; only the chosen one is imported, so ``--help`` stays fast.
Every :class:`~igvm_builder.errors.IgvmError` becomes one line on stderr and exit status
1 (2 for usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "validate an IGVM file (exit 0 valid, 1 invalid)"),
    "dump": ("dump", "show every header of an IGVM file (text or --json)"),
    "measure": ("measure", "compute each platform's launch measurement"),
    "build": ("build", "build an IGVM file from a TOML config"),
    "lint": ("lint", "report what a loader will reject or ignore in an IGVM file"),
    "sign": ("sign", "add or replace the SEV-SNP ID block of an IGVM file"),
    "verify": ("verify", "verify the SEV-SNP ID block of an IGVM file"),
    "diff": ("diff", "semantic diff of two IGVM files"),
    "repro": ("repro", "build a config twice under perturbed conditions and compare"),
    "verify-release": ("verify_release", "rebuild from sources and check against published reference values"),
}


def _version() -> str:
    from igvm_builder import __version__

    return str(__version__)


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for: ``importlib.metadata`` (and the email,
    zipfile and csv modules it imports) would otherwise cost every command ~15 ms of start-up."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igvm-builder",
        description="Build, measure, sign and verify IGVM confidential-VM launch images.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    return parser


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"igvm_builder.commands.{module}").add_arguments(p)
    return parser


def _find_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _find_command(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    debug = args.debug or bool(os.environ.get("IGVM_BUILDER_DEBUG"))
    from igvm_builder.errors import IgvmError

    module = importlib.import_module(f"igvm_builder.commands.{COMMANDS[args.command][0]}")
    restore = _exit_on_signals()
    try:
        return int(module.run(args) or 0)
    except IgvmError as exc:
        if debug:
            raise
        print(f"igvm-builder {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if debug:
            raise
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"igvm-builder {args.command}: error: {name}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        restore()


def _exit_on_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP (what ``timeout``, CI cancellation and a closed terminal send)
    end the command the way Ctrl-C does: ``SystemExit(128 + signal)`` is raised in the main
    thread, so every output under way is discarded (no temporary file is left) before the
    process exits with the usual status (143 for SIGTERM, 129 for SIGHUP).  A signal the
    caller ignores (``nohup``) stays ignored.  Returns the function that puts the previous
    handlers back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        current = signal.getsignal(sig)
        if current is signal.SIG_DFL:
            previous[sig] = current
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


if __name__ == "__main__":
    sys.exit(main())
