"""A small read-only reader of uncompressed EROFS images, at any offset inside a file.

Owns just enough of the EROFS on-disk format (Linux fs/erofs/erofs_fs.h) to check a
region image without root, loop devices or a copy: the superblock (magic 0xE0F5E1E2
at 1024 bytes into the filesystem, crc32c when the SB_CHKSUM feature is set), compact
and extended inodes, directory blocks, and the two uncompressed data layouts
(FLAT_PLAIN and FLAT_INLINE). Compressed and chunk-based files are reported, not read:
region images never contain them (DAX needs plain blocks).

Every problem raises :class:`ErofsError` with a one-line reason.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

EROFS_MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
FEATURE_COMPAT_SB_CHKSUM = 0x1
LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE = 0, 2
LAYOUT_NAMES = {0: "flat-plain", 1: "compressed-full", 2: "flat-inline",
                3: "compressed-compact", 4: "chunk-based"}
DIRENT = struct.Struct("<QHBB")

_SB = struct.Struct("<IIIBBHQQIIII16s16sI")


class ErofsError(Exception):
    """The filesystem is not a readable uncompressed EROFS image (one-line reason)."""


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Return the kernel's ``crc32c(crc, data)`` (reflected, no final inversion)."""
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@dataclass(frozen=True)
class Superblock:
    """The superblock fields libshare uses."""

    checksum: int
    feature_compat: int
    blkszbits: int
    root_nid: int
    inos: int
    build_time: int
    blocks: int
    meta_blkaddr: int
    uuid: bytes
    feature_incompat: int

    @property
    def block_size(self) -> int:
        """Return the block size in bytes."""
        return 1 << self.blkszbits


@dataclass(frozen=True)
class Inode:
    """One inode: where it is, what it is (mode, size, owner), where its data is."""

    nid: int
    mode: int
    size: int
    layout: int
    raw_blkaddr: int
    tail_offset: int        # absolute offset (within the fs) of inline tail data
    uid: int = 0
    gid: int = 0

    @property
    def is_dir(self) -> bool:
        """Return True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """Return True for a regular file."""
        return stat.S_ISREG(self.mode)


class FsImage:
    """A filesystem inside the open binary file ``fh``, from byte ``offset`` for
    ``length`` bytes (default: to the end): bounded reads, a file's data in pieces and
    path lookup, shared by the readers (this module's :class:`Erofs`,
    :class:`libshare.sharing.formats.ext4.Ext4`), which give the superblock (``sb``:
    ``root_nid``), ``inode``, ``read_inode`` and ``listdir``."""

    sb: Any

    def __init__(self, fh: BinaryIO, offset: int = 0, length: int | None = None) -> None:
        self.fh = fh
        self.offset = offset
        end = os.fstat(fh.fileno()).st_size
        self.length = end - offset if length is None else length

    def read(self, pos: int, n: int) -> bytes:
        """Return ``n`` bytes at filesystem offset ``pos``; ErofsError if past the end."""
        if pos < 0 or n < 0 or pos + n > self.length:
            raise ErofsError(f"read of {n} bytes at {pos} beyond the filesystem end "
                             f"({self.length}): image truncated or corrupt")
        self.fh.seek(self.offset + pos)
        data = self.fh.read(n)
        if len(data) != n:
            raise ErofsError(f"short read at {pos}: image truncated")
        return data

    def inode(self, nid: int) -> Inode:
        """Return inode ``nid``."""
        raise NotImplementedError

    def read_inode(self, ino: Inode, start: int = 0, n: int | None = None) -> bytes:
        """Return ``n`` bytes (default: to the end) of ``ino``'s data from ``start``."""
        raise NotImplementedError

    def listdir(self, ino: Inode) -> dict[str, int]:
        """Return name -> nid of the entries of directory ``ino``."""
        raise NotImplementedError

    def iter_chunks(self, ino: Inode, chunk: int = 1 << 20) -> Iterator[bytes]:
        """Yield ``ino``'s data in pieces of at most ``chunk`` bytes."""
        for start in range(0, ino.size, chunk):
            yield self.read_inode(ino, start, chunk)

    def lookup(self, path: str) -> Inode:
        """Return the inode at absolute ``path`` (no symlinks followed); ErofsError if absent."""
        ino = self.inode(self.sb.root_nid)
        for part in [p for p in path.split("/") if p]:
            entries = self.listdir(ino)
            if part not in entries:
                raise ErofsError(f"{path}: not found in the filesystem")
            ino = self.inode(entries[part])
        return ino


