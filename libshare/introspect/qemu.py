"""Finding a running libvirt domain's guest RAM inside its QEMU process.

Owns the QEMU side of introspection (libvirt itself is reached through
:mod:`libshare.virt.api`): a running domain's QEMU pid
(``/run/libvirt/qemu/<name>.pid``, checked against the process's command line), the
guest RAM blocks and their host virtual addresses (HMP ``info mtree -f`` plus
``gpa2hva`` through ``virDomainQemuMonitorCommand``; without HMP, the process's
``/proc/PID/maps`` mapping of exactly the RAM size plus QEMU's pc/q35 split below and
above 4 GiB), opening a :class:`~libshare.introspect.memory.ProcMemory` or (for
file/memfd-backed RAM, found by :func:`ram_file`) a
:class:`~libshare.introspect.memory.FileMemory`, and
:func:`paused`, a bounded suspend/resume around a walk (resumed on exit, on its
watchdog and on SIGINT/SIGTERM/SIGHUP; :class:`PauseState` tells whether the watchdog
fired).

Only the RAM regions of the machine's main memory (``pc.ram``, NUMA ``ram-node*``) are
taken: device RAM (VGA, NVDIMM or ivshmem regions, ROMs) is not guest RAM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from libshare.errors import LibshareError
from libshare.introspect.memory import (
    FileMemory,
    PhysicalMemory,
    ProcMemory,
    RamBlock,
    pc_ram_layout,
)
from libshare.virt import api, process

log = logging.getLogger(__name__)
PID_DIR = process.QEMU_RUN_DIR
_MTREE_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (ram|rom|i/o|romd)\): (\S+)"
    r"(?: @([0-9a-f]+))?")
_GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-f]+) \((.*)\) is (0x[0-9a-f]+)")
_RAM_NAME = re.compile(r"^(pc\.ram|(/objects/)?ram-node\d+|(/objects/)?pc\.ram)$")


def libvirt_module() -> Any:
    """Return the imported ``libvirt`` module; raise LibshareError if it is missing."""
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - a dependency
        raise LibshareError("the libvirt Python binding is not installed") from exc
    return libvirt


def qemu_pid(dom: Any, pid_dir: Path = PID_DIR) -> int:
    """Return the pid of the QEMU process running ``dom``."""
    pid = process.qemu_pid(dom.name(), pid_dir)
    if pid is None:
        raise LibshareError(f"cannot find the QEMU process of {dom.name()} "
                            f"(no live QEMU named in {pid_dir}/{dom.name()}.pid)")
    return pid


def parse_mtree(text: str) -> list[tuple[int, int, str, int]]:
    """Return ``(start, end_exclusive, region, region_offset)`` of every RAM-backed range
    (``ram``, or ``rom`` such as the BIOS-shadowed parts of ``pc.ram``) in the flat view
    of ``info mtree -f`` output that serves address space "memory"."""
    out: list[tuple[int, int, str, int]] = []
    in_view = False
    for line in text.splitlines():
        if line.startswith("FlatView"):
            if out:
                break
            in_view = False
            continue
        if line.strip().startswith('AS "memory"'):
            in_view = True
            continue
        if not in_view:
            continue
        m = _MTREE_LINE.match(line)
        if m and m.group(3) in ("ram", "rom"):
            start, last = int(m.group(1), 16), int(m.group(2), 16)
            offset = int(m.group(5), 16) if m.group(5) else 0
            out.append((start, last + 1, m.group(4), offset))
    return out


def ram_blocks_hmp(dom: Any) -> list[RamBlock]:
    """Return the guest RAM blocks of ``dom`` with host virtual addresses, from HMP."""
    ranges = [r for r in parse_mtree(api.monitor_command(dom, "info mtree -f")) if _RAM_NAME.match(r[2])]
    if not ranges:
        raise LibshareError(f"{dom.name()}: no guest RAM in 'info mtree -f'")
    bases: dict[str, int] = {}
    blocks: list[RamBlock] = []
    for start, end, region, offset in ranges:
        if region not in bases:
            m = _GPA2HVA.search(api.monitor_command(dom, f"gpa2hva {start:#x}"))
            if not m:
                raise LibshareError(f"{dom.name()}: gpa2hva {start:#x} gave no address")
            bases[region] = int(m.group(3), 16) - offset
        hva = bases[region] + offset
        last = blocks[-1] if blocks else None
        if last and last.end == start and last.backing_offset + last.size == hva:
            blocks[-1] = RamBlock(last.start, last.size + end - start, last.backing_offset)
        else:
            blocks.append(RamBlock(start, end - start, hva))
    return blocks


def domain_ram(dom: Any) -> tuple[int, str]:
    """Return ``(ram_bytes, machine_type)`` of ``dom`` from its live XML."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    mem = root.find("memory")
    unit = (mem.get("unit") or "KiB") if mem is not None else "KiB"
    scale = {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": 1 << 20, "M": 1 << 20,
             "GiB": 1 << 30, "G": 1 << 30}.get(unit, 1024)
    size = int(mem.text or 0) * scale if mem is not None else dom.info()[1] * 1024
    ostype = root.find("os/type")
    machine = ostype.get("machine", "pc") if ostype is not None else "pc"
    return size, machine


