"""A running domain's QEMU process, as libvirt's system driver records it.

libvirt writes ``/run/libvirt/qemu/<name>.pid`` for each running domain; the pid is only
trusted when ``/proc/<pid>/cmdline`` is a QEMU started for that domain (``guest=<name>``).
Light on purpose (no libvirt, no lxml): the hook uses it.
"""

from __future__ import annotations

from pathlib import Path

from libshare.errors import LibshareError
from libshare.util.files import read_regular

QEMU_RUN_DIR = Path("/run/libvirt/qemu")


def qemu_pid(name: str, run_dir: Path = QEMU_RUN_DIR) -> int | None:
    """Return the pid of domain ``name``'s QEMU process from libvirt's pid file, or None
    when it is missing or does not name a live QEMU of that domain. Only regular files
    are read, without blocking (the hook calls this)."""
    try:
        pid = int(read_regular(run_dir / f"{name}.pid", 64).strip())
        cmdline = read_regular(f"/proc/{pid}/cmdline", 1 << 20).split(b"\0")
    except (OSError, ValueError, LibshareError):
        return None
    if not cmdline or b"qemu" not in cmdline[0]:
        return None
    if not any(part.startswith(f"guest={name}".encode()) for part in cmdline):
        return None
    return pid
