"""A deterministic writer of "newc" (SVR4, magic 070701) cpio archives, the format the
Linux kernel unpacks as an initramfs.

Owns only the byte format: entries are written in the order given (callers sort them),
with fixed inode numbers, uid/gid 0 and a fixed mtime unless told otherwise, so that the
same input always gives the same bytes. The kernel accepts several archives concatenated
(each starting on a 4-byte boundary of the whole file: the kernel pads by absolute
offset), which is how a per-test overlay is appended to a cached base image and how
libshare extends a domain's own initrd (:func:`append_archive`). :class:`ArchiveReader`
reads archives from a stream, bounded, for inspection of initrds that are not ours.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from libshare.util.files import atomic_file

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


def with_parents(entries: Iterable[Entry], existing: Iterable[str] = ()) -> list[Entry]:
    """Return ``entries`` plus a directory entry for every missing parent directory (none
    for the names in ``existing``), sorted by name (parents first) and de-duplicated (the
    last entry for a name wins)."""
    by_name: dict[str, Entry] = {}
    for e in entries:
        by_name[e.name] = e
    have = set(existing) | set(by_name)
    for name in list(by_name):
        parts = name.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            parent = "/".join(parts[: i + 1])
            if parent not in have:
                by_name[parent] = dir_entry(parent)
                have.add(parent)
    return [by_name[k] for k in sorted(by_name)]


def append_archive(base: Path, archive: bytes, dest: Path, mode: int = 0o644) -> str:
    """Write the file ``base``, zero bytes up to a 4-byte boundary (the kernel skips
    them between archives) and ``archive`` to ``dest``, atomically
    (:func:`~libshare.util.files.atomic_file`: nothing changes on failure), with
    permission bits ``mode``; return the hex SHA-256 of what was written."""
    h = hashlib.sha256()
    with atomic_file(dest, mode, durable=False) as out, open(base, "rb") as src:
        size = 0
        while chunk := src.read(1 << 20):
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
        for tail in (_pad4(size), archive):
            out.write(tail)
            h.update(tail)
    return h.hexdigest()


class Readable(Protocol):
    """What :class:`ArchiveReader` reads from: a binary stream's ``read``."""

    def read(self, n: int = -1, /) -> bytes: ...


class ArchiveError(ValueError):
    """A stream is not a well-formed newc archive (or exceeds the reader's bounds)."""


class ArchiveReader:
    """Reads the members of one or more concatenated newc archives from a binary stream,
    bounded: at most ``max_entries`` members, ``max_name`` bytes per name and
    ``max_data`` bytes per file (ArchiveError beyond, and on a malformed member).

    :meth:`entries` stops at the end of the stream or at the first bytes after a
    trailer (and the zero padding the kernel skips) that do not start a new archive;
    :attr:`end` is then their offset from where reading began (None at the end of the
    stream): a compressed archive that follows starts there. :attr:`archives` counts
    the archives read to their trailer.
    """

    def __init__(self, fh: Readable, *, max_entries: int = 1 << 20, max_name: int = 4096,
                 max_data: int = 1 << 30) -> None:
        self.fh, self.max_entries, self.max_name, self.max_data = \
            fh, max_entries, max_name, max_data
        self.pos = 0
        self.end: int | None = None
        self.archives = 0
        self._buf = b""

    def _peek(self, n: int) -> bytes:
        while len(self._buf) < n:
            more = self.fh.read(max(n - len(self._buf), 1 << 16))
            if not more:
                break
            self._buf += more
        return self._buf[:n]

    def _read(self, n: int) -> bytes:
        out = self._peek(n)
        self._buf = self._buf[len(out):]
        self.pos += len(out)
        if len(out) < n:
            raise ArchiveError(f"truncated cpio archive at offset {self.pos}")
        return out

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, 1 << 20)
            self._read(step)
            n -= step

    def _skip_zeros(self) -> bool:
        """Skip zero bytes; return False at the end of the stream."""
        while True:
            chunk = self._peek(1 << 12)
            if not chunk:
                return False
            zeros = len(chunk) - len(chunk.lstrip(b"\0"))
            if zeros == 0:
                return True
            self._read(zeros)

    def entries(self, data: bool = True) -> Iterator[Entry]:
        """Yield each member (trailers dropped); with ``data`` False the contents of
        regular files are skipped (``Entry.data`` empty; symlink targets are kept)."""
        count, between = 0, True
        while True:
            if between:
                if not self._skip_zeros():
                    return
                if self._peek(6) != NEWC_MAGIC:
                    self.end = self.pos
                    return
            start = self.pos
            head = self._read(110)
            if head[:6] != NEWC_MAGIC:
                raise ArchiveError(f"bad cpio magic at offset {start}")
            try:
                f = [int(head[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
            except ValueError:
                raise ArchiveError(f"bad cpio header at offset {start}") from None
            namesize, filesize = f[11], f[6]
            if not 1 <= namesize <= self.max_name or filesize > self.max_data:
                raise ArchiveError(f"cpio member at offset {start} exceeds the reader's "
                                   "bounds")
            name = self._read(namesize)[:-1].decode("utf-8", "surrogateescape")
            self._skip(-self.pos % 4)
            body = b""
            if data or stat.S_ISLNK(f[1]):
                body = self._read(filesize)
            else:
                self._skip(filesize)
            self._skip(-self.pos % 4)
            between = name == TRAILER
            if between:
                self.archives += 1
                continue
            count += 1
            if count > self.max_entries:
                raise ArchiveError(f"more than {self.max_entries} cpio members")
            yield Entry(name, f[1], body, f[9], f[10], f[2], f[3], f[5])


def read_archive(blob: bytes) -> list[Entry]:
    """Return the members of one or more concatenated newc archives in ``blob`` (trailers
    dropped). Used by tests and for inspection; raises ValueError on a malformed archive."""
    import io

    reader = ArchiveReader(io.BytesIO(blob))
    entries = list(reader.entries())
    if reader.end is not None:
        raise ArchiveError(f"bad cpio magic at offset {reader.end}")
    return entries
