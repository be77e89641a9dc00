"""The ``igvm-builder`` command line: argparse front end over the pure library.

Each subcommand lives in ``igvm_builder/commands/<name>.py`` with ``add_arguments(parser)``
and ``run(args) -> int``; only the chosen one is imported, so ``--help`` stays fast.

Exit status, the same for every command (the table is :data:`EXIT_CODES`, applied here
and nowhere else):

* 0 (:data:`EXIT_OK`): done; the file is valid, verifies, matches, is reproducible;
* 1 (:data:`EXIT_FAILED`): the command ran and its check failed: invalid file (``check``),
  files differ (``diff``), lint errors, a signature or reference value does not verify,
  the builds differ, the release does not match;
* 2 (:data:`EXIT_ERROR`): usage error or input that could not be used (missing or
  unreadable file, bad config, bad key, failed build); the command could not decide;
* 130 on Ctrl-C; 141 (128 + SIGPIPE) when standard output was closed early (``| head``),
  quietly.

Every :class:`~igvm_builder.errors.IgvmError` becomes one line on stderr; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141
#: The one exit-code table of every command (docs/JSON.md repeats it).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok: valid, verified, identical, reproducible, built",
    EXIT_FAILED: "the check ran and failed: invalid, differs, does not verify, lint errors",
    EXIT_ERROR: "usage error or unusable input (missing/unreadable file, bad config or key, failed build)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_PIPE_CLOSED: "standard output closed early (e.g. | head); nothing more is printed",
}

#: The SEV-SNP loader profile of every command unless told otherwise (a test checks that it is
#: igvm_builder.measure.profiles.DEFAULT_LOADER, which is not imported here to keep start-up fast).
DEFAULT_LOADER = "hyperv"

COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "validate an IGVM file (exit 0 valid, 1 invalid, 2 unreadable)"),
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


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` gives it (``COLUMNS``, else the
    terminal of standard output, else 80), without importing :mod:`shutil` and the compression
    modules it imports (~1.5 ms): argparse asks for it each time it makes a help formatter, which
    it does for every argument it is given, not only to print help."""
    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, with the width found by :func:`_columns`."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igvm-builder",
        formatter_class=_Formatter,
        description="Build, measure, sign and verify IGVM confidential-VM launch images.",
        epilog="Exit status of every command: 0 ok; 1 the check failed (invalid, differs, does not verify); "
               "2 usage error or unusable input. The default SEV-SNP loader profile of every command is "
               f"{DEFAULT_LOADER} (igvm-builder measure --help lists the profiles).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    return parser


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if command is not None and name != command:
            continue  # the command is known: the others' parsers would never be used
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
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


def _failure_is_verdict(command: str, exc: BaseException) -> bool:
    """Errors that are the command's verdict (exit 1) rather than a failure to decide (exit 2)."""
    from igvm_builder.errors import IgvmFormatError

    return command == "check" and isinstance(exc, IgvmFormatError)


def _close_stdout() -> None:
    """Standard output was closed by the reader: send what is left to /dev/null, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: the program's arguments); returns the exit status."""
    # Start-up (the command's modules, its parser) allocates tens of thousands of objects that live
    # as long as the process; the cyclic garbage collector would scan them again and again (about
    # 5% of a small command's time).  It is paused until the command itself runs.  Run as the
    # program (no ``argv``), they are then moved out of the collector's sight for good
    # (``gc.freeze``): neither the command's collections nor the one at interpreter exit scan
    # them again (another 10% of a small command).  A caller in the same process (``argv`` given)
    # keeps its collector as it was: its objects stay collectable.
    as_program = argv is None
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = _find_command(argv)
        parser = build_parser(command)
        args = parser.parse_args(argv)  # usage errors: argparse exits with EXIT_ERROR (2)
        module = importlib.import_module(f"igvm_builder.commands.{COMMANDS[args.command][0]}")
    finally:
        if as_program:
            gc.freeze()
        if gc_was_enabled:
            gc.enable()
    debug = args.debug or bool(os.environ.get("IGVM_BUILDER_DEBUG"))
    from igvm_builder.errors import IgvmError

    restore = _exit_on_signals()
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _close_stdout()
        return EXIT_PIPE_CLOSED
    except IgvmError as exc:
        if debug:
            raise
        print(f"igvm-builder {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED if _failure_is_verdict(args.command, exc) else EXIT_ERROR
    except OSError as exc:
        if debug:
            raise
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"igvm-builder {args.command}: error: {name}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
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

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        current = signal.getsignal(sig)
        if current is signal.SIG_DFL:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (a library caller's worker): signals are not ours
                break
            previous[sig] = current

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


if __name__ == "__main__":
    sys.exit(main())
