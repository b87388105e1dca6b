"""``libshare redirect|unredirect DOMAIN``: switch a running guest's libraries to the
region's identical copies now, or undo everything libshare did in it
(libshare.redirect.actions); each step shows on stderr with its elapsed seconds."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from libshare.cli.options import add_json, libvirt_uri
from libshare.cli.output import print_json
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.redirect import actions
from libshare.virt import api


def _print(rep: actions.RedirectReport) -> None:
    """Print a RedirectReport for people."""
    d = rep.domain
    if rep.action == "redirect":
        print(f"{d}: {rep.bound} libraries bound now, {rep.binds_total} in place "
              f"(region {rep.region_device}; {rep.hashed} hashed, {rep.cached} from cache)")
        for path in rep.differs:
            print(f"{d}: differs from the region, kept: {path}")
    else:
        print(f"{d}: {rep.removed} binds removed; initramfs {rep.initramfs or '-'}")
        for path in rep.deleted:
            print(f"{d}: deleted {path}")
    if rep.restarted:
        print(f"{d}: restarted {' '.join(rep.restarted)}")
    if rep.kept:
        print(f"{d}: not restarted (keep their old copies): {' '.join(rep.kept)}")
    if rep.agent_restarted:
        print(f"{d}: guest agent restarted")
    if rep.boot:
        print(f"{d}: {rep.boot}")


def _act(args: argparse.Namespace, cfg: Config, verb: str,
         action: Callable[..., actions.RedirectReport], **extra: object) -> int:
    """Run ``action`` (redirect or unredirect, with ``extra`` arguments) on
    ``args.domain`` with its steps shown on stderr; print the report; return 0."""
    progress = ProgressPrinter(f"{verb} {args.domain}")
    try:
        with api.connect(libvirt_uri(args, cfg)) as conn:
            rep = action(api.lookup(conn, args.domain), restart=not args.no_restart,
                         progress=progress, **extra)
    finally:
        progress.close()
    print_json(rep.as_dict()) if args.json else _print(rep)
    return 0


def _redirect(args: argparse.Namespace, cfg: Config) -> int:
    return _act(args, cfg, "redirect", actions.redirect)


def _unredirect(args: argparse.Namespace, cfg: Config) -> int:
    return _act(args, cfg, "unredirect", actions.unredirect, state_dir=cfg.state_dir)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``redirect`` and ``unredirect`` to the ``libshare`` parser."""
    r = sub.add_parser("redirect", help="run a guest's libraries from the region now",
                       description="Bind the region's byte-identical copies over the "
                       "guest's library files (libshare-redirect apply, through the guest "
                       "agent), then re-execute systemd and restart the services still "
                       "mapping old copies (the agent last). Needs 'libshare guest "
                       "install' first. Refused, with nothing changed, when the guest has "
                       "no responding agent, no region device or no DAX.")
    u = sub.add_parser("unredirect", help="undo redirect and guest install in a guest",
                       description="Remove exactly the binds libshare made, delete its "
                       "guest-side files and rebuild the initramfs (a domain with direct "
                       "kernel boot boots its own initrd again); restart the services "
                       "mapping region copies. After a reboot the guest runs as before.")
    for p in (r, u):
        p.add_argument("domain", metavar="DOMAIN")
        p.add_argument("--no-restart", action="store_true",
                       help="do not re-execute systemd nor restart services")
        add_json(p)
    r.set_defaults(func=_redirect)
    u.set_defaults(func=_unredirect)
