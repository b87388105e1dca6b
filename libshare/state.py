"""Host-side state kept in the state directory: running-domain records and the hook log.

``STATE/running/NAME.json`` exists while an enrolled domain runs (written by the hook
at ``started``, removed at ``stopped``/``release``) and tells the engine which QEMU
process maps which region. ``STATE/log/hook.log`` has one line per hook invocation.
All writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from libshare.fileutil import atomic_write


def running_dir(state_dir: Path) -> Path:
    """Return the folder of running-domain records."""
    return state_dir / "running"


def record_path(state_dir: Path, name: str) -> Path:
    """Return the record file of running domain ``name``."""
    return running_dir(state_dir) / f"{name}.json"


def write_running(state_dir: Path, record: dict[str, Any]) -> Path:
    """Store ``record`` (must hold ``name``) as a running-domain record; return its path."""
    path = record_path(state_dir, record["name"])
    atomic_write(path, json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")
    return path


def remove_running(state_dir: Path, name: str) -> bool:
    """Remove the record of domain ``name``; return True if there was one."""
    try:
        record_path(state_dir, name).unlink()
        return True
    except FileNotFoundError:
        return False


def read_running(state_dir: Path) -> list[dict[str, Any]]:
    """Return every readable running-domain record, sorted by name."""
    out = []
    folder = running_dir(state_dir)
    if not folder.is_dir():
        return []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def hook_log_path(state_dir: Path) -> Path:
    """Return the hook's log file."""
    return state_dir / "log" / "hook.log"


def append_hook_log(state_dir: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to the hook log (best effort: errors are ignored)."""
    entry = {"time": round(time.time(), 3), **entry}
    with contextlib.suppress(OSError):
        path = hook_log_path(state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")


def read_hook_log(state_dir: Path) -> list[dict[str, Any]]:
    """Return the hook log entries, oldest first (unreadable lines skipped)."""
    try:
        lines = hook_log_path(state_dir).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
