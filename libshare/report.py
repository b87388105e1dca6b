"""What ``libshare report`` gathers: the memory libshare saves on this host now, per
running domain, per trust group and for the host, beside what KSM saves.

Per running domain, from one read of its QEMU's ``/proc/PID/smaps`` (per mapping, never
process totals: TCG's translation buffer dominates those):

- the region mapping: ``mapped`` (Rss: the region pages this guest uses), ``pss``, and
  ``saved`` = Rss - Pss: what the guest would hold in its own page cache for those pages
  less its share of the host's one copy. A group's saving is Σ Rss - Σ Pss.
- ``copied``: anonymous pages in the region mapping (smaps ``Anonymous``): copy-on-write
  copies of region pages, one per guest write. They must be 0.
- the guest-RAM mapping: Rss, Pss and their difference, what KSM merged of this guest
  (a merged page stays in every mapper's Rss; Pss divides it), with ``/proc/PID/ksm_stat``.

With ``page_cache``, also the file pages each guest still holds in its own page cache
that its group's region could serve (a cached file not served by the region whose path
and size are those of a region file), read from guest memory by introspection
(:func:`libshare.introspect.pagecache.survey_domain_page_cache`: no agent, no pause).
That walk reads every inode of the guest's kernel (0.3-0.5 s of CPU per Debian guest):
it is opt-in so that a plain report stays cheap enough to run every minute. Guests on
hugepages are not read: reading a private hugetlbfs mapping through /proc/PID/mem
allocates every huge page it touches (measured: a guest's 182 MiB became 512 MiB).

With ``forecast`` (a trust group), also what each region policy would serve of what
the guests cache now (:func:`group_forecast`: the same page-cache walk, then
:func:`libshare.sharing.forecast.forecast`), for guests not yet enrolled as for those
that are.

Host-wide: the savings summed, each region file's host page cache counted once, and
KSM's own figures (:func:`libshare.sharing.ksm.host_ksm`). Every figure is in bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from libshare import domxml
from libshare.config import Config
from libshare.domxml.memory import guest_ram_sizes
from libshare.errors import LibshareError
from libshare.sharing import accounting, ksm
from libshare.virt import api
from libshare.virt.process import qemu_pid

KB = 1024


def region_figures(region: dict[str, int]) -> dict[str, int]:
    """Return the report's figures (bytes) of one domain's summed region mappings
    (``region``: :func:`libshare.sharing.accounting.summed` counters in kB)."""
    return {"mapped_bytes": region["Rss"] * KB, "pss_bytes": region["Pss"] * KB,
            "saved_bytes": max(region["Rss"] - region["Pss"], 0) * KB,
            "copied_bytes": accounting.copied_kb(region) * KB,
            "shared_clean_bytes": region["Shared_Clean"] * KB,
            "mappings": region["mappings"]}


def ram_figures(ram: dict[str, int], merged: dict[str, int] | None) -> dict[str, Any]:
    """Return the report's figures (bytes) of one domain's guest-RAM mappings (``ram``:
    summed counters in kB) with what KSM merged of its process (``merged``:
    :func:`libshare.sharing.ksm.process_ksm`)."""
    return {"resident_bytes": ram["resident"] * KB, "rss_bytes": ram["Rss"] * KB,
            "pss_bytes": ram["Pss"] * KB, "hugetlb_bytes": (ram["resident"] - ram["Rss"]) * KB,
            "ksm_saved_bytes": max(ram["Rss"] - ram["Pss"], 0) * KB,
            "ksm_merging_pages": (merged or {}).get("ksm_merging_pages"),
            "ksm_profit_bytes": (merged or {}).get("ksm_process_profit")}


def domain_memory(pid: int, ram_sizes: list[int], region: str | None,
                  proc: Path = accounting.PROC) -> dict[str, Any]:
    """Return the memory figures of one running domain whose QEMU is ``pid`` (guest RAM
    blocks of ``ram_sizes`` bytes; ``region`` the file its region device maps, or None),
    from one read of its smaps: ``guest_ram`` (:func:`ram_figures`) and ``region``
    (:func:`region_figures`, None without a region)."""
    maps = accounting.smaps(pid, proc)
    ram = accounting.summed(accounting.guest_ram_mappings(maps, ram_sizes))
    out: dict[str, Any] = {"guest_ram": ram_figures(ram, ksm.process_ksm(pid, proc)),
                           "region": None, "region_path": None}
    if region:
        out["region_path"] = os.path.realpath(region)
        out["region"] = region_figures(
            accounting.summed(accounting.region_mappings(maps, region)))
    return out


def region_guest_files(path: str) -> dict[str, int]:
    """Return the guest paths the region image ``path`` serves, each with its file size
    in bytes, from the image's manifest; empty when it cannot be read."""
    from libshare.sharing.formats.erofs import Erofs, ErofsError
    from libshare.sharing.region import layout, manifest

    try:
        with open(path, "rb") as fh:
            files = manifest.read_manifest(Erofs(fh, offset=layout.DATAOFF))["files"]
    except (OSError, ErofsError, KeyError, TypeError, ValueError):
        return {}
    out: dict[str, int] = {}
    for f in files:
        if isinstance(f, dict) and isinstance(f.get("size"), int):
            for g in f.get("guest_paths") or []:
                if isinstance(g, str):
                    out[g] = f["size"]
    return out


