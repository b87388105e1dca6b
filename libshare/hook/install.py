"""Installing libshare's qemu hook into libvirt's hooks directory, and removing it.

The hook goes in as ``HOOKS/qemu`` when that name is free (or already ours); when
another program owns ``qemu``, it goes into ``HOOKS/qemu.d/libshare`` (libvirt runs
every script there in order). Someone else's hook is never overwritten. The installed
file is ``hooks/qemu`` of this project with its ``#!`` line pointing at the Python that
has libshare installed. libvirtd is sent SIGHUP afterwards so it notices the hook.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from libshare.data import host_text
from libshare.util.files import open_regular, write_owned

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
MARKER = "libshare-hook"
DAEMONS = ("libvirtd", "virtqemud")


def hook_source() -> str:
    """Return the text of the hook shim shipped with the package (``hooks/qemu``)."""
    return host_text("qemu-hook")


def render(python: str | None = None) -> str:
    """Return the hook script with its ``#!`` line set to ``python`` (default: this one)."""
    lines = hook_source().splitlines(keepends=True)
    lines[0] = f"#!{python or sys.executable}\n"
    return "".join(lines)


def is_ours(path: Path) -> bool:
    """Return True when ``path`` is a hook written by libshare (a regular file only:
    a FIFO there is never opened for reading)."""
    try:
        with open_regular(path) as fh:
            return MARKER in fh.read(4096).decode(errors="replace")
    except OSError:
        return False


def _target(hooks_dir: Path) -> Path:
    main = hooks_dir / "qemu"
    if not main.exists() or is_ours(main):
        return main
    return hooks_dir / "qemu.d" / "libshare"


@dataclass
class InstallResult:
    """Where the hook went, and which daemons were told to reload."""

    path: Path
    action: str
    reloaded: list[int]


def daemon_pids() -> list[int]:
    """Return the pids of running libvirtd/virtqemud processes."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() in DAEMONS:
                pids.append(int(entry.name))
    return sorted(pids)


def reload_daemons() -> list[int]:
    """Send SIGHUP to libvirt's daemons so they rescan hooks; return the pids signalled."""
    done = []
    for pid in daemon_pids():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGHUP)
            done.append(pid)
    return done


def install(hooks_dir: Path = DEFAULT_HOOKS_DIR, python: str | None = None,
            reload: bool = True) -> InstallResult:
    """Install the hook under ``hooks_dir``; return where it went and what was reloaded."""
    target = _target(hooks_dir)
    # a foreign file can only be qemu.d/libshare here, written by someone else
    action = write_owned(target, render(python).encode(), 0o755, is_ours,
                         "exists and is not libshare's hook")
    reloaded = reload_daemons() if reload and action != "unchanged" else []
    return InstallResult(target, action, reloaded)


def uninstall(hooks_dir: Path = DEFAULT_HOOKS_DIR, reload: bool = True) -> InstallResult:
    """Remove libshare's hook from ``hooks_dir`` (only files it wrote); return the result."""
    for cand in (hooks_dir / "qemu", hooks_dir / "qemu.d" / "libshare"):
        if cand.exists() and is_ours(cand):
            cand.unlink()
            return InstallResult(cand, "removed", reload_daemons() if reload else [])
    return InstallResult(hooks_dir / "qemu", "absent", [])
