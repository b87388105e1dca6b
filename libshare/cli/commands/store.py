"""``libshare store``: import guest trees into the canonical store and list it.

``store import DIR... [--json]`` walks each tree (a guest root, an extracted package, a
mounted image), stores every regular file by SHA-256 (x86-64 ELF shared objects and
executables with their ELF identity) and records the tree entry by entry;
``store ls [--trees] [--json]`` lists the store's objects, or its trees; ``store rm
SHA256... [--force] [--json]`` removes objects (refusing those a group's current image
holds unless ``--force``; images keep their own copies).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from libshare.cli.options import add_json
from libshare.cli.output import print_json, print_table
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.sharing.region.gc import current_holdings
from libshare.sharing.store import MIN_PREFIX, import_tree, load_index, remove_objects
from libshare.sharing.trees import load_tree, tree_digests
from libshare.util.units import human


def register(subparsers: Any) -> None:
    """Add the ``store`` command and its sub-commands to ``subparsers``."""
    p = subparsers.add_parser("store", help="canonical library store",
                              description="Content-addressed store of library files.")
    sub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    imp = sub.add_parser("import", help="import the files found under directories",
                         description="Import every regular file found under DIR (x86-64 "
                         "ELF shared objects and executables with their build-id and "
                         "SONAME; symlinks become extra guest paths) and record the tree "
                         "(names, modes, owners, links) for region builds. Idempotent.")
    imp.add_argument("dirs", nargs="+", metavar="DIR", help="root of a tree to import")
    add_json(imp)
    imp.set_defaults(func=cmd_import)
    ls = sub.add_parser("ls", help="list the objects of the store")
    ls.add_argument("--trees", action="store_true", help="list the imported trees instead")
    add_json(ls)
    ls.set_defaults(func=cmd_ls)
    rm = sub.add_parser("rm", help="remove objects from the store",
                        description="Remove objects from the store (index and file). "
                        "Objects that a group's current region image holds are refused, "
                        "with nothing removed, unless --force: the group's next 'region "
                        "build' would leave them out. Region images are never changed: "
                        "each holds its own copy of every library.")
    rm.add_argument("objects", nargs="+", metavar="SHA256",
                    help=f"an object's SHA-256, or a unique prefix of at least "
                    f"{MIN_PREFIX} hex digits (see 'libshare store ls')")
    rm.add_argument("--force", action="store_true",
                    help="also remove objects a group's current image holds")
    add_json(rm)
    rm.set_defaults(func=cmd_rm)


def cmd_import(args: argparse.Namespace, cfg: Config) -> int:
    """Import ``args.dirs`` into the store; return the exit status (0)."""
    progress = ProgressPrinter("store import")
    try:
        result = import_tree(cfg.store_dir, args.dirs, progress=progress)
    finally:
        progress.close()
    if args.json:
        print_json(result.as_dict())
        return 0
    print(f"{result.files_seen} files seen, {len(result.added)} new objects, "
          f"{result.known} already stored, {result.paths_added} new guest paths "
          f"({result.symlinks} symlinks followed, {result.plain} files not ELF)")
    for digest in result.trees:
        print(f"tree {digest}")
    for sha in result.repaired:
        print(f"repaired {sha}: the stored copy was corrupt, replaced from the import")
    for reason, count in result.skipped_counts().items():
        print(f"skipped {count}: {reason}")
    if result.orphans_removed:
        print(f"removed {len(result.orphans_removed)} objects left unindexed by an "
              "interrupted import")
    return 0


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    """List the store's objects; return the exit status (0)."""
    if args.trees:
        recs = [load_tree(cfg.store_dir, d).summary() for d in tree_digests(cfg.store_dir)]
        if args.json:
            print_json({"store": str(cfg.store_dir), "trees": recs})
            return 0
        print_table(["TREE", "ENTRIES", "FILES", "SIZE", "IMPORTED FROM"],
                    [[r["digest"][:16], r["entries"], r["files"], human(r["bytes"]),
                      ", ".join(r["roots"])] for r in recs])
        return 0
    index = load_index(cfg.store_dir)
    entries = sorted(index.entries.values(), key=lambda e: (e.name, e.sha256))
    if args.json:
        print_json({"store": str(cfg.store_dir),
                    "objects": [e.as_dict() for e in entries],
                    "build_ids": index.by_build_id()})
        return 0
    rows = [[e.sha256[:16], e.name, human(e.size), (e.build_id or "-")[:16],
             e.paths[0] if e.paths else "-", len(e.paths)] for e in entries]
    print_table(["SHA256", "NAME", "SIZE", "BUILD-ID", "FIRST PATH", "PATHS"], rows)
    total = sum(e.size for e in entries)
    print(f"{len(entries)} objects, {human(total)}")
    return 0


def cmd_rm(args: argparse.Namespace, cfg: Config) -> int:
    """Remove store objects; return 0, or 1 when refused (objects held by a group's
    current image, nothing removed)."""
    result = remove_objects(cfg.store_dir, args.objects, lambda: current_holdings(cfg),
                            force=args.force)
    if args.json:
        print_json(result.as_dict())
    else:
        for sha in result.removed:
            print(f"removed {sha}")
        if result.removed:
            print(f"removed {len(result.removed)} objects, {human(result.freed)}")
    if result.held and not result.removed:
        first, groups = next(iter(result.held.items()))
        more = f" (and {len(result.held) - 1} more)" if len(result.held) > 1 else ""
        print(f"libshare: object {first} is in the current image of group "
              f"{', '.join(groups)}{more}; nothing removed (--force removes it from the "
              "store anyway; the image keeps its copy)", file=sys.stderr)
        return 1
    return 0
