"""The canonical store: content-addressed objects plus an index.

Owns ``cfg.store_dir`` (``STATE/store/``)::

    objects/<sha256[:2]>/<sha256>   one copy of each distinct file (by SHA-256), mode 0555
    index.json                      sha256 -> size, build-id, soname, ELF type, PT_LOAD
                                    segments, guest paths seen; build-id -> [sha256...]
    trees/<digest>.json             each imported tree, entry by entry
                                    (:mod:`libshare.sharing.trees`)
    proven.json                     sha256 -> the object file's (device, inode, size,
                                    mtime) when an import last proved its SHA-256
    tmp/                            temporary files of an import in progress
    .lock                           flock: held exclusively by an import or a removal,
                                    shared by region builds while they read objects

Every regular file of an imported tree becomes an object. An x86-64 ELF shared object
or executable keeps its ELF identity in the index (build-id, SONAME, segments); any
other file is a plain object, its ``elf_type`` "ET_REL" for x86-64 relocatable ELF
(kernel modules) and :data:`PLAIN` for the rest.

Rules:

* an object only appears under its hash after its bytes were copied to ``tmp/``,
  re-hashed, fsync'ed and renamed; an interrupted import leaves at most temporary files
  and objects the index does not list (both removed by the next import) and never a
  half-written object; an import that fails (disk full) indexes the objects it stored
  or, if the index cannot be written either, removes them: one line, store consistent;
* only regular files are read (never a FIFO or device, even one that replaces a file
  during the walk; symlinks are not followed when opening) and names are validated:
  a guest path must be valid UTF-8 without control characters (guests read a
  line- and tab-separated manifest), a SONAME must also be a file name of at most
  NAME_MAX bytes; a file that fails is skipped and reported, never stored;
* :func:`remove_objects` drops objects (``libshare store rm``); region images are never
  touched by it (each image holds its own copy of every library);
* the index is replaced atomically (temp file, fsync, rename, fsync of the directory);
* importing the same tree twice adds nothing and does not rewrite the index; an object
  already stored is re-hashed first unless its file is unchanged (device, inode, size,
  mtime) since an import proved its hash, and one whose bytes no longer match its name
  (damaged in place: a write moves the mtime) is replaced atomically from the imported
  file and reported as repaired; region builds skip the hash of a proven object too
  (ctime is not part of the proof: every build's hard link moves it);
* identity is the SHA-256: a build-id maps to every hash seen with it, so a build-id
  shared by different bytes gives two objects, never one;
* guest paths are the paths inside the imported tree ("/usr/lib/.../libc.so.6"); a
  symlink in the tree that resolves (inside the tree: absolute targets are taken relative
  to the tree root and ``..`` stops at it) to an imported file adds its own path to that
  file's guest paths. Symlinked directories are not walked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.sharing import trees
from libshare.sharing.elf import ElfIdentity, Skipped, header_type, identify
from libshare.util import files
from libshare.util.digest import (
    copy_sha256,
    load_entries,
    save_entries,
    sha256_file,
    sha256_stream,
    stat_key,
)
from libshare.util.files import atomic_write
from libshare.util.progress import Progress

INDEX_VERSION = 1
#: bytes of index.json read at most (about 500 bytes per object)
MAX_INDEX = 1 << 30
NOT_ELF = "not an ELF file"
#: ``elf_type`` of an object that is not x86-64 ELF (text, data, foreign binaries)
PLAIN = "none"
OBJECT_MODE = 0o555  # read-only; r-x so region staging can hard-link objects unchanged

#: the longest file name, in bytes, a region file may have (NAME_MAX of Linux filesystems)
NAME_MAX = 255


def path_problem(path: str) -> str | None:
    """Return why ``path`` (a guest path, or any name) cannot be recorded, or None: it
    must be valid UTF-8 (undecodable bytes arrive as surrogates from ``os.walk``) and
    hold no control character (newline, tab...: the guests' manifest is a text table)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if any(c < " " or c == "\x7f" for c in path):
        return "holds a control character"
    return None


def name_problem(name: str) -> str | None:
    """Return why ``name`` (a SONAME) cannot be a region file's name, or None: the rules
    of :func:`path_problem`, no U+FFFD (pyelftools' mark of undecodable bytes), no
    ``/``, not ``.`` or ``..``, at most NAME_MAX bytes."""
    problem = path_problem(name)
    if problem:
        return problem
    if "\ufffd" in name:
        return "not valid UTF-8"
    if "/" in name or name in ("", ".", ".."):
        return "not a file name"
    if len(name.encode()) > NAME_MAX:
        return f"longer than {NAME_MAX} bytes"
    return None


@dataclass
class StoreEntry:
    """One object of the store as recorded in the index."""

    sha256: str
    size: int
    build_id: str | None
    soname: str | None
    elf_type: str
    paths: list[str] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Return the stable file name for this object: its SONAME, else its smallest
        basename, else its SHA-256 (only names that pass :func:`name_problem`: an
        index written before names were checked still builds)."""
        if self.soname and name_problem(self.soname) is None:
            return self.soname
        names = sorted(n for n in {p.rsplit("/", 1)[-1] for p in self.paths}
                       if name_problem(n) is None)
        return names[0] if names else self.sha256

    def as_dict(self) -> dict[str, Any]:
        """Return the entry as a JSON-ready dict (the index representation)."""
        return {"sha256": self.sha256, "size": self.size, "build_id": self.build_id,
                "soname": self.soname, "elf_type": self.elf_type,
                "paths": sorted(self.paths), "segments": self.segments}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreEntry:
        """Return the entry recorded as ``d`` in the index."""
        return cls(sha256=d["sha256"], size=int(d["size"]), build_id=d.get("build_id"),
                   soname=d.get("soname"), elf_type=d.get("elf_type", "ET_DYN"),
                   paths=list(d.get("paths", [])), segments=list(d.get("segments", [])))


@dataclass
class StoreIndex:
    """The whole index: entries by SHA-256 (build-id map derived from them)."""

    entries: dict[str, StoreEntry] = field(default_factory=dict)

    def by_build_id(self) -> dict[str, list[str]]:
        """Return build-id -> sorted SHA-256s of every object carrying it."""
        out: dict[str, list[str]] = {}
        for e in self.entries.values():
            if e.build_id:
                out.setdefault(e.build_id, []).append(e.sha256)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def by_path(self) -> dict[str, list[str]]:
        """Return guest path -> sorted SHA-256s of every object seen at that path.

        Different trees (two guest images, two releases) often hold different bytes at
        the same guest path ("/usr/lib/x86_64-linux-gnu/libc.so.6"); each of those
        objects is kept, so selecting the path selects all of them, each under its own
        region path (see ``libshare.sharing.region.build.fs_path``).
        """
        out: dict[str, list[str]] = {}
        for e in self.entries.values():
            for p in e.paths:
                out.setdefault(p, []).append(e.sha256)
        return {k: sorted(v) for k, v in out.items()}

    def to_json(self) -> str:
        """Return the canonical JSON text of the index."""
        doc = {"version": INDEX_VERSION,
               "objects": {k: self.entries[k].as_dict() for k in sorted(self.entries)},
               "build_ids": self.by_build_id()}
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"


@dataclass
class ImportResult:
    """What :func:`import_tree` did."""

    roots: list[str]
    files_seen: int = 0
    added: list[str] = field(default_factory=list)      # new objects (sha256)
    known: int = 0                                      # files already in the store
    repaired: list[str] = field(default_factory=list)   # corrupt objects replaced (sha256)
    paths_added: int = 0                                # new guest paths recorded
    symlinks: int = 0                                   # symlinks recorded as guest paths
    skipped: list[Skipped] = field(default_factory=list)
    plain: int = 0                                      # files stored as plain objects
    trees: list[str] = field(default_factory=list)      # tree record digests (one a root)
    index_written: bool = False
    orphans_removed: list[str] = field(default_factory=list)  # of a killed import (sha256)

    def skipped_counts(self) -> dict[str, int]:
        """Return skip reason -> number of files."""
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (non-ELF files are only counted, not listed)."""
        return {"roots": self.roots, "files_seen": self.files_seen,
                "added": len(self.added), "added_objects": self.added,
                "known": self.known, "repaired": self.repaired, "paths_added": self.paths_added,
                "symlinks": self.symlinks, "plain": self.plain, "trees": self.trees,
                "skipped_counts": self.skipped_counts(),
                "skipped": [{"path": s.path, "reason": s.reason}
                            for s in self.skipped if s.reason != NOT_ELF],
                "index_written": self.index_written,
                "orphans_removed": self.orphans_removed}


def object_path(store_dir: Path, sha256: str) -> Path:
    """Return where the object with hex SHA-256 ``sha256`` lives in the store."""
    return Path(object_file(store_dir, sha256))


def object_file(store_dir: Path, sha256: str) -> str:
    """Return :func:`object_path` as a string (no Path made: a region build asks for
    tens of thousands)."""
    return f"{os.fspath(store_dir)}/objects/{sha256[:2]}/{sha256}"


def index_path(store_dir: Path) -> Path:
    """Return the path of the store's index file."""
    return store_dir / "index.json"


def load_index(store_dir: Path) -> StoreIndex:
    """Return the store's index (empty if the store does not exist yet).

    Raises LibshareError if the index exists but cannot be read or parsed.
    """
    path = index_path(store_dir)
    try:
        doc = json.loads(files.read_regular(path, MAX_INDEX))
    except FileNotFoundError:
        return StoreIndex()
    except OSError as exc:
        raise LibshareError(f"cannot read store index {path}: "
                            f"{files.os_error(exc, path=False)}") from exc
    except ValueError as exc:
        raise LibshareError(f"cannot read store index {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
        raise LibshareError(f"store index {path}: unsupported format")
    try:
        entries = {k: StoreEntry.from_dict(v) for k, v in doc.get("objects", {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise LibshareError(f"store index {path}: bad entry ({exc})") from exc
    return StoreIndex(entries)


def save_index(store_dir: Path, index: StoreIndex) -> None:
    """Write ``index`` as the store's index, atomically."""
    atomic_write(index_path(store_dir), index.to_json().encode())


def locked(store_dir: Path, shared: bool = False) -> contextlib.AbstractContextManager[None]:
    """Return the store's lock: exclusive for imports and removals, ``shared`` for
    readers of objects (region builds); waits for a conflicting holder to finish."""
    return files.locked(store_dir / ".lock", shared=shared)


def resolve_in_root(root: str, rel: str, max_links: int = 40) -> str | None:
    """Return the host path that guest path ``rel`` resolves to inside ``root``, or None.

    Symlinks are followed as if ``root`` were ``/``: absolute targets restart at
    ``root`` and ``..`` never climbs above it. None for loops (> ``max_links``).
    """
    pending = [p for p in rel.split("/") if p]
    pending.reverse()
    cur: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if cur:
                cur.pop()
            continue
        candidate = os.path.join(root, *cur, part)
        if os.path.islink(candidate):
            links += 1
            if links > max_links:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                cur = []
            pending.extend(reversed([p for p in target.split("/") if p]))
            continue
        cur.append(part)
    return os.path.join(root, *cur)


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (host path, lstat) of every regular file and symlink under ``root``, sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        names = sorted(filenames + [d for d in dirnames
                                    if os.path.islink(os.path.join(dirpath, d))])
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield path, st


def _copy_object(store_dir: Path, src: str, ident: ElfIdentity) -> str | None:
    """Copy ``src`` into the store as ``ident.sha256``; return None or a skip reason.

    The copy is re-hashed before it becomes visible; a file that changed since it was
    identified (or was replaced by something that is not a regular file) is refused
    (reason returned) and nothing is left behind. OSErrors of the store (disk full)
    propagate.
    """
    final = object_path(store_dir, ident.sha256)
    tmpdir = store_dir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    try:
        source = files.open_regular(src, follow=False)
    except OSError as exc:
        return f"cannot read: {files.os_error(exc, path=False)}"
    try:
        with source as s, files.atomic_file(final, OBJECT_MODE, tmp_dir=tmpdir) as d:
            if copy_sha256(s, d, limit=ident.size + 1) != ident.sha256:
                raise _Changed
    except _Changed:
        return "file changed while being imported"
    return None


class _Changed(Exception):
    """The file being imported changed since it was identified."""


def proofs_path(store_dir: Path) -> Path:
    """Return the path of the store's proofs (see the module docstring)."""
    return store_dir / "proven.json"


def load_proofs(store_dir: Path) -> dict[str, str]:
    """Return sha256 -> proof key (:func:`proof_key`) of the objects an import proved
    (empty if there is no readable record)."""
    return load_entries(proofs_path(store_dir))


def proof_key(st: os.stat_result) -> str:
    """Return what must not change in an object file's stat for its proof to hold."""
    return stat_key(st, ctime=False)


def is_proven(store_dir: Path, entry_sha: str, size: int, proofs: dict[str, str],
              st: os.stat_result | None = None) -> bool:
    """Return True if the object ``entry_sha`` is unchanged (and of ``size`` bytes) since
    an import proved its SHA-256; ``st`` is the object file's stat when the caller has
    it already (else it is taken now)."""
    want = proofs.get(entry_sha)
    if not want:
        return False
    if st is None:
        try:
            st = object_path(store_dir, entry_sha).stat()
        except OSError:
            return False
    return st.st_size == size and proof_key(st) == want


def _object_state(store_dir: Path, ident: ElfIdentity,
                  proofs: dict[str, str]) -> str | None:
    """Return None if the object for ``ident`` is stored with the right bytes, else
    "missing" or "corrupt" (wrong size, wrong SHA-256 or unreadable).

    The stored bytes are re-hashed unless proven (``proofs``, updated when they are
    proved now): a store object damaged in place (same size, a byte changed) must never
    count as known, or every region built from it would carry it.
    """
    path = object_path(store_dir, ident.sha256)
    try:
        st = path.stat()
        if st.st_size != ident.size:
            return "corrupt"
        if is_proven(store_dir, ident.sha256, ident.size, proofs):
            return None
        if sha256_file(path) != ident.sha256:
            return "corrupt"
        proofs[ident.sha256] = proof_key(st)
        return None
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "corrupt"


def identify_any(path: str) -> ElfIdentity | Skipped:
    """Return the identity of the regular file at ``path`` as the store keeps it: its ELF
    identity when it is a storable x86-64 ELF, else a plain one (SHA-256, size,
    ``elf_type`` from its header or :data:`PLAIN`); a Skipped only when it cannot be
    read."""
    ident = identify(path, follow=False)
    if not isinstance(ident, Skipped) or ident.reason.startswith("cannot read") \
            or ident.reason == "file changed while being read":
        return ident
    try:
        with files.open_regular(path, follow=False) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(64)
            fh.seek(0)
            digest = sha256_stream(fh)
            if fh.tell() != size:
                return Skipped(path, "file changed while being read")
    except OSError as exc:
        return Skipped(path, f"cannot read: {exc.strerror or exc}")
    kind = header_type(head)
    return ElfIdentity(path=path, sha256=digest, size=size,
                       elf_type=kind if kind == "ET_REL" else PLAIN, build_id=None,
                       soname=None)


def import_tree(store_dir: Path, dirs: Iterable[str | os.PathLike[str]],
                progress: Progress | None = None) -> ImportResult:
    """Import every regular file found under ``dirs`` into the store at ``store_dir``
    (x86-64 ELF files with their ELF identity) and record each tree
    (:func:`libshare.sharing.trees.record_tree`).

    Returns an :class:`ImportResult`. Raises LibshareError if a directory does not
    exist. Idempotent; holds the store lock for the whole import.
    """
    roots = [os.path.realpath(d) for d in dirs]
    for r in roots:
        if not os.path.isdir(r):
            raise LibshareError(f"{r}: not a directory")
    result = ImportResult(roots=roots)
    try:
        with locked(store_dir):
            tmpdir = store_dir / "tmp"
            if tmpdir.is_dir():  # leftovers of an interrupted import (we hold the lock)
                for leftover in tmpdir.iterdir():
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            index = load_index(store_dir)
            result.orphans_removed = _remove_orphans(store_dir, index)
            before = index.to_json()
            proofs = load_proofs(store_dir)
            known = dict(proofs)
            try:
                for root in roots:
                    shas = _import_root(store_dir, root, index, result, progress, proofs)
                    rec, _written = trees.record_tree(store_dir, root, shas)
                    result.trees.append(rec.digest)
                if index.to_json() != before:
                    save_index(store_dir, index)
                    result.index_written = True
                kept = {k: v for k, v in proofs.items() if k in index.entries}
                if kept != known:
                    save_entries(proofs_path(store_dir), kept)
            except OSError as exc:
                raise LibshareError(_import_failed(store_dir, index, result, exc)) from exc
    except OSError as exc:  # the store itself (lock, index folder) cannot be written
        raise LibshareError(f"store import failed: {files.os_error(exc)}") from exc
    return result


def _import_failed(store_dir: Path, index: StoreIndex, result: ImportResult,
                   exc: OSError) -> str:
    """Leave the store consistent after ``exc`` stopped an import (disk full, an I/O
    error): index the objects stored so far or, if the index cannot be written either,
    remove them; return the one-line error saying which."""
    try:
        save_index(store_dir, index)
        kept = (f"the {len(result.added)} new objects stored before it are indexed"
                if result.added else "nothing new was stored")
    except OSError:
        for sha in result.added:
            with contextlib.suppress(OSError):
                object_path(store_dir, sha).unlink()
        kept = "nothing new was kept"
    return f"store import failed: {files.os_error(exc)}; {kept}"


def _remove_orphans(store_dir: Path, index: StoreIndex) -> list[str]:
    """Remove object files the index does not list (stored by an import killed before
    it wrote the index; we hold the lock, so no import is running); return their
    names, sorted."""
    objects = store_dir / "objects"
    found = []
    if objects.is_dir():
        for sub in objects.iterdir():
            for obj in sub.iterdir() if sub.is_dir() and not sub.is_symlink() else []:
                if obj.name not in index.entries:
                    found.append(obj.name)
                    with contextlib.suppress(OSError):
                        obj.unlink()
    return sorted(found)


def _import_root(store_dir: Path, root: str, index: StoreIndex, result: ImportResult,
                 progress: Progress | None,
                 proofs: dict[str, str]) -> dict[tuple[int, int], str]:
    """Import one tree ``root`` into ``index`` (objects copied, index not yet written);
    return (st_dev, st_ino) -> SHA-256 of every regular file imported."""
    items = list(_walk(root))
    by_inode: dict[tuple[int, int], str] = {}       # (dev, ino) -> sha256 of imported file
    links: list[str] = []                            # guest paths of symlinks
    total = len(items)
    for n, (path, st) in enumerate(items, 1):
        if progress:
            progress("import", n, total, "files")
        guest = "/" + os.path.relpath(path, root)
        problem = path_problem(guest)
        if problem:
            result.skipped.append(Skipped(path, f"guest path {problem}"))
            continue
        if stat.S_ISLNK(st.st_mode):
            links.append(guest)
            continue
        result.files_seen += 1
        key = (st.st_dev, st.st_ino)
        sha = by_inode.get(key)
        if sha is None:
            ident = identify_any(path)
            if isinstance(ident, Skipped):
                result.skipped.append(ident)
                continue
            problem = name_problem(ident.soname) if ident.soname else None
            if problem:
                result.skipped.append(Skipped(path, f"SONAME {problem}"))
                continue
            if ident.elf_type not in ("ET_DYN", "ET_EXEC"):
                result.plain += 1
            sha = _add_object(store_dir, path, ident, index, result, proofs)
            if sha is None:
                continue
            by_inode[key] = sha
        else:
            result.known += 1
        if _add_path(index.entries[sha], guest):
            result.paths_added += 1
    for guest in links:
        target = resolve_in_root(root, guest)
        if target is None:
            continue
        try:
            st = os.stat(target)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        sha = by_inode.get((st.st_dev, st.st_ino))
        if sha is None:
            continue
        result.symlinks += 1
        if _add_path(index.entries[sha], guest):
            result.paths_added += 1
    return by_inode


def _add_object(store_dir: Path, path: str, ident: ElfIdentity, index: StoreIndex,
                result: ImportResult, proofs: dict[str, str]) -> str | None:
    """Make sure ``ident`` is stored and indexed; return its sha256 or None if skipped."""
    entry = index.entries.get(ident.sha256)
    state = _object_state(store_dir, ident, proofs)
    if state is not None:
        why = _copy_object(store_dir, path, ident)
        if why is not None:
            result.skipped.append(Skipped(path, why))
            return None
        proofs[ident.sha256] = proof_key(object_path(store_dir, ident.sha256).stat())
        if state == "corrupt":
            result.repaired.append(ident.sha256)
    if entry is None:
        index.entries[ident.sha256] = StoreEntry(
            sha256=ident.sha256, size=ident.size, build_id=ident.build_id,
            soname=ident.soname, elf_type=ident.elf_type,
            segments=[s.as_dict() for s in ident.segments])
        result.added.append(ident.sha256)
    else:
        result.known += 1
    return ident.sha256


def _add_path(entry: StoreEntry, guest: str) -> bool:
    """Record ``guest`` as a path of ``entry``; return True if it was new."""
    if guest in entry.paths:
        return False
    entry.paths.append(guest)
    entry.paths.sort()
    return True


@dataclass
class RemoveResult:
    """What :func:`remove_objects` removed (or refused, with ``held``)."""

    removed: list[str] = field(default_factory=list)                # sha256s
    freed: int = 0                                                  # bytes
    held: dict[str, list[str]] = field(default_factory=dict)        # sha256 -> groups
    forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return dict(self.__dict__)


#: the shortest SHA-256 prefix :func:`resolve_objects` accepts
MIN_PREFIX = 8


def resolve_objects(index: StoreIndex, items: Iterable[str]) -> list[str]:
    """Return the SHA-256s that ``items`` (full SHA-256s or unique prefixes of at least
    MIN_PREFIX hex digits) name in ``index``, in order, each once. Raises LibshareError
    naming the first item that is not hex, too short, unknown or ambiguous."""
    out: list[str] = []
    for item in items:
        key = item.lower()
        if not (MIN_PREFIX <= len(key) <= 64) or any(c not in "0123456789abcdef" for c in key):
            raise LibshareError(f"{item!r} is not a SHA-256 (or a prefix of at least "
                                f"{MIN_PREFIX} hex digits)")
        found = [sha for sha in index.entries if sha.startswith(key)]
        if not found:
            raise LibshareError(f"no object {item} in the store")
        if len(found) > 1:
            raise LibshareError(f"{item} names {len(found)} objects; give more digits")
        if found[0] not in out:
            out.append(found[0])
    return out


def remove_objects(store_dir: Path, items: Iterable[str],
                   held: Callable[[], dict[str, list[str]]],
                   force: bool = False) -> RemoveResult:
    """Remove the objects ``items`` name (see :func:`resolve_objects`) from the index
    and the store; return a :class:`RemoveResult`.

    ``held()`` (called under the store lock, so no build can publish meanwhile) gives
    SHA-256 -> groups whose current image holds that library: such objects are refused
    (nothing removed, ``held`` filled) unless ``force``; a later ``region build`` of
    those groups would leave them out. Region images are never touched: each holds its
    own copy. The index is written first, then the files removed (a crash in between
    leaves unlisted files, which the next import removes). Raises LibshareError for an
    unknown item (nothing removed) or when the store cannot be written.
    """
    result = RemoveResult(forced=force)
    try:
        with locked(store_dir):
            index = load_index(store_dir)
            shas = resolve_objects(index, items)
            holders = held()
            result.held = {sha: holders[sha] for sha in shas if sha in holders}
            if result.held and not force:
                return result
            for sha in shas:
                result.freed += index.entries.pop(sha).size
            save_index(store_dir, index)
            for sha in shas:
                with contextlib.suppress(FileNotFoundError):
                    object_path(store_dir, sha).unlink()
                result.removed.append(sha)
    except OSError as exc:
        raise LibshareError(f"store rm failed: {files.os_error(exc)}") from exc
    return result


def stat_object(store_dir: Path, entry: StoreEntry) -> os.stat_result:
    """Return the stat of ``entry``'s object file; raises LibshareError if it is
    missing, unreadable or not of the indexed size.

    Cheap (one ``stat``): the bytes are not hashed here; :func:`corrupt_object_problem`
    words the error for an object whose SHA-256 turned out wrong.
    """
    try:
        st = os.stat(object_file(store_dir, entry.sha256))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise LibshareError(f"object {entry.sha256} missing from the store") from exc
        raise LibshareError(f"object {entry.sha256}: {exc.strerror}") from exc
    if st.st_size != entry.size:
        raise LibshareError(f"object {entry.sha256} has size {st.st_size}, index says "
                            f"{entry.size}")
    return st


def corrupt_object_problem(entry: StoreEntry, actual: str) -> str:
    """Return the one-line error for store object ``entry`` whose bytes hash to ``actual``."""
    where = entry.paths[0] if entry.paths else entry.name
    return (f"store object {entry.sha256} ({where}) is corrupt: its SHA-256 is now "
            f"{actual}; re-import a tree holding it with 'libshare store import DIR' "
            "to repair it")
