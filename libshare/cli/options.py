"""Options that many ``libshare`` commands share, declared once so that they mean the
same everywhere (in the way of virt-manager's ``virtinst/cli.py``).

The global options (``--config``, ``--state-dir``, ``-c/--connect``, ``-v``) are added by
:mod:`libshare.cli.app` to the top parser and to every sub-command parser, so they may
stand before or after the sub-command; ``--json`` is added per command that reports.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from libshare import config
from libshare.errors import LibshareError, UsageError

#: the environment variable virsh honours for the default connection
LIBVIRT_URI_ENV = "LIBVIRT_DEFAULT_URI"


def add_global_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """Add the global options to ``parser``; ``default`` is their value when absent
    (``argparse.SUPPRESS`` on sub-command parsers: a value given after the sub-command
    then overrides one given before it, absence keeps it)."""
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="configuration file (default $LIBSHARE_CONFIG or "
                        f"{config.SYSTEM_CONFIG})")
    parser.add_argument("--state-dir", metavar="DIR", default=default,
                        help="state directory (default $LIBSHARE_STATE_DIR, the config's "
                        f"state_dir, or {config.DEFAULT_STATE_DIR})")
    parser.add_argument("-c", "--connect", metavar="URI", default=default,
                        help=f"libvirt connection URI (default ${LIBVIRT_URI_ENV}, else the "
                        "config's libvirt_uri, qemu:///system)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=False if default is None else default,
                        help="log debug messages")


def add_json(parser: argparse.ArgumentParser, text: str = "print the result as JSON") -> None:
    """Add ``--json`` (``args.json``) to ``parser``."""
    parser.add_argument("--json", action="store_true", help=text)


def libvirt_uri(args: argparse.Namespace, cfg: config.Config,
                environ: dict[str, str] | None = None) -> str:
    """Return the libvirt URI to connect to: ``-c/--connect``, else
    ``$LIBVIRT_DEFAULT_URI``, else the config's ``libvirt_uri``."""
    env = os.environ if environ is None else environ
    return getattr(args, "connect", None) or env.get(LIBVIRT_URI_ENV) or cfg.libvirt_uri


def positive_seconds(text: str) -> float:
    """Return ``text`` as a finite, positive number of seconds (an option's ``type=``);
    UsageError otherwise ("nan", "inf", "0", "-1" included)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{text!r} is not a positive number of seconds")
    return value


def int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """Return an option ``type=`` that takes a whole number from ``low`` to ``high``
    (no upper bound when None) and raises UsageError for anything else."""
    def convert(text: str) -> int:
        try:
            value = int(text.strip(), 10) if text.strip().isascii() else None
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise UsageError(f"{text!r} is not a whole number {bound}")
        return value
    return convert


def folder(path: str, what: str) -> Path:
    """Return ``path`` as a Path when it is a directory or does not exist yet (it will
    be created); LibshareError (exit 1) when it names something else (``what`` says
    which option: "--hooks-dir")."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise LibshareError(f"{what} {path}: not a directory")
    return Path(path)


def add_trees(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--tree TREE`` (repeatable, ``args.trees``: None when absent) to ``parser``:
    an imported tree named by digest, prefix or the directory it was imported from;
    ``what`` says what the trees are for."""
    parser.add_argument("--tree", action="append", dest="trees", metavar="TREE",
                        help=f"an imported tree (digest, prefix, or the directory it was "
                        f"imported from; see 'store ls --trees') {what}; repeatable; "
                        "default: every tree of the store")
