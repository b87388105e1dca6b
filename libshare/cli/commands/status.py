"""``libshare status``: enrolment, region, memory and redirect state of libvirt domains
(gathered by :mod:`libshare.status`), as tables or ``--json``."""


from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from libshare import status
from libshare.cli.options import add_json, libvirt_uri, positive_seconds
from libshare.cli.output import print_json, print_table
from libshare.config import Config
from libshare.hook import state
from libshare.sharing import accounting
from libshare.util.units import human
from libshare.virt import api


def _when(t: Any) -> str:
    """Return wall-clock time ``t`` (seconds) as local ``YYYY-MM-DD HH:MM:SS``, or '-'."""
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _auto_text(auto: dict[str, Any] | None) -> str:
    """Return the AUTO-REDIRECT cell: pending/ok/failed and when, '-' if never."""
    if not auto:
        return "-"
    return f"{auto['state']} {_when(auto.get('time'))}"


def _yes(value: Any) -> str:
    return {None: "-", True: "yes", False: "no"}.get(value, str(value))


def _this_boot_text(tb: dict[str, Any] | None) -> str:
    """Return the THIS BOOT cell: yes, no, ? (unknown) or '-' (BINDS MADE says how)."""
    if not tb:
        return "-"
    return {True: "yes", False: "no"}.get(tb["binds"], "?")


def _boot_path_text(r: dict[str, Any]) -> str:
    """Return the BOOT cell: how the domain booted (live) or boots (defined): disk,
    kernel (direct kernel boot with its own initrd) or kernel+libshare (with
    libshare's)."""
    boot = r.get("live_boot") or r.get("boot") or {}
    if not boot.get("direct_kernel"):
        return "disk"
    return "kernel+libshare" if boot.get("libshare_initrd") else "kernel"


