"""Progress reporting for long store imports and region builds.

Owns the presentation of the ``Progress`` callbacks (phase, done, total) that
:mod:`libshare.sharing.store` and :mod:`libshare.sharing.region` call: nothing is shown
for operations that finish within ``delay`` seconds; after that, a redrawn bar on a
terminal, or one plain line per phase when the stream is not a terminal (logs, CI).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressPrinter:
    """Callable progress sink; call :meth:`close` when the operation ends."""

    def __init__(self, label: str, stream: TextIO | None = None, delay: float = 0.5,
                 tty: bool | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.delay = delay
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.phase: str | None = None
        self.announced: str | None = None
        self.drawn = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        """Record progress of ``phase``: ``done`` of ``total`` units (total 0: unknown)."""
        now = time.monotonic()
        if phase != self.phase:
            self.phase = phase
            self.last_draw = 0.0
        if now - self.start < self.delay:
            return
        if not self.tty:
            if self.announced != phase:
                self.announced = phase
                what = f" ({total} steps)" if total else ""
                self.stream.write(f"{self.label}: {phase}{what}\n")
                self.stream.flush()
            return
        if now - self.last_draw < 0.1 and done != total:
            return
        self.last_draw = now
        if total:
            width = 30
            filled = int(width * done / total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"\r{self.label}: {phase:<10} [{bar}] {100 * done // total:3d}%"
        else:
            text = f"\r{self.label}: {phase:<10} ..."
        self.stream.write(text.ljust(60))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
