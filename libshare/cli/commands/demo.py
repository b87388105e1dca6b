"""``libshare demo``: the whole story on this host, with two Debian guests by default or
tiny busybox guests with ``--tiny`` (see libshare.demo.story)."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

from libshare.cli.options import add_json, int_between, libvirt_uri
from libshare.cli.output import print_json, print_table
from libshare.config import Config
from libshare.sharing.accounting import copied_kb

DESCRIPTION = """\
Run the whole story on this host: guests of one trust group share one region.
By default two Debian 12 guests (lsdemo-1, lsdemo-2) under TCG: build or reuse the cached
Debian image, read its root on the host read-only, import it into the store, build the
'demo' group's region (--policy usr: every file of its /usr), define and enrol the
guests through the libvirt API, boot them, read their page cache, install libshare in
each guest and power-cycle it (boot-time mode: the initramfs binds the region's
identical directories and files before PID 1 starts), then report what each guest
caches before and after, what the host sees by introspection without asking the
guests, and the host memory these files take with sharing and without.
--tiny runs the fast variant with busybox guests. The guests are always removed at the
end, on failure and on Ctrl-C or SIGTERM too."""


def _run(args: argparse.Namespace, cfg: Config) -> int:
    def say(msg: str) -> None:
        print(f"demo: {msg}", file=sys.stderr)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through the demo's cleanups (guests removed)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        from libshare.demo import story  # the guest kit loads only when the demo runs

        report = story.run_demo(cfg, libvirt_uri(args, cfg), args.guests, say,
                               tiny=args.tiny, mode=args.mode, policy=args.policy)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print_json(report)
        return 0
    if report["kind"] == "debian":
        _print_debian(report)
        return 0
    reg = report["region"]
    print(f"region: {reg['path']} ({reg['files']} libraries, {reg['size'] // 1024} kB)")
    print()
    print_table(
        ["GUEST", "DAX", "BINDS", "LIB MAPS FROM REGION", "FROM DISK", "SURVEY: FROM REGION",
         "GUEST CACHE +kB", "QEMU REGION RSS kB", "SHARED_CLEAN kB", "PRIVATE_DIRTY kB",
         "COPIED kB"],
        [[g["name"], "yes" if g["dax"] else "NO", g["binds"], g["maps_region"],
          g["maps_disk"],
          f"{g['survey']['region_mappings']}/{g['survey']['library_mappings']}",
          g["cached_growth_kb"], g["region_mapping"].get("Rss", 0),
          g["region_mapping"].get("Shared_Clean", 0),
          g["region_mapping"].get("Private_Dirty", 0),
          copied_kb(g["region_mapping"])] for g in report["guests"]])
    host = report["host"]
    print()
    print_table(["HOST", "kB"], [
        ["region pages mapped by the guests' QEMUs (sum of Rss)", host["region_rss_sum_kb"]],
        ["sum of their Pss (each page counted once)", host["region_pss_sum_kb"]],
        ["region file in the host page cache (one copy)", host["region_page_cache_kb"]],
        *_copy_rows(host),
        ["host memory for these libraries without sharing", host["without_sharing_kb"]],
        ["host memory for these libraries with libshare", host["with_sharing_kb"]],
    ])
    return 0


def _copy_rows(host: dict[str, Any]) -> list[list[Any]]:
    """Return the HOST rows about copies: the copy-on-write copies of region pages (the
    mappings' Anonymous pages) and their Private_Dirty, which is not a copy count."""
    return [["copy-on-write copies of region pages (Anonymous)", host["region_copied_kb"]],
            ["region Private_Dirty (dirty page cache of a new image; not copies)",
             host["region_private_dirty_kb"]]]


def _print_debian(report: dict[str, Any]) -> None:
    """Print the Debian demo's report as tables."""
    reg = report["region"]
    print(f"region: {reg['path']} ({reg['files']} files of the Debian image, "
          f"{reg['policy']} policy, {reg['directories_offered']} directories guests may "
          f"bind whole, {reg['size'] >> 20} MiB)")
    print()
    print("In each guest (read inside it through the guest agent, 60 s after boot): the "
          "page cache of its own disk copies, before libshare and after")
    base = report["idle_baseline_kb"]
    print_table(
        ["GUEST", "MODE", "CACHED kB BEFORE", "OF /usr", "CACHED kB AFTER", "OF /usr",
         "/usr vs IDLE BASELINE", "BINDS", "BOUND IN s", "/usr MAPS FROM REGION",
         "FROM DISK"],
        [[g["name"], g["mode"], g["before"]["cache_kb"], g["before"]["usr_cache_kb"],
          g["cache_kb"], g["usr_cache_kb"], f"{100 * g['usr_cache_kb'] / base:.1f}%",
          g["binds"], "-" if g["bind_seconds"] is None else g["bind_seconds"],
          g["maps_region"], g["maps_disk"]] for g in report["guests"]])
    for g in report["guests"]:
        print(f"{g['name']}: largest cached after: "
              + ", ".join(t.strip() for t in g["top_cached"][:3]))
    print()
    print("From the host (introspection of guest memory; each QEMU's region mapping):")
    print_table(
        ["GUEST", "SURVEY: LIB MAPS FROM REGION", "RSS kB", "PSS kB", "SHARED_CLEAN kB",
         "PRIVATE_DIRTY kB", "COPIED kB", "GUEST CACHE SAVED kB"],
        [[g["name"], f"{g['survey']['region_mappings']}/{g['survey']['library_mappings']}",
          g["region_mapping"].get("Rss", 0), g["region_mapping"].get("Pss", 0),
          g["region_mapping"].get("Shared_Clean", 0),
          g["region_mapping"].get("Private_Dirty", 0), copied_kb(g["region_mapping"]),
          g["guest_cache_saved_kb"]] for g in report["guests"]])
    print("(guest cache saved: the region pages the guest touched, as its QEMU maps them; "
          "without the region the guest would hold them in its own page cache)")
    host = report["host"]
    print()
    print_table(["HOST", "kB"], [
        ["region file in the host page cache (one copy)", host["region_page_cache_kb"]],
        *_copy_rows(host),
        ["host memory for these files without sharing (sum of Rss)",
         host["without_sharing_kb"]],
        ["host memory for these files with libshare (sum of Pss)",
         host["with_sharing_kb"]],
        ["saved", host["without_sharing_kb"] - host["with_sharing_kb"]],
    ])
    secs = report["seconds"]
    print()
    print(f"took {secs['total']:.0f} s (guests booted at {secs['boot']:.0f} s, "
          f"redirected at {secs['redirect']:.0f} s)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``libshare`` parser."""
    p = sub.add_parser("demo", help="run the built-in demo: guests share one region",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guests", type=int_between(1, 8), default=2, metavar="N",
                   help="how many demo guests (default 2; at most 4 Debian or 8 tiny ones)")
    p.add_argument("--tiny", action="store_true",
                   help="fast variant: busybox guests bind the region themselves")
    p.add_argument("--policy", choices=("usr", "elf", "libraries"), default="usr",
                   help="what the Debian demo's region holds (default usr: every file of "
                   "the image's /usr; libraries: its shared libraries only)")
    p.add_argument("--mode", choices=("boot", "runtime"), default="boot",
                   help="redirect mode of the Debian guests (default: boot, i.e. guest "
                   "install + reboot)")
    add_json(p)
    p.set_defaults(func=_run)
