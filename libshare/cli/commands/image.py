"""``libshare image prepare|status|unprepare DISK``: libshare's guest side in a guest disk
image (qcow2 or raw), offline (the work is :mod:`libshare.image.prepare`'s)."""

from __future__ import annotations

import argparse
from typing import Any

from libshare.cli.options import add_json, libvirt_uri
from libshare.cli.output import print_json
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.domxml.metadata import check_group
from libshare.errors import UsageError
from libshare.image import disk, prepare
from libshare.image.prepare import ImageReport


def _progress(args: argparse.Namespace) -> tuple[ProgressPrinter, Any]:
    """Return a progress printer for ``image ACTION DISK`` and the step callback."""
    printer = ProgressPrinter(f"image {args.image_command} {args.disk}")
    return printer, lambda phase: printer(phase, 0, 0)


def _print(rep: ImageReport) -> None:
    """Print a report for people."""
    print(f"{rep.image} ({rep.format}): {rep.action}")
    if rep.in_use:
        print(f"  in use: {rep.in_use}")
    if rep.distribution:
        print(f"  distribution: {rep.distribution['pretty']}, initramfs tool "
              f"{rep.initramfs_tool}")
    if rep.prepared is not None:
        state = "no" if not rep.prepared else ("yes, current" if rep.current
                                                else "yes, NOT current (prepare it again)")
        print(f"  prepared: {state}" + (f" (libshare {rep.libshare})" if rep.libshare else ""))
    if rep.group:
        print(f"  group: {rep.group}, region {(rep.region_digest or '-')[:16]}")
    if rep.primed:
        print(f"  primed: {rep.primed['identical']} libraries identical to the region's, "
              f"{rep.primed['differs']} differ")
    for k in rep.kernels:
        print(f"  kernel {k['version']}: {k['initramfs_image'] or 'no initramfs'}, "
              f"{k['entries']} libshare files in it")
    for f in rep.files:
        extra = f" ({f['state']})" if "state" in f else (
            "" if f.get("removed", True) else " (was absent)")
        print(f"  {f['path']}{extra}")
    if rep.seconds:
        print("  seconds: " + ", ".join(f"{k} {v}" for k, v in rep.seconds.items()))


def _run(args: argparse.Namespace, cfg: Config) -> int:
    group = None if args.image_command != "prepare" or args.group is None else \
        check_group(args.group, "--group", UsageError)
    disk.check_requirements(f"image {args.image_command}")
    printer, step = _progress(args)
    uri = libvirt_uri(args, cfg)

    def work() -> ImageReport:  # (in the child: its progress lines end there)
        try:
            if args.image_command == "prepare":
                return prepare.prepare(args.disk, cfg, uri, group=group, force=args.force,
                                       progress=step)
            if args.image_command == "unprepare":
                return prepare.unprepare(args.disk, cfg, uri, progress=step)
            return prepare.status(args.disk, cfg, uri, progress=step)
        finally:
            printer.close()

    rep = disk.run_private(work)  # no mount outlives the command, even if it is killed
    if args.json:
        print_json(rep.as_dict())
    else:
        _print(rep)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``image prepare|status|unprepare`` to the ``libshare`` parser."""
    img = sub.add_parser("image", help="libshare's guest side in guest disk images, offline",
                         description="Put libshare's guest side (what 'guest install' puts "
                         "into a running guest) into a qcow2 or raw guest disk image "
                         "without booting it, so that its clones share from their first "
                         "boot; tell what an image holds; take it out again. Needs root.")
    isub = img.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    p = isub.add_parser(
        "prepare", help="put libshare's guest side into a disk image",
        description="Write libshare-redirect, the boot hook of the image's initramfs tool "
        "(initramfs-tools or dracut), the apt/dpkg hooks and the unit into the image, "
        "rebuild the initramfs of each of its kernels inside it (chroot), check the "
        "result, and commit it. Works on an overlay: the image changes only at the end. "
        "Refused, with nothing changed, for an image in use (a running domain, a loop "
        "device, a libvirt domain's disk chain), of an unknown distribution or "
        "initramfs tool, or full. The image's own programs run as root here: prepare "
        "only images you trust.")
    p.add_argument("disk", metavar="DISK")
    p.add_argument("--group", metavar="NAME", help="also hash the image's libraries against this group's "
                   "region (its clones then bind them at first boot without hashing)")
    p.add_argument("--force", action="store_true",
                   help="prepare again even if the image already holds this libshare's "
                   "guest side")
    s = isub.add_parser("status", help="what a disk image holds (read-only)",
                        description="Tell whether the image holds libshare's guest side, "
                        "whether it is this libshare's and complete, per kernel what its "
                        "initramfs holds, and whether something uses the image.")
    s.add_argument("disk", metavar="DISK")
    u = isub.add_parser("unprepare", help="take libshare's guest side out of a disk image",
                        description="Remove exactly what 'image prepare' wrote and rebuild "
                        "the initramfs without it (on an overlay, committed at the end).")
    u.add_argument("disk", metavar="DISK")
    for parser in (p, s, u):
        add_json(parser)
        parser.set_defaults(func=_run)
