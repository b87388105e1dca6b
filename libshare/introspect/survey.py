"""The library survey: which shared objects the tasks of running guests map, how much of
each is resident, and what one shared copy per library would save across guests.

Owns :func:`walk_kernel` (tasks, their mms and file-backed ``.so`` mappings of one
understood kernel, into a :class:`DomainSurvey`), :func:`survey_domain` (open a running
domain's memory, understand its kernel - from the per-boot cache of
:mod:`libshare.introspect.cache` when it is still valid, else by scanning guest RAM - and
walk it, optionally paused, retrying a walk torn by the
running guest), :func:`summarize` (the cross-domain table, largest saving first) and
:func:`to_json`.

A library is what the seed study counted: a path containing ".so" mapped file-backed by
any task. ``resident_pages`` counts distinct guest page frames under present PTEs of all
of its mappings in all processes (a page mapped by ten processes counts once);
``shared_pages`` counts those under mappings without write permission (the page-cache
pages a shared copy can replace).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.introspect.helpers.fs import file_fs, file_path, is_region_fs
from libshare.introspect.helpers.mm import (
    VM_WRITE,
    build_id,
    for_each_vma,
    map_count,
    mm_pgd,
    resident_frames,
)
from libshare.introspect.helpers.tasks import for_each_task, for_each_thread, task_info
from libshare.introspect.kernel import Kernel, WalkError
from libshare.introspect.layout import Layout
from libshare.introspect.memory import PAGE_SIZE
from libshare.introspect.paging import WalkStats

log = logging.getLogger(__name__)
RETRIES = 3


@dataclass
class Library:
    """One shared object in one guest."""

    path: str
    build_id: str | None = None
    resident_pages: int = 0
    shared_pages: int = 0
    mappings: int = 0
    processes: int = 0
    region_mappings: int | None = 0   # mappings served by the library region (None: unknown)


@dataclass
class ProcessMappings:
    """How one process maps its libraries: in all, and from the library region."""

    pid: int
    comm: str
    library_mappings: int
    region_mappings: int | None


@dataclass
class DomainSurvey:
    """The survey of one guest; ``partial`` with ``errors`` if a walk was incomplete."""

    name: str
    kernel: str = ""
    banner: str = ""
    tasks: int = 0
    threads: int = 0
    task_list: list[tuple[int, str, str]] = field(default_factory=list)  # pid, comm, name
    libraries: list[Library] = field(default_factory=list)
    partial: bool = False
    errors: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    scanned: bool = False
    paging_levels: int = 4
    processes: list[ProcessMappings] = field(default_factory=list)

    def library_mappings(self) -> int:
        """Return how many library mappings the guest's processes have in all."""
        return sum(lib.mappings for lib in self.libraries)

    def region_mappings(self) -> int | None:
        """Return how many library mappings the region serves (None if unknown)."""
        counts = [lib.region_mappings for lib in self.libraries]
        return None if any(c is None for c in counts) else sum(c or 0 for c in counts)


def is_library(path: str) -> bool:
    """Return True if a mapped file path counts as a shared library (contains ".so")."""
    return ".so" in path


@dataclass
class _MmLibs:
    """The libraries of one mm: path -> (frames, shared frames, mappings, build-id)."""

    frames: dict[str, set[int]] = field(default_factory=dict)
    shared: dict[str, set[int]] = field(default_factory=dict)
    mappings: dict[str, int] = field(default_factory=dict)
    build_ids: dict[str, str] = field(default_factory=dict)
    region: dict[str, int] = field(default_factory=dict)   # mappings from the region
    fs_known: bool = True


def _on_pmem(fs: tuple[str, str] | None) -> bool:
    """Return True if ``fs`` (from :func:`file_fs`) sits on a pmem device, whose DAX
    mappings point outside guest RAM by design, or is unknown (a layout without the
    filesystem members cannot tell)."""
    return fs is None or fs[1].startswith("pmem")


