"""The state directory's files: bounded logs (rotation in the writer, tails read from
the end), only regular files read, and folders that must be real folders."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from libshare.errors import RefusedError
from libshare.hook import state


def returns_soon(call: Callable[[], object]) -> object:
    """Return what ``call`` returns, failing if it does not within 10 s (a FIFO opened
    for good blocks the thread, not the test)."""
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "blocked"
    return out[0]


def test_log_is_rotated_at_its_size(tmp_path: Path) -> None:
    log = tmp_path / "log" / "hook.log"
    for i in range(400):
        state.append_log(log, {"i": i, "pad": "x" * 40}, max_bytes=4096)
    rotated = log.with_name("hook.log.1")
    assert log.stat().st_size <= 4096 and rotated.stat().st_size <= 4096
    assert sorted(p.name for p in log.parent.iterdir()) == ["hook.log", "hook.log.1"]
    entries = state.read_log(log)
    assert [e["i"] for e in entries] == list(range(400 - len(entries), 400))
    # the last N span both files when the current one holds fewer
    current = len(log.read_text().splitlines())
    last = state.read_log(log, last=current + 3)
    assert [e["i"] for e in last] == list(range(400 - current - 3, 400))


def test_concurrent_writers_lose_no_line_at_rotation(tmp_path: Path) -> None:
    log = tmp_path / "log" / "daemon.log"
    per, writers = 60, 4
    line = len(json.dumps({"time": 1.0, "w": 0, "i": 0, "pad": "y" * 30})) + 1
    limit = int(per * writers * line * 0.7)  # one rotation, everything fits in two files

    def write(w: int) -> None:
        for i in range(per):
            state.append_log(log, {"w": w, "i": i, "pad": "y" * 30}, max_bytes=limit)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {(e["w"], e["i"]) for e in state.read_log(log)}
    assert got == {(w, i) for w in range(writers) for i in range(per)}


def test_last_lines_are_read_from_the_end(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "hook.log"
    with open(log, "w") as fh:  # a big log from before rotation existed
        for i in range(200_000):
            fh.write(json.dumps({"i": i, "pad": "z" * 50}) + "\n")
    read = []
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        read.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", counting)
    assert [e["i"] for e in state.read_log(log, last=5)] == list(range(199_995, 200_000))
    assert sum(read) <= 128 * 1024 < log.stat().st_size // 50
    assert state.read_log(log, last=0) == []


def test_partial_and_garbage_lines_are_skipped(tmp_path: Path) -> None:
    log = tmp_path / "hook.log"
    log.write_bytes(b'{"i": 1}\nnot json\n[1, 2]\n\xff\xfe\n{"i": 2}\n{"i": 3')
    assert [e["i"] for e in state.read_log(log)] == [1, 2]
    assert [e["i"] for e in state.read_log(log, last=1)] == [2]


def test_log_in_a_fifo_or_through_a_link_is_not_written(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    fifo = tmp_path / "log" / "hook.log"
    os.mkfifo(fifo)
    returns_soon(lambda: state.append_hook_log(tmp_path, {"op": "x"}))  # blocked before
    assert returns_soon(lambda: state.read_hook_log(tmp_path)) == []
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.unlink(fifo)
    os.rmdir(tmp_path / "log")
    (tmp_path / "log").symlink_to(target)
    state.append_hook_log(tmp_path, {"op": "x"})
    assert list(target.iterdir()) == []


def test_records_only_in_real_folders(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    s = tmp_path / "s"
    s.mkdir()
    (s / "running").symlink_to(outside)
    with pytest.raises(RefusedError, match="not a folder"):
        state.write_running(s, {"name": "h"})
    assert list(outside.iterdir()) == []
    (s / "requests").mkdir()
    os.mkfifo(s / "requests" / "h.json")
    assert returns_soon(lambda: state.read_request(s, "h")) is None  # a FIFO: not read
