"""The progress printer (libshare.cli.progress): heartbeat lines while a long open-ended
step (a program in a guest) runs, off a terminal."""

from __future__ import annotations

import io

import pytest

from libshare.cli import progress as progress_mod


def test_progress_heartbeat_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest step of minutes prints a line every heartbeat off a terminal."""
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    p = progress_mod.ProgressPrinter("guest install g1", stream, delay=0.0, tty=False,
                                     heartbeat=30.0)
    for t in range(0, 95, 5):
        now[0] = 100.0 + t
        p("update-initramfs", t, 0)
    p.close()
    assert stream.getvalue().splitlines() == [
        "guest install g1: update-initramfs ...",
        "guest install g1: update-initramfs ... 30 s",
        "guest install g1: update-initramfs ... 60 s",
        "guest install g1: update-initramfs ... 90 s",
        "guest install g1: update-initramfs done in 90.0 s"]
