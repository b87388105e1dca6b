"""Filesystem inputs for fault tests: a time bound for calls that could block for good
(a FIFO opened for reading), and a small tmpfs to run out of space on."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest


class Blocked(Exception):
    """The call under :func:`within` did not return in time (it would have hung)."""


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Raise Blocked in the ``with`` body if it runs longer than ``seconds`` (SIGALRM:
    a blocking ``open`` or ``read`` is interrupted and the exception propagates)."""
    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Blocked(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "20m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (created) for the ``with`` body, always
    unmounted after (lazily if busy); skips the test when it cannot be mounted (not
    root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                          str(path)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``directory`` with one file until at most ``leave`` bytes
    are free; return that file."""
    ballast = directory / "ballast"
    with open(ballast, "wb") as fh:
        chunk = b"\1" * (1 << 20)
        with contextlib.suppress(OSError):
            while True:
                free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
                if free <= leave:
                    break
                fh.write(chunk[:max(4096, min(len(chunk), free - leave))])
                fh.flush()
    return ballast
