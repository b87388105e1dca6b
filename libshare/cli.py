"""The ``libshare`` command line: global options, sub-command dispatch, exit codes.

Each sub-command lives in ``libshare/commands/<name>.py`` and exposes
``register(subparsers)``; the parser it adds sets ``func(args, cfg) -> int``.
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
from libshare.errors import EXIT_FAILED, LibshareError

# Sub-command modules under libshare/commands/, in --help order.
COMMAND_MODULES = ["xml", "enrol", "hook", "store", "region", "survey", "guest", "redirect",
                   "daemon", "demo"]


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="libshare",
        description="Share one canonical copy of shared libraries among the libvirt "
        "guests of a trust group, through a read-only library region device.",
    )
    parser.add_argument("--version", action="version", version=f"libshare {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default $LIBSHARE_CONFIG or "
                        f"{config.SYSTEM_CONFIG})")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="state directory (default $LIBSHARE_STATE_DIR, the config's "
                        f"state_dir, or {config.DEFAULT_STATE_DIR})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"libshare.commands.{name}")
        module.register(sub)
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
