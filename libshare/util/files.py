"""Durable file updates shared by every part of libshare that writes state.

``atomic_write`` replaces a file so that readers see either the old or the new bytes,
never a mix, and the change survives a crash (file and directory are fsynced);
``write_owned`` installs a file libshare owns (a hook, a unit) without ever replacing
one it does not.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from libshare.errors import LibshareError


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_owned(path: Path, data: bytes, mode: int, ours: Callable[[Path], bool],
                foreign: str) -> str:
    """Install ``data`` at ``path`` (atomically, with ``mode``) unless it already holds
    exactly that; return "installed", "updated" or "unchanged". An existing file for
    which ``ours(path)`` is false is never touched: LibshareError "PATH FOREIGN; not
    touching it" (``foreign`` says what it is), as is a failed write."""
    action = "installed"
    if path.exists():
        if not ours(path):
            raise LibshareError(f"{path} {foreign}; not touching it")
        action = "unchanged" if path.read_bytes() == data else "updated"
    if action != "unchanged":
        try:
            atomic_write(path, data, mode=mode)
        except OSError as exc:
            raise LibshareError(f"cannot write {path}: {exc.strerror}") from exc
    return action
