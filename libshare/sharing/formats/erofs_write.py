"""Writing uncompressed EROFS filesystems from a tree held in memory: no staging tree on
disk, no mkfs.erofs.

Owns the writer's side of the format :mod:`libshare.sharing.formats.erofs` reads (Linux
fs/erofs/erofs_fs.h). A tree is :class:`Dir`, :class:`File` and :class:`Symlink` nodes;
a node reached under two names is one inode (a hard link). :class:`Plan` assigns inode
numbers and blocks in one fixed walk and knows the filesystem's size before a byte is
written; :meth:`Plan.chunks` then yields the filesystem's bytes in order, reading each
file's data once (and hashing it where the caller wants its content proved).

What is written, and why:

* block 0: the superblock at 1024 (magic, crc32c over the rest of the block, 4 KiB
  blocks, the UUID and volume label given, ``meta_blkaddr`` 0, features SB_CHKSUM and
  MTIME as mkfs.erofs 1.5 sets them), the inode table from 1152 (the root first, nid 36)
  running on into the next blocks, each inode 32-byte aligned with its inline tail;
* inodes compact (32 bytes) unless a size of 4 GiB or more, an owner above 65535 or a
  link count above 65535 needs the extended form (64 bytes, never across a block);
  no xattrs; every time 0 (compact inodes take the superblock's build time, 0);
* regular files FLAT_PLAIN: their data in whole blocks of their own from
  ``raw_blkaddr``, zero-padded (block-aligned: what DAX maps); directories and symlinks
  FLAT_INLINE where their last partial block fits after the inode in its block (as
  mkfs.erofs does: a lookup reads one block, and a region of 10,000 one-entry hash
  directories is not 40 MB of nearly empty blocks), else plain; empty inodes have no
  block;
* directories: blocks of 12-byte dirents then names, ``.`` and ``..`` included, names
  sorted bytewise across the whole directory (the kernel's lookup is a binary search),
  each block holding as many entries as fit; the size counts the last block's used
  bytes only;
* data after the inode table: directories, then symlinks, then files, each group in
  walk order (a sorted depth-first walk), so the bytes depend only on the tree.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from libshare.sharing.formats.erofs import (
    DIRENT,
    EROFS_MAGIC,
    FEATURE_COMPAT_SB_CHKSUM,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    SUPER_OFFSET,
    ErofsError,
    crc32c_raw,
)

#: what writes region filesystems, recorded in each manifest: raise the number whenever
#: the same tree would give other bytes (images are named by their digest)
WRITER = "libshare-erofs 1"
BLOCK = 4096
#: superblock feature: extended inodes carry an mtime (set by mkfs.erofs 1.5 too)
FEATURE_COMPAT_MTIME = 0x2
#: where the inode table starts (after the 128-byte superblock): nid 36
FIRST_INODE = SUPER_OFFSET + 128
NULL_ADDR = 0xFFFFFFFF
MAX_NAME = 255
#: bytes a file's data is read in
CHUNK = 4 * 1024 * 1024
_FILE_TYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 7}
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
_SUPER = struct.Struct("<IIIBBHQQIIII16s16sI")


@dataclass(eq=False)
class Node:
    """An inode: permission bits (``mode & 0o7777``), owner and group."""

    mode: int
    uid: int = 0
    gid: int = 0

    @property
    def kind(self) -> int:
        """Return the file type bits (stat.S_IFREG, S_IFDIR or S_IFLNK)."""
        raise NotImplementedError


@dataclass(eq=False)
class File(Node):
    """A regular file of ``size`` bytes, read from ``path`` (or given as ``data``) when
    the filesystem is written; ``expect``: its hex SHA-256 when it must be proved as
    it is read (else None: the caller vouches for it)."""

    size: int = 0
    path: str | None = None
    data: bytes | None = None
    expect: str | None = None

    @property
    def kind(self) -> int:
        """Return stat.S_IFREG."""
        return stat.S_IFREG


@dataclass(eq=False)
class Symlink(Node):
    """A symbolic link to ``target``."""

    target: bytes = b""

    @property
    def kind(self) -> int:
        """Return stat.S_IFLNK."""
        return stat.S_IFLNK


@dataclass(eq=False)
class Dir(Node):
    """A directory: name (bytes, no "/" or NUL) -> node."""

    entries: dict[bytes, Node] = field(default_factory=dict)

    @property
    def kind(self) -> int:
        """Return stat.S_IFDIR."""
        return stat.S_IFDIR


def check_name(name: bytes) -> None:
    """Raise ErofsError unless ``name`` can be a directory entry's name."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name \
            or len(name) > MAX_NAME:
        raise ErofsError(f"invalid file name {name!r}")


