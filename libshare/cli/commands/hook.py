"""``libshare hook install|uninstall|log``: the libvirt hook on this host."""

from __future__ import annotations

import argparse

from libshare.cli.options import add_json, folder, int_between
from libshare.cli.output import iso_time, print_json, print_table
from libshare.config import Config
from libshare.hook import install, state


def _install(args: argparse.Namespace, cfg: Config) -> int:
    res = install.install(folder(args.hooks_dir, "--hooks-dir"), reload=not args.no_reload)
    return _show(res, args.json)


def _uninstall(args: argparse.Namespace, cfg: Config) -> int:
    res = install.uninstall(folder(args.hooks_dir, "--hooks-dir"),
                            reload=not args.no_reload)
    return _show(res, args.json)


def _show(res: install.InstallResult, as_json: bool) -> int:
    if as_json:
        print_json({"path": str(res.path), "action": res.action, "reloaded": res.reloaded})
    else:
        line = f"{res.path}: {res.action}"
        if res.reloaded:
            line += f"; libvirt daemon reloaded (pid {', '.join(map(str, res.reloaded))})"
        print(line)
    return 0


def _log(args: argparse.Namespace, cfg: Config) -> int:
    entries = state.read_hook_log(cfg.state_dir, last=args.last)
    for e in entries:  # ISO 8601 local time beside the epoch seconds
        e["local_time"] = iso_time(e.get("time"))
    if args.json:
        print_json({"entries": entries})
    else:
        print_table(["TIME", "DOMAIN", "OP", "SUB", "STATUS", "SECONDS", "RESULT"],
                    [[e["local_time"] or e.get("time"), e.get("domain"), e.get("op"),
                      e.get("sub"), e.get("status"), e.get("seconds"), e.get("result")]
                     for e in entries])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``hook`` command group to the ``libshare`` parser."""
    p = sub.add_parser("hook", help="install or remove the libvirt qemu hook",
                       description="Manage libshare's libvirt qemu hook.")
    hs = p.add_subparsers(dest="hook_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("install", _install, "install the hook as HOOKS/qemu, or HOOKS/qemu.d/libshare "
         "when another program owns HOOKS/qemu (never overwritten), then reload libvirtd"),
        ("uninstall", _uninstall, "remove libshare's hook (only files libshare wrote)"),
    ):
        h = hs.add_parser(name, help=text, description=text)
        h.add_argument("--hooks-dir", default=str(install.DEFAULT_HOOKS_DIR),
                       metavar="DIR", help="libvirt hooks directory (default %(default)s)")
        h.add_argument("--no-reload", action="store_true",
                       help="do not send SIGHUP to libvirtd")
        add_json(h)
        h.set_defaults(func=func)
    lg = hs.add_parser("log", help="show the hook's recent invocations",
                       description="Show the last invocations recorded in STATE/log/hook.log.")
    lg.add_argument("--last", type=int_between(1), default=20, metavar="N",
                    help="how many of the last invocations (default %(default)s)")
    add_json(lg)
    lg.set_defaults(func=_log)
