"""What ``libshare status`` knows about domains, gathered without changing anything:
per domain its enrolment, whether its region image is intact, the hook's running record,
the daemon's automatic redirect state, for a running domain the host memory of its
guest-RAM and region mappings (smaps), the library mappings the region serves (read
from guest memory) and the guest's own redirect view (from its agent, bounded in time);
host-wide, each region file's page cache counted once.
"""


from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from libshare import domxml
from libshare.config import Config
from libshare.domxml.memory import guest_ram_sizes
from libshare.errors import LibshareError
from libshare.redirect import actions, daemon
from libshare.redirect.agent import AgentFactory, GuestAgent
from libshare.sharing import accounting
from libshare.util.digest import cached_sha256
from libshare.virt import api
from libshare.virt.process import qemu_pid


def library_mappings(conn: Any, name: str, cfg: Config, processes: bool) -> dict[str, Any]:
    """Return, from introspection of the running guest (nothing asked of it), how many
    library mappings it has, how many the library region serves and how many map the
    guest's own files (``from_guest_files``: each such library is a copy in that
    guest's page cache); per process too when ``processes``."""
    from libshare.introspect.survey import survey_domain

    seen = survey_domain(conn, name, cache_dir=cfg.state_dir / "introspect")
    total = seen.library_mappings()
    region = seen.region_mappings()
    out: dict[str, Any] = {"library": total, "from_region": region,
                           "from_guest_files": None if region is None else total - region,
                           "partial": seen.partial}
    if processes:
        out["processes"] = [{"pid": p.pid, "comm": p.comm, "library": p.library_mappings,
                             "from_region": p.region_mappings} for p in seen.processes]
    return out


#: seconds each program run in a guest for ``libshare status`` may take
STATUS_AGENT_TIMEOUT = 20.0


#: seconds one guest agent command may take for ``libshare status``
STATUS_AGENT_COMMAND_TIMEOUT = 5


def guest_view(dom: Any, agent_factory: AgentFactory | None = None,
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
        raw = actions.guest_status(dom, agent_factory=agent_factory or bounded,
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
    (``auto_redirect``, see :func:`libshare.redirect.daemon.auto_state`), and for a running
    domain the host memory of its guest-RAM and region mappings (``memory``), with
    ``introspect`` its library mappings from the region versus private (``mappings``)
    and, with ``agent`` and when enrolled, the guest's own redirect state (``guest``,
    see :func:`guest_view`)."""
    info = domxml.describe(domxml.parse(api.inactive_xml(dom)))
    info["running"] = api.is_active(dom)
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
            info["memory"] = accounting.domain_memory(pid, guest_ram_sizes(live), region)
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


def host_memory(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return host-wide figures: each region file's page cache counted once, the region
    Pss summed over every running domain that maps it, the copy-on-write copies of
    region pages (``region_copied_kb``: the mappings' Anonymous pages) and their
    Private_Dirty (dirty page cache of a freshly written image counts there too: not
    copies, see :mod:`libshare.sharing.accounting`)."""
    regions = {r["memory"]["region_path"] for r in rows
               if r.get("memory") and r["memory"].get("region_path")}
    cache = accounting.region_page_cache(regions)
    usages = [r["memory"]["region"] for r in rows
              if r.get("memory") and r["memory"].get("region")]
    return {"region_page_cache_kb": {p: b // 1024 for p, b in cache.items()},
            "region_pss_kb": sum(u["Pss"] for u in usages),
            "region_copied_kb": sum(accounting.copied_kb(u) for u in usages),
            "region_private_dirty_kb": sum(u["Private_Dirty"] for u in usages)}
