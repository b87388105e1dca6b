"""One look at a running domain's kernel, as every survey takes it: the domain's guest
RAM opened from the host, the guest optionally paused for the look (bounded: a watchdog
resumes it), and its kernel understood, from the per-boot cache when still valid, else
by scanning guest RAM (:mod:`libshare.introspect.cache`). What is walked then is the
caller's: libraries (:mod:`~libshare.introspect.survey`), page cache
(:mod:`~libshare.introspect.pagecache`). :func:`each_domain` takes one survey of each of
several domains, a domain that fails not stopping the others.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.introspect import qemu
from libshare.introspect.cache import boot_key, understand
from libshare.introspect.discover import KernelError
from libshare.introspect.kernel import Kernel
from libshare.introspect.layout import Layout
from libshare.virt import api


@dataclass
class Look:
    """An open look at domain ``name``: its ``kernel``, whether it had to be found by
    scanning guest RAM (``scanned``), whether the guest is paused for the look
    (``paused``), and once the look is over, ``expired`` (the watchdog resumed the
    guest before the look ended: not an exact snapshot) and the CPU and wall seconds
    the whole look took."""

    name: str
    kernel: Kernel
    scanned: bool
    paused: bool
    pause_timeout: float
    expired: bool = False
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    _state: Any = field(default=None, repr=False)

    def expiry_message(self) -> str:
        """Return the error a result of an expired look carries."""
        return (f"the guest was resumed after {self.pause_timeout:.0f} s paused, "
                "before the walk ended: not an exact snapshot")


@contextlib.contextmanager
def look(conn: Any, name: str, pause: bool = False, backend: str = "proc",
         layout: Layout | None = None, cache_dir: Path | None = None,
         pause_timeout: float = 60.0) -> Iterator[Look]:
    """Yield a :class:`Look` at running domain ``name`` on libvirt connection ``conn``
    (its memory read through ``backend``; ``layout`` forces the structure layout;
    ``cache_dir`` holds the per-boot caches); the guest is resumed and the memory closed
    when the block ends. Raises LibshareError if the kernel cannot be understood."""
    t0, c0 = time.perf_counter(), time.process_time()
    dom = api.running_domain(conn, name)
    name = dom.name()
    mem = qemu.open_memory(dom, backend)
    out: Look | None = None
    try:
        key = boot_key(qemu.qemu_pid(dom))
        cache_file = cache_dir / f"{dom.UUIDString()}.json" if cache_dir else None
        ctx: contextlib.AbstractContextManager[qemu.PauseState | None] = (
            qemu.paused(dom, pause_timeout) if pause else contextlib.nullcontext())
        with ctx as pause_state:
            mem.invalidate()
            try:
                info, scanned = understand(mem, layout, cache_file, key)
            except KernelError as exc:
                raise LibshareError(f"{name}: cannot understand the guest kernel: {exc}") from exc
            out = Look(name, Kernel(mem, info), scanned, pause, pause_timeout,
                       _state=pause_state)
            yield out
        out.expired = pause_state is not None and pause_state.expired
    finally:
        mem.close()
        if out is not None:
            out.wall_seconds = time.perf_counter() - t0
            out.cpu_seconds = time.process_time() - c0


def each_domain(names: list[str], survey: Callable[[str], Any],
                single_raises: bool = True) -> tuple[list[Any], list[str]]:
    """Return (the surveys ``survey(name)`` of ``names``, one "name: reason" per domain
    that failed); with ``single_raises``, the error of a single domain is raised
    instead."""
    results, failures = [], []
    for name in names:
        try:
            results.append(survey(name))
        except LibshareError as exc:
            if single_raises and len(names) == 1:
                raise
            failures.append(f"{name}: {exc}")
    return results, failures
