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

The hook runs as root on input a domain definition controls, so every path here is
built safely: a domain name becomes a file name only when :func:`check_name` accepts it
(libvirt's own rules, plus what a file name needs), the folders under the state
directory must be real folders (not symbolic links), and the logs are opened only as
regular files, without blocking (libshare.util.files: ``open_regular``, ``open_append``).

The logs are bounded: a log that would grow past LOG_MAX_BYTES is renamed to
``NAME.1`` (replacing the previous one) and started anew, so each takes at most twice
that; :func:`read_log` reads the last lines from the end of the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libshare.errors import RefusedError
from libshare.util.files import atomic_write, open_append, open_regular

#: a log is rotated (renamed to NAME.1, one generation kept) before it passes this size
LOG_MAX_BYTES = 1 << 20
#: a record or request file is a few hundred bytes: more than this is not one
MAX_OBJECT_BYTES = 1 << 20
#: the longest domain name that can become a file name here: NAME.json, and the
#: ``.NAME.json.XXXXXXXX`` temporary of an atomic write, within 255 bytes
MAX_NAME_BYTES = 240
#: one log line is at most this long (a traceback is cut)
MAX_LINE_BYTES = 64 * 1024


def check_name(name: object) -> str:
    """Return ``name`` when it is a domain name libvirt accepts and that can name a
    file in a state folder: not empty, no ``/`` (libvirt refuses it), no newline
    (libvirt refuses it) or NUL, not ``.`` or ``..``, valid UTF-8 (libvirt's XML is),
    at most MAX_NAME_BYTES bytes. Raise RefusedError (one line) otherwise."""
    ok = isinstance(name, str) and name not in ("", ".", "..") and not any(
        c in name for c in "/\n\0")
    if ok:
        assert isinstance(name, str)
        try:
            ok = len(name.encode()) <= MAX_NAME_BYTES
        except UnicodeEncodeError:
            ok = False
    if not ok:
        raise RefusedError(f"invalid domain name {printable(name)} (libvirt's rules: not "
                           "empty, no '/' or newline; libshare's: valid UTF-8, not '.' or "
                           f"'..', at most {MAX_NAME_BYTES} bytes)")
    assert isinstance(name, str)
    return name


def printable(value: object, limit: int = 80) -> str:
    """Return ``repr(value)`` safe to print and log anywhere: ASCII only (surrogates of
    undecodable bytes escaped), cut to about ``limit`` characters."""
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _folder(path: Path) -> Path:
    """Return the folder ``path`` under a state directory, created if missing; raise
    RefusedError when it exists as anything but a real folder (a symbolic link there
    could lead a write outside the state directory)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise RefusedError(f"{path} is not a folder (a symbolic link or a file); libshare "
                           "writes only into real folders of its state directory")
    return path


def running_dir(state_dir: Path) -> Path:
    """Return the folder of running-domain records."""
    return state_dir / "running"


def record_path(state_dir: Path, name: str) -> Path:
    """Return the record file of running domain ``name`` (checked: :func:`check_name`)."""
    return running_dir(state_dir) / f"{check_name(name)}.json"


def _write_object(path: Path, obj: dict[str, Any]) -> Path:
    """Store ``obj`` as indented JSON in ``path`` atomically (its folder must be a real
    folder); return ``path``."""
    _folder(path.parent)
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
        record = _read_object(path)
        if record is not None:
            out.append(record)
    return out


def requests_dir(state_dir: Path) -> Path:
    """Return the folder of pending automatic redirect requests."""
    return state_dir / "requests"


def request_path(state_dir: Path, name: str) -> Path:
    """Return the automatic redirect request file of domain ``name`` (checked:
    :func:`check_name`)."""
    return requests_dir(state_dir) / f"{check_name(name)}.json"


def write_request(state_dir: Path, request: dict[str, Any]) -> Path:
    """Store ``request`` (must hold ``domain``) as a pending automatic redirect request,
    replacing any earlier one; return its path."""
    return _write_object(request_path(state_dir, request["domain"]), request)


def _read_object(path: Path) -> dict[str, Any] | None:
    """Return the JSON object stored in ``path``, or None (absent, unreadable, not a
    regular file, larger than MAX_OBJECT_BYTES, not an object)."""
    try:
        with open_regular(path, follow=False) as fh:
            raw = fh.read(MAX_OBJECT_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_OBJECT_BYTES else None
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
    """Return the file holding the daemon's last automatic redirect outcome for ``name``
    (checked: :func:`check_name`)."""
    return state_dir / "redirects" / f"{check_name(name)}.json"


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


def _line(entry: dict[str, Any]) -> bytes:
    """Return ``entry`` with the current ``time`` as one JSON line, ASCII only, cut
    (its ``traceback`` first) to MAX_LINE_BYTES."""
    entry = {"time": round(time.time(), 3), **entry}
    line = json.dumps(entry, sort_keys=True, default=str).encode()
    if len(line) >= MAX_LINE_BYTES and isinstance(entry.get("traceback"), str):
        entry["traceback"] = "...\n" + entry["traceback"][-(MAX_LINE_BYTES // 2):]
        line = json.dumps(entry, sort_keys=True, default=str).encode()
    if len(line) >= MAX_LINE_BYTES:
        line = json.dumps({k: (printable(v, 1024) if isinstance(v, str) else v)
                           for k, v in entry.items() if k != "traceback"},
                          sort_keys=True, default=str).encode()
    return line + b"\n"


def append_log(path: Path, entry: dict[str, Any], max_bytes: int = LOG_MAX_BYTES) -> None:
    """Append ``entry`` with the current ``time`` as one JSON line to log file ``path``
    (best effort: errors are ignored). The file is opened only if it is a regular file
    (never a FIFO, a device or a symbolic link), without blocking, in a real folder; one
    that would pass ``max_bytes`` is first renamed to ``path.1`` (one generation kept;
    the rename happens under an ``flock`` of the file, so concurrent writers lose no
    line)."""
    line = _line(entry)
    with contextlib.suppress(OSError, RefusedError):
        _folder(path.parent)
        for _ in range(4):  # another writer may rotate the file under us: reopen
            fd = open_append(path, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                if os.lstat(path).st_ino != st.st_ino:
                    continue  # rotated meanwhile
                if st.st_size and st.st_size + len(line) > max_bytes:
                    os.replace(path, path.with_name(path.name + ".1"))
                    continue
                os.write(fd, line)
                return
            finally:
                os.close(fd)


def read_hook_log(state_dir: Path, last: int | None = None) -> list[dict[str, Any]]:
    """Return the hook log entries, oldest first (the ``last`` ones only, when given;
    unreadable lines skipped)."""
    return read_log(hook_log_path(state_dir), last)


#: bytes read per step when reading a log backwards from its end
_TAIL_BLOCK = 64 * 1024


def _tail_lines(path: Path, want: int | None) -> tuple[list[bytes], bool]:
    """Return the complete lines at the end of the regular file ``path``, at least the
    last ``want`` (all of them for None), read backwards from the end, and whether that
    was the whole file; none when it cannot be read."""
    try:
        fh = open_regular(path, follow=False)
    except OSError:
        return [], True
    with fh:
        fd = fh.fileno()
        pos = os.fstat(fd).st_size
        chunks: list[bytes] = []
        count = 0
        while pos > 0 and (want is None or count <= want):
            step = min(_TAIL_BLOCK, pos)
            chunk = os.pread(fd, step, pos - step)
            if len(chunk) < step:
                break  # the file shrank: take what we have
            pos -= step
            chunks.append(chunk)
            count += chunk.count(b"\n")
    lines = b"".join(reversed(chunks)).splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first line read may be the end of a longer one
    return lines, pos == 0


def _entries(lines: list[bytes]) -> list[dict[str, Any]]:
    """Return the JSON objects among ``lines`` (anything else skipped)."""
    out = []
    for raw in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(raw)
            if isinstance(entry, dict):
                out.append(entry)
    return out


def read_log(path: Path, last: int | None = None) -> list[dict[str, Any]]:
    """Return the JSON-line entries of log file ``path``, oldest first: the ``last``
    ones only when given (read from the end, taking from the rotated ``path.1`` when
    ``path`` holds fewer), else all of both files. Unreadable lines are skipped; no file:
    empty."""
    if last is not None and last <= 0:
        return []
    want = last
    while True:
        lines, whole = _tail_lines(path, want)
        out = _entries(lines)
        if whole or last is None or want is None or len(out) >= last:
            break
        want *= 4  # garbage lines at the end: read further back
    if last is None or len(out) < last:
        rotated = path.with_name(path.name + ".1")
        out = _entries(_tail_lines(rotated, None)[0]) + out
    return out if last is None else out[-last:]
