"""The region's filesystem as ext4 (``region build --fs ext4``), built deterministically.

Owns formatting a staging tree as ext4 for DAX: ``mkfs.ext4 -d`` with a configuration of
its own (:data:`MKE2FS_CONF`, so the host's /etc/mke2fs.conf changes nothing), 4 KiB
blocks, no journal (the region is read-only), a fixed UUID and directory hash seed,
``E2FSPROGS_FAKE_TIME`` and no lazy initialisation; then one ``debugfs -w`` run writes
what ``-d`` copies from the staging inodes and the build must fix: every inode's times
(0) and the modes and owners of the guest trees (:func:`libshare.sharing.region.tree.
stage_trees`), and ``e2fsck -fn`` checks the result. The same staging tree and
e2fsprogs version give the same bytes on every host: mke2fs reads directories sorted,
and nothing of the staging inodes but their data, names and links survives.

The filesystem's size is computed from the staging tree (:func:`size_for`): the data of
each inode once, directories, inode tables and a margin.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from libshare.errors import LibshareError
from libshare.sharing.formats.erofs import ErofsError
from libshare.sharing.formats.ext4 import Ext4
from libshare.sharing.region.layout import FS_LABEL
from libshare.util.units import REGION_ALIGN, round_up

BLOCK = 4096
INODE_SIZE = 256
#: the only configuration mkfs.ext4 reads (MKE2FS_CONFIG): defaults of our own
MKE2FS_CONF = """[defaults]
    base_features = sparse_super,large_file,filetype,dir_index,ext_attr
    blocksize = 4096
    inode_size = 256
    inode_ratio = 16384
    reserved_ratio = 0
[fs_types]
    ext4 = {
        features = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
    }
"""
FAKE_TIME = "1"
TIME_FIELDS = ("atime", "ctime", "mtime", "crtime", "atime_extra", "ctime_extra",
               "mtime_extra", "crtime_extra")
VERSION = re.compile(r"(?:mke2fs|debugfs) ([0-9][\w.+~-]*)")


def _tool(name: str) -> str:
    """Return the path of e2fsprogs tool ``name``; LibshareError if it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise LibshareError(f"{name} not found (install e2fsprogs)")
    return path


@functools.lru_cache(maxsize=2)
def mke2fs_version() -> str:
    """Return the e2fsprogs version of mkfs.ext4 ("1.47.0"), "unknown" if it says none."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, LibshareError):
        proc = subprocess.run([_tool("mkfs.ext4"), "-V"], capture_output=True, text=True,
                              check=False, timeout=10)
        m = VERSION.search(proc.stderr + proc.stdout)
        if m:
            return m.group(1)
    return "unknown"


def size_for(root: Path) -> tuple[int, int]:
    """Return (bytes, inodes) an ext4 filesystem needs for the staging tree ``root``:
    the data of every inode once (4 KiB blocks), directory blocks, inode tables and a
    margin for the allocator, rounded up to 2 MiB."""
    seen: set[tuple[int, int]] = set()
    data = 0
    dirs = 0
    for dirpath, dirnames, filenames in os.walk(root):
        names = dirnames + filenames
        dirs += max(1, -(-sum(8 + len(os.fsencode(n)) + 4 for n in names) // (BLOCK - 64)))
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size >= 60):
                data += round_up(max(st.st_size, 1), BLOCK)
    inodes = len(seen) + 64 + len(seen) // 16
    meta = inodes * INODE_SIZE + dirs * BLOCK
    total = data + meta + data // 32 + 8 * 1024 * 1024
    return round_up(total, REGION_ALIGN), round_up(inodes, 64)


def _env(conf: Path) -> dict[str, str]:
    return {**os.environ, "MKE2FS_CONFIG": str(conf), "E2FSPROGS_FAKE_TIME": FAKE_TIME,
            "LC_ALL": "C"}


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LibshareError(f"{what} failed: {lines[-1] if lines else proc.returncode}")


def _inodes(fs_image: Path) -> dict[str, tuple[int, int]]:
    """Return path -> (inode number, file type bits) of every entry of the ext4 image."""
    paths: dict[str, tuple[int, int]] = {"/": (2, stat.S_IFDIR)}
    with open(fs_image, "rb") as fh:
        fs = Ext4(fh)
        todo = [("", fs.inode(2))]
        while todo:
            path, ino = todo.pop()
            for name, child in fs.listdir(ino).items():
                node = fs.inode(child)
                paths[f"{path}/{name}"] = (child, stat.S_IFMT(node.mode))
                if node.is_dir:
                    todo.append((f"{path}/{name}", node))
    return paths


def mkfs_ext4(root: Path, out: Path, fs_uuid: str,
              patch: dict[str, tuple[int, int, int]]) -> None:
    """Format the staging tree ``root`` as the ext4 image ``out`` (labelled FS_LABEL,
    UUID and hash seed ``fs_uuid``), then write every inode's times and the modes and
    owners ``patch`` asks for (region path -> (mode, uid, gid)); raise LibshareError if
    a tool fails or e2fsck finds the result unclean."""
    size, inodes = size_for(root)
    conf = out.parent / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    env = _env(conf)
    out.unlink(missing_ok=True)
    with open(out, "wb") as fh:
        fh.truncate(size)
    _run([_tool("mkfs.ext4"), "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I",
          str(INODE_SIZE), "-N", str(inodes), "-m", "0", "-L", FS_LABEL, "-U", fs_uuid,
          "-O", "^has_journal,^resize_inode",
          "-E", f"hash_seed={fs_uuid},lazy_itable_init=0,lazy_journal_init=0,"
          "root_owner=0:0,nodiscard", "-d", str(root), str(out), str(size // BLOCK)],
         env, "mkfs.ext4")
    try:
        paths = _inodes(out)
    except ErofsError as exc:
        raise LibshareError(f"mkfs.ext4 made a filesystem libshare cannot read: {exc}") \
            from exc
    cmds = [f"sif <{n}> {f} 0" for n in sorted({n for n, _k in paths.values()})
            for f in TIME_FIELDS]
    for path, (mode, uid, gid) in sorted(patch.items()):
        if path not in paths:
            raise LibshareError(f"region build: {path} is missing from the ext4 image")
        n, kind = paths[path]
        cmds += [f"sif <{n}> mode 0{kind | (mode & 0o7777):o}", f"sif <{n}> uid {uid}",
                 f"sif <{n}> gid {gid}"]
    script = out.parent / "debugfs.cmds"
    script.write_text("\n".join(cmds) + "\n")
    proc = subprocess.run([_tool("debugfs"), "-w", "-f", str(script), str(out)],
                          capture_output=True, text=True, env=env, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise LibshareError(f"debugfs failed: {(errors or [str(proc.returncode)])[0]}")
    _run([_tool("e2fsck"), "-fn", str(out)], env, "e2fsck of the new filesystem")
