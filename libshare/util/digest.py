"""SHA-256 of files, with a small on-disk cache keyed by device, inode, size, mtime, ctime.

Region images are large and hashed on every guest start (by the hook's prepare check);
the cache makes the second and later checks a ``stat``. A cache entry is only trusted
while the file's (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) are unchanged: a
write in place that restores the mtime with ``utime`` still moves the ctime, which user
space cannot set. :func:`forget` prunes entries of removed files (``region gc``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

from libshare.errors import LibshareError
from libshare.util.files import atomic_write, open_regular, read_regular

CHUNK = 4 * 1024 * 1024
#: bytes of a digest cache file read at most (a larger one is ignored, then rewritten)
MAX_CACHE = 64 * 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of the whole regular file at ``path`` (a FIFO or device
    raises :class:`~libshare.util.files.NotRegularFile`, an OSError, without blocking)."""
    with open_regular(path) as fh:
        return sha256_stream(fh)


def sha256_stream(fh: BinaryIO) -> str:
    """Return the hex SHA-256 of the rest of the open binary stream ``fh``."""
    h = hashlib.sha256()
    while chunk := fh.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def copy_sha256(src: BinaryIO, dst: BinaryIO, limit: int | None = None) -> str:
    """Copy the rest of ``src`` to ``dst`` (at most ``limit`` bytes when given); return
    the hex SHA-256 of the bytes copied (one read for both)."""
    h = hashlib.sha256()
    left = limit
    while chunk := src.read(CHUNK if left is None else min(CHUNK, left)):
        h.update(chunk)
        dst.write(chunk)
        if left is not None:
            left -= len(chunk)
    return h.hexdigest()


def stat_key(st: os.stat_result, ctime: bool = True) -> str:
    """Return the cache key of a file's stat: what must not change for a hit (device,
    inode, size, mtime and, unless ``ctime`` is False, ctime)."""
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return f"{key}:{st.st_ctime_ns}" if ctime else key


def load_entries(cache: Path) -> dict[str, str]:
    """Return the entries of the JSON cache file ``cache`` (empty if it is missing or
    unreadable)."""
    with contextlib.suppress(OSError, ValueError, LibshareError):
        doc = json.loads(read_regular(cache, MAX_CACHE))
        if isinstance(doc, dict):
            return doc
    return {}


def save_entries(cache: Path, entries: dict[str, str]) -> None:
    """Replace the JSON cache file ``cache`` with ``entries`` atomically; errors are
    ignored (a lost cache only costs a recomputation)."""
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps(entries).encode(), durable=False)


def cached_sha256(path: str | os.PathLike[str], cache: Path | None) -> str:
    """Return the hex SHA-256 of ``path``, using and updating the JSON cache file ``cache``.

    A cache that cannot be read or written is ignored (the digest is then computed).
    """
    real = os.path.realpath(path)
    with open_regular(real) as fh:
        return cached_sha256_open(fh, real, cache)


def cached_sha256_open(fh: BinaryIO, real: str, cache: Path | None) -> str:
    """Return the hex SHA-256 of the open regular file ``fh`` whose real path is
    ``real`` (the cache's key), using and updating the JSON cache file ``cache``; the
    whole file is read from its start on a miss (the hook checks the very file it
    opened)."""
    st = os.fstat(fh.fileno())
    entries: dict[str, str] = {}
    if cache is not None:
        entries = load_entries(cache)
        hit = entries.get(real)
        if isinstance(hit, str) and hit.startswith(stat_key(st) + "="):
            return hit.split("=", 1)[1]
    fh.seek(0)
    digest = sha256_stream(fh)
    if cache is not None and stat_key(os.fstat(fh.fileno())) == stat_key(st):
        remember(cache, real, st, digest, entries)
    return digest


def remember(cache: Path, real: str, st: os.stat_result, digest: str,
             entries: dict[str, str] | None = None) -> None:
    """Record in the cache file ``cache`` that the file whose real path is ``real`` has
    the hex SHA-256 ``digest`` while its stat is ``st`` (for a file whose bytes the
    caller hashed itself: a build that wrote and hashed an image); ``entries``: the
    cache's entries when the caller has loaded them. Returns nothing; errors are
    ignored as in :func:`save_entries`."""
    entries = load_entries(cache) if entries is None else entries
    entries[real] = f"{stat_key(st)}={digest}"
    save_entries(cache, entries)


def forget(cache: Path, paths: list[str] | None = None) -> list[str]:
    """Remove from the cache file ``cache`` the entries of ``paths`` (real paths) and of
    every file that no longer exists; return the paths removed (sorted).

    The cache is rewritten only when something was removed.
    """
    entries = load_entries(cache)
    drop = {os.path.realpath(p) for p in paths or []}
    gone = sorted(p for p in entries if p in drop or not os.path.lexists(p))
    if gone:
        for p in gone:
            del entries[p]
        save_entries(cache, entries)
    return gone