def _redirect_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Return the rows of the redirect table: one per enrolled domain."""
    out = []
    for r in rows:
        if not r["enrolled"]:
            continue
        g = r.get("guest") or {}
        if g.get("available"):
            cells = [_yes(g["installed"]), g.get("mode") or "-", _yes(g["region_mounted"]),
                     _yes(g["dax"]), *("-" if g[k] is None else g[k] for k in
                                       ("files_redirected", "maps_region", "maps_disk"))]
        else:
            cells = ["unavailable" if g else "-"] + ["-"] * 6
        out.append([r["name"], r.get("redirect") or "off",
                    _auto_text(r.get("auto_redirect")), _boot_path_text(r),
                    _this_boot_text(r.get("this_boot")), *cells])
    return out


def _region_cells(memory: dict[str, Any]) -> list[Any]:
    """Return the region cells of a domain's memory row: Rss, Pss, Shared_Clean,
    Private_Dirty (dirty page cache counts there: not copies) and the copy-on-write
    copies (Anonymous pages), in kB; '-' without a region mapping."""
    usage = memory.get("region")
    if not usage:
        return ["-"] * 5
    return [*(usage[k] for k in ("Rss", "Pss", "Shared_Clean", "Private_Dirty")),
            accounting.copied_kb(usage)]


def _status(args: argparse.Namespace, cfg: Config) -> int:
    rows = []
    with api.connect(libvirt_uri(args, cfg)) as conn:
        doms = [api.lookup(conn, n) for n in args.domains] if args.domains \
            else api.all_domains(conn)
        records = {r.get("name", ""): r for r in state.read_running(cfg.state_dir)}
        for dom in doms:
            rows.append(status.domain_status(dom, cfg, records, not args.no_introspect,
                                      args.processes, agent=not args.no_agent,
                                      agent_timeout=args.agent_timeout))
    host = status.host_memory(rows)
    if args.json:
        print_json({"domains": rows, "host": host})
        return 0
    table = [[r["name"], "yes" if r["enrolled"] else "no", r["group"] or "-",
              r["model"] or "-", human(r["size"]) if r["size"] else "-",
              (r["digest"] or "-")[:12],
              {None: "-", True: "ok", False: "MISSING/CHANGED"}[r["region_ok"]],
              r.get("redirect") or "-",
              "running" if r["running"] else "shut off"] for r in rows]
    print_table(["DOMAIN", "ENROLLED", "GROUP", "MODEL", "SIZE", "DIGEST", "REGION",
                 "REDIRECT", "STATE"], table)
    redirects = _redirect_rows(rows)
    if redirects:
        print()
        print_table(["DOMAIN", "REDIRECT", "AUTO-REDIRECT", "BOOT", "THIS BOOT",
                     "INSTALLED", "BINDS MADE", "MOUNTED", "DAX", "FILES REDIRECTED",
                     "MAPS REGION", "MAPS DISK"], redirects)
        for r in rows:
            tb = r.get("this_boot") or {}
            if tb.get("why"):
                print(f"{r['name']}: this boot: {tb['why']}")
            note = (r.get("boot_initrd") or {}).get("note")
            if note:
                print(f"{r['name']}: libshare's initrd: {note}")
    mem = [[r["name"], r["memory"]["guest_ram"]["Rss"], *_region_cells(r["memory"])]
           for r in rows if r.get("memory")]
    if mem:
        print()
        print_table(["DOMAIN", "GUEST RAM RSS kB", "REGION RSS kB", "REGION PSS kB",
                     "SHARED_CLEAN kB", "PRIVATE_DIRTY kB", "COPIED kB"], mem)
        for path, kb in host["region_page_cache_kb"].items():
            print(f"region {path}: {kb} kB in the host page cache (counted once)")
    maps = [r for r in rows if r.get("mappings") and "error" not in r["mappings"]]
    if maps:
        print()
        print_table(["DOMAIN", "LIBRARY MAPPINGS", "FROM REGION", "FROM GUEST FILES"],
                    [[r["name"], r["mappings"]["library"], r["mappings"]["from_region"],
                      r["mappings"]["from_guest_files"]] for r in maps])
        for r in maps:
            for p in r["mappings"].get("processes", []):
                print(f"  {r['name']} pid {p['pid']} {p['comm']}: {p['from_region']}/"
                      f"{p['library']} library mappings from the region")
    for r in rows:
        if r.get("mappings") and "error" in r["mappings"]:
            print(f"{r['name']}: no introspection: {r['mappings']['error']}", file=sys.stderr)
        auto = r.get("auto_redirect") or {}
        if auto.get("state") == "failed" and auto.get("error"):
            print(f"{r['name']}: automatic redirect failed: {auto['error']}", file=sys.stderr)
        if r.get("guest") and not r["guest"].get("available"):
            print(f"{r['name']}: guest view unavailable: {r['guest']['error']}",
                  file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``status`` to the ``libshare`` parser."""
    s = sub.add_parser("status", help="show the enrolment of libvirt domains",
                       description="Show, per domain, enrolment, group, model, region "
                       "image (and whether it is intact) and whether it runs; for running "
                       "domains the host memory of their guest RAM and region mappings "
                       "(from smaps, the region's page cache counted once; COPIED: the "
                       "copy-on-write copies of region pages a guest wrote, its mapping's "
                       "Anonymous pages; PRIVATE_DIRTY also counts dirty page cache of a "
                       "freshly written image, not copies) and, read from "
                       "guest memory by introspection, how many library mappings the "
                       "region serves versus the guest's own files; per enrolled domain its "
                       "automatic redirect mode, the daemon's last outcome, how it boots "
                       "(disk, or direct kernel boot with or without libshare's initrd), "
                       "whether this boot's binds happened, how (boot: in the initramfs; "
                       "runtime) and if not why, and, from its guest agent, the guest's "
                       "own view (libshare-redirect installed, boot mode, region "
                       "mounted, DAX, files redirected, library mappings from the region "
                       "and from disk).")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--no-introspect", action="store_true",
                   help="do not read running guests' memory to count library mappings "
                   "served from the region")
    s.add_argument("--processes", action="store_true",
                   help="list library mappings from the region per process")
    s.add_argument("--no-agent", action="store_true",
                   help="do not ask running guests' agents for their own redirect state")
    s.add_argument("--agent-timeout", type=positive_seconds,
                   default=status.STATUS_AGENT_TIMEOUT,
                   metavar="SECONDS",
                   help="at most this long per program run through a guest agent "
                   f"(default {status.STATUS_AGENT_TIMEOUT:.0f}; slow TCG guests may need more)")
    add_json(s)
    s.set_defaults(func=_status)
