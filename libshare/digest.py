"""SHA-256 of files, with a small on-disk cache keyed by device, inode, size and mtime.

Region images are large and hashed on every guest start (by the hook's prepare check);
the cache makes the second and later checks a ``stat``. A cache entry is only trusted
while the file's (st_dev, st_ino, st_size, st_mtime_ns) are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

CHUNK = 4 * 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of the whole file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def cached_sha256(path: str | os.PathLike[str], cache: Path | None) -> str:
    """Return the hex SHA-256 of ``path``, using and updating the JSON cache file ``cache``.

    A cache that cannot be read or written is ignored (the digest is then computed).
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    entries: dict[str, str] = {}
    if cache is not None:
        with contextlib.suppress(OSError, ValueError):
            entries = json.loads(cache.read_text())
        hit = entries.get(real)
        if isinstance(hit, str) and hit.startswith(_key(st) + "="):
            return hit.split("=", 1)[1]
    digest = sha256_file(real)
    if cache is not None and _key(os.stat(real)) == _key(st):
        entries[real] = f"{_key(st)}={digest}"
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".digests.")
            with os.fdopen(fd, "w") as fh:
                json.dump(entries, fh)
            os.replace(tmp, cache)
    return digest
