"""Filters of the libshare role's fleet view (tasks/fleet.yml): every host's
``libshare status --json`` as rows of one table, per host and trust group.

``libshare_fleet_rows(hostvars, hosts)`` returns one row per host and group: the
domains enrolled in it, running, and redirected (their guest agent reports redirected
files), and, over its running domains, the region mappings' Rss and Pss sums from
smaps (kB): ``saved_kb`` = Rss - Pss is what one shared copy saves against a copy per
guest, ``private_kb`` the region pages that are private copies (``Anonymous`` where the
status reports it, else ``Private_Dirty``: after a migration or restore, until the
guest's next power cycle). A host whose status could
not be read gets one row with its ``error``. ``libshare_fleet_table(rows)`` prints them
with a total line. Standard library only: the controller needs nothing more.
"""

from __future__ import annotations

import json
from typing import Any

COLUMNS = (("host", "HOST"), ("group", "GROUP"), ("enrolled", "ENROLLED"),
           ("running", "RUNNING"), ("redirected", "REDIRECTED"), ("saved_kb", "SAVED kB"),
           ("private_kb", "PRIVATE kB"))
NUMBERS = ("enrolled", "running", "redirected", "region_rss_kb", "region_pss_kb",
           "saved_kb", "private_kb")


def _status(hostvars: Any, host: str) -> tuple[dict[str, Any] | None, str | None]:
    """Return a host's parsed status (or None) and why it could not be read."""
    result = (hostvars.get(host) or {}).get("libshare_fleet_status")
    if not result:
        return None, "no status (unreachable or not run)"
    if result.get("rc") != 0:
        err = (result.get("stderr") or result.get("msg") or "").strip().splitlines()
        return None, err[-1] if err else f"exit {result.get('rc')}"
    try:
        return json.loads(result.get("stdout") or ""), None
    except ValueError as exc:
        return None, f"unreadable status: {exc}"


def _redirected(domain: dict[str, Any]) -> bool:
    """Return True when the domain's guest reports files redirected to the region."""
    guest = domain.get("guest") or {}
    return bool(guest.get("available")) and (guest.get("files_redirected") or 0) > 0


def fleet_rows(hostvars: Any, hosts: list[str]) -> list[dict[str, Any]]:
    """Return the fleet view's rows (see the module doc), hosts in ``hosts`` order."""
    rows = []
    for host in hosts:
        status, error = _status(hostvars, host)
        if status is None:
            rows.append({"host": host, "group": None, "error": error,
                         **{k: 0 for k in NUMBERS}})
            continue
        groups: dict[str, dict[str, Any]] = {}
        for d in status.get("domains", []):
            if not d.get("enrolled"):
                continue
            row = groups.setdefault(d.get("group") or "-", {
                "host": host, "group": d.get("group") or "-", "error": None,
                "domains": [], **{k: 0 for k in NUMBERS}})
            row["domains"].append(d.get("name"))
            row["enrolled"] += 1
            row["running"] += 1 if d.get("running") else 0
            row["redirected"] += 1 if _redirected(d) else 0
            region = (d.get("memory") or {}).get("region") or {}
            row["region_rss_kb"] += region.get("Rss", 0)
            row["region_pss_kb"] += region.get("Pss", 0)
            row["private_kb"] += region.get("Anonymous", region.get("Private_Dirty", 0))
        for row in groups.values():
            row["saved_kb"] = row["region_rss_kb"] - row["region_pss_kb"]
        rows.extend(groups[g] for g in sorted(groups))
        if not groups:
            rows.append({"host": host, "group": None, "error": None, "domains": [],
                         **{k: 0 for k in NUMBERS}})
    return rows


def fleet_table(rows: list[dict[str, Any]]) -> str:
    """Return ``rows`` as an aligned text table with a total line."""
    total = {k: sum(r.get(k, 0) for r in rows) for k in NUMBERS}
    hosts = len({r["host"] for r in rows})
    lines = [[title for _, title in COLUMNS]]
    for r in rows:
        if r.get("error"):
            lines.append([r["host"], f"(error: {r['error']})", "", "", "", "", ""])
            continue
        lines.append([str(r.get(k) if r.get(k) is not None else "-") for k, _ in COLUMNS])
    lines.append([f"{hosts} hosts", "total", *(str(total[k]) for k, _ in COLUMNS[2:])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths, strict=True))
                               ).rstrip() for line in lines)


class FilterModule:
    """The role's filters."""

    def filters(self) -> dict[str, Any]:
        """Return the filters by name."""
        return {"libshare_fleet_rows": fleet_rows, "libshare_fleet_table": fleet_table}
