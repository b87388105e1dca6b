"""Where a region build lays its tree out before the filesystem is made: in memory for
EROFS, on disk for ext4.

Owns the two places behind one set of operations (:class:`Staging`), so that what goes
into a region (:func:`libshare.sharing.region.build` stages the store objects and the
manifests, :func:`libshare.sharing.region.tree.stage_trees` the guest trees) is said
once:

* :class:`MemoryStaging` builds :mod:`libshare.sharing.formats.erofs_write` nodes: no
  file is created, linked or removed (a whole /usr is tens of thousands of each); a
  store object's bytes are read once, when the image is written, and hashed then
  unless the store proved them;
* :class:`DiskStaging` makes a real tree (hard links to the store objects, copies where
  a link is impossible, each hashed as it is staged) for ``mkfs.ext4 -d``.

Region paths are absolute ("/lib/ab/<sha256>/libc.so.6"); both places give directories
0755, store objects OBJECT_MODE, written files the mode asked, everything owned by root
(the trees' own metadata is applied afterwards: by debugfs for ext4,
:meth:`MemoryStaging.apply` in memory).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from libshare.errors import LibshareError
from libshare.sharing.formats import erofs_write as ew
from libshare.sharing.store import OBJECT_MODE, StoreEntry, corrupt_object_problem
from libshare.util.digest import copy_sha256, sha256_file
from libshare.util.files import open_regular

DIR_MODE = 0o755


class Staging:
    """The operations a region's content is staged with (region paths, absolute)."""

    def add_object(self, rpath: str, src: str, st: os.stat_result, entry: StoreEntry,
                   proven: bool) -> None:
        """Put the store object ``entry`` (its file ``src``, stat ``st``) at ``rpath``,
        its parents made as needed; ``proven``: the store proved its bytes (no hash)."""
        raise NotImplementedError

    def mkdir(self, rpath: str, parents: bool = False) -> None:
        """Make the directory ``rpath`` (``parents``: and its missing parents, no error
        if it exists)."""
        raise NotImplementedError

    def symlink(self, target: str, rpath: str) -> None:
        """Make ``rpath`` a symbolic link to ``target``."""
        raise NotImplementedError

    def write(self, rpath: str, data: bytes, mode: int) -> None:
        """Make ``rpath`` a file holding ``data`` with permission bits ``mode``."""
        raise NotImplementedError

    def link(self, existing: str, rpath: str) -> None:
        """Make ``rpath`` another name of the file at ``existing``."""
        raise NotImplementedError

    def copy(self, existing: str, rpath: str, sha256: str) -> None:
        """Make ``rpath`` a file of its own with the bytes and mode of ``existing`` (whose
        hex SHA-256 is ``sha256``: raises LibshareError where the copy shows otherwise)."""
        raise NotImplementedError


def _changed(sha256: str) -> LibshareError:
    return LibshareError(f"region build: the store object {sha256} changed while being "
                         "staged")