def mm_libraries(k: Kernel, pid: int, mm: int, paths: dict[int, str],
                 stats: WalkStats | None = None,
                 filesystems: dict[int, tuple[str, str] | None] | None = None) -> _MmLibs:
    """Return the libraries mapped by ``mm`` (of process ``pid``) with their resident
    frames and how many mappings the library region serves; ``paths`` and
    ``filesystems`` cache ``struct file`` -> path / filesystem. Raises WalkError if the
    VMAs walked disagree with ``mm->map_count`` or any structure is inconsistent."""
    out = _MmLibs()
    fss = {} if filesystems is None else filesystems
    pgd = mm_pgd(k, mm)
    vmas = list(for_each_vma(k, mm))
    expected = map_count(k, mm)
    if len(vmas) != expected:
        raise WalkError(f"pid {pid}: {len(vmas)} VMAs walked, map_count {expected}")
    for vma in vmas:
        if not vma.file:
            continue
        if vma.file not in paths:
            paths[vma.file] = file_path(k, vma.file)
        path = paths[vma.file]
        if not is_library(path):
            continue
        out.mappings[path] = out.mappings.get(path, 0) + 1
        if vma.file not in fss:
            fss[vma.file] = file_fs(k, vma.file)
        if fss[vma.file] is None:
            out.fs_known = False
        elif is_region_fs(fss[vma.file]):
            out.region[path] = out.region.get(path, 0) + 1
        # a DAX mapping of a pmem filesystem (the library region) maps device memory
        got = set(resident_frames(k, pgd, vma.start, vma.end, stats,
                                  device_ok=_on_pmem(fss[vma.file])))
        out.frames.setdefault(path, set()).update(got)
        if not vma.flags & VM_WRITE:
            out.shared.setdefault(path, set()).update(got)
        if path not in out.build_ids and vma.pgoff == 0:
            bid = build_id(k, pgd, vma)
            if bid:
                out.build_ids[path] = bid
    return out


def walk_kernel(k: Kernel, name: str = "", tolerant: bool = False,
                retries: int = RETRIES) -> DomainSurvey:
    """Return the survey of the kernel ``k``: task list, thread count and libraries.
    A process whose walk meets inconsistent data (it exec'd or exited meanwhile) is
    re-read up to ``retries`` times; after that a WalkError is raised unless
    ``tolerant``, in which case the process is left out and the result marked partial.
    A torn task list always raises WalkError."""
    out = DomainSurvey(name, kernel=k.info.release, banner=k.info.banner,
                       paging_levels=k.levels)
    frames: dict[str, set[int]] = {}
    shared: dict[str, set[int]] = {}
    libs: dict[str, Library] = {}
    seen_mm: set[int] = set()
    paths: dict[int, str] = {}
    filesystems: dict[int, tuple[str, str] | None] = {}
    stats = WalkStats()
    for addr in for_each_task(k):
        t = task_info(k, addr)
        out.task_list.append((t.pid, t.comm, t.name))
        mine: _MmLibs | None = None
        error = ""
        for attempt in range(retries + 1):
            try:
                if attempt:
                    k.invalidate()
                    paths.clear()
                    filesystems.clear()
                    t = task_info(k, addr)
                threads = sum(1 for _ in for_each_thread(k, addr))
                if not t.mm or t.mm in seen_mm:
                    mine = _MmLibs()
                else:
                    mine = mm_libraries(k, t.pid, t.mm, paths, stats, filesystems)
                    seen_mm.add(t.mm)
                out.threads += threads
                break
            except WalkError as exc:
                error = str(exc)
                mine = None
        if mine is None:
            if not tolerant:
                raise WalkError(f"pid {t.pid} ({t.comm}): {error}")
            out.partial = True
            out.errors.append(f"pid {t.pid} ({t.comm}): {error}")
            continue
        if mine.mappings:
            out.processes.append(ProcessMappings(
                t.pid, t.comm, sum(mine.mappings.values()),
                sum(mine.region.values()) if mine.fs_known else None))
        for path, count in mine.mappings.items():
            lib = libs.setdefault(path, Library(path))
            lib.mappings += count
            lib.processes += 1
            if lib.region_mappings is not None:
                lib.region_mappings = (lib.region_mappings + mine.region.get(path, 0)
                                       if mine.fs_known else None)
            frames.setdefault(path, set()).update(mine.frames.get(path, ()))
            shared.setdefault(path, set()).update(mine.shared.get(path, ()))
            if lib.build_id is None and path in mine.build_ids:
                lib.build_id = mine.build_ids[path]
    if stats.bad_entries:
        out.partial = True  # pages behind those entries are missing from the counts
        out.errors.append(f"{stats.bad_entries} page-table entries point outside RAM")
    if stats.revisits:  # hostile page tables (see paging.iter_mappings)
        out.partial = True
        out.errors.append(f"{stats.revisits} page-table entries loop back to a table")
    if stats.truncated:
        out.partial = True
        out.errors.append("page-table walks stopped at their work budget")
    for path, lib in libs.items():
        lib.resident_pages = len(frames.get(path, ()))
        lib.shared_pages = len(shared.get(path, ()))
    out.libraries = sorted(libs.values(), key=lambda lib: lib.path)
    out.tasks = len(out.task_list)
    return out




















