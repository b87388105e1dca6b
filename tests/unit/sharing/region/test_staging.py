"""Staging a region's tree: in memory (EROFS) and on disk (ext4) hold the same tree."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from libshare.errors import LibshareError
from libshare.sharing.formats import erofs_write as ew
from libshare.sharing.region.staging import DiskStaging, MemoryStaging, Staging
from libshare.sharing.store import OBJECT_MODE, StoreEntry


def entry(path: Path, sha: str) -> StoreEntry:
    """Return a store entry for the file ``path`` claiming SHA-256 ``sha``."""
    return StoreEntry(sha256=sha, size=path.stat().st_size, build_id=None, soname=None,
                      elf_type="none", paths=["/usr/lib/" + path.name])


def fill(stage: Staging, obj: Path, sha: str) -> None:
    """Stage the same content through every operation."""
    stage.add_object(f"/lib/{sha[:2]}/{sha}/libx.so", str(obj), os.stat(obj), entry(obj, sha),
                     True)
    stage.mkdir("/tree/t/usr", parents=True)
    stage.mkdir("/tree/t/usr", parents=True)          # exists: fine with parents
    stage.mkdir("/tree/t/usr/lib")
    stage.link(f"/lib/{sha[:2]}/{sha}/libx.so", "/tree/t/usr/lib/libx.so")
    stage.copy(f"/lib/{sha[:2]}/{sha}/libx.so", "/tree/t/usr/lib/suid", sha)
    stage.symlink("libx.so", "/tree/t/usr/lib/libx.so.1")
    stage.write("/tree/t/usr/lib/extra", b"extra", 0o640)


def listing_disk(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Return path -> (kind, mode, data or target) of the tree under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = "/" + str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0o777, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def listing_memory(d: ew.Dir, prefix: str = "") -> dict[str, tuple[str, int, bytes]]:
    """Return path -> (kind, mode, data or target) of the nodes under ``d``."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for name, n in d.entries.items():
        rel = f"{prefix}/{os.fsdecode(name)}"
        if isinstance(n, ew.Dir):
            out[rel] = ("d", n.mode, b"")
            out.update(listing_memory(n, rel))
        elif isinstance(n, ew.Symlink):
            out[rel] = ("l", 0o777, n.target)
        else:
            assert isinstance(n, ew.File)
            data = n.data if n.data is not None else Path(n.path or "").read_bytes()
            out[rel] = ("f", n.mode, data)
    return out


def test_memory_and_disk_hold_the_same_tree(tmp_path: Path) -> None:
    obj = tmp_path / "obj"
    obj.write_bytes(b"\x7fELF library")
    obj.chmod(OBJECT_MODE)
    sha = hashlib.sha256(obj.read_bytes()).hexdigest()
    mem = MemoryStaging()
    fill(mem, obj, sha)
    disk = DiskStaging(tmp_path / "root")
    disk.root.mkdir()
    fill(disk, obj, sha)
    assert listing_memory(mem.root) == listing_disk(disk.root)
    link = mem.node("/tree/t/usr/lib/libx.so")
    assert link is mem.node(f"/lib/{sha[:2]}/{sha}/libx.so")             # a hard link
    assert mem.node("/tree/t/usr/lib/suid") is not link           # a copy: its own inode
    assert os.stat(disk.root / "tree/t/usr/lib/libx.so").st_nlink == 3   # + the store's


def test_memory_staging_refuses_what_no_filesystem_holds(tmp_path: Path) -> None:
    obj = tmp_path / "obj"
    obj.write_bytes(b"data")
    sha = "cd" * 32
    mem = MemoryStaging()
    mem.add_object("/lib/x", str(obj), os.stat(obj), entry(obj, sha), False)
    with pytest.raises(LibshareError, match="staged twice"):
        mem.write("/lib/x", b"", 0o644)
    with pytest.raises(LibshareError, match="not staged"):
        mem.link("/lib/missing", "/lib/y")
    with pytest.raises(LibshareError, match="not a directory"):
        mem.write("/lib/x/below", b"", 0o644)
    mem.link("/lib/x", "/lib/y")
    with pytest.raises(LibshareError, match="shares an inode"):
        mem.apply({"/lib/x": (0o600, 0, 0), "/lib/y": (0o644, 0, 0)})
    mem.apply({"/lib/x": (0o4755, 0, 7), "/lib/y": (0o4755, 0, 7), "/": (0o755, 0, 0)})
    node = mem.node("/lib/y")
    assert (node.mode, node.uid, node.gid) == (0o4755, 0, 7)
    f = mem.node("/lib/x")
    assert isinstance(f, ew.File) and f.expect == sha      # not proven: hashed when written
    with pytest.raises(LibshareError, match=f"store object {sha} .* is corrupt"):
        mem.proved(f, "00" * 32)
    obj.write_bytes(b"longer data")
    with pytest.raises(LibshareError, match="corrupt"):
        mem.add_object("/lib/z", str(obj), os.stat(obj),
                       StoreEntry(sha256=sha, size=4, build_id=None, soname=None,
                                  elf_type="none", paths=["/usr/lib/obj"]), True)
