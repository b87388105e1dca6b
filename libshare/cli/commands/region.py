"""``libshare region``: build, verify, list and garbage-collect region images.

``region build [--group NAME] [--policy libraries|elf|usr|observed] [--tree TREE]...
[--fs erofs|ext4] [--select all|FILE] [--size SIZE] [--json]`` builds the group's image from the store
(what the policy chooses, :mod:`libshare.sharing.region.policy`; ``observed`` surveys
the page cache of the group's running guests first) and switches the group's link to
it; ``region verify PATH``
exits 1 with the first problem; ``region ls [--json]``; ``region gc [--dry-run] [--json]
[-c URI]`` removes images that no libvirt domain references nor a running QEMU maps
(root only, unless --dry-run: reading QEMU's mappings needs root).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from libshare.cli.options import add_json, add_trees, libvirt_uri
from libshare.cli.output import print_json, print_table
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.domxml.metadata import check_group
from libshare.errors import LibshareError, UsageError
from libshare.sharing.region import build, gc, policy, verify
from libshare.sharing.region.layout import FILESYSTEMS
from libshare.util.units import human, parse_size
from libshare.virt import api


def register(subparsers: Any) -> None:
    """Add the ``region`` command and its sub-commands to ``subparsers``."""
    p = subparsers.add_parser("region", help="library region images",
                              description="Region images: PFN info block + EROFS, one file "
                              "per digest, one current image per trust group.")
    sub = p.add_subparsers(dest="region_command", metavar="SUBCOMMAND", required=True)
    b = sub.add_parser("build", help="build a group's region image from the store")
    b.add_argument("--group", metavar="NAME",
                   help="trust group (default: the config's default_group)")
    b.add_argument("--policy", choices=policy.POLICIES, default=None,
                   help="what the region holds: libraries (default: ELF shared objects), "
                   "elf (libraries, executables, kernel modules), usr (every file under "
                   "/usr of the imported trees), observed (what the group's running guests "
                   "hold in their page cache)")
    add_trees(b, "to take files from")
    b.add_argument("--fs", choices=FILESYSTEMS, default=FILESYSTEMS[0], dest="filesystem",
                   help="the region's filesystem: erofs (default) or ext4 (both DAX-mapped "
                   "by guests; see the README on the choice)")
    b.add_argument("--select", default="all", metavar="all|FILE",
                   help="'all' (what the policy chooses) or a file of guest paths / sha256s, "
                   "one a line (then no policy: files only, no directory trees)")
    b.add_argument("--size", type=parse_size, metavar="SIZE",
                   help="total image size (rounded up to 2 MiB; refused if too small)")
    add_json(b)
    b.set_defaults(func=cmd_build)
    v = sub.add_parser("verify", help="check an image; exit 1 with the first problem")
    v.add_argument("path", metavar="PATH")
    v.add_argument("--fsck", action="store_true",
                   help="also run fsck.erofs --extract on a copy of the filesystem")
    add_json(v)
    v.set_defaults(func=cmd_verify)
    ls = sub.add_parser("ls", help="list images and the groups using them")
    add_json(ls)
    ls.set_defaults(func=cmd_ls)
    g = sub.add_parser("gc", help="remove images no libvirt domain references")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    add_json(g)
    g.set_defaults(func=cmd_gc)


def cmd_build(args: argparse.Namespace, cfg: Config) -> int:
    """Build the region image; return the exit status (0)."""
    group = cfg.default_group if args.group is None else \
        check_group(args.group, "--group", UsageError)  # "" is refused, not the default
    if args.select != "all" and (args.policy or args.trees):
        raise UsageError("--select FILE excludes --policy and --tree")
    observed = observed_paths(args, cfg, group) if args.policy == "observed" else None
    progress = ProgressPrinter(f"region build {group}")
    try:
        result = build.build_region(cfg, group, args.select, args.size, progress=progress,
                                    policy=args.policy, trees_wanted=args.trees,
                                    observed=observed, filesystem=args.filesystem)
    finally:
        progress.close()
    if args.json:
        print_json(result.as_dict())
        return 0
    print(f"path    {result.path}")
    print(f"digest  {result.digest}")
    print(f"size    {result.size} ({human(result.size)})")
    print(f"files   {result.files} ({human(result.data_size)}), policy {result.policy}")
    for t in result.trees:
        print(f"tree    {t['tid']}: {t['files']} files, {len(t['offered'])} directories "
              "guests may bind whole")
    print(f"group   {result.group} -> {result.link}{'' if result.new else ' (image existed)'}")
    print(f"fs      {result.filesystem}, written by {result.writer}")
    return 0


def observed_paths(args: argparse.Namespace, cfg: Config, group: str) -> set[str]:
    """Return the guest paths the running guests of ``group`` hold in their page cache
    (each surveyed from the host); LibshareError if none runs or a survey fails."""
    from libshare.introspect.pagecache import survey_domain_page_cache

    with api.connect(libvirt_uri(args, cfg)) as conn:
        names = api.running_group_domains(conn, group)
        if not names:
            raise LibshareError(f"the observed policy needs running guests of group {group}: "
                                "none is running")
        surveys = [survey_domain_page_cache(conn, n, cache_dir=cfg.state_dir / "introspect")
                   for n in names]
    return policy.observed_paths(surveys)


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    """Verify one image; return 0 if sound, else raise LibshareError with the problem."""
    problem = verify.verify(args.path, fsck=args.fsck)
    if args.json:
        print_json({"path": args.path, "ok": problem is None, "problem": problem})
        return 0 if problem is None else 1
    if problem:
        raise LibshareError(f"{args.path}: {problem}")
    print(f"{args.path}: ok")
    return 0


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    """List region images; return the exit status (0)."""
    images = gc.list_images(cfg)
    links = gc.group_links(cfg)
    if args.json:
        print_json({"images": [i.as_dict() for i in images],
                    "groups": links})
        return 0
    rows = [[i.digest[:16], human(i.size), i.size, "-" if i.files is None else i.files,
             ",".join(i.groups) or "-", i.path] for i in images]
    print_table(["DIGEST", "SIZE", "BYTES", "FILES", "GROUPS", "PATH"], rows)
    known = {os.path.realpath(i.path) for i in images}
    for group, target in sorted(links.items()):
        if target not in known:
            print(f"group {group}: link points to missing {target}")
    return 0


def cmd_gc(args: argparse.Namespace, cfg: Config) -> int:
    """Remove unreferenced images; return the exit status (0)."""
    with api.connect(libvirt_uri(args, cfg)) as conn:
        refs = api.referenced_region_paths(conn)
    result = gc.gc(cfg, refs, dry_run=args.dry_run)
    if args.json:
        print_json(result.as_dict())
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for path in result.removed:
        print(f"{verb} {path}")
    for path, why in sorted(result.kept.items()):
        print(f"kept {path}: {why}")
    for path in result.leftovers:
        print(f"{verb} leftover {path}")
    if result.unreadable:
        print(f"note: could not read the mappings of QEMU process "
              f"{', '.join(map(str, result.unreadable))}; images they map are not "
              "protected in this list (run as root)")
    print(f"{verb} {len(result.removed)} images, {human(result.freed)}")
    return 0
