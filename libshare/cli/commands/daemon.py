"""``libshare daemon [install|uninstall]``: serve automatic redirect requests
(libshare.redirect.daemon), and its systemd unit."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from types import FrameType

from libshare.cli.options import (
    add_json,
    folder,
    int_between,
    libvirt_uri,
    positive_seconds,
)
from libshare.cli.output import print_json
from libshare.config import Config
from libshare.errors import UsageError
from libshare.redirect import daemon, unit
from libshare.virt import api


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    if args.once and args.until_idle:
        raise UsageError("--once and --until-idle do not go together")
    d = daemon.Daemon(cfg.state_dir, api.opener(libvirt_uri(args, cfg)),
                      wait=cfg.redirect_wait, jobs=args.jobs)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        d.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = d.serve(once=args.once, until_idle=args.until_idle, poll=args.poll)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print_json({"handled": [r.as_dict() for r in d.results],
                    "failed": [r.domain for r in d.failures]})
    return status


def _global_args(args: argparse.Namespace) -> list[str]:
    """Return the global options (``--config``, ``--state-dir``) to repeat in the unit."""
    out = []
    if getattr(args, "config", None):
        out += ["--config", str(Path(args.config).resolve())]
    if getattr(args, "state_dir", None):
        out += ["--state-dir", str(Path(args.state_dir).resolve())]
    return out


def _install(args: argparse.Namespace, cfg: Config) -> int:
    res = unit.install_unit(folder(args.unit_dir, "--unit-dir"), extra_args=_global_args(args),
                            state_dir=cfg.state_dir)
    if args.json:
        print_json(res.as_dict())
    else:
        print(f"{res.path}: {res.action}; {res.systemd}")
        if res.action != "unchanged":
            print(f"start it with: systemctl enable --now {unit.UNIT_NAME}")
    return 0


def _uninstall(args: argparse.Namespace, cfg: Config) -> int:
    res = unit.uninstall_unit(folder(args.unit_dir, "--unit-dir"))
    if args.json:
        print_json(res.as_dict())
    else:
        print(f"{res.path}: {res.action}; {res.systemd}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``daemon`` (and ``daemon install|uninstall``) to the ``libshare`` parser."""
    p = sub.add_parser(
        "daemon", help="redirect guests enrolled with --redirect runtime after they start",
        description="Serve the automatic redirect requests the hook leaves in "
        "STATE/requests/ when a domain enrolled with '--redirect runtime' starts: once "
        "its guest agent answers, install libshare-redirect in the guest if needed and "
        "redirect it (like 'libshare guest install --no-initramfs' + 'libshare "
        "redirect'). A request whose agent stays silent for the config's redirect_wait "
        "seconds (900) fails; a domain that is gone or stopped is dropped. Outcomes go "
        "to STATE/redirects/NAME.json, events to STATE/log/daemon.log and stderr. Runs "
        "until SIGTERM unless --once or --until-idle. 'libshare daemon install' and "
        "'libshare daemon uninstall' manage its systemd unit.")
    p.add_argument("--once", action="store_true",
                   help="one pass over the pending requests, then exit")
    p.add_argument("--until-idle", action="store_true",
                   help="serve until no request is pending, then exit (1 if one failed)")
    p.add_argument("--poll", type=positive_seconds, default=daemon.DEFAULT_POLL, metavar="SECONDS",
                   help="seconds between passes (default %(default)s)")
    p.add_argument("--jobs", type=int_between(1), default=daemon.DEFAULT_JOBS, metavar="N",
                   help="domains handled at once (default %(default)s)")
    add_json(p, "on exit, print what was handled as JSON")
    p.set_defaults(func=_serve)
    ds = p.add_subparsers(dest="daemon_command", metavar="[install|uninstall]")
    for name, func, text in (
        ("install", _install, f"write the systemd unit {unit.UNIT_NAME} running this "
         "interpreter's 'python -m libshare daemon' (with this command's --config and "
         "--state-dir), then 'systemctl daemon-reload' if systemd runs"),
        ("uninstall", _uninstall, f"stop, disable and remove {unit.UNIT_NAME} (only "
         "a unit libshare wrote)"),
    ):
        u = ds.add_parser(name, help=text, description=text)
        u.add_argument("--unit-dir", default=str(unit.DEFAULT_UNIT_DIR), metavar="DIR",
                       help="systemd unit directory (default %(default)s)")
        add_json(u)
        u.set_defaults(func=func)