class Erofs(FsImage):
    """An EROFS filesystem starting at byte ``offset`` of the open binary file ``fh``."""

    def __init__(self, fh: BinaryIO, offset: int = 0, length: int | None = None) -> None:
        super().__init__(fh, offset, length)
        self.sb = self._superblock()

    def _superblock(self) -> Superblock:
        raw = self.read(SUPER_OFFSET, _SB.size)
        f = _SB.unpack(raw)
        if f[0] != EROFS_MAGIC:
            raise ErofsError(f"no EROFS superblock (magic {f[0]:#010x}, want {EROFS_MAGIC:#x})")
        sb = Superblock(checksum=f[1], feature_compat=f[2], blkszbits=f[3], root_nid=f[5],
                        inos=f[6], build_time=f[7], blocks=f[9], meta_blkaddr=f[10],
                        uuid=f[12], feature_incompat=f[14])
        if sb.blkszbits != 12:
            raise ErofsError(f"block size {sb.block_size} (DAX needs 4096)")
        if sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM:
            block = bytearray(self.read(SUPER_OFFSET, sb.block_size - SUPER_OFFSET))
            block[4:8] = bytes(4)
            crc = crc32c_raw(bytes(block))
            if crc != sb.checksum:
                raise ErofsError(f"superblock checksum {sb.checksum:#010x} != {crc:#010x}")
        if sb.blocks * sb.block_size > self.length:
            raise ErofsError(f"filesystem has {sb.blocks} blocks but only {self.length} "
                             "bytes are present: image truncated")
        return sb

    def inode(self, nid: int) -> Inode:
        """Return inode ``nid``; ErofsError if it is malformed."""
        pos = self.sb.meta_blkaddr * self.sb.block_size + nid * 32
        head = self.read(pos, 32)
        i_format, xattr_icount, mode = struct.unpack_from("<HHH", head)
        extended = i_format & 1
        layout = (i_format >> 1) & 7
        if extended:
            full = self.read(pos, 64)
            size = struct.unpack_from("<Q", full, 8)[0]
            uid, gid = struct.unpack_from("<II", full, 24)
            isize = 64
        else:
            size = struct.unpack_from("<I", head, 8)[0]
            uid, gid = struct.unpack_from("<HH", head, 24)
            isize = 32
        raw_blkaddr = struct.unpack_from("<I", head, 16)[0]
        xsize = 0 if xattr_icount == 0 else 12 + (xattr_icount - 1) * 4
        return Inode(nid=nid, mode=mode, size=size, layout=layout, raw_blkaddr=raw_blkaddr,
                     tail_offset=pos + isize + xsize, uid=uid, gid=gid)

    def read_inode(self, ino: Inode, start: int = 0, n: int | None = None) -> bytes:
        """Return ``n`` bytes (default: to the end) of ``ino``'s data from ``start``."""
        bs = self.sb.block_size
        end = ino.size if n is None else min(ino.size, start + n)
        if start >= end:
            return b""
        if ino.layout == LAYOUT_FLAT_PLAIN:
            return self.read(ino.raw_blkaddr * bs + start, end - start)
        if ino.layout != LAYOUT_FLAT_INLINE:
            raise ErofsError(f"inode {ino.nid}: {LAYOUT_NAMES.get(ino.layout, ino.layout)} "
                             "data layout is not supported")
        nblocks = -(-ino.size // bs)
        plain_end = (nblocks - 1) * bs
        out = b""
        if start < plain_end:
            out += self.read(ino.raw_blkaddr * bs + start, min(end, plain_end) - start)
        if end > plain_end:
            s = max(start, plain_end)
            out += self.read(ino.tail_offset + (s - plain_end), end - s)
        return out

    def listdir(self, ino: Inode) -> dict[str, int]:
        """Return name -> nid of the entries of directory ``ino`` (without . and ..)."""
        if not ino.is_dir:
            raise ErofsError(f"inode {ino.nid} is not a directory")
        bs = self.sb.block_size
        out: dict[str, int] = {}
        for blk_start in range(0, ino.size, bs):
            block = self.read_inode(ino, blk_start, bs)
            if len(block) < DIRENT.size:
                raise ErofsError(f"directory inode {ino.nid}: short block")
            first_nameoff = DIRENT.unpack_from(block, 0)[1]
            count = first_nameoff // DIRENT.size
            if count == 0 or first_nameoff % DIRENT.size or first_nameoff > len(block):
                raise ErofsError(f"directory inode {ino.nid}: corrupt dirent block")
            ents = [DIRENT.unpack_from(block, i * DIRENT.size) for i in range(count)]
            for i, (nid, nameoff, _ftype, _r) in enumerate(ents):
                stop = ents[i + 1][1] if i + 1 < count else len(block)
                if not nameoff <= stop <= len(block):
                    raise ErofsError(f"directory inode {ino.nid}: corrupt name offsets")
                name = block[nameoff:stop].split(b"\0", 1)[0].decode("utf-8",
                                                                     "surrogateescape")
                if name not in (".", ".."):
                    out[name] = nid
        return out
