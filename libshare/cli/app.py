"""The ``libshare`` command line: global options, sub-command dispatch, exit codes.

Each sub-command lives in ``libshare/cli/commands/<name>.py`` and exposes
``register(subparsers)``; the parser it adds sets ``func(args, cfg) -> int``.
The global options (``--config``, ``--state-dir``, ``-c/--connect``, ``-v``; see
:mod:`libshare.cli.options`) are accepted before the sub-command and after it, at any
depth (``libshare region build --state-dir DIR``).
Errors: a LibshareError prints ``libshare: <reason>`` on stderr and exits 1 (2 for
usage errors); argparse's own usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from libshare import __version__, config
from libshare.cli.options import add_global_options
from libshare.errors import EXIT_FAILED, LibshareError

# Sub-command modules under libshare/cli/commands/, in --help order.
COMMAND_MODULES = ["xml", "enrol", "status", "report", "hook", "store", "region", "survey", "guest", "redirect",
                   "daemon", "demo"]


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
    parser = argparse.ArgumentParser(
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("libshare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
