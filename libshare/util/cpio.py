"""A deterministic writer of "newc" (SVR4, magic 070701) cpio archives, the format the
Linux kernel unpacks as an initramfs.

Owns only the byte format: entries are written in the order given (callers sort them),
with fixed inode numbers, uid/gid 0 and a fixed mtime unless told otherwise, so that the
same input always gives the same bytes. The kernel accepts several archives concatenated,
which is how a per-test overlay is appended to a cached base image.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
FIXED_MTIME = 0


@dataclass(frozen=True)
class Entry:
    """One archive member: ``name`` without a leading slash, full ``mode`` (type bits
    included), ``data`` (file contents or symlink target), and ``rdev`` for device nodes."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME


def file_entry(name: str, data: bytes, mode: int = 0o644) -> Entry:
    """Return an Entry for a regular file ``name`` holding ``data`` with permission bits ``mode``."""
    return Entry(name.lstrip("/"), stat.S_IFREG | (mode & 0o7777), data)


def dir_entry(name: str, mode: int = 0o755) -> Entry:
    """Return an Entry for a directory ``name``."""
    return Entry(name.lstrip("/"), stat.S_IFDIR | (mode & 0o7777))


def symlink_entry(name: str, target: str) -> Entry:
    """Return an Entry for a symbolic link ``name`` pointing at ``target``."""
    return Entry(name.lstrip("/"), stat.S_IFLNK | 0o777, target.encode())


def chardev_entry(name: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    """Return an Entry for a character device node ``name`` (``major``:``minor``)."""
    return Entry(name.lstrip("/"), stat.S_IFCHR | (mode & 0o7777), b"", major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, namesize: int, filesize: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, filesize,
        0, 0, entry.rdev_major, entry.rdev_minor, namesize, 0,
    )
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def encode_entry(ino: int, entry: Entry) -> bytes:
    """Return the bytes of one newc member (header, name, padding, data, padding)."""
    name = entry.name.encode() + b"\0"
    head = _header(ino, entry, len(name), len(entry.data))
    out = head + name + _pad4(len(head) + len(name))
    if entry.data:
        out += entry.data + _pad4(len(entry.data))
    return out


def write_archive(entries: Iterable[Entry], first_ino: int = 1) -> bytes:
    """Return a complete newc archive of ``entries`` (in the given order) plus the trailer.

    Inode numbers count up from ``first_ino``; give overlays a distinct range so that
    no two members of concatenated archives share one.
    """
    parts = [encode_entry(first_ino + i, e) for i, e in enumerate(entries)]
    parts.append(encode_entry(0, Entry(TRAILER, 0)))
    blob = b"".join(parts)
    return blob + _pad4(len(blob))


def read_archive(blob: bytes) -> list[Entry]:
    """Return the members of one or more concatenated newc archives in ``blob`` (trailers
    dropped). Used by tests and for inspection; raises ValueError on a malformed archive."""
    entries: list[Entry] = []
    pos = 0
    while pos < len(blob):
        if blob[pos:pos + 4] == b"\0\0\0\0":  # padding between concatenated archives
            pos += 4
            continue
        if blob[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        f = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = pos + 110
        name = blob[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += -data_start % 4
        data = blob[data_start:data_start + filesize]
        pos = data_start + filesize
        pos += -pos % 4
        if name != TRAILER:
            entries.append(Entry(name, f[1], data, f[9], f[10], f[2], f[3], f[5]))
    return entries
