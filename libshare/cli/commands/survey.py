"""``libshare survey``: list the shared libraries the tasks of running guests map, from
the host, and what one shared copy of each would save; with ``--page-cache``, the files
each guest holds in its page cache, and with ``--forecast GROUP`` what each region
policy would serve of them.

Owns the command line and the presentation (table or ``--json``); the work is
:mod:`libshare.introspect.survey`, :mod:`libshare.introspect.pagecache` and
:mod:`libshare.sharing.forecast`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from libshare.cli.options import add_json, add_trees, int_between, libvirt_uri
from libshare.cli.output import print_json, print_table
from libshare.config import Config
from libshare.domxml.metadata import check_group
from libshare.errors import EXIT_FAILED, EXIT_OK, LibshareError, UsageError
from libshare.util import files


def register(subparsers: Any) -> None:
    """Add the ``survey`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "survey", help="list the shared libraries mapped inside running guests",
        description="Read running guests' memory from the host (no guest agent, no change "
        "to the guest) and list, per domain, the kernel, the number of tasks and the "
        "shared libraries mapped by any task, with resident pages and build-id; then, "
        "across domains, each library's copies and the memory one shared copy would save.")
    p.add_argument("domains", nargs="*", metavar="DOMAIN",
                   help="domain names or UUIDs (default: every running domain)")
    add_json(p)
    p.add_argument("--pause", action="store_true",
                   help="pause each guest during its walk (always resumed) for an exact "
                   "snapshot")
    p.add_argument("--backend", choices=("proc", "file"), default="proc",
                   help="how to read guest RAM: the QEMU process (/proc/PID/mem, default) "
                   "or the file/memfd backing it")
    p.add_argument("--offsets", metavar="FILE",
                   help="structure offsets for a kernel without BTF: an ISF JSON "
                   "(Volatility3) or an offsets file")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use or write the per-boot kernel cache")
    p.add_argument("--page-cache", action="store_true",
                   help="list the files each guest holds in its page cache (path, cached "
                   "bytes, whether the region serves it) and a table per filesystem")
    p.add_argument("--forecast", metavar="NAME",
                   help="with --page-cache: what a region of each policy (built from the "
                   "store's trees) would serve of it, per guest and for the host; the "
                   "guests are the DOMAINs, else the running guests of group NAME, else "
                   "every running guest")
    add_trees(p, "for --forecast to plan from")
    p.add_argument("--top", type=int_between(1), default=None, metavar="N",
                   help="with --page-cache: files shown per guest, largest first "
                   f"(default {TOP}; --json lists all)")
    p.set_defaults(func=run)


def _layout(path: str | None) -> Any:
    if not path:
        return None
    from libshare.introspect.layout import layout_from_isf, layout_from_offsets

    try:
        with files.open_regular(path) as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise LibshareError(f"cannot read {path}: {files.os_error(exc, path=False)}") from exc
    if b'"user_types"' in head or b'"metadata"' in head:
        return layout_from_isf(path)
    return layout_from_offsets(path)


def print_domain_libraries(d: Any) -> None:
    """Print the library table of one domain's survey ``d`` (a DomainSurvey): path,
    short build-id, resident and shareable pages, mappings and processes; largest
    resident first. Prints nothing if it has no libraries."""
    if not d.libraries:
        return
    print()
    print(f"{d.name} ({d.kernel or 'kernel unknown'}, {d.tasks} tasks"
          f"{', partial' if d.partial else ''}):")
    libs = sorted(d.libraries, key=lambda lib: (-lib.resident_pages, lib.path))
    print_table(["LIBRARY", "BUILD-ID", "RESIDENT-PAGES", "SHARED-PAGES", "MAPPINGS",
                 "PROCESSES"],
                [[lib.path, (lib.build_id or "-")[:16], lib.resident_pages, lib.shared_pages,
                  lib.mappings, lib.processes] for lib in libs])


def _kib(n: int) -> int:
    return n // 1024


#: files shown per guest by ``survey --page-cache`` unless --top says otherwise
TOP = 25


def print_page_cache(s: Any, top: int) -> None:
    """Print one guest's page-cache survey ``s``: its files (largest first, ``top`` of
    them) and its table per filesystem."""
    print()
    print(f"{s.name} ({s.kernel or 'kernel unknown'}, {len(s.files)} files cached"
          f"{', partial' if s.partial else ''}):")
    files = s.files[:top]
    print_table(["PATH", "CACHED-KIB", "SIZE-KIB", "FS", "REGION"],
                [[f.path or f"(inode {f.ino})", _kib(f.cached_bytes), _kib(f.size),
                  f.fstype, "yes" if f.served_by_region else "no"] for f in files])
    if len(files) < len(s.files):
        print(f"... {len(s.files) - len(files)} more (--top N shows more, --json all)")
    print_table(["DEV", "FSTYPE", "MOUNTED ON", "FILES", "CACHED-KIB", "OTHER-KIB", "REGION"],
                [[fs.dev, fs.fstype, fs.mount_point or "-", fs.files, _kib(fs.cached_bytes),
                  _kib(fs.other_cached_bytes), "yes" if fs.served_by_region else "no"]
                 for fs in s.filesystems if fs.files or fs.other_cached_bytes])


def print_forecast(doc: dict[str, Any]) -> None:
    """Print the forecast ``doc`` (:func:`libshare.sharing.forecast.forecast_json`): per
    policy, the region's size, per guest what it would stop caching of what it caches,
    and what the host would hold and save."""
    print()
    print(f"forecast for group {doc['group']}{' (partial)' if doc['partial'] else ''} "
          "(KiB; a guest stops caching what the region would serve, the host holds it "
          "once):")
    rows = doc["policies"]
    names = [g["name"] for g in next((r["guests"] for r in rows if not r["error"]), [])]
    table = []
    for r in rows:
        if r["error"]:
            table.append([r["policy"], "-", *["-" for _ in names], "-", "-", r["error"]])
            continue
        table.append([r["policy"], _kib(r["region_bytes"]),
                      *[f"{_kib(g['stop_caching'])}/{_kib(g['cached'])}" for g in r["guests"]],
                      _kib(r["host_holds"]), _kib(r["host_saves"]), ""])
    print_table(["POLICY", "REGION", *names, "HOST-HOLDS", "HOST-SAVES", ""], table)


def run_page_cache(args: argparse.Namespace, cfg: Config, conn: Any,
                   names: list[str]) -> int:
    """Survey the page cache of ``names`` (and forecast with ``--forecast``); print a
    table or JSON; return the exit status."""
    from libshare.introspect.pagecache import survey_domain_page_cache, to_json
    from libshare.introspect.session import each_domain
    from libshare.sharing.forecast import forecast, forecast_json

    layout = _layout(args.offsets)
    cache_dir = None if args.no_cache else cfg.state_dir / "introspect"
    results, failures = each_domain(names, lambda name: survey_domain_page_cache(
        conn, name, pause=args.pause, backend=args.backend, layout=layout,
        cache_dir=cache_dir))
    fc = forecast_json(args.forecast, forecast(results, cfg.store_dir, trees=args.trees),
                       results, failures) if args.forecast else None
    if args.json:
        doc: dict[str, Any] = {"domains": [to_json(s) for s in results], "failed": failures}
        if fc:
            doc["forecast"] = fc
        print_json(doc)
    else:
        print_table(["DOMAIN", "KERNEL", "FILES", "CACHED-KIB", "REGION-KIB", "OTHER-KIB",
                     "INODES", "TIME", ""],
                    [[s.name, s.kernel, len(s.files), _kib(s.cached_bytes()),
                      _kib(s.region_bytes()), _kib(s.other_cached_bytes()), s.inodes,
                      f"{s.wall_seconds:.2f}s", "partial" if s.partial else ""]
                     for s in results])
        for s in results:
            print_page_cache(s, args.top or TOP)
        if fc:
            print_forecast(fc)
    return report_failures(results, failures, printed=not args.json)


def report_failures(results: list[Any], failures: list[str], printed: bool) -> int:
    """Print (if ``printed``: after tables; JSON carries them) each survey's errors and
    each failed domain on stderr; return the exit status (1 if any failed or is
    partial)."""
    if printed:
        for s in results:
            for err in s.errors:
                print(f"libshare: {s.name}: {err}", file=sys.stderr)
        for f in failures:
            print(f"libshare: {f}", file=sys.stderr)
    return EXIT_FAILED if failures or any(s.partial for s in results) else EXIT_OK


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Survey the requested running domains; print a table or JSON; return the status."""
    from libshare.introspect.session import each_domain
    from libshare.introspect.survey import DomainSurvey, summarize, survey_domain, to_json
    from libshare.virt import api

    if (args.forecast or args.trees or args.top) and not args.page_cache:
        raise UsageError("--forecast, --tree and --top go with --page-cache")
    if args.forecast:
        check_group(args.forecast, "--forecast", UsageError)
    conn = api.open_connection(libvirt_uri(args, cfg))
    names = list(args.domains)
    if not names and args.forecast:
        names = api.running_group_domains(conn, args.forecast)
    if not names:
        names = sorted(d.name() for d in conn.listAllDomains() if d.isActive())
        if not names:
            raise LibshareError("no running domains to survey")
    if args.page_cache:
        return run_page_cache(args, cfg, conn, names)
    layout = _layout(args.offsets)
    cache_dir = None if args.no_cache else cfg.state_dir / "introspect"
    results: list[DomainSurvey]
    results, failures = each_domain(names, lambda name: survey_domain(
        conn, name, pause=args.pause, backend=args.backend, layout=layout,
        cache_dir=cache_dir))
    if args.json:
        doc = to_json(results)
        doc["failed"] = failures
        print_json(doc)
    else:
        rows = [[d.name, d.kernel, d.tasks, d.threads, len(d.libraries),
                 sum(lib.resident_pages for lib in d.libraries),
                 f"{d.wall_seconds:.2f}s", "partial" if d.partial else ""]
                for d in results]
        print_table(["DOMAIN", "KERNEL", "TASKS", "THREADS", "LIBRARIES", "RESIDENT-PAGES",
                     "TIME", ""], rows)
        for d in results:
            print_domain_libraries(d)
        libs = summarize(results)
        if libs:
            print()
            print(f"across {len(results)} domain(s):")
            print_table(["LIBRARY", "BUILD-ID", "COPIES", "RESIDENT-PAGES", "SAVED-KIB"],
                        [[g["path"], (g["build_id"] or "-")[:16], g["copies"],
                          g["resident_pages"], g["saved_bytes"] // 1024] for g in libs])
    return report_failures(results, failures, printed=not args.json)
