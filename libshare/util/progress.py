"""The progress callback long operations report to (store imports, region builds, guest
steps through the agent); :mod:`libshare.cli.progress` shows it to people."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Progress callback (libshare.cli.progress.ProgressPrinter shows it)."""

    def __call__(self, phase: str, done: int, total: int, unit: str = "") -> None:
        """Report ``done`` of ``total`` ``unit`` ("bytes", "files", "" for steps) in
        ``phase``; total 0 when the end is unknown (then ``done`` is seconds)."""
