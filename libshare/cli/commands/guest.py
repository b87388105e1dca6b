"""``libshare guest install|status DOMAIN``: the guest-side files of redirection.

``install`` puts ``libshare-redirect``, its initramfs-tools hook and init-bottom script
(boot-time mode), the apt/dpkg hooks and a systemd unit into a running guest through
qemu-guest-agent, then sets up boot-time mode by the boot path it finds
(libshare.redirect.actions.install, libshare.redirect.bootmode) and says which path and
what it did, showing each step with its elapsed seconds on stderr (minutes under TCG).
``status`` prints the guest's own view of its redirection.
"""

from __future__ import annotations

import argparse

from libshare.cli.options import add_json, libvirt_uri
from libshare.cli.output import print_json
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.redirect import actions
from libshare.virt import api


def _install(args: argparse.Namespace, cfg: Config) -> int:
    progress = ProgressPrinter(f"guest install {args.domain}")
    try:
        with api.connect(libvirt_uri(args, cfg)) as conn:
            dom = api.lookup(conn, args.domain)
            rep = actions.install(dom, update_initramfs=not args.no_initramfs,
                                  progress=progress, state_dir=cfg.state_dir)
    finally:
        progress.close()
    if args.json:
        print_json(rep.as_dict())
        return 0 if not rep.initramfs.startswith("failed") else 1
    d = rep.domain
    print(f"{d}: region {rep.region_device} mounts with DAX")
    for f in rep.files:
        print(f"{d}: installed {f}")
    boot = rep.boot
    if boot is None:
        print(f"{d}: boot path not looked at (--no-initramfs): runtime mode only; "
              f"'libshare redirect {d}' applies it now ({rep.seconds} s)")
        return 0
    print(f"{d}: boot path: {boot['found']}")
    print(f"{d}: guest initramfs {rep.initramfs}"
          + (f" ({rep.initramfs_entries} libshare files in it)"
             if rep.initramfs == "updated" else ""))
    for line in boot["done"]:
        print(f"{d}: {line}")
    if boot["reason"]:
        what = {"runtime": "no boot-time redirect", "boot+runtime": "boot-time redirect "
                "not certain"}.get(boot["mode"], "note")
        print(f"{d}: {what}: {boot['reason']}")
    if boot["mode"] in ("boot", "boot+runtime"):
        print(f"{d}: boot-time redirect from the next start (power-cycle); 'libshare "
              f"redirect {d}' applies it now; 'libshare status {d}' says what the boot did "
              f"({rep.seconds} s)")
    return 0 if not rep.initramfs.startswith("failed") else 1


def _status(args: argparse.Namespace, cfg: Config) -> int:
    with api.connect(libvirt_uri(args, cfg)) as conn:
        dom = api.lookup(conn, args.domain)
        info = actions.guest_status(dom)
    if args.json:
        print_json({"domain": args.domain, **info})
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``guest install`` and ``guest status`` to the ``libshare`` parser."""
    g = sub.add_parser("guest", help="install libshare's guest-side files in a guest",
                       description="Manage the guest side of redirection through "
                       "qemu-guest-agent.")
    gsub = g.add_subparsers(dest="guest_command", metavar="ACTION", required=True)
    i = gsub.add_parser("install", help="put libshare-redirect and its boot/dpkg hooks "
                        "into a running guest",
                        description="Install libshare-redirect, its initramfs-tools hook "
                        "and init-bottom script (boot-time redirect), apt/dpkg hooks and "
                        "a systemd unit into a running enrolled guest, then set up "
                        "boot-time redirect by its boot path: GRUB from the guest disk "
                        "(update-initramfs -u in the guest), direct kernel boot "
                        "(libshare's own initrd: the domain's initrd with libshare's "
                        "archive appended, built under the state directory, and the "
                        "definition switched to it), or, where that cannot be done "
                        "(dracut, no initrd, ...), automatic runtime redirect after each "
                        "start; it says which. Refused, with nothing changed, when "
                        "the guest has no responding agent, no region device or no DAX.")
    i.add_argument("domain", metavar="DOMAIN")
    i.add_argument("--no-initramfs", action="store_true",
                   help="set up no boot-time redirect (runtime mode only)")
    s = gsub.add_parser("status", help="the guest's view: region mount, DAX, binds, "
                        "library mappings from region/disk",
                        description="Run libshare-redirect status in the guest (from "
                        "stdin: works without install).")
    s.add_argument("domain", metavar="DOMAIN")
    for p in (i, s):
        add_json(p)
    i.set_defaults(func=_install)
    s.set_defaults(func=_status)