def servable(files: Iterable[Any], guest_files: dict[str, int]) -> dict[str, int]:
    """Return, for one guest's cached files (:class:`~libshare.introspect.pagecache.CachedFile`
    items), ``private_bytes`` (file pages in guest RAM), ``servable_bytes`` (those of files
    the region could serve: same path and size as a region file, not served by it) and
    ``served_bytes`` (files the region serves: DAX entries, the host's copy)."""
    private = serv = served = 0
    for f in files:
        if f.served_by_region:
            served += f.cached_bytes
            continue
        private += f.cached_bytes
        path = (f.path or "").removesuffix(" (deleted)")
        if f.mounted and f.path and not f.path.endswith(" (deleted)") \
                and guest_files.get(path) == f.size:
            serv += f.cached_bytes
    return {"private_bytes": private, "servable_bytes": serv, "served_bytes": served}


PageCacheSurveyor = Callable[[Any, str], Any]


def _survey_page_cache(conn: Any, name: str, cfg: Config) -> Any:
    """Return the page-cache survey of running domain ``name`` (no pause, no agent)."""
    from libshare.introspect.pagecache import survey_domain_page_cache

    return survey_domain_page_cache(conn, name, cache_dir=cfg.state_dir / "introspect")


def page_cache_figures(survey: Any, guest_files: dict[str, int]) -> dict[str, Any]:
    """Return the report's page-cache figures of one guest from its survey: those of
    :func:`servable`, ``partial``, ``errors`` (at most 3) and the walk's ``cpu_seconds``."""
    return {**servable(survey.files, guest_files), "partial": survey.partial,
            "errors": survey.errors[:3], "cpu_seconds": round(survey.cpu_seconds, 4)}