def walk_with_retries(k: Kernel, name: str, retries: int = RETRIES) -> DomainSurvey:
    """Return the walk of ``k``, retried (cache dropped) up to ``retries`` times when it
    meets inconsistent data (a torn task list, a process changing under the walk), then
    done tolerantly (partial) as a last resort."""
    last = ""
    for _ in range(retries):
        try:
            return walk_kernel(k, name, retries=retries)
        except WalkError as exc:
            last = str(exc)
            log.debug("%s: walk torn (%s); retrying", name, exc)
            k.invalidate()
    out = walk_kernel(k, name, tolerant=True, retries=retries)
    if not out.partial:
        out.partial = True
        out.errors.append(f"walk inconsistent {retries} times: {last}")
    return out


def survey_domain(conn: Any, name: str, pause: bool = False, backend: str = "proc",
                  layout: Layout | None = None, cache_dir: Path | None = None,
                  pause_timeout: float = 60.0) -> DomainSurvey:
    """Return the library survey of running domain ``name`` on libvirt connection
    ``conn`` (see :func:`libshare.introspect.session.look` for the other arguments)."""
    from libshare.introspect.session import look

    with look(conn, name, pause, backend, layout, cache_dir, pause_timeout) as seen:
        out = walk_with_retries(seen.kernel, seen.name, retries=1 if pause else RETRIES)
        out.scanned = seen.scanned
    if seen.expired:
        out.partial = True
        out.errors.append(seen.expiry_message())
    out.wall_seconds, out.cpu_seconds = seen.wall_seconds, seen.cpu_seconds
    return out


def summarize(domains: Sequence[DomainSurvey]) -> list[dict[str, Any]]:
    """Return one entry per library across ``domains`` (keyed by build-id when known,
    else by path): copies, resident and shareable pages summed, and ``saved_bytes``,
    what one shared copy would save (all copies' shareable pages but the largest),
    largest saving first."""
    groups: dict[str, dict[str, Any]] = {}
    for d in domains:
        for lib in d.libraries:
            key = lib.build_id or f"path:{lib.path}"
            g = groups.setdefault(key, {"path": lib.path, "build_id": lib.build_id,
                                        "copies": 0, "domains": [], "resident_pages": 0,
                                        "shared_pages": [], })
            g["copies"] += 1
            g["domains"].append(d.name)
            g["resident_pages"] += lib.resident_pages
            g["shared_pages"].append(lib.shared_pages)
    out = []
    for g in groups.values():
        sp = g.pop("shared_pages")
        g["saved_bytes"] = (sum(sp) - max(sp)) * PAGE_SIZE
        out.append(g)
    out.sort(key=lambda g: (-g["saved_bytes"], -g["resident_pages"], g["path"]))
    return out


def domain_json(d: DomainSurvey) -> dict[str, Any]:
    """Return the JSON object of one domain's survey."""
    return {
        "name": d.name, "kernel": d.kernel, "banner": d.banner, "tasks": d.tasks,
        "threads": d.threads,
        "task_list": [{"pid": pid, "comm": comm, "name": name}
                      for pid, comm, name in d.task_list],
        "libraries": [{"path": lib.path, "build_id": lib.build_id,
                       "resident_pages": lib.resident_pages,
                       "shared_pages": lib.shared_pages, "mappings": lib.mappings,
                       "region_mappings": lib.region_mappings,
                       "processes": lib.processes} for lib in d.libraries],
        "library_mappings": d.library_mappings(),
        "region_mappings": d.region_mappings(),
        "processes": [{"pid": p.pid, "comm": p.comm, "library_mappings": p.library_mappings,
                       "region_mappings": p.region_mappings} for p in d.processes],
        "partial": d.partial, "errors": d.errors,
        "wall_seconds": round(d.wall_seconds, 4), "cpu_seconds": round(d.cpu_seconds, 4),
        "scanned": d.scanned, "paging_levels": d.paging_levels,
    }


def to_json(domains: Sequence[DomainSurvey]) -> dict[str, Any]:
    """Return the survey's JSON document: ``domains``, cross-domain ``libraries`` and
    ``total_saved_bytes``."""
    libs = summarize(domains)
    return {"domains": [domain_json(d) for d in domains], "libraries": libs,
            "total_saved_bytes": sum(g["saved_bytes"] for g in libs)}
