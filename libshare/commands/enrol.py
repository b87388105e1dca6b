"""``libshare enable|disable|status``: enrolment of libvirt domains through the API."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from libshare import capabilities, domxml, enrol, state, virt
from libshare.commands.xml import MODEL_HELP
from libshare.config import MODELS, Config
from libshare.digest import cached_sha256
from libshare.errors import LibshareError
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


def _enable(args: argparse.Namespace, cfg: Config) -> int:
    model = args.model or cfg.default_model
    outcomes, failures = [], []
    with virt.connect(args.connect or cfg.libvirt_uri) as conn:
        if model == "virtio-pmem":
            works, reason = capabilities.virtio_pmem_works(conn, cfg.state_dir)
            if not works:
                print(f"libshare: virtio-pmem cannot start on this host ({reason}); "
                      "using nvdimm", file=sys.stderr)
                model = "nvdimm"
        spec = enrol.resolve_region(cfg, args.group or cfg.default_group, model,
                                    args.region)
        for name in args.domains:
            try:
                outcomes.append(enrol.enable_domain(conn, name, spec))
            except LibshareError as exc:
                failures.append({"domain": name, "error": str(exc)})
    return _report(outcomes, failures, args.json)


def _disable(args: argparse.Namespace, cfg: Config) -> int:
    outcomes, failures = [], []
    with virt.connect(args.connect or cfg.libvirt_uri) as conn:
        for name in args.domains:
            try:
                outcomes.append(enrol.disable_domain(conn, name))
            except LibshareError as exc:
                failures.append({"domain": name, "error": str(exc)})
    return _report(outcomes, failures, args.json)


def domain_status(dom: Any, cfg: Config, running: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return the status object of one domain: its enrolment, whether it runs, whether
    its region image is present and intact, the hook's running record, and for a running
    domain the host memory of its guest-RAM and region mappings (``memory``)."""
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
    return info


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
            rows.append(domain_status(dom, cfg, records))
    host = host_memory(rows)
    if args.json:
        print_json({"domains": rows, "host": host})
        return 0
    table = [[r["name"], "yes" if r["enrolled"] else "no", r["group"] or "-",
              r["model"] or "-", human(r["size"]) if r["size"] else "-",
              (r["digest"] or "-")[:12],
              {None: "-", True: "ok", False: "MISSING/CHANGED"}[r["region_ok"]],
              "running" if r["running"] else "shut off"] for r in rows]
    print_table(["DOMAIN", "ENROLLED", "GROUP", "MODEL", "SIZE", "DIGEST", "REGION", "STATE"],
                table)
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
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``enable``, ``disable`` and ``status`` to the ``libshare`` parser."""
    e = sub.add_parser("enable", help="enrol libvirt domains into their group's region",
                       description="Redefine each domain's persistent definition with the "
                       "library region device (see 'libshare xml enable'). A running "
                       "domain keeps running; the region is attached at its next boot.")
    e.add_argument("domains", nargs="+", metavar="DOMAIN")
    e.add_argument("--group", metavar="NAME", help="trust group (default from config)")
    e.add_argument("--model", choices=MODELS, help=MODEL_HELP)
    e.add_argument("--region", metavar="PATH",
                   help="region image (default: the group's current image)")
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
                       "image (and whether it is intact) and whether it runs.")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    _uri_arg(s)
    s.set_defaults(func=_status)
