"""Tree records: what each imported directory tree looked like, entry by entry.

Owns ``STORE/trees/<digest>.json``, one record per distinct imported tree: every
directory, regular file, symbolic link and special file under the tree's root, each as
its guest path ("/usr/bin/bash"; the root is "/"), kind (``d``, ``f``, ``l``, or ``c``,
``b``, ``p``, ``s`` for special files, ``?`` for a regular file that could not be
read), permission bits (``stat.S_IMODE``), owner and group ids, size, and for a regular
file the SHA-256 of its bytes (the store object holding them), for a symbolic link its
target. ``digest`` is the SHA-256 of the canonical JSON of the entries only, so
importing the same tree again (from any place) finds the same record; ``roots`` lists
the host directories it was imported from. Records are written atomically and never
change but for ``roots``.

Region builds lay guests' directory trees out from these records
(:mod:`libshare.sharing.region.tree`): a guest directory is bound whole from the region
only when it is exactly what the record says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.util.files import atomic_write

TREE_VERSION = 1
DIGEST = re.compile(r"^[0-9a-f]{64}$")

_KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
          stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a tree: ``path`` (absolute guest path), ``kind`` (see the module
    docstring), ``mode`` (permission bits), ``uid``, ``gid``, ``size`` and ``payload``
    (SHA-256 of a regular file, target of a symbolic link, else None)."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    payload: str | None = None

    def as_list(self) -> list[Any]:
        """Return the entry as the JSON list of a record."""
        return [self.path, self.kind, self.mode, self.uid, self.gid, self.size, self.payload]


@dataclass
class TreeRecord:
    """A stored tree: ``digest``, ``entries`` sorted by path, ``roots`` imported from."""

    digest: str
    entries: list[TreeEntry]
    roots: list[str] = field(default_factory=list)

    def files(self) -> int:
        """Return the number of regular files in the tree."""
        return sum(1 for e in self.entries if e.kind == "f")

    def bytes(self) -> int:
        """Return the sum of the regular files' sizes."""
        return sum(e.size for e in self.entries if e.kind == "f")

    def summary(self) -> dict[str, Any]:
        """Return digest, roots, entry and file counts and bytes (JSON-ready)."""
        return {"digest": self.digest, "roots": self.roots, "entries": len(self.entries),
                "files": self.files(), "bytes": self.bytes()}


def trees_dir(store_dir: Path) -> Path:
    """Return the folder of the store's tree records."""
    return store_dir / "trees"


def record_path(store_dir: Path, digest: str) -> Path:
    """Return where the record of tree ``digest`` lives."""
    return trees_dir(store_dir) / f"{digest}.json"


def listing_digest(entries: list[TreeEntry]) -> str:
    """Return the digest of ``entries`` (SHA-256 of their canonical JSON)."""
    raw = json.dumps([e.as_list() for e in entries], separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


def walk_tree(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (guest path, lstat) of ``root`` ("/") and of everything under it, sorted by
    path within each directory, parents first; symlinked directories are entries, never
    walked; entries that vanish while walked are left out."""
    try:
        yield "/", os.lstat(root)
    except OSError:
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = "/" if rel == "." else "/" + rel + "/"
        for name in sorted(dirnames + filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            yield base + name, st


def entries_of(root: str, shas: Mapping[tuple[int, int], str]) -> list[TreeEntry]:
    """Return the entries of the tree at ``root``, sorted by path; ``shas`` maps a regular
    file's (st_dev, st_ino) to its SHA-256 (files missing from it become kind ``?``)."""
    out = []
    for guest, st in walk_tree(root):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "?")
        payload: str | None = None
        if kind == "f":
            payload = shas.get((st.st_dev, st.st_ino))
            if payload is None:
                kind = "?"
        elif kind == "l":
            try:
                payload = os.readlink(os.path.join(root, guest.lstrip("/")))
            except OSError:
                kind = "?"
        out.append(TreeEntry(guest, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                             st.st_size if kind == "f" else 0, payload))
    out.sort(key=lambda e: e.path)
    return out


def _doc(rec: TreeRecord) -> bytes:
    return (json.dumps({"version": TREE_VERSION, "digest": rec.digest,
                        "roots": sorted(rec.roots),
                        "entries": [e.as_list() for e in rec.entries]},
                       separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")


def record_tree(store_dir: Path, root: str, shas: Mapping[tuple[int, int], str]
                ) -> tuple[TreeRecord, bool]:
    """Record the tree at host directory ``root`` (see :func:`entries_of` for ``shas``);
    return (its record, whether the record file was written: new tree or new root)."""
    entries = entries_of(root, shas)
    digest = listing_digest(entries)
    try:
        old = load_tree(store_dir, digest)
    except LibshareError:
        old = None
    roots = sorted(set(old.roots if old else []) | {root})
    rec = TreeRecord(digest, entries, roots)
    if old is not None and old.roots == roots:
        return old, False
    atomic_write(record_path(store_dir, digest), _doc(rec))
    return rec, True


def load_tree(store_dir: Path, digest: str) -> TreeRecord:
    """Return the record of tree ``digest``; LibshareError if missing or unreadable."""
    path = record_path(store_dir, digest)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except FileNotFoundError:
        raise LibshareError(f"tree {digest} is not in the store "
                            "(import it with 'libshare store import DIR')") from None
    except (OSError, ValueError) as exc:
        raise LibshareError(f"cannot read tree record {path}: {exc}") from exc
    try:
        if doc["version"] != TREE_VERSION:
            raise ValueError(f"version {doc['version']}")
        entries = [TreeEntry(str(p), str(k), int(m), int(u), int(g), int(s),
                             None if x is None else str(x))
                   for p, k, m, u, g, s, x in doc["entries"]]
        rec = TreeRecord(str(doc["digest"]), entries, [str(r) for r in doc.get("roots", [])])
    except (KeyError, TypeError, ValueError) as exc:
        raise LibshareError(f"tree record {path}: unsupported or malformed ({exc})") from exc
    if rec.digest != digest or listing_digest(rec.entries) != digest:
        raise LibshareError(f"tree record {path} does not match its digest (damaged)")
    return rec


def tree_digests(store_dir: Path) -> list[str]:
    """Return the digests of every tree recorded in the store, sorted."""
    d = trees_dir(store_dir)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.iterdir()
                  if p.suffix == ".json" and DIGEST.match(p.stem))


def resolve_trees(store_dir: Path, specs: list[str] | None) -> list[str]:
    """Return the digests that ``specs`` name (each a digest, a unique prefix of one, or
    a root it was imported from); every tree of the store when ``specs`` is None or
    empty. Raises LibshareError naming a spec that matches no tree or several."""
    known = tree_digests(store_dir)
    if not specs:
        return known
    out: list[str] = []
    for spec in specs:
        hits = [d for d in known if d.startswith(spec.lower())] if re.fullmatch(
            r"[0-9a-fA-F]{4,64}", spec) else []
        if not hits:
            real = os.path.realpath(spec)
            hits = [d for d in known if real in load_tree(store_dir, d).roots]
        if len(hits) != 1:
            why = "no tree" if not hits else f"{len(hits)} trees"
            raise LibshareError(f"tree {spec}: {why} of the store match "
                                "(see 'libshare store ls --trees')")
        if hits[0] not in out:
            out.append(hits[0])
    return out
