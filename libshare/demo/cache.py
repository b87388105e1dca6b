"""Where the small-guest kit keeps its files: the cache root and its sub-directories.

Owns the choice of location (default ``/var/cache/libshare/guests``, overridden by the
environment variable ``LIBSHARE_GUEST_CACHE``) and a cross-process lock so that
concurrent test runs do not build the same artefact twice. Everything placed here must be
readable by QEMU running as ``libvirt-qemu``, so directories are made mode 0755.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/libshare/guests")
CACHE_ENV = "LIBSHARE_GUEST_CACHE"


def cache_root(override: Path | str | None = None) -> Path:
    """Return the cache root (created, mode 0755): ``override``, else $LIBSHARE_GUEST_CACHE, else the default."""
    root = Path(override) if override else Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        root.chmod(0o755)
    return root


def cache_subdir(name: str, override: Path | str | None = None) -> Path:
    """Return ``<cache root>/<name>``, created with mode 0755."""
    path = cache_root(override) / name
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        path.chmod(0o755)
    return path


def publish_build(build: Path, target: Path, complete: str) -> None:
    """Make the finished build folder ``build`` the cache entry ``target``: write its
    ``.complete`` marker (``complete``), open it to QEMU (0755), and rename it in place
    of any old ``target``."""
    (build / ".complete").write_text(complete)
    build.chmod(0o755)
    if target.exists():
        shutil.rmtree(target)
    build.rename(target)
