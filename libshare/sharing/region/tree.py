"""The guest trees of a region: ``/tree/<tid>/...`` and ``/.libshare/tree.tsv``.

Owns how a tree record (:mod:`libshare.sharing.trees`) is laid out in a region, so
that a guest can bind a whole directory of it over its own when the two are identical.
``tid`` is the first 16 hex digits of the record's digest; the region path of guest path
``P`` of that tree is ``/tree/<tid>P``.

What a tree holds (:func:`lay_out`): the files the policy chose (:class:`~libshare.
sharing.region.policy.Plan`), every directory above them, and the whole subtree of
every *complete* directory (one whose every regular file below is chosen, with no
special file, no unreadable file, no name holding a tab, newline or carriage return, no
owner above 65535): its empty directories and symbolic links too. Each tree also holds
libshare's own guest files (``libshare guest install``) that fall in a directory it
holds, as the policy would choose them: a guest is compared as it is once libshare is
installed. A complete directory at depth 2 or more ("/usr/bin", not "/usr"), outside
:data:`NO_DIR_BIND`, holding at least one regular file, is *offered*: guests may bind
it whole.

Inodes: the data of each store object is stored once. Its ``/lib/...`` path (see
:mod:`libshare.sharing.region.layout`) and every tree path with the object's *primary*
metadata share one inode: the permission bits of its first tree entry without setuid,
setgid or sticky bits, owned by root (mode 0555 when no tree holds it). A tree entry
with other metadata (a setuid or group-owned program) gets an inode of its own with
exactly that metadata. Directories carry their tree's metadata: :func:`stage_trees` says
which inodes get what (the EROFS writer takes it in memory, ext4's build by debugfs).

``/.libshare/tree.tsv``, for the guest script, one line per entry of each tree but its
root, sorted by tid then path::

    tid TAB path TAB kind TAB mode TAB uid TAB gid TAB size TAB payload TAB offered

``kind`` d, f or l; ``mode`` the permission bits in octal ("755", "4755"); ``payload``
the SHA-256 of a file, the target of a link, ``-`` for a directory; ``offered`` 1 for
an offered directory. For a link, mode, uid and gid are ``-``; for a non-file, size is
``-``. The guest's own listing of an entry (GNU ``find -printf``) gives the same
fields: kind, mode, uid, gid, payload are what must be equal.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from libshare.sharing.region.staging import Staging
from libshare.sharing.store import OBJECT_MODE
from libshare.sharing.trees import TreeEntry, TreeRecord

#: subtrees never bound whole: they stay writable in guests (local installs)
NO_DIR_BIND = ("/usr/local",)
TREE_TSV_PATH = "/.libshare/tree.tsv"
TREE_ROOT = "/tree"
#: metadata of an object's inode when no tree holds it (mode, uid, gid)
PLAIN_META = (OBJECT_MODE, 0, 0)
MAX_ID = 0xFFFF
_BAD = ("\t", "\n", "\r")

Meta = tuple[int, int, int]


@dataclass
class LaidTree:
    """One tree as a region holds it: ``digest``, ``tid``, the ``entries`` held (sorted,
    the root left out), the ``offered`` directories and the bytes of libshare's own
    guest files among the entries (``extra``: path -> bytes)."""

    digest: str
    tid: str
    entries: list[TreeEntry]
    offered: set[str]
    extra: dict[str, bytes] = field(default_factory=dict)

    def region_path(self, guest: str) -> str:
        """Return the region path of guest path ``guest`` of this tree."""
        return f"{TREE_ROOT}/{self.tid}{guest}"

    def summary(self) -> dict[str, object]:
        """Return digest, tid, entries, files and offered directories (JSON-ready)."""
        return {"digest": self.digest, "tid": self.tid, "entries": len(self.entries),
                "files": sum(1 for e in self.entries if e.kind == "f"),
                "offered": sorted(self.offered)}


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _no_bind(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in NO_DIR_BIND)


def guest_files() -> list[tuple[str, int, bytes]]:
    """Return (guest path, mode, bytes) of every regular file ``libshare guest install``
    writes into guests."""
    from libshare.redirect.actions import GUEST_FILES, guest_file_bytes

    return [(f.path, f.mode, guest_file_bytes(f.source)) for f in GUEST_FILES if f.source]


def lay_out(rec: TreeRecord, chosen: Callable[[TreeEntry], bool],
            extra: list[tuple[str, int, bytes]] | None = None) -> LaidTree:
    """Return how the region holds tree ``rec`` when ``chosen`` tells which of its regular
    files it holds; ``extra`` (guest path, mode, bytes) are files added to the tree where
    their directory exists (default: :func:`guest_files`)."""
    by_path = {e.path: e for e in rec.entries}
    extra_bytes: dict[str, bytes] = {}
    for path, mode, data in guest_files() if extra is None else extra:
        parent = by_path.get(_parent(path))
        if parent is None or parent.kind != "d":
            continue
        by_path[path] = TreeEntry(path, "f", mode, 0, 0, len(data),
                                  hashlib.sha256(data).hexdigest())
        extra_bytes[path] = data
    entries = sorted(by_path.values(), key=lambda e: e.path)
    children: dict[str, list[str]] = {}
    for e in entries:
        if e.path != "/":
            children.setdefault(_parent(e.path), []).append(e.path)
    take = {e.path for e in entries if e.kind == "f" and chosen(e) and _fits(e)}
    complete: dict[str, bool] = {}
    files_below: dict[str, int] = {}
    for e in reversed(entries):           # children before their parents
        kids = children.get(e.path, [])
        if e.kind == "d":
            complete[e.path] = _fits(e) and all(complete[k] for k in kids)
            files_below[e.path] = sum(files_below[k] for k in kids)
        else:
            complete[e.path] = e.path in take if e.kind == "f" else (
                e.kind == "l" and _fits(e))
            files_below[e.path] = 1 if e.kind == "f" else 0
    held: set[str] = set()
    for path in take:                     # chosen files and every directory above them
        p = path
        while p not in held:
            held.add(p)
            if p == "/":
                break
            p = _parent(p)
    for e in entries:                     # everything below a complete directory held
        if e.path not in held and e.path != "/" and _parent(e.path) in held \
                and complete[_parent(e.path)]:
            held.add(e.path)
    offered = {e.path for e in entries if e.kind == "d" and e.path in held
               and complete[e.path] and _depth(e.path) >= 2 and not _no_bind(e.path)
               and files_below[e.path] > 0}
    kept = [e for e in entries if e.path in held and e.path != "/"]
    return LaidTree(rec.digest, rec.digest[:16], kept, offered,
                    {p: b for p, b in extra_bytes.items() if p in held})


def _fits(e: TreeEntry) -> bool:
    """Return True if entry ``e`` can be laid out and listed for guests."""
    if any(c in e.path for c in _BAD) or e.kind not in ("d", "f", "l"):
        return False
    if e.kind == "l":
        return e.payload is not None and not any(c in e.payload for c in _BAD)
    return e.uid <= MAX_ID and e.gid <= MAX_ID


def tsv_bytes(laid: list[LaidTree]) -> bytes:
    """Return ``/.libshare/tree.tsv`` for the trees ``laid`` (see the module docstring)."""
    lines = []
    for t in laid:
        for e in t.entries:
            if e.kind == "l":
                meta, size, payload = "-\t-\t-", "-", e.payload or ""
            else:
                meta = f"{e.mode:o}\t{e.uid}\t{e.gid}"
                size = str(e.size) if e.kind == "f" else "-"
                payload = (e.payload or "") if e.kind == "f" else "-"
            offer = "1" if e.path in t.offered else "0"
            lines.append(f"{t.tid}\t{e.path}\t{e.kind}\t{meta}\t{size}\t{payload}\t{offer}\n")
    return "".join(sorted(lines)).encode("utf-8", "surrogateescape")


def primary_meta(laid: list[LaidTree]) -> dict[str, Meta]:
    """Return sha256 -> metadata of the object's shared inode (see the module
    docstring) for every object some tree holds."""
    out: dict[str, Meta] = {}
    for t in laid:
        for e in t.entries:
            if e.kind == "f" and e.payload and e.path not in t.extra \
                    and e.payload not in out:
                out[e.payload] = (e.mode & 0o777, 0, 0)
    return out


def stage_trees(stage: Staging, laid: list[LaidTree], lib_paths: dict[str, str]
                ) -> dict[str, Meta]:
    """Lay the trees ``laid`` out in ``stage`` (``lib_paths``: sha256 -> staged
    ``/lib/...`` path of every object, already staged) and write ``/.libshare/tree.tsv``;
    return the metadata the filesystem's inodes must get (:meth:`~libshare.sharing.
    region.staging.MemoryStaging.apply`, ext4's debugfs), per region path (one path per
    inode, plus every directory of the trees)."""
    primary = primary_meta(laid)
    patch: dict[str, Meta] = {}
    for sha, meta in primary.items():
        if meta != PLAIN_META:
            patch[lib_paths[sha]] = meta
    variants: dict[tuple[str, Meta], str] = {}
    for t in laid:
        stage.mkdir(f"{TREE_ROOT}/{t.tid}", parents=True)
        patch[f"{TREE_ROOT}/{t.tid}"] = (0o755, 0, 0)
        for e in t.entries:
            rpath = t.region_path(e.path)
            meta = (e.mode, e.uid, e.gid)
            if e.kind == "d":
                stage.mkdir(rpath)
                patch[rpath] = meta
            elif e.kind == "l":
                stage.symlink(e.payload or "", rpath)
            elif e.path in t.extra:
                stage.write(rpath, t.extra[e.path], e.mode)
                patch[rpath] = meta
            else:
                sha = e.payload or ""
                if meta == primary[sha]:
                    stage.link(lib_paths[sha], rpath)
                elif (sha, meta) in variants:
                    stage.link(variants[(sha, meta)], rpath)
                else:
                    stage.copy(lib_paths[sha], rpath, sha)
                    variants[(sha, meta)] = rpath
                    patch[rpath] = meta
    stage.mkdir(os.path.dirname(TREE_TSV_PATH), parents=True)
    stage.write(TREE_TSV_PATH, tsv_bytes(laid), 0o444)
    return patch
