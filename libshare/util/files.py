"""File updates and locks shared by every part of libshare that writes state.

``atomic_file``/``atomic_write`` replace a file so that readers see either the old or the
new bytes, never a mix, and (durable) the change survives a crash: file and directory
are fsynced; a failure or interrupt leaves the old file and no temporary behind.
``write_owned`` installs a file libshare owns (a hook, a unit) without ever replacing
one it does not; ``locked`` holds an exclusive ``flock`` on a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from libshare.errors import LibshareError


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644, tmp_dir: Path | None = None,
                durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the ``with`` body ends normally;
    if the body raises, the temporary file (in ``tmp_dir``, default ``path``'s folder,
    which must be on the same filesystem) is removed and ``path`` is left as it was.
    ``durable``: fsync the file before the rename and the folder after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, mode, durable=durable) as fh:
        fh.write(data)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created, with its folder,
    if missing) for the ``with`` body; yields nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
