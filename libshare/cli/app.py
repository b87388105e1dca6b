"""The ``libshare`` command line: global options, sub-command dispatch, exit codes.

Each sub-command lives in ``libshare/cli/commands/<name>.py`` and exposes
``register(subparsers)``; the parser it adds sets ``func(args, cfg) -> int``.
The global options (``--config``, ``--state-dir``, ``-c/--connect``, ``-v``; see
:mod:`libshare.cli.options`) are accepted before the sub-command and after it, at any
depth (``libshare region build --state-dir DIR``).
Errors: a LibshareError prints ``libshare: <reason>`` on stderr and exits 1 (2 for
usage errors); every usage error, argparse's own and a LibshareError raised by an
option's ``type=`` converter (``--size lots``), prints one line
(``libshare region build: argument --size: invalid size 'lots' ...``) and exits 2.
Output that cannot be encoded (names that are not UTF-8) is backslash-escaped, and an
OSError no caller worded (an I/O error) is one line too: never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from libshare import __version__, config
from libshare.cli.options import add_global_options
from libshare.errors import EXIT_FAILED, EXIT_USAGE, LibshareError
from libshare.util.files import os_error

# Sub-command modules under libshare/cli/commands/, in --help order.
COMMAND_MODULES = ["xml", "enrol", "status", "report", "hook", "store", "region", "survey", "guest", "redirect",
                   "daemon", "demo"]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr (exit 2), also for a
    LibshareError raised by a ``type=`` converter; sub-command parsers are Parsers too."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` on one line; exit 2."""
        message = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        """Convert one argument; a LibshareError from the converter is a usage error."""
        try:
            return super()._get_value(action, arg_string)
        except LibshareError as exc:
            raise argparse.ArgumentError(action, str(exc)) from None


def _sub_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Return every sub-command parser under ``parser``, nested ones included (each once)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found.append(child)
                found.extend(_sub_parsers(child))
    return found


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser with every sub-command registered; each
    sub-command also accepts the global options (SUPPRESS default: a value given after
    the sub-command overrides one given before it, absence keeps it)."""
    parser = Parser(
        prog="libshare",
        description="Share one canonical copy of shared libraries among the libvirt "
        "guests of a trust group, through a read-only library region device.",
    )
    parser.add_argument("--version", action="version", version=f"libshare {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"libshare.cli.commands.{name}")
        module.register(sub)
    for child in _sub_parsers(parser):
        add_global_options(child, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2, one line), or --help/--version (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        cfg = config.load(args.config, args.state_dir)
        level = logging.DEBUG if args.verbose else getattr(logging, cfg.log_level.upper())
        logging.basicConfig(level=level, format="libshare: %(levelname)s: %(message)s")
        status: int = args.func(args, cfg)
        return status
    except LibshareError as exc:
        print(f"libshare: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return EXIT_FAILED
    except OSError as exc:  # the system failed (disk full, I/O error) where no caller
        print(f"libshare: {os_error(exc)}", file=sys.stderr)  # words it: still one line
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("libshare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