@dataclass
class _Slot:
    node: Node
    nid: int = 0
    extended: bool = False
    nlink: int = 0
    size: int = 0
    blkaddr: int = NULL_ADDR
    tail: int = 0            # bytes kept inline after the inode (FLAT_INLINE), else 0
    body: bytes = b""        # directory blocks or symlink target (files: read later)
    parts: list[tuple[int, list[tuple[bytes, Node]]]] = field(default_factory=list)
    # ^ a directory's entries cut into blocks (_dir_split), once: sizes, then bytes
    parent: Dir | None = None

    @property
    def isize(self) -> int:
        """Return the inode's size on disk (32 or 64 bytes)."""
        return 64 if self.extended else 32

    @property
    def blocks(self) -> int:
        """Return the number of data blocks of its own (the inline tail excluded)."""
        return -(-(self.size - self.tail) // BLOCK)


class Plan:
    """Where every inode and block of the tree ``root`` goes; ``size``: the filesystem's
    bytes (a multiple of 4 KiB), known before anything is written.

    Raises ErofsError for a tree EROFS cannot hold (a bad name, a directory reached
    twice, a file over 2^32 blocks)."""

    def __init__(self, root: Dir, uuid: bytes, label: bytes = b"") -> None:
        if len(uuid) != 16 or len(label) > 16:
            raise ErofsError("the UUID must be 16 bytes and the label at most 16")
        self.uuid, self.label = uuid, label
        self.slots: dict[int, _Slot] = {}
        self.order: list[_Slot] = []
        self._walk(root)
        self._sizes()
        self._assign_nids()
        self._assign_blocks()

    # -- the walk: every inode once, in sorted depth-first order
    def _walk(self, root: Dir) -> None:
        stack: list[tuple[Node, Dir | None]] = [(root, root)]
        while stack:
            node, parent = stack.pop()
            slot = self.slots.get(id(node))
            if slot is not None:
                if isinstance(node, Dir):
                    raise ErofsError("a directory is reached under two names")
                slot.nlink += 1
                continue
            slot = _Slot(node, nlink=1, parent=parent)
            self.slots[id(node)] = slot
            self.order.append(slot)
            if isinstance(node, Dir):
                for name in node.entries:
                    check_name(name)
                subdirs = sum(isinstance(c, Dir) for c in node.entries.values())
                slot.nlink = 2 + subdirs
                for name in sorted(node.entries, reverse=True):
                    stack.append((node.entries[name], node))

    def _sizes(self) -> None:
        """Set each inode's size, form (compact or extended) and inline tail: the last
        partial block of a directory or symlink goes right after its inode (FLAT_INLINE,
        as mkfs.erofs does: a lookup reads the inode's block only), files never (DAX
        maps whole blocks)."""
        for slot in self.order:
            n = slot.node
            if isinstance(n, Dir):
                slot.parts = _dir_split(self._dir_items(slot))
                slot.size = BLOCK * (len(slot.parts) - 1) + slot.parts[-1][0]
            elif isinstance(n, Symlink):
                slot.size = len(n.target)
            elif isinstance(n, File):
                slot.size = n.size
            slot.extended = slot.size >= 1 << 32 or n.uid > 0xFFFF or n.gid > 0xFFFF \
                or slot.nlink > 0xFFFF
            if not isinstance(n, File) and slot.size % BLOCK \
                    and slot.isize + slot.size % BLOCK <= BLOCK:
                slot.tail = slot.size % BLOCK

    def _assign_nids(self) -> None:
        pos = FIRST_INODE
        for slot in self.order:
            need = slot.isize + slot.tail
            if pos % BLOCK + need > BLOCK:   # an inode and its tail never span two blocks
                pos += BLOCK - pos % BLOCK
            slot.nid = pos // 32
            pos += -(-need // 32) * 32
        self.meta_blocks = -(-pos // BLOCK)

    def _assign_blocks(self) -> None:
        for slot in self.order:
            n = slot.node
            if isinstance(n, Dir):
                slot.body = self._dir_blocks(slot)
            elif isinstance(n, Symlink):
                slot.body = n.target
        #: the inodes with blocks of their own, in the order their data is laid out
        self.data = [slot for kind in (stat.S_IFDIR, stat.S_IFLNK, stat.S_IFREG)
                     for slot in self.order if slot.node.kind == kind and slot.blocks]
        blk = self.meta_blocks
        for slot in self.data:
            slot.blkaddr = blk
            blk += slot.blocks
        if blk >= 1 << 32:
            raise ErofsError("the tree needs more than 2^32 blocks")
        self.blocks = blk
        self.size = blk * BLOCK

    def _dir_items(self, slot: _Slot) -> list[tuple[bytes, Node]]:
        """Return the entries of directory ``slot`` with . and .., sorted bytewise."""
        d = slot.node
        assert isinstance(d, Dir) and slot.parent is not None
        items: list[tuple[bytes, Node]] = [(b".", d), (b"..", slot.parent)]
        items += list(d.entries.items())
        items.sort(key=lambda t: t[0])
        return items

    def _dir_blocks(self, slot: _Slot) -> bytes:
        blocks: list[bytes] = []
        for _used, part in slot.parts:
            heads, names = bytearray(), bytearray()
            nameoff = DIRENT.size * len(part)
            for name, node in part:
                child = self.slots[id(node)]
                heads += DIRENT.pack(child.nid, nameoff + len(names),
                                     _FILE_TYPE[node.kind], 0)
                names += name
            blocks.append(bytes(heads + names))
        return b"".join(b.ljust(BLOCK, b"\0") for b in blocks[:-1]) + blocks[-1]

    # -- the bytes
    def _inode(self, slot: _Slot) -> bytes:
        n = slot.node
        mode = n.kind | (n.mode & 0o7777)
        ino = slot.nid            # only for 32-bit stat; unique like the nid
        layout = (LAYOUT_FLAT_INLINE if slot.tail else LAYOUT_FLAT_PLAIN) << 1
        if slot.extended:
            return _EXTENDED.pack(layout | 1, 0, mode, 0, slot.size, slot.blkaddr, ino,
                                  n.uid, n.gid, 0, 0, slot.nlink)
        return _COMPACT.pack(layout, 0, mode, slot.nlink, slot.size, 0, slot.blkaddr, ino,
                             n.uid, n.gid, 0)

    def meta(self) -> bytes:
        """Return the superblock block and the inode table with the inline tails
        (``meta_blocks`` blocks)."""
        out = bytearray(self.meta_blocks * BLOCK)
        root = self.order[0]
        sb = _SUPER.pack(EROFS_MAGIC, 0, FEATURE_COMPAT_SB_CHKSUM | FEATURE_COMPAT_MTIME,
                         12, 0, root.nid, len(self.order), 0, 0, self.blocks, 0, 0,
                         self.uuid, self.label.ljust(16, b"\0"), 0)
        out[SUPER_OFFSET:SUPER_OFFSET + len(sb)] = sb
        for slot in self.order:
            raw = self._inode(slot)
            if slot.tail:
                raw += slot.body[slot.size - slot.tail:]
            out[slot.nid * 32:slot.nid * 32 + len(raw)] = raw
        crc = crc32c_raw(bytes(out[SUPER_OFFSET:BLOCK]))    # checksum field still 0
        out[SUPER_OFFSET + 4:SUPER_OFFSET + 8] = crc.to_bytes(4, "little")
        return bytes(out)

    def chunks(self, proved: Callable[[File, str], None] | None = None) -> Iterator[bytes]:
        """Yield the filesystem's bytes in order (``size`` bytes in all). A file with
        ``expect`` is hashed as it is read and ``proved(file, sha256)`` is called with
        what it hashed to (the caller raises on a mismatch). Raises ErofsError if a
        file's length is not its ``size`` or the bytes are not the plan's; OSError if a
        file cannot be read."""
        meta = self.meta()
        yield meta
        done = len(meta)
        for slot in self.data:
            if done != slot.blkaddr * BLOCK:
                raise ErofsError(f"inode {slot.nid}: data at byte {done}, planned at "
                                 f"block {slot.blkaddr}")
            node = slot.node
            if isinstance(node, File):
                for piece in _file_chunks(node, proved):
                    done += len(piece)
                    yield piece
            else:
                own = slot.body[:slot.size - slot.tail]
                done += len(own)
                yield own
            if done % BLOCK:
                pad = BLOCK - done % BLOCK
                done += pad
                yield bytes(pad)
        if done != self.size:
            raise ErofsError(f"{done} bytes of filesystem written, {self.size} planned")


def _dir_split(items: list[tuple[bytes, Node]]) -> list[tuple[int, list[tuple[bytes, Node]]]]:
    """Return the directory entries ``items`` cut into blocks: (bytes used, entries) per
    block, each holding as many 12-byte dirents and their names as fit."""
    out: list[tuple[int, list[tuple[bytes, Node]]]] = []
    i = 0
    while i < len(items):
        used, j = 0, i
        while j < len(items) and used + DIRENT.size + len(items[j][0]) <= BLOCK:
            used += DIRENT.size + len(items[j][0])
            j += 1
        out.append((used, items[i:j]))
        i = j
    return out


def _file_chunks(node: File, proved: Callable[[File, str], None] | None) -> Iterator[bytes]:
    """Yield ``node``'s ``size`` bytes (from ``data`` or its ``path``, opened without
    following a final symlink, as a regular file only)."""
    h = hashlib.sha256() if node.expect and proved else None
    if node.data is not None:
        if len(node.data) != node.size:
            raise ErofsError(f"file data of {len(node.data)} bytes, {node.size} expected")
        if h is not None:
            h.update(node.data)
        yield node.data
    else:
        if node.path is None:
            raise ErofsError("a file with neither data nor a path")
        fd = os.open(node.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != node.size:
                raise ErofsError(f"{node.path}: {st.st_size} bytes, {node.size} expected "
                                 "(changed while the filesystem was written)")
            left = node.size
            while left:
                chunk = os.read(fd, min(CHUNK, left))
                if not chunk:
                    raise ErofsError(f"{node.path}: shorter than {node.size} bytes "
                                     "(changed while the filesystem was written)")
                left -= len(chunk)
                if h is not None:
                    h.update(chunk)
                yield chunk
        finally:
            os.close(fd)
    if h is not None and proved is not None:
        proved(node, h.hexdigest())
