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
from libshare.boot import store as boot_store
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
    "region_device", "files_redirected", "maps_region", "maps_disk", "maps_stale",
    "boot_ran" (libshare's init-bottom script ran at this boot), "boot_via" (in an
    initrd the guest built, "guest", or libshare built on the host, "host"),
    "boot_release", "boot_modules" (that initrd carried the region's modules for the
    running kernel), "boot_refused" (why it bound nothing), "boot_rc" (its exit
    status), "installed_after_boot"}``, or ``{"available": False, "error": why}`` when
    the agent cannot tell (never raises)."""
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
            "maps_disk": raw.get("maps_disk"), "maps_stale": raw.get("maps_stale"),
            "boot_ran": flag("boot_ran"), "boot_via": raw.get("boot_via"),
            "boot_release": None if raw.get("boot_release") is None
            else str(raw["boot_release"]), "boot_modules": flag("boot_modules"),
            "boot_refused": raw.get("boot_refused"), "boot_rc": raw.get("boot_rc"),
            "installed_after_boot": flag("installed_after_boot")}


def this_boot(info: dict[str, Any]) -> dict[str, Any] | None:
    """Return whether the binds of this boot of a running enrolled domain happened, for
    ``libshare status``: ``{"binds": True|False|None (unknown), "how": "boot" (in the
    initramfs) | "runtime" | None, "why": one line or None}``, from the status object
    ``info`` of :func:`domain_status` (its ``guest`` view, ``live_boot``, ``boot``,
    ``live_device_present``, ``auto_redirect``); None for a domain that is not running
    or not enrolled."""
    if not info.get("running") or not info.get("enrolled"):
        return None
    name = info.get("name") or "DOMAIN"
    live, nxt = info.get("live_boot") or {}, info.get("boot") or {}
    if info.get("live_device_present") is False:
        return {"binds": False, "how": None, "why": "the region device is attached at "
                "the next start (enrolled while running): power-cycle"}
    g = info.get("guest") or {}
    if not g.get("available"):
        why = f"guest agent: {g['error']}" if g.get("error") else \
            "the guest was not asked (--no-agent)"
        return {"binds": None, "how": None, "why": why}
    if (g.get("files_redirected") or 0) > 0:
        how = g.get("mode") if g.get("mode") in ("boot", "runtime") else None
        note = None
        if how == "runtime" and g.get("boot_ran") and g.get("boot_refused"):
            note = f"boot-time apply refused: {g['boot_refused']}"
        return {"binds": True, "how": how, "why": note}
    if not g.get("installed"):
        why = f"libshare-redirect is not installed in the guest ('libshare guest install {name}')"
    elif g.get("boot_ran") and g.get("boot_refused"):
        why = _refusal(str(g["boot_refused"]), g, live)
    elif g.get("boot_ran") and g.get("boot_rc") not in (None, 0, "0"):
        why = f"boot-time apply failed (exit {g['boot_rc']})"
    elif g.get("region_device") is None:
        why = "region device missing in the guest (no /dev/pmem* with the region's label)"
    elif g.get("dax") is False:
        why = "no DAX: the region is mounted without it"
    elif live.get("direct_kernel") and not live.get("libshare_initrd"):
        why = "direct kernel boot: the guest's initramfs is not booted"
        if nxt.get("libshare_initrd"):
            why += "; libshare's initrd is booted from the next start: power-cycle"
        else:
            why += f" (run 'libshare guest install {name}')"
    elif g.get("installed_after_boot"):
        why = "installed after this boot: power-cycle"
    elif g.get("boot_ran") is False:
        why = ("the initramfs this boot ran has no libshare hook "
               f"(run 'libshare guest install {name}' and power-cycle)")
    else:
        why = "nothing bound"
    auto = info.get("auto_redirect") or {}
    if info.get("redirect") == "runtime" and auto.get("state") in ("pending", "failed"):
        why += f"; automatic runtime redirect {auto['state']}"
        if auto.get("error"):
            why += f": {auto['error']}"
    return {"binds": False, "how": None, "why": why}


def _refusal(refused: str, g: dict[str, Any], live: dict[str, Any]) -> str:
    """Return the reason for status of a boot-time apply that refused with ``refused``."""
    if "DAX" in refused:
        return f"no DAX: {refused}"
    if "no region device" in refused:
        why = "region device missing at boot"
        if g.get("boot_via") == "host" and g.get("boot_modules") is False:
            why += (f" (libshare's initrd has no modules for kernel {g.get('boot_release')}:"
                    " kernel updated on the host? run 'libshare guest install' again)")
        return why
    return f"boot-time apply refused: {refused}"


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
    see :func:`guest_view`) and whether this boot's binds happened (``this_boot``, see
    :func:`this_boot`). ``boot`` is how the definition boots next and ``live_boot`` how
    the running domain booted (:func:`libshare.domxml.boot_of`); ``boot_initrd`` is the
    record of libshare's initrd (:mod:`libshare.boot.store`) of a domain booting it."""
    info = domxml.describe(domxml.parse(api.inactive_xml(dom)))
    info["running"] = api.is_active(dom)
    info["live_boot"] = info["live_device_present"] = None
    if info["running"]:
        # libvirt or XML errors (the domain stopped meanwhile): nothing known of it live
        with contextlib.suppress(Exception):
            live_desc = domxml.describe(domxml.parse(dom.XMLDesc(0)))
            info["live_boot"] = live_desc["boot"]
            info["live_device_present"] = live_desc["device_present"]
    info["boot_initrd"] = None
    if info["boot"]["libshare_initrd"]:
        with contextlib.suppress(LibshareError):
            rec = boot_store.load(Path(info["state_dir"] or cfg.state_dir),
                                  dom.UUIDString())
            info["boot_initrd"] = None if rec is None else rec.as_dict()
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
    info["this_boot"] = this_boot(info)
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