def host_mappings(pid: int) -> list[tuple[int, int, str, str]]:
    """Return ``(start, end, perms, path)`` of every mapping in ``/proc/PID/maps``."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[1], parts[5] if len(parts) > 5 else ""))
    return out


def ram_blocks_maps(pid: int, ram_size: int, machine: str) -> tuple[list[RamBlock], str]:
    """Return guest RAM blocks (host virtual addresses) found from ``/proc/PID/maps``:
    the rw mapping of exactly ``ram_size`` bytes, split pc/q35-style; and its path
    ("" for anonymous memory)."""
    hits = [m for m in host_mappings(pid) if m[1] - m[0] == ram_size and m[2].startswith("rw")]
    if not hits:
        raise LibshareError(f"QEMU {pid}: no mapping of {ram_size} bytes (guest RAM)")
    lo, _hi, _, path = hits[0]
    return pc_ram_layout(ram_size, machine, lo), path


def ram_file(dom: Any) -> tuple[str, list[RamBlock]]:
    """Return ``(path, blocks)`` for guest RAM held in a shared file or memfd: a path
    that opens that very file (``/proc/<qemu pid>/map_files/<lo>-<hi>`` of QEMU's
    mapping of it) and the RamBlocks with file offsets; raise LibshareError if the RAM
    is anonymous memory."""
    pid = qemu_pid(dom)
    size, machine = domain_ram(dom)
    blocks, _path = ram_blocks_maps(pid, size, machine)
    lo = blocks[0].backing_offset
    hit = next(m for m in host_mappings(pid) if m[0] == lo)
    if not hit[3] or hit[3].startswith("["):
        raise LibshareError(f"{dom.name()}: guest RAM is anonymous memory; the file "
                            "backend needs <memoryBacking><source type='file'|'memfd'/>")
    fblocks = [RamBlock(b.start, b.size, b.backing_offset - lo) for b in blocks]
    return f"/proc/{pid}/map_files/{hit[0]:x}-{hit[1]:x}", fblocks


def open_memory(dom: Any, backend: str = "proc") -> PhysicalMemory:
    """Return a reader of ``dom``'s guest RAM. ``backend`` "proc" reads
    ``/proc/<qemu pid>/mem`` (layout from HMP, else from /proc/PID/maps); "file" maps
    the file or memfd backing the RAM (the domain must use file/memfd memory backing)."""
    if backend == "file":
        return FileMemory(*ram_file(dom))
    if backend != "proc":
        raise LibshareError(f"unknown memory backend {backend!r} (proc, file)")
    pid = qemu_pid(dom)
    try:
        blocks = ram_blocks_hmp(dom)
    except LibshareError as exc:
        log.debug("HMP layout unavailable (%s); using /proc/%d/maps", exc, pid)
        size, machine = domain_ram(dom)
        blocks, _ = ram_blocks_maps(pid, size, machine)
    return ProcMemory(pid, blocks)


@dataclass
class PauseState:
    """What happened to a pause: ``expired`` once the watchdog resumed the guest before
    the ``with`` body ended (the body then ran over a running guest)."""

    timeout: float
    expired: bool = False


#: signals that end the command; paused() resumes the guest before they take effect
PAUSE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def paused(dom: Any, timeout: float = 60.0) -> Iterator[PauseState]:
    """Suspend ``dom`` for the ``with`` body and always resume it afterwards; yield a
    :class:`PauseState`. A watchdog resumes it after ``timeout`` seconds even if the
    body is stuck (``expired`` then tells the body its snapshot is no longer exact).
    In the main thread, SIGINT/SIGTERM/SIGHUP resume the guest first and then take
    their previous effect (the previous handlers are restored on exit). A domain that
    was already paused is left paused."""
    libvirt = libvirt_module()
    state = PauseState(timeout)
    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        yield state
        return
    # re-entrant: a signal handled in the thread that is inside resume() calls it again
    lock = threading.RLock()
    suspending = False  # set before suspend() is called: a signal may land at any point
    resumed = False

    def resume() -> bool:
        """Resume the guest unless done already; return True if this call did."""
        nonlocal resumed
        with lock:
            if resumed or not suspending:
                return False
            resumed = True
            try:
                dom.resume()
            except libvirt.libvirtError as exc:
                log.error("could not resume %s: %s", dom.name(), exc.get_error_message())
            return True

    def watchdog() -> None:
        if resume():  # expired is set only once the guest runs again
            state.expired = True
            log.warning("%s: paused for %.0f s; resumed it (the walk goes on over a "
                        "running guest)", dom.name(), timeout)

    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        resume()
        prev = previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)  # die of the signal, as without us
        os.kill(os.getpid(), signum)

    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in PAUSE_SIGNALS:  # before suspend(): no moment without them
                prev = signal.getsignal(sig)
                if prev in (signal.SIG_IGN, None):
                    continue  # ignored (or set outside Python): leave it so
                previous[sig] = prev
                signal.signal(sig, on_signal)
        suspending = True
        try:
            dom.suspend()
        except libvirt.libvirtError as exc:
            with lock:
                suspending = False
            raise LibshareError(f"cannot pause {dom.name()}: "
                                f"{exc.get_error_message()}") from exc
        timer.start()
        yield state
    finally:
        timer.cancel()
        resume()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