def domain_row(conn: Any, dom: Any, cfg: Config, page_cache: bool = False,
               guest_files: Callable[[str], dict[str, int]] = region_guest_files,
               proc: Path = accounting.PROC,
               surveys: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Return the report row of domain ``dom`` on libvirt connection ``conn``, or None when it is not running (or its
    QEMU is gone): ``name``, ``enrolled``, ``group``, ``model``, ``qemu_pid``, the figures
    of :func:`domain_memory` and, with ``page_cache``, ``page_cache``
    (:func:`page_cache_figures`, or ``{"error": why}``; the survey itself is kept in
    ``surveys`` by domain name when given). A region shared through ivshmem
    (``/dev/shm``, guest writes shared) is not accounted: ``region`` is None."""
    name = dom.name()
    pid = qemu_pid(name) if api.is_active(dom) else None
    if pid is None:
        return None
    try:
        live = domxml.parse(dom.XMLDesc(0))
    except Exception:  # the domain stopped since it was listed (libvirtError)
        return None
    enr = domxml.enrolment(live)
    region = enr.region if enr and enr.model != "ivshmem" else None
    try:
        mem = domain_memory(pid, guest_ram_sizes(live), region, proc)
    except OSError:
        return None
    row: dict[str, Any] = {"name": name, "enrolled": enr is not None,
                           "group": enr.group if enr else None,
                           "model": enr.model if enr else None, "qemu_pid": pid, **mem,
                           "page_cache": None}
    if page_cache and mem["region_path"] and mem["guest_ram"]["hugetlb_bytes"]:
        row["page_cache"] = {"error": HUGEPAGES}
    elif page_cache and mem["region_path"]:
        try:
            seen = _survey_page_cache(conn, name, cfg)
            if surveys is not None:
                surveys[name] = seen
            row["page_cache"] = page_cache_figures(seen, guest_files(mem["region_path"]))
        except LibshareError as exc:
            row["page_cache"] = {"error": str(exc)}
    return row


HUGEPAGES = ("guest RAM on hugepages: not read (reading it through /proc/PID/mem would "
             "allocate every huge page)")


def group_forecast(conn: Any, cfg: Config, group: str, names: list[str] | None,
                   rows: list[dict[str, Any]], trees: list[str] | None = None,
                   taken: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the forecast of trust group ``group`` (:func:`~libshare.sharing.forecast.
    forecast_json`, the store's trees ``trees``, default all) for the running domains
    ``names`` (default: those enrolled in ``group``), from their page cache read now;
    ``rows`` are the report's rows (a domain without one is not running; one on
    hugepages is not read; ``taken``: page-cache surveys the report took already, by
    name, not walked again). Raises LibshareError when ``group`` has no running domain."""
    from libshare.introspect.session import each_domain
    from libshare.sharing.forecast import forecast, forecast_json

    names = names or api.running_group_domains(conn, group)
    if not names:
        raise LibshareError(f"no running domains enrolled in group {group}: nothing to "
                            "forecast")
    by_name = {r["name"]: r for r in rows}

    def survey(name: str) -> Any:
        row = by_name.get(name)
        if row is None:
            raise LibshareError("not running")
        if row["guest_ram"]["hugetlb_bytes"]:
            raise LibshareError(HUGEPAGES)
        if taken and name in taken:
            return taken[name]
        return _survey_page_cache(conn, name, cfg)

    surveys, failures = each_domain(names, survey, single_raises=False)
    return forecast_json(group, forecast(surveys, cfg.store_dir, trees=trees), surveys,
                         failures)


def _total(rows: Iterable[dict[str, Any]], part: str, key: str) -> int:
    """Return ``row[part][key]`` summed over ``rows`` where present."""
    return sum(r[part][key] for r in rows if r.get(part) and isinstance(r[part].get(key), int))


def group_rows(rows: list[dict[str, Any]],
               page_cache_bytes: Callable[[str], int]) -> list[dict[str, Any]]:
    """Return one row per trust group of the enrolled ``rows``: its ``domains``, region
    files, ``mapped_bytes``/``pss_bytes`` (Σ Rss, Σ Pss), ``saved_bytes`` (Σ Rss - Σ Pss),
    ``copied_bytes``, ``region_page_cache_bytes`` (each region file once,
    ``page_cache_bytes(path)``) and, when surveyed, ``private_bytes``/``servable_bytes``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["group"] is not None:
            groups.setdefault(r["group"], []).append(r)
    out = []
    for group, members in sorted(groups.items()):
        regions = sorted({r["region_path"] for r in members if r["region_path"]})
        surveyed = [r for r in members if r.get("page_cache") and "error" not in r["page_cache"]]
        out.append({
            "group": group, "domains": [r["name"] for r in members], "regions": regions,
            "mapped_bytes": _total(members, "region", "mapped_bytes"),
            "pss_bytes": _total(members, "region", "pss_bytes"),
            "saved_bytes": _total(members, "region", "saved_bytes"),
            "copied_bytes": _total(members, "region", "copied_bytes"),
            "region_page_cache_bytes": sum(page_cache_bytes(p) for p in regions),
            "private_bytes": _total(surveyed, "page_cache", "private_bytes") if surveyed else None,
            "servable_bytes": _total(surveyed, "page_cache", "servable_bytes") if surveyed else None,
        })
    return out


def _page_cache_or_zero(path: str) -> int:
    """Return the host page cache of region file ``path`` in bytes (0 if unreadable)."""
    try:
        return accounting.page_cache_bytes(path)
    except OSError:
        return 0


def host_row(rows: list[dict[str, Any]], groups: list[dict[str, Any]],
             ksm_state: dict[str, Any]) -> dict[str, Any]:
    """Return the host totals: domains, enrolled ones, the region figures summed, the
    region files' page cache (each once), the servable private file pages (None if not
    surveyed), KSM's saving and its whole state (``ksm``)."""
    surveyed = [g for g in groups if g["servable_bytes"] is not None]
    return {
        "domains": len(rows), "enrolled": sum(1 for r in rows if r["enrolled"]),
        "region_saved_bytes": sum(g["saved_bytes"] for g in groups),
        "region_copied_bytes": sum(g["copied_bytes"] for g in groups),
        "region_mapped_bytes": sum(g["mapped_bytes"] for g in groups),
        "region_page_cache_bytes": sum(g["region_page_cache_bytes"] for g in groups),
        "private_servable_bytes": sum(g["servable_bytes"] for g in surveyed) if surveyed else None,
        "guest_ram_resident_bytes": _total(rows, "guest_ram", "resident_bytes"),
        "guests_ksm_saved_bytes": _total(rows, "guest_ram", "ksm_saved_bytes"),
        "ksm_saved_bytes": ksm_state["saved_bytes"], "ksm": ksm_state,
    }


