"""Host-side state kept in the state directory: running-domain records, automatic
redirect requests and outcomes, and the hook and daemon logs.

``STATE/running/NAME.json`` exists while an enrolled domain runs (written by the hook
at ``started``, removed at ``stopped``/``release``) and tells the engine which QEMU
process maps which region. ``STATE/requests/NAME.json`` is an automatic redirect
request the hook leaves at ``started`` for a domain enrolled with ``redirect=runtime``
(removed at ``stopped``/``release``, or by ``libshare daemon`` once served);
``STATE/redirects/NAME.json`` is the daemon's last outcome for that domain.
``STATE/log/hook.log`` has one line per hook invocation, ``STATE/log/daemon.log`` one
per daemon event. All writes but the log appends are atomic (temporary file + rename).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libshare.util.files import atomic_write


def running_dir(state_dir: Path) -> Path:
    """Return the folder of running-domain records."""
    return state_dir / "running"


def record_path(state_dir: Path, name: str) -> Path:
    """Return the record file of running domain ``name``."""
    return running_dir(state_dir) / f"{name}.json"


def _write_object(path: Path, obj: dict[str, Any]) -> Path:
    """Store ``obj`` as indented JSON in ``path`` atomically; return ``path``."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
                 + b"\n")
    return path


def _remove(path: Path) -> bool:
    """Remove ``path``; return True if it existed."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def write_running(state_dir: Path, record: dict[str, Any]) -> Path:
    """Store ``record`` (must hold ``name``) as a running-domain record; return its path."""
    return _write_object(record_path(state_dir, record["name"]), record)


def remove_running(state_dir: Path, name: str) -> bool:
    """Remove the record of domain ``name``; return True if there was one."""
    return _remove(record_path(state_dir, name))


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


def requests_dir(state_dir: Path) -> Path:
    """Return the folder of pending automatic redirect requests."""
    return state_dir / "requests"


def request_path(state_dir: Path, name: str) -> Path:
    """Return the automatic redirect request file of domain ``name``."""
    return requests_dir(state_dir) / f"{name}.json"


def write_request(state_dir: Path, request: dict[str, Any]) -> Path:
    """Store ``request`` (must hold ``domain``) as a pending automatic redirect request,
    replacing any earlier one; return its path."""
    return _write_object(request_path(state_dir, request["domain"]), request)


def _read_object(path: Path) -> dict[str, Any] | None:
    """Return the JSON object stored in ``path``, or None (absent, unreadable, not an
    object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_request(state_dir: Path, name: str) -> dict[str, Any] | None:
    """Return the pending request of domain ``name``, or None (absent or unreadable)."""
    return _read_object(request_path(state_dir, name))


def read_requests(state_dir: Path, on_unreadable: Callable[[Path], None] | None = None
                  ) -> list[dict[str, Any]]:
    """Return every readable pending request (each with ``domain``), sorted by file
    name; unreadable files are skipped, after ``on_unreadable(path)`` when given."""
    folder = requests_dir(state_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        req = _read_object(path)
        if req is not None and isinstance(req.get("domain"), str):
            out.append(req)
        elif on_unreadable is not None:
            on_unreadable(path)
    return out


def remove_request(state_dir: Path, name: str, requested_at: float | None = None) -> bool:
    """Remove the pending request of domain ``name``; with ``requested_at``, only if it is
    still that request (not a newer one the hook wrote meanwhile). Return True if a file
    was removed."""
    if requested_at is not None:
        current = read_request(state_dir, name)
        if current is None or current.get("requested_at") != requested_at:
            return False
    return _remove(request_path(state_dir, name))


def outcome_path(state_dir: Path, name: str) -> Path:
    """Return the file holding the daemon's last automatic redirect outcome for ``name``."""
    return state_dir / "redirects" / f"{name}.json"


def write_outcome(state_dir: Path, outcome: dict[str, Any]) -> Path:
    """Store ``outcome`` (must hold ``domain``) as the domain's last automatic redirect
    outcome; return its path."""
    return _write_object(outcome_path(state_dir, outcome["domain"]), outcome)


def read_outcome(state_dir: Path, name: str) -> dict[str, Any] | None:
    """Return the daemon's last outcome for domain ``name``, or None."""
    return _read_object(outcome_path(state_dir, name))


def daemon_log_path(state_dir: Path) -> Path:
    """Return the daemon's log file (JSON lines)."""
    return state_dir / "log" / "daemon.log"


def hook_log_path(state_dir: Path) -> Path:
    """Return the hook's log file."""
    return state_dir / "log" / "hook.log"


def append_hook_log(state_dir: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to the hook log (best effort: errors are ignored)."""
    append_log(hook_log_path(state_dir), entry)


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` with the current ``time`` as one JSON line to log file ``path``
    (best effort: errors are ignored)."""
    entry = {"time": round(time.time(), 3), **entry}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def read_hook_log(state_dir: Path) -> list[dict[str, Any]]:
    """Return the hook log entries, oldest first (unreadable lines skipped)."""
    return read_log(hook_log_path(state_dir))


def read_log(path: Path) -> list[dict[str, Any]]:
    """Return the JSON-line entries of log file ``path``, oldest first (unreadable lines
    skipped; no file: empty)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
