"""A small read-only reader of ext4 images, at any offset inside a file.

Owns just enough of the ext4 on-disk format (Linux fs/ext4/ext4.h, ext4_extents.h) to
check a region image built with ``mkfs.ext4 -d`` without root, loop devices or a copy:
the superblock (magic 0xEF53 at 1080 bytes into the filesystem), 32- and 64-byte group
descriptors, inodes of any size, extent trees, fast and slow symbolic links, and
directories read block by block (an htree's index blocks read as empty entries). Inline
data, block-mapped (ext2/3) files and encrypted files are reported, not read: region
images never contain them (DAX needs extents).

Its interface is :class:`libshare.sharing.formats.erofs.FsImage`'s, the one region
checks use (``sb.blocks``, ``sb.block_size``, ``inode``, ``read_inode``,
``iter_chunks``, ``listdir``, ``lookup``); inode numbers stand in for EROFS nids and a
file mapped by extents has ``layout`` FLAT_PLAIN (block-aligned, DAX-mappable). Every
problem raises :class:`~libshare.sharing.formats.erofs.ErofsError` with a one-line
reason (the checks catch one error type for both filesystems).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from libshare.sharing.formats.erofs import LAYOUT_FLAT_PLAIN, ErofsError, FsImage, Inode

EXT4_MAGIC = 0xEF53
MAGIC_OFFSET = 1080
ROOT_INO = 2
INCOMPAT_64BIT = 0x80
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
EXTENT_MAGIC = 0xF30A
#: data layouts other than extents (reported, not read)
LAYOUT_BLOCKMAP, LAYOUT_INLINE = 100, 101
MAX_EXTENT_DEPTH = 5
#: entries read from one directory at most (a corrupt rec_len loop ends there)
MAX_DIRENTS = 1 << 22


@dataclass(frozen=True)
class Superblock:
    """The superblock fields the reader uses."""

    blocks: int
    block_size: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    first_data_block: int
    label: str
    root_nid: int = ROOT_INO


class Ext4(FsImage):
    """An ext4 filesystem starting at byte ``offset`` of the open binary file ``fh``."""

    def __init__(self, fh: BinaryIO, offset: int = 0, length: int | None = None) -> None:
        super().__init__(fh, offset, length)
        self.sb = self._superblock()
        self._tables: dict[int, int] = {}
        self._extents: dict[int, list[tuple[int, int, int]]] = {}

    def _superblock(self) -> Superblock:
        raw = self.read(1024, 1024)
        if struct.unpack_from("<H", raw, 56)[0] != EXT4_MAGIC:
            raise ErofsError("no ext4 superblock (bad magic)")
        log_bs, = struct.unpack_from("<I", raw, 24)
        if log_bs > 6:
            raise ErofsError(f"ext4 block size 2^{10 + log_bs} is not supported")
        bs = 1024 << log_bs
        lo, = struct.unpack_from("<I", raw, 4)
        incompat, = struct.unpack_from("<I", raw, 96)
        hi = struct.unpack_from("<I", raw, 336)[0] if incompat & INCOMPAT_64BIT else 0
        desc = struct.unpack_from("<H", raw, 254)[0] if incompat & INCOMPAT_64BIT else 32
        ipg, = struct.unpack_from("<I", raw, 40)
        isize = struct.unpack_from("<H", raw, 88)[0] or 128
        sb = Superblock(blocks=lo | hi << 32, block_size=bs, inodes_per_group=ipg,
                        inode_size=isize, desc_size=desc or 32,
                        first_data_block=struct.unpack_from("<I", raw, 20)[0],
                        label=raw[120:136].split(b"\0", 1)[0].decode("utf-8", "replace"))
        if not ipg or isize < 128 or sb.desc_size < 32:
            raise ErofsError("ext4 superblock: corrupt geometry")
        if sb.blocks * bs > self.length:
            raise ErofsError(f"filesystem has {sb.blocks} blocks but only {self.length} "
                             "bytes are present: image truncated")
        return sb

    def _inode_table(self, group: int) -> int:
        """Return the first block of group ``group``'s inode table."""
        if group not in self._tables:
            bs, ds = self.sb.block_size, self.sb.desc_size
            raw = self.read((self.sb.first_data_block + 1) * bs + group * ds, ds)
            lo, = struct.unpack_from("<I", raw, 8)
            hi = struct.unpack_from("<I", raw, 40)[0] if ds >= 44 else 0
            self._tables[group] = lo | hi << 32
        return self._tables[group]

    def _raw_inode(self, ino: int) -> bytes:
        if ino < 1:
            raise ErofsError(f"inode {ino} out of range")
        group, index = divmod(ino - 1, self.sb.inodes_per_group)
        pos = self._inode_table(group) * self.sb.block_size + index * self.sb.inode_size
        return self.read(pos, 128)

    def inode(self, nid: int) -> Inode:
        """Return inode ``nid`` (an inode number); ErofsError if it is malformed."""
        raw = self._raw_inode(nid)
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", raw, 0)
        gid_lo, = struct.unpack_from("<H", raw, 24)
        flags, = struct.unpack_from("<I", raw, 32)
        size_hi, = struct.unpack_from("<I", raw, 108)
        uid_hi, gid_hi = struct.unpack_from("<HH", raw, 120)
        if flags & INLINE_DATA_FL:
            layout = LAYOUT_INLINE
        elif flags & EXTENTS_FL:
            layout = LAYOUT_FLAT_PLAIN
        else:
            layout = LAYOUT_BLOCKMAP
        return Inode(nid=nid, mode=mode, size=size_lo | size_hi << 32, layout=layout,
                     raw_blkaddr=0, tail_offset=0, uid=uid_lo | uid_hi << 16,
                     gid=gid_lo | gid_hi << 16)

    def _extent_list(self, ino: Inode) -> list[tuple[int, int, int]]:
        """Return (logical block, length, physical block) of ``ino``'s extents, sorted
        (uninitialized extents, which read as zeros, have physical block -1)."""
        if ino.nid in self._extents:
            return self._extents[ino.nid]
        out: list[tuple[int, int, int]] = []
        self._walk_extents(self._raw_inode(ino.nid)[40:100], out, MAX_EXTENT_DEPTH)
        out.sort()
        self._extents[ino.nid] = out
        return out

    def _walk_extents(self, node: bytes, out: list[tuple[int, int, int]], depth: int) -> None:
        magic, entries, _max, level = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC or level > depth or 12 + entries * 12 > len(node):
            raise ErofsError("corrupt extent tree")
        for i in range(entries):
            off = 12 + 12 * i
            if level == 0:
                lblk, length, hi, lo = struct.unpack_from("<IHHI", node, off)
                if length > 32768:
                    out.append((lblk, length - 32768, -1))
                else:
                    out.append((lblk, length, lo | hi << 32))
            else:
                _lblk, lo, hi = struct.unpack_from("<IIH", node, off)
                child = self.read((lo | hi << 32) * self.sb.block_size, self.sb.block_size)
                self._walk_extents(child, out, level - 1)

    def read_inode(self, ino: Inode, start: int = 0, n: int | None = None) -> bytes:
        """Return ``n`` bytes (default: to the end) of ``ino``'s data from ``start``."""
        end = ino.size if n is None else min(ino.size, start + n)
        if start >= end:
            return b""
        raw = self._raw_inode(ino.nid)
        if ino.layout == LAYOUT_BLOCKMAP and (ino.mode & 0o170000) == 0o120000 \
                and ino.size < 60:
            return raw[40 + start:40 + end]          # a fast symbolic link
        if ino.layout != LAYOUT_FLAT_PLAIN:
            raise ErofsError(f"inode {ino.nid}: data not mapped by extents (not supported)")
        bs = self.sb.block_size
        out = bytearray(end - start)
        for lblk, length, pblk in self._extent_list(ino):
            lo, hi = max(start, lblk * bs), min(end, (lblk + length) * bs)
            if lo >= hi or pblk < 0:
                continue                             # holes and unwritten extents: zeros
            out[lo - start:hi - start] = self.read(pblk * bs + (lo - lblk * bs), hi - lo)
        return bytes(out)

    def listdir(self, ino: Inode) -> dict[str, int]:
        """Return name -> inode number of the entries of directory ``ino`` (without .
        and ..)."""
        if not ino.is_dir:
            raise ErofsError(f"inode {ino.nid} is not a directory")
        bs = self.sb.block_size
        out: dict[str, int] = {}
        count = 0
        for blk_start in range(0, ino.size, bs):
            block = self.read_inode(ino, blk_start, bs)
            pos = 0
            while pos + 8 <= len(block):
                child, rec_len, name_len, _ftype = struct.unpack_from("<IHBB", block, pos)
                if rec_len < 8 or pos + rec_len > len(block) or 8 + name_len > rec_len:
                    raise ErofsError(f"directory inode {ino.nid}: corrupt entry")
                count += 1
                if count > MAX_DIRENTS:
                    raise ErofsError(f"directory inode {ino.nid}: too many entries")
                name = block[pos + 8:pos + 8 + name_len].decode("utf-8", "surrogateescape")
                if child and name not in (".", ".."):
                    out[name] = child
                pos += rec_len
        return out
