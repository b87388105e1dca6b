"""``libshare store``: import guest trees into the canonical store and list it.

``store import DIR... [--json]`` walks each tree (a guest root, an extracted package, a
mounted image), stores every regular file by SHA-256 (x86-64 ELF shared objects and
executables with their ELF identity) and records the tree entry by entry;
``store ls [--trees] [--json]`` lists the store's objects, or its trees.
"""

from __future__ import annotations

import argparse
from typing import Any

from libshare.cli.options import add_json
from libshare.cli.output import print_json, print_table
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.sharing.store import import_tree, load_index
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