def build_report(rows: list[dict[str, Any]], ksm_state: dict[str, Any],
                 page_cache_bytes: Callable[[str], int] = _page_cache_or_zero
                 ) -> dict[str, Any]:
    """Return the whole report from the domain ``rows`` and the host's KSM state:
    ``domains``, ``groups`` (:func:`group_rows`), ``host`` (:func:`host_row`), ``time``."""
    groups = group_rows(rows, page_cache_bytes)
    return {"time": time.time(), "domains": rows, "groups": groups,
            "host": host_row(rows, groups, ksm_state)}


def gather(conn: Any, cfg: Config, names: list[str] | None = None,
           page_cache: bool = False, proc: Path = accounting.PROC,
           ksm_dir: Path = ksm.KSM_DIR, forecast: str | None = None,
           trees: list[str] | None = None) -> dict[str, Any]:
    """Return the report (:func:`build_report`) of the running domains on ``conn``
    (``names``: only those, each must exist; shut-off ones are listed in ``skipped``),
    with the CPU and wall seconds the gathering took (``cost``). ``page_cache`` adds
    each enrolled guest's private file pages the region could serve (introspection);
    ``forecast`` (a group) adds ``forecast`` (:func:`group_forecast` of ``names``, from
    ``trees``), else None."""
    t0, c0 = time.perf_counter(), time.process_time()
    doms = [api.lookup(conn, n) for n in names] if names else api.all_domains(conn)
    rows, skipped = [], []
    manifests: dict[str, dict[str, int]] = {}
    surveys: dict[str, Any] = {}           # page-cache walks, taken once for both uses

    def guest_files(path: str) -> dict[str, int]:
        if path not in manifests:
            manifests[path] = region_guest_files(path)
        return manifests[path]

    for dom in doms:
        with contextlib.suppress(LibshareError) if not names else contextlib.nullcontext():
            row = domain_row(conn, dom, cfg, page_cache, guest_files, proc, surveys)
            if row is None:
                skipped.append(dom.name())
            else:
                rows.append(row)
    out = build_report(rows, ksm.host_ksm(ksm_dir, proc))
    out["skipped"] = skipped if names else []
    out["page_cache_surveyed"] = page_cache
    out["forecast"] = (group_forecast(conn, cfg, forecast, names, rows, trees, surveys)
                       if forecast is not None else None)
    out["cost"] = {"cpu_seconds": round(time.process_time() - c0, 4),
                   "wall_seconds": round(time.perf_counter() - t0, 4)}
    return out
