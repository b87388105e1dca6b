"""File updates and locks shared by every part of libshare that writes state.

``atomic_file``/``atomic_write`` replace a file so that readers see either the old or the
new bytes, never a mix, and (durable) the change survives a crash: file and directory
are fsynced; a failure or interrupt leaves the old file and no temporary behind.
``write_owned`` installs a file libshare owns (a hook, a unit) without ever replacing
one it does not; ``locked`` holds an exclusive ``flock`` on a lock file.
``open_regular``/``read_regular`` open only regular files, never blocking on a FIFO or
a device and never following a symbolic link in the last component (the hook, which
libvirt runs as root and waits for, opens nothing else).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from libshare.errors import LibshareError


class NotRegularError(OSError):
    """The path names something other than a regular file (FIFO, device, directory,
    socket) or a symbolic link where none is allowed."""


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o644,
                 follow: bool = False) -> int:
    """Return a file descriptor of the regular file ``path`` opened with ``flags``
    (plus O_NONBLOCK and O_CLOEXEC, so that a FIFO or a device never blocks the open; the
    flag is cleared again once the file is known to be regular). Unless ``follow``, a
    symbolic link as the last component is refused (O_NOFOLLOW). Raise
    NotRegularError for anything that is not a regular file, OSError when it cannot be
    opened."""
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        # ELOOP: a symlink refused by O_NOFOLLOW; ENXIO: a FIFO opened for writing
        # without a reader
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise NotRegularError(exc.errno, "not a regular file", os.fspath(path)) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularError(errno.EINVAL, "not a regular file", os.fspath(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], limit: int, follow: bool = False) -> bytes:
    """Return the bytes of the regular file ``path`` (see :func:`open_regular`); raise
    OSError (EFBIG) when it holds more than ``limit`` bytes."""
    with os.fdopen(open_regular(path, follow=follow), "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return data


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
