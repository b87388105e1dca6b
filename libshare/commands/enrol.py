"""``libshare enable|disable|status``: enrolment of libvirt domains through the API."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from libshare import capabilities, daemon, domxml, enrol, redirect, state, virt
from libshare.agent import GuestAgent
from libshare.commands.xml import MODEL_HELP, REDIRECT_HELP
from libshare.config import MODELS, REDIRECT_MODES, Config
from libshare.digest import cached_sha256
from libshare.domxml.metadata import Enrolment, check_group
from libshare.errors import LibshareError, UsageError
from libshare.output import print_json, print_table
from libshare.runtime import qemu_pid
from libshare.sharing import accounting
from libshare.units import human


def _uri_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt connection URI (default from config: qemu:///system)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _report(outcomes: list[enrol.Outcome], failures: list[dict[str, Any]],
            as_json: bool) -> int:
    if as_json:
        print_json({"domains": [o.as_dict() for o in outcomes], "errors": failures})
    else:
        for o in outcomes:
            print(f"{o.domain}: {o.message}")
    for f in failures:
        print(f"libshare: {f['domain']}: {f['error']}", file=sys.stderr)
    return 1 if failures else 0


def _recorded(conn: Any, name: str) -> Enrolment | None:
    """Return the enrolment recorded in domain ``name``'s definition, or None (also
    when the domain does not exist: enabling it then reports that)."""
    try:
        return domxml.enrolment(domxml.parse(virt.inactive_xml(virt.lookup(conn, name))))
    except LibshareError:
        return None


def _enable(args: argparse.Namespace, cfg: Config) -> int:
    outcomes, failures = [], []
    specs: dict[tuple[str, str], domxml.RegionSpec] = {}
    if args.group is not None:  # "" is refused, not the default
        check_group(args.group, "--group", UsageError)
    with virt.connect(args.connect or cfg.libvirt_uri) as conn:
        for name in args.domains:
            try:
                # an enrolled domain keeps its group and model unless told otherwise
                old = _recorded(conn, name) \
                    if not (args.group is not None and args.model) else None
                group = args.group if args.group is not None else \
                    (old.group if old else cfg.default_group)
                model = args.model or (old.model if old else cfg.default_model)
                if (group, model) not in specs:
                    specs[(group, model)] = _spec(conn, cfg, args, group, model)
                outcomes.append(enrol.enable_domain(conn, name, specs[(group, model)],
                                                    cfg.redirect))
            except LibshareError as exc:
                failures.append({"domain": name, "error": str(exc)})
    return _report(outcomes, failures, args.json)


def _spec(conn: Any, cfg: Config, args: argparse.Namespace, group: str,
          model: str) -> domxml.RegionSpec:
    """Return the region spec for ``group`` and ``model`` (virtio-pmem falls back to
    nvdimm, with a warning, on hosts where it cannot start)."""
    if model == "virtio-pmem":
        works, reason = capabilities.virtio_pmem_works(conn, cfg.state_dir)
        if not works:
            print(f"libshare: virtio-pmem cannot start on this host ({reason}); "
                  "using nvdimm", file=sys.stderr)
            model = "nvdimm"
    return replace(enrol.resolve_region(cfg, group, model, args.region),
                   redirect=args.redirect)


def _disable(args: argparse.Namespace, cfg: Config) -> int:
    outcomes, failures = [], []
    with virt.connect(args.connect or cfg.libvirt_uri) as conn:
        for name in args.domains:
            try:
                outcomes.append(enrol.disable_domain(conn, name))
            except LibshareError as exc:
                failures.append({"domain": name, "error": str(exc)})
    return _report(outcomes, failures, args.json)


def library_mappings(conn: Any, name: str, cfg: Config, processes: bool) -> dict[str, Any]:
    """Return, from introspection of the running guest (nothing asked of it), how many
    library mappings it has and how many the library region serves; per process too
    when ``processes``."""
    from libshare.introspect.survey import survey_domain

    seen = survey_domain(conn, name, cache_dir=cfg.state_dir / "introspect")
    total = seen.library_mappings()
    region = seen.region_mappings()
    out: dict[str, Any] = {"library": total, "from_region": region,
                           "private": None if region is None else total - region,
                           "partial": seen.partial}
    if processes:
        out["processes"] = [{"pid": p.pid, "comm": p.comm, "library": p.library_mappings,
                             "from_region": p.region_mappings} for p in seen.processes]
    return out


#: seconds each program run in a guest for ``libshare status`` may take
STATUS_AGENT_TIMEOUT = 20.0
#: seconds one guest agent command may take for ``libshare status``
STATUS_AGENT_COMMAND_TIMEOUT = 5


def guest_view(dom: Any, agent_factory: redirect.AgentFactory | None = None,
               timeout: float = STATUS_AGENT_TIMEOUT) -> dict[str, Any]:
    """Return the running guest's own redirect state from its agent, bounded in time:
    ``{"available": True, "installed", "mode" (how this boot's binds were made: "boot"
    in the initramfs, "runtime" later, "none"), "boot_mode", "boot_hook" (the initramfs
    hook is installed), "region_mounted", "dax",
    "region_device", "files_redirected", "maps_region", "maps_disk", "maps_stale"}``, or
    ``{"available": False, "error": why}`` when the agent cannot tell (never raises)."""
    def bounded(d: Any) -> GuestAgent:
        return GuestAgent.for_domain(d, timeout=STATUS_AGENT_COMMAND_TIMEOUT)

    try:
        raw = redirect.guest_status(dom, agent_factory=agent_factory or bounded,
                                    timeout=timeout)
    except LibshareError as exc:
        return {"available": False, "error": str(exc)}
    except Exception as exc:  # whatever the agent or libvirt throws: status goes on
        return {"available": False, "error": f"unexpected error: {exc}"}

    def flag(key: str) -> bool | None:
        return None if key not in raw else raw[key] in (1, "1")

    return {"available": True, "installed": bool(raw.get("installed")),
            "mode": raw.get("mode"), "boot_mode": flag("boot_mode"),
            "boot_hook": flag("boot_hook"), "region_mounted": flag("region_mounted"),
            "dax": flag("dax"), "region_device": raw.get("region_device"),
            "files_redirected": raw.get("binds"), "maps_region": raw.get("maps_region"),
            "maps_disk": raw.get("maps_disk"), "maps_stale": raw.get("maps_stale")}


def domain_status(dom: Any, cfg: Config, running: dict[str, dict[str, Any]],
                  introspect: bool = False, processes: bool = False,
                  agent: bool = False,
                  agent_timeout: float = STATUS_AGENT_TIMEOUT) -> dict[str, Any]:
    """Return the status object of one domain: its enrolment (with ``redirect``, its
    automatic redirect mode), whether it runs, whether its region image is present and
    intact, the hook's running record, the daemon's automatic redirect state
    (``auto_redirect``, see :func:`libshare.daemon.auto_state`), and for a running
    domain the host memory of its guest-RAM and region mappings (``memory``), with
    ``introspect`` its library mappings from the region versus private (``mappings``)
    and, with ``agent`` and when enrolled, the guest's own redirect state (``guest``,
    see :func:`guest_view`)."""
    info = domxml.describe(domxml.parse(virt.inactive_xml(dom)))
    info["running"] = virt.is_active(dom)
    info["region_ok"] = None
    if info["enrolled"] and info["region"]:
        try:
            ok = cached_sha256(info["region"], cfg.digest_cache) == info["digest"]
        except OSError:
            ok = False
        info["region_ok"] = ok
    info["record"] = running.get(dom.name())
    info["memory"] = None
    pid = qemu_pid(dom.name()) if info["running"] else None
    if pid is not None:
        live = domxml.parse(dom.XMLDesc(0))
        live_enr = domxml.enrolment(live)
        region = live_enr.region if live_enr and live_enr.model != "ivshmem" else None
        with contextlib.suppress(OSError):
            info["memory"] = accounting.domain_memory(pid, live, region)
    info["mappings"] = None
    if introspect and info["running"] and info["enrolled"]:
        try:
            info["mappings"] = library_mappings(dom.connect(), dom.name(), cfg, processes)
        except LibshareError as exc:
            info["mappings"] = {"error": str(exc)}
    info["auto_redirect"] = daemon.auto_state(
        Path(info["state_dir"] or cfg.state_dir), dom.name()) if info["enrolled"] else None
    info["guest"] = guest_view(dom, timeout=agent_timeout) \
        if agent and info["running"] and info["enrolled"] else None
    return info


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
                    _auto_text(r.get("auto_redirect")), *cells])
    return out


def host_memory(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return host-wide figures: each region file's page cache counted once, and the
    region Pss summed over every running domain that maps it."""
    regions = {r["memory"]["region_path"] for r in rows
               if r.get("memory") and r["memory"].get("region_path")}
    cache = accounting.region_page_cache(regions)
    return {"region_page_cache_kb": {p: b // 1024 for p, b in cache.items()},
            "region_pss_kb": sum(r["memory"]["region"]["Pss"] for r in rows
                                 if r.get("memory") and r["memory"].get("region")),
            "region_private_dirty_kb": sum(
                r["memory"]["region"]["Private_Dirty"] for r in rows
                if r.get("memory") and r["memory"].get("region"))}


def _status(args: argparse.Namespace, cfg: Config) -> int:
    rows = []
    with virt.connect(args.connect or cfg.libvirt_uri) as conn:
        doms = [virt.lookup(conn, n) for n in args.domains] if args.domains \
            else virt.all_domains(conn)
        records = {r.get("name", ""): r for r in state.read_running(cfg.state_dir)}
        for dom in doms:
            rows.append(domain_status(dom, cfg, records, not args.no_introspect,
                                      args.processes, agent=not args.no_agent,
                                      agent_timeout=args.agent_timeout))
    host = host_memory(rows)
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
        print_table(["DOMAIN", "REDIRECT", "AUTO-REDIRECT", "INSTALLED", "BINDS MADE",
                     "MOUNTED", "DAX", "FILES REDIRECTED", "MAPS REGION", "MAPS DISK"],
                    redirects)
    mem = [[r["name"], r["memory"]["guest_ram"]["Rss"],
            *(r["memory"]["region"][k] if r["memory"].get("region") else "-"
              for k in ("Rss", "Pss", "Shared_Clean", "Private_Dirty"))]
           for r in rows if r.get("memory")]
    if mem:
        print()
        print_table(["DOMAIN", "GUEST RAM RSS kB", "REGION RSS kB", "REGION PSS kB",
                     "SHARED_CLEAN kB", "PRIVATE_DIRTY kB"], mem)
        for path, kb in host["region_page_cache_kb"].items():
            print(f"region {path}: {kb} kB in the host page cache (counted once)")
    maps = [r for r in rows if r.get("mappings") and "error" not in r["mappings"]]
    if maps:
        print()
        print_table(["DOMAIN", "LIBRARY MAPPINGS", "FROM REGION", "PRIVATE COPIES"],
                    [[r["name"], r["mappings"]["library"], r["mappings"]["from_region"],
                      r["mappings"]["private"]] for r in maps])
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
    """Add ``enable``, ``disable`` and ``status`` to the ``libshare`` parser."""
    e = sub.add_parser("enable", help="enrol libvirt domains into their group's region",
                       description="Redefine each domain's persistent definition with the "
                       "library region device (see 'libshare xml enable'). A running "
                       "domain keeps running; the region is attached at its next boot. Run it "
                       "again after 'libshare region build' to move enrolled domains to "
                       "their group's new image (a running guest keeps the old one until "
                       "it stops).")
    e.add_argument("domains", nargs="+", metavar="DOMAIN")
    e.add_argument("--group", metavar="NAME",
                   help="trust group (default: an enrolled domain's recorded group, else "
                        "the config's default_group)")
    e.add_argument("--model", choices=MODELS,
                   help=MODEL_HELP + "; default: an enrolled domain's recorded model, else "
                        "the config's default_model")
    e.add_argument("--region", metavar="PATH",
                   help="region image (default: the group's current image)")
    e.add_argument("--redirect", choices=REDIRECT_MODES, help=REDIRECT_HELP)
    _uri_arg(e)
    e.set_defaults(func=_enable)
    d = sub.add_parser("disable", help="undo the enrolment of libvirt domains",
                       description="Redefine each domain with exactly what enrolment "
                       "added removed and what it changed restored.")
    d.add_argument("domains", nargs="+", metavar="DOMAIN")
    _uri_arg(d)
    d.set_defaults(func=_disable)
    s = sub.add_parser("status", help="show the enrolment of libvirt domains",
                       description="Show, per domain, enrolment, group, model, region "
                       "image (and whether it is intact) and whether it runs; for running "
                       "domains the host memory of their guest RAM and region mappings "
                       "(from smaps, the region's page cache counted once) and, read from "
                       "guest memory by introspection, how many library mappings the "
                       "region serves versus private copies; per enrolled domain its "
                       "automatic redirect mode, the daemon's last outcome and, from its "
                       "guest agent, the guest's own view (libshare-redirect installed, "
                       "boot mode, region mounted, DAX, files redirected, library "
                       "mappings from the region and from disk).")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--no-introspect", action="store_true",
                   help="do not read running guests' memory to count library mappings "
                   "served from the region")
    s.add_argument("--processes", action="store_true",
                   help="list library mappings from the region per process")
    s.add_argument("--no-agent", action="store_true",
                   help="do not ask running guests' agents for their own redirect state")
    s.add_argument("--agent-timeout", type=float, default=STATUS_AGENT_TIMEOUT,
                   metavar="SECONDS",
                   help="at most this long per program run through a guest agent "
                   f"(default {STATUS_AGENT_TIMEOUT:.0f}; slow TCG guests may need more)")
    _uri_arg(s)
    s.set_defaults(func=_status)