class MemoryStaging(Staging):
    """The tree as :mod:`~libshare.sharing.formats.erofs_write` nodes (``root``)."""

    def __init__(self) -> None:
        self.root = ew.Dir(DIR_MODE)
        self._entry: dict[int, StoreEntry] = {}      # id(File) -> its store object

    def _parent(self, rpath: str, make: bool) -> tuple[ew.Dir, bytes]:
        """Return the directory holding ``rpath`` (made where ``make``) and its name."""
        parts = [p for p in os.fsencode(rpath).split(b"/") if p]
        if not parts:
            raise LibshareError(f"region build: bad region path {rpath!r}")
        d = self.root
        for name in parts[:-1]:
            nxt = d.entries.get(name)
            if nxt is None and make:
                nxt = d.entries[name] = ew.Dir(DIR_MODE)
            if not isinstance(nxt, ew.Dir):
                raise LibshareError(f"region build: {rpath}: a parent is not a directory")
            d = nxt
        return d, parts[-1]

    def _put(self, rpath: str, node: ew.Node, make: bool = False) -> None:
        d, name = self._parent(rpath, make)
        if name in d.entries:
            raise LibshareError(f"region build: {rpath} is staged twice")
        d.entries[name] = node

    def node(self, rpath: str) -> ew.Node:
        """Return the node at ``rpath``; LibshareError if there is none."""
        d, name = self._parent(rpath, False)
        found = d.entries.get(name)
        if found is None:
            raise LibshareError(f"region build: {rpath} is not staged")
        return found

    def add_object(self, rpath: str, src: str, st: os.stat_result, entry: StoreEntry,
                   proven: bool) -> None:
        """See :meth:`Staging.add_object` (the bytes are read and, unless ``proven``,
        hashed when the image is written)."""
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            raise LibshareError(corrupt_object_problem(entry, f"of a file of {st.st_size} "
                                                       "bytes"))
        f = ew.File(OBJECT_MODE, size=entry.size, path=src,
                    expect=None if proven else entry.sha256)
        self._entry[id(f)] = entry
        self._put(rpath, f, make=True)

    def mkdir(self, rpath: str, parents: bool = False) -> None:
        """See :meth:`Staging.mkdir`."""
        d, name = self._parent(rpath, parents)
        if parents and isinstance(d.entries.get(name), ew.Dir):
            return
        self._put(rpath, ew.Dir(DIR_MODE))

    def symlink(self, target: str, rpath: str) -> None:
        """See :meth:`Staging.symlink`."""
        self._put(rpath, ew.Symlink(0o777, target=os.fsencode(target)))

    def write(self, rpath: str, data: bytes, mode: int) -> None:
        """See :meth:`Staging.write`."""
        self._put(rpath, ew.File(mode & 0o7777, size=len(data), data=data))

    def link(self, existing: str, rpath: str) -> None:
        """See :meth:`Staging.link`."""
        self._put(rpath, self.node(existing))

    def copy(self, existing: str, rpath: str, sha256: str) -> None:
        """See :meth:`Staging.copy` (proved when the image is written)."""
        src = self.node(existing)
        if not isinstance(src, ew.File):
            raise LibshareError(f"region build: {existing} is not a file")
        self._put(rpath, ew.File(src.mode, size=src.size, path=src.path, data=src.data,
                                 expect=sha256))

    def apply(self, patch: dict[str, tuple[int, int, int]]) -> None:
        """Give each region path of ``patch`` its (permission bits, uid, gid); raise
        LibshareError if a path is not staged or two names of one inode want different
        metadata."""
        done: dict[int, tuple[int, int, int]] = {}
        for rpath, meta in sorted(patch.items()):
            n = self.node(rpath) if rpath.strip("/") else self.root
            if done.setdefault(id(n), meta) != meta:
                raise LibshareError(f"region build: {rpath} shares an inode with another "
                                    "path of different metadata")
            n.mode, n.uid, n.gid = meta[0] & 0o7777, meta[1], meta[2]

    def proved(self, f: ew.File, actual: str) -> None:
        """Check what the file ``f`` hashed to as the image was written (see
        :meth:`libshare.sharing.formats.erofs_write.Plan.chunks`); raise LibshareError
        naming the store object when it is not its SHA-256."""
        if actual == f.expect:
            return
        entry = self._entry.get(id(f))
        if entry is not None:
            raise LibshareError(corrupt_object_problem(entry, actual))
        raise _changed(f.expect or "")


class DiskStaging(Staging):
    """The tree as real files under the directory ``root`` (it exists, empty)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._top = os.fspath(root)
        self._made = {self._top}

    def _make_dirs(self, path: str) -> None:
        if path in self._made:
            return
        self._make_dirs(os.path.dirname(path))
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
        self._made.add(path)

    def add_object(self, rpath: str, src: str, st: os.stat_result, entry: StoreEntry,
                   proven: bool) -> None:
        """See :meth:`Staging.add_object` (a hard link where the object's mode allows,
        else a copy; hashed as staged unless ``proven`` and linked)."""
        dest = self._top + rpath
        self._make_dirs(os.path.dirname(dest))
        linked = False
        if stat.S_IMODE(st.st_mode) == OBJECT_MODE:
            try:
                os.link(src, dest)
                linked = True
            except OSError:
                pass
        if linked and proven:
            return
        if linked:
            actual = sha256_file(dest)
        else:
            with open_regular(src) as fin, open(dest, "wb") as fout:
                actual = copy_sha256(fin, fout)
            os.chmod(dest, OBJECT_MODE)
        if actual != entry.sha256:
            raise LibshareError(corrupt_object_problem(entry, actual))

    def mkdir(self, rpath: str, parents: bool = False) -> None:
        """See :meth:`Staging.mkdir`."""
        if parents:
            self._make_dirs(self._top + rpath)
        else:
            os.mkdir(self._top + rpath, DIR_MODE)

    def symlink(self, target: str, rpath: str) -> None:
        """See :meth:`Staging.symlink`."""
        os.symlink(target, self._top + rpath)

    def write(self, rpath: str, data: bytes, mode: int) -> None:
        """See :meth:`Staging.write`."""
        with open(self._top + rpath, "wb") as fh:
            fh.write(data)
        os.chmod(self._top + rpath, mode)

    def link(self, existing: str, rpath: str) -> None:
        """See :meth:`Staging.link`."""
        os.link(self._top + existing, self._top + rpath)

    def copy(self, existing: str, rpath: str, sha256: str) -> None:
        """See :meth:`Staging.copy`."""
        with open(self._top + existing, "rb") as fin, open(self._top + rpath, "wb") as fout:
            if copy_sha256(fin, fout) != sha256:
                raise _changed(sha256)
            os.fchmod(fout.fileno(), stat.S_IMODE(os.fstat(fin.fileno()).st_mode))

    def fix_dir_modes(self) -> None:
        """Make every directory 0755 where the umask took bits from it (images must not
        depend on the umask of whoever builds them); with the usual umasks (022, 002)
        there is nothing to do and no walk."""
        mask = os.umask(0o022)
        os.umask(mask)
        if not mask & DIR_MODE:
            return
        for dirpath, _dirs, _files in os.walk(self.root):
            os.chmod(dirpath, DIR_MODE)
