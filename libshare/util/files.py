"""File reads, updates and locks shared by every part of libshare that touches files.

``open_regular``/``read_regular`` are the one way to read a file named by a user, a
configuration or a domain definition: only a regular file is opened (a FIFO or a device
is refused without blocking: ``stat`` first, then ``O_NONBLOCK`` and ``fstat`` of what was
opened), and ``read_regular``/``read_bounded`` never read more than a limit.
``open_append`` is the one way to append to a log: only to a regular file, never through
a symbolic link in its last component, never blocking on a FIFO.
``os_error`` words an OSError as one line (ENOSPC included).
``atomic_file``/``atomic_write`` replace a file so that readers see either the old or the
new bytes, never a mix, and (durable) the change survives a crash: file and directory
are fsynced; a failure or interrupt leaves the old file and no temporary behind.
``write_owned`` installs a file libshare owns (a hook, a unit) without ever replacing
one it does not; ``locked`` holds an exclusive (or shared) ``flock`` on a lock file.
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

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFLNK: "a symbolic link"}


class NotRegularFile(OSError):
    """A path names something other than a regular file (``strerror`` says what)."""


def _kind(mode: int) -> str:
    """Return what a non-regular file of ``st_mode`` ``mode`` is ("a FIFO")."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _refuse(path: str | os.PathLike[str], mode: int) -> NotRegularFile:
    """Return the error for ``path`` of ``st_mode`` ``mode`` not being a regular file."""
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    return NotRegularFile(code, f"is {_kind(mode)}, not a regular file", os.fspath(path))


def open_regular(path: str | os.PathLike[str], follow: bool = True) -> BinaryIO:
    """Return ``path`` opened for binary reading, only if it is a regular file.

    Never blocks and never opens a device: ``path`` is stat'ed first; then opened with
    ``O_NONBLOCK | O_NOCTTY`` (``O_NOFOLLOW`` too unless ``follow``) and what was opened is
    fstat'ed again (it may have been replaced in between). Raises NotRegularFile (an
    OSError) for a directory, FIFO, socket or device, other OSErrors as ``os.open``."""
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags if follow else flags | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, st.st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_append(path: str | os.PathLike[str], mode: int = 0o640) -> int:
    """Return a file descriptor of ``path`` opened for appending (created with ``mode``
    if missing), only if it is a regular file and not a symbolic link: opened with
    ``O_NONBLOCK | O_NOFOLLOW`` (a FIFO without a reader is ENXIO, one with a reader is
    refused after ``fstat``), then made blocking again. Raises NotRegularFile (an
    OSError) for anything else, other OSErrors as ``os.open``."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW
             | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO without reader
            mode_of = stat.S_IFLNK if exc.errno == errno.ELOOP else stat.S_IFIFO
            raise _refuse(path, mode_of) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, st.st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(fh: BinaryIO, limit: int, what: str) -> bytes:
    """Return the rest of the open binary stream ``fh`` (at most ``limit`` bytes); raise
    LibshareError "WHAT is larger than LIMIT bytes" when there is more."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise LibshareError(f"{what} is larger than {limit} bytes")
    return data


def read_regular(path: str | os.PathLike[str], limit: int, what: str | None = None) -> bytes:
    """Return the bytes of the regular file ``path`` (see :func:`open_regular`), at most
    ``limit`` of them. Raises OSError when it cannot be opened or is not a regular file,
    LibshareError when it is larger than ``limit`` (``what`` names it; default the path)."""
    with open_regular(path) as fh:
        return read_bounded(fh, limit, what or os.fspath(path))


def os_error(exc: OSError, path: bool = True) -> str:
    """Return ``exc`` as one line: its reason and (``path``) the file it concerns, if
    known ("No space left on device: /var/lib/libshare/store/tmp/x")."""
    reason = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    return f"{reason}: {exc.filename}" if path and exc.filename else reason


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
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (``shared``: a shared) ``flock`` on the lock file ``path``
    (created, with its folder, if missing) for the ``with`` body; yields nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(path, os.fstat(fd).st_mode)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
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
    try:
        existing: int | None = os.lstat(path).st_mode
    except FileNotFoundError:
        existing = None
    except OSError as exc:  # a parent is not a folder, no permission...
        raise LibshareError(f"cannot write {path}: {os_error(exc, path=False)}") from exc
    if existing is not None and not stat.S_ISREG(existing):
        raise LibshareError(f"{path} is {_kind(existing)}; not touching it")
    if existing is not None:
        if not ours(path):
            raise LibshareError(f"{path} {foreign}; not touching it")
        try:
            with open_regular(path) as fh:
                same = fh.read(len(data) + 1) == data
        except OSError as exc:
            raise LibshareError(f"cannot read {path}: {os_error(exc, path=False)}") from exc
        action = "unchanged" if same else "updated"
    if action != "unchanged":
        try:
            atomic_write(path, data, mode=mode)
        except OSError as exc:
            raise LibshareError(f"cannot write {path}: {exc.strerror}") from exc
    return action
