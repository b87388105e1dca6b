"""The hook's contract with libvirt, stated once for the shim (``hooks/qemu``) and the
handler: which ``(operation, sub-operation)`` pairs libshare handles, which operations
refuse on failure (libvirt then refuses the start, migration or restore), and the time
budget libvirt's synchronous call allows, with the one clock and alarm that enforce it.

The budget counts from the hook process's start (:func:`process_start`), so that the
interpreter's start-up, the imports, reading stdin, loading the configuration and
writing the logs all count: :func:`arm` sets ``SIGALRM`` to fire at a deadline on that
clock and makes it raise :class:`Expired`, which derives from BaseException so that no
``except Exception`` or ``suppress(OSError)`` on the way can swallow it.

Light on purpose (standard library only): the shim imports it before it knows whether
the domain is enrolled at all.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import BinaryIO

#: operations whose failure must refuse what libvirt is doing (exit 1, one line)
STRICT = frozenset({"prepare", "migrate", "restore"})
#: what libshare handles; every other call exits 0 at once
HANDLED = frozenset({
    ("prepare", "begin"), ("started", "begin"), ("reconnect", "begin"),
    ("stopped", "end"), ("release", "end"), ("migrate", "begin"), ("restore", "begin"),
})
#: libvirt waits for the hook synchronously: all of its work must end within this many
#: seconds, counted from the hook process's start
MAX_SECONDS = 5.0
#: kept back from MAX_SECONDS for the interpreter's exit after the last write
EXIT_MARGIN = 0.25
#: a domain definition is text of a few kB; more than this on stdin is not one
MAX_XML_BYTES = 16 << 20


class Expired(BaseException):
    """The hook's deadline passed (raised by the alarm :func:`arm` sets)."""


def is_strict(op: str, sub: str) -> bool:
    """Return True when a failure of ``op``/``sub`` must refuse the operation."""
    return op in STRICT and sub == "begin"


def process_start() -> float:
    """Return when this process started, on the ``time.monotonic()`` clock (from
    ``/proc/self/stat``, 10 ms resolution); the current time when that cannot be read."""
    now = time.monotonic()
    try:
        fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        fields = raw.rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return now
    return now - max(0.0, age)


def hard_deadline(started: float) -> float:
    """Return the ``time.monotonic()`` time by which the hook process must be done with
    everything, its last log line included, when it started at ``started``."""
    return started + MAX_SECONDS - EXIT_MARGIN


def _expired(_signum: int, _frame: FrameType | None) -> None:
    raise Expired


def arm(deadline: float) -> None:
    """Make SIGALRM raise :class:`Expired` at ``deadline`` (``time.monotonic()``), or at
    once when it has passed (one timer per process: this replaces any earlier one)."""
    signal.signal(signal.SIGALRM, _expired)
    left = deadline - time.monotonic()
    if left <= 0:
        raise Expired
    signal.setitimer(signal.ITIMER_REAL, left)


def disarm() -> None:
    """Cancel the alarm :func:`arm` set."""
    signal.setitimer(signal.ITIMER_REAL, 0)


def read_input(stream: BinaryIO) -> bytes:
    """Return the domain XML libvirt writes on the hook's stdin (``stream``), at most
    MAX_XML_BYTES (raise ValueError past that). Blocks until end of file: call it armed."""
    data = stream.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise ValueError(f"more than {MAX_XML_BYTES} bytes on stdin: not a domain definition")
    return data
