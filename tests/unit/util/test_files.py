"""Reading only regular files (never blocking on a FIFO or a device), bounded reads,
one-line OS errors, and the shared lock."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from libshare.errors import LibshareError
from libshare.util import files
from tests.support.fs import within


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_open_regular_refuses_fifos_devices_and_folders_without_blocking(
        tmp_path: Path, fifo: Path) -> None:
    with within(5):
        for path, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device"),
                           (tmp_path, "a directory")):
            with pytest.raises(files.NotRegularFile) as err:
                files.open_regular(path)
            assert err.value.strerror == f"is {kind}, not a regular file"
            assert files.os_error(err.value) == f"is {kind}, not a regular file: {path}"
    assert err.value.errno == errno.EISDIR


def test_open_regular_reads_a_file_and_may_refuse_symlinks(tmp_path: Path,
                                                           fifo: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target)
    with files.open_regular(link) as fh:
        assert fh.read() == b"data"
    with pytest.raises(files.NotRegularFile):
        files.open_regular(link, follow=False)
    to_fifo = tmp_path / "to-fifo"
    to_fifo.symlink_to(fifo)
    with within(5), pytest.raises(files.NotRegularFile):
        files.open_regular(to_fifo)


def test_read_regular_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    assert files.read_regular(path, 101) == b"x" * 101
    with pytest.raises(LibshareError, match="big is larger than 100 bytes"):
        files.read_regular(path, 100)
    with pytest.raises(FileNotFoundError):
        files.read_regular(tmp_path / "missing", 100)


def test_write_owned_never_reads_or_replaces_a_fifo(fifo: Path) -> None:
    with within(5), pytest.raises(LibshareError, match="is a FIFO; not touching it"):
        files.write_owned(fifo, b"unit", 0o644, lambda _p: True, "is not libshare's")
    assert fifo.is_fifo()


def test_os_error_is_one_line() -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", "/s/store/tmp/x")
    assert files.os_error(exc) == "No space left on device: /s/store/tmp/x"
    assert files.os_error(exc, path=False) == "No space left on device"


def test_shared_locks_share_and_exclude_the_exclusive_one(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    order: list[str] = []

    def exclusive() -> None:
        with files.locked(lock):
            order.append("exclusive")

    with files.locked(lock, shared=True), files.locked(lock, shared=True):
        t = threading.Thread(target=exclusive)
        t.start()
        time.sleep(0.3)
        order.append("shared done")
    t.join(5)
    assert order == ["shared done", "exclusive"]
