"""What a group's region holds: the policies of ``region build --policy``.

Owns the choice of store objects and of the guest trees a region lays out:

* ``libraries`` (the default): ELF shared objects (``ET_DYN`` with a SONAME, or seen at
  a ``*.so``/``*.so.N`` path);
* ``elf``: every x86-64 ELF object: libraries, executables (``ET_EXEC``, PIE
  ``ET_DYN``) and kernel modules (``ET_REL`` seen at a ``*.ko`` path);
* ``usr``: every regular file under ``/usr`` of the trees, deduplicated by SHA-256;
* ``observed``: the objects seen at the paths guests hold in their page cache (the
  caller surveys them: :func:`observed_paths`).

No policy serves a guest path under :data:`MUTABLE` (configuration, state, homes: a
bind would make them read-only). ``libraries`` and ``elf`` choose among every object of
the store unless trees are named
(then among those trees' files); ``usr`` takes the trees named, else every tree of the
store; ``observed`` chooses by path among every object. Every tree taken (for
``libraries``, ``elf`` and ``observed``: every tree of the store holding a chosen file)
is laid out in the region with the chosen files
(:mod:`libshare.sharing.region.tree`), so guests can bind whole directories of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError, UsageError
from libshare.sharing import trees as treestore
from libshare.sharing.store import StoreEntry, StoreIndex
from libshare.sharing.trees import TreeEntry, TreeRecord

POLICIES = ("libraries", "elf", "usr", "observed")
#: guest trees a region never serves: files guests own and change
MUTABLE = ("/etc/", "/var/", "/home/", "/root/", "/tmp/", "/run/", "/srv/", "/boot/")
DEFAULT_POLICY = "libraries"
USR = "/usr/"
_SO = re.compile(r"\.so(\.[0-9][0-9.]*)?$")


@dataclass
class Plan:
    """A region's contents: ``policy``, the store ``entries`` (sorted by SHA-256, each
    with only the guest paths the policy serves: ``usr`` serves /usr only, ``observed``
    the paths observed), the tree ``records`` to lay out and ``chosen``, which tree
    entries (regular files) of them the region holds."""

    policy: str
    entries: list[StoreEntry]
    records: list[TreeRecord] = field(default_factory=list)
    chosen: Callable[[TreeEntry], bool] = lambda _e: False

    def summary(self) -> dict[str, Any]:
        """Return the policy, object count and bytes, and the tree digests (JSON-ready)."""
        return {"policy": self.policy, "objects": len(self.entries),
                "bytes": sum(e.size for e in self.entries),
                "trees": [r.digest for r in self.records]}


def is_library(e: StoreEntry) -> bool:
    """Return True if ``e`` is an ELF shared object (the ``libraries`` policy)."""
    return e.elf_type == "ET_DYN" and (
        bool(e.soname) or any(_SO.search(p.rsplit("/", 1)[-1]) for p in e.paths))


def is_elf(e: StoreEntry) -> bool:
    """Return True if ``e`` is a library, an executable or a kernel module (``elf``)."""
    return e.elf_type in ("ET_DYN", "ET_EXEC") or (
        e.elf_type == "ET_REL" and any(p.endswith(".ko") for p in e.paths))


def observed_paths(surveys: Iterable[Any]) -> set[str]:
    """Return the guest paths of the files held in the page cache of the surveyed
    guests (:class:`~libshare.introspect.pagecache.PageCacheSurvey` objects): regular
    files reached through a mount, region files included (their guest paths are the
    bind mounts'), deleted files left out."""
    out: set[str] = set()
    for s in surveys:
        for f in s.files:
            if f.path and f.mounted and not f.path.endswith(" (deleted)"):
                out.add(f.path)
    return out


def _tree_records(store_dir: Path, specs: list[str] | None) -> list[TreeRecord]:
    return [treestore.load_tree(store_dir, d) for d in treestore.resolve_trees(store_dir, specs)]


def plan_region(store_dir: Path, index: StoreIndex, policy: str = DEFAULT_POLICY,
                trees: list[str] | None = None,
                observed: set[str] | None = None) -> Plan:
    """Return the :class:`Plan` of ``policy`` over the store at ``store_dir`` (its
    ``index`` loaded): ``trees`` names tree records (digest, prefix or import root;
    default: every tree); ``observed`` the guest paths of the ``observed`` policy.
    Raises UsageError for an unknown policy, LibshareError for an unknown tree."""
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} (one of {', '.join(POLICIES)})")
    records = _tree_records(store_dir, trees)
    if policy == "usr":
        shas = {e.payload for r in records for e in r.entries
                if e.kind == "f" and e.path.startswith(USR)}
        picked = [index.entries[s] for s in shas if s in index.entries]
        if len(picked) != len(shas):
            raise LibshareError("a tree lists files the store lacks: re-import it with "
                                "'libshare store import DIR'")
        return Plan(policy, _serving(picked, lambda p: p.startswith(USR)), records,
                    _under_usr)
    if policy == "observed":
        if observed is None:
            raise UsageError("the observed policy needs the paths guests hold in their "
                             "page cache (region build --policy observed surveys the "
                             "group's running guests)")
        paths = {p for p in observed if servable(p)}
        picked = [e for e in index.entries.values() if paths.intersection(e.paths)]
    else:
        test = is_library if policy == "libraries" else is_elf
        in_trees = {e.payload for r in records for e in r.entries if e.kind == "f"}
        picked = [e for e in index.entries.values()
                  if test(e) and (not trees or e.sha256 in in_trees)]
    shas = {e.sha256 for e in picked}

    def chosen(e: TreeEntry) -> bool:
        return e.payload in shas and (policy != "observed" or e.path in paths)

    records = [r for r in records if any(e.kind == "f" and chosen(e) for e in r.entries)]
    keep = paths.__contains__ if policy == "observed" else servable
    return Plan(policy, _serving(picked, keep), records,
                lambda e: servable(e.path) and chosen(e))


def servable(path: str) -> bool:
    """Return True if a region may serve guest path ``path`` (not under MUTABLE)."""
    return not path.startswith(MUTABLE)


def _serving(entries: list[StoreEntry], keep: Callable[[str], bool]) -> list[StoreEntry]:
    """Return copies of ``entries`` holding only the guest paths ``keep`` accepts (a
    region serves those only: the ``usr`` policy never binds a copy over /etc), those
    left with none dropped, sorted by SHA-256."""
    kept = (replace(e, paths=[p for p in e.paths if keep(p)]) for e in entries)
    return sorted((e for e in kept if e.paths), key=lambda e: e.sha256)


def _under_usr(e: TreeEntry) -> bool:
    """Return True for an entry under /usr (what the ``usr`` policy holds)."""
    return e.path.startswith(USR)
