"""``libshare survey``: list the shared libraries the tasks of running guests map, from
the host, and what one shared copy of each would save.

Owns the command line and the presentation (table or ``--json``); the work is
:mod:`libshare.introspect.survey`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from libshare.cli.options import add_json, libvirt_uri
from libshare.cli.output import print_json, print_table
from libshare.config import Config
from libshare.errors import EXIT_FAILED, EXIT_OK, LibshareError
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


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Survey the requested running domains; print a table or JSON; return the status."""
    from libshare.introspect.survey import DomainSurvey, summarize, survey_domain, to_json
    from libshare.virt import api

    conn = api.open_connection(libvirt_uri(args, cfg))
    names = list(args.domains)
    if not names:
        names = sorted(d.name() for d in conn.listAllDomains() if d.isActive())
        if not names:
            raise LibshareError("no running domains to survey")
    layout = _layout(args.offsets)
    cache_dir = None if args.no_cache else cfg.state_dir / "introspect"
    results: list[DomainSurvey] = []
    failures: list[str] = []
    for name in names:
        try:
            results.append(survey_domain(conn, name, pause=args.pause, backend=args.backend,
                                         layout=layout, cache_dir=cache_dir))
        except LibshareError as exc:
            if len(names) == 1:
                raise
            failures.append(f"{name}: {exc}")
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
        for d in results:
            for err in d.errors:
                print(f"libshare: {d.name}: {err}", file=sys.stderr)
        for f in failures:
            print(f"libshare: {f}", file=sys.stderr)
    return EXIT_FAILED if failures or any(d.partial for d in results) else EXIT_OK
