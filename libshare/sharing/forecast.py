"""The forecast: what each policy's region would serve of what running guests cache now,
before they are enrolled.

Owns :func:`forecast`: from page-cache surveys of guests (read from the host by
:func:`libshare.introspect.pagecache.survey_domain_page_cache`) and the store (its
objects and imported trees), for each policy of :mod:`libshare.sharing.region.policy`:

* per guest, the bytes it caches now in its own RAM that the region would serve
  (``stop_caching``): a cached regular file counts when a file of the policy's region
  has its guest path and its size (the host cannot read the guest's bytes; a guest
  whose copy differs keeps its own, so this is an upper bound for such guests);
* for the group, what the host would hold once in the region's page cache instead
  (``host_holds``: per file the most any guest caches of it) and what it would save
  (``host_saves``: the guests' bytes minus that single copy), and the region's size
  (``region_bytes``, the policy's objects).

Files the region serves already (a DAX mount) are neither cached in guest RAM nor
counted. :func:`forecast_json` is its JSON form (the policies, and whether a guest's
survey was partial or failed), as both commands print it: ``libshare survey --page-cache
--forecast GROUP`` and ``libshare report --forecast GROUP``
(:func:`libshare.report.group_forecast`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from libshare.errors import LibshareError
from libshare.sharing.region import policy as policies
from libshare.sharing.store import StoreIndex, load_index


class CachedFileLike(Protocol):
    """What the forecast reads of one cached file (a pagecache.CachedFile)."""

    path: str | None
    size: int
    cached_bytes: int
    served_by_region: bool
    mounted: bool


class SurveyLike(Protocol):
    """What the forecast reads of one guest's survey (a pagecache.PageCacheSurvey)."""

    name: str
    files: list[Any]


@dataclass
class GuestForecast:
    """One guest under one policy: bytes cached in its RAM now (``cached``), those the
    region would serve (``stop_caching``, ``files``)."""

    name: str
    cached: int = 0
    stop_caching: int = 0
    files: int = 0


@dataclass
class PolicyForecast:
    """One policy for the whole group: per guest, the single copy the host would hold,
    what it would save, and the region's size (its objects)."""

    policy: str
    guests: list[GuestForecast] = field(default_factory=list)
    host_holds: int = 0
    host_saves: int = 0
    region_bytes: int = 0
    region_files: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the forecast of this policy as a JSON-ready dict."""
        return {"policy": self.policy, "error": self.error,
                "guests": [g.__dict__ for g in self.guests], "host_holds": self.host_holds,
                "host_saves": self.host_saves, "region_bytes": self.region_bytes,
                "region_files": self.region_files,
                "stop_caching": sum(g.stop_caching for g in self.guests)}


def _cached_in_ram(s: SurveyLike) -> list[CachedFileLike]:
    """Return the files of survey ``s`` held in the guest's own RAM, with a path."""
    return [f for f in s.files if f.path and f.mounted and not f.served_by_region
            and not f.path.endswith(" (deleted)")]


def _served(plan: policies.Plan) -> dict[str, set[int]]:
    """Return guest path -> sizes of the files the plan's region serves at that path."""
    out: dict[str, set[int]] = {}
    for e in plan.entries:
        for p in e.paths:
            out.setdefault(p, set()).add(e.size)
    return out


def forecast(surveys: Sequence[SurveyLike], store_dir: Path, index: StoreIndex | None = None,
             trees: list[str] | None = None,
             which: Iterable[str] = policies.POLICIES) -> list[PolicyForecast]:
    """Return, for each policy of ``which``, what its region (built from the store at
    ``store_dir``, ``index`` loaded if None, from the trees ``trees``: default all)
    would serve of what the surveyed guests cache (see the module docstring). A policy
    the store cannot plan (no tree for ``usr``) has ``error`` set instead of figures."""
    index = load_index(store_dir) if index is None else index
    observed = policies.observed_paths(surveys)
    out = []
    for name in which:
        pf = PolicyForecast(name)
        try:
            plan = policies.plan_region(store_dir, index, name, trees, observed)
        except LibshareError as exc:      # this policy cannot be planned: said per policy
            pf.error = str(exc)
            out.append(pf)
            continue
        served = _served(plan)
        pf.region_bytes = sum(e.size for e in plan.entries)
        pf.region_files = len(plan.entries)
        most: dict[tuple[str, int], int] = {}
        for s in surveys:
            g = GuestForecast(s.name)
            for f in _cached_in_ram(s):
                g.cached += f.cached_bytes
                if f.size in served.get(f.path or "", ()):
                    g.stop_caching += f.cached_bytes
                    g.files += 1
                    key = (f.path or "", f.size)
                    most[key] = max(most.get(key, 0), f.cached_bytes)
            pf.guests.append(g)
        pf.host_holds = sum(most.values())
        pf.host_saves = sum(g.stop_caching for g in pf.guests) - pf.host_holds
        out.append(pf)
    return out


def forecast_json(group: str, rows: Sequence[PolicyForecast], surveys: Sequence[Any],
                  failures: Sequence[str]) -> dict[str, Any]:
    """Return the JSON object of the forecast ``rows`` of ``group`` made from ``surveys``
    (each with ``name``, ``partial``, ``errors``): ``group``, ``partial`` (a survey was
    partial, its ``errors`` "name: error" each, or a guest could not be surveyed:
    ``failed``, "name: reason" each), ``policies``."""
    return {"group": group,
            "partial": bool(failures) or any(s.partial for s in surveys),
            "errors": [f"{s.name}: {e}" for s in surveys for e in s.errors],
            "failed": list(failures), "policies": [r.as_dict() for r in rows]}
