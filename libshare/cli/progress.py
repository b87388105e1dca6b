"""Progress reporting for long store imports, region builds and guest steps.

Owns the presentation of the ``Progress`` callbacks (phase, done, total, unit;
:class:`libshare.util.progress.Progress`) that :mod:`libshare.sharing.store`,
:mod:`libshare.sharing.region.build` and :mod:`libshare.redirect.actions` (``guest
install``, ``redirect``, ``unredirect``: minutes under TCG) call: nothing is shown
for operations that finish within ``delay`` seconds; after that, a redrawn line on a
terminal, or plain lines when the stream is not a terminal (logs, CI).

* a phase with a known ``total`` shows a bar on a terminal and one line ("write
  (144.0 MiB)", "stage (12 files)") otherwise; ``unit`` "bytes" is shown in human units;
* a phase with ``total`` 0 has no known end (mkfs.erofs, a program in a guest): its
  caller ticks it and a terminal shows a spinner with the elapsed seconds; otherwise
  one line when it starts, one every ``heartbeat`` seconds while it lasts ("... 30 s")
  and one when it ends, with the time it took.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from libshare.util.units import human

SPINNER = "|/-\\"


class ProgressPrinter:
    """Callable progress sink; call :meth:`close` when the operation ends."""

    def __init__(self, label: str, stream: TextIO | None = None, delay: float = 0.5,
                 tty: bool | None = None, heartbeat: float = 30.0) -> None:
        self.label = label
        self.heartbeat = heartbeat
        self.beats = 0                # heartbeat lines written in this phase
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.delay = delay
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.phase: str | None = None
        self.phase_start = self.start
        self.open_ended = False       # the current phase has no known total
        self.announced: str | None = None
        self.drawn = False
        self.spins = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _end_phase(self, now: float) -> None:
        """Say that an announced open-ended phase ended (plain lines only)."""
        if self.open_ended and not self.tty and self.announced == self.phase:
            self._write(f"{self.label}: {self.phase} done in {now - self.phase_start:.1f} s\n")

    def __call__(self, phase: str, done: int, total: int, unit: str = "") -> None:
        """Record progress of ``phase``: ``done`` of ``total`` ``unit`` ("bytes", "files";
        "" for plain steps). ``total`` 0: no known end, ``done`` is ignored and the
        time since the phase began is shown instead."""
        now = time.monotonic()
        if phase != self.phase:
            self._end_phase(now)
            self.phase = phase
            self.phase_start = now
            self.last_draw = 0.0
            self.beats = 0
        self.open_ended = total == 0
        if now - self.start < self.delay:
            return
        if not self.tty:
            if self.announced != phase:
                self.announced = phase
                self._write(f"{self.label}: {phase}{self._amount(total, unit)}\n")
            elif self.open_ended and now - self.phase_start >= \
                    (self.beats + 1) * self.heartbeat:
                self.beats = int((now - self.phase_start) // self.heartbeat)
                self._write(f"{self.label}: {phase} ... {now - self.phase_start:.0f} s\n")
            return
        if now - self.last_draw < 0.1 and done != total:
            return
        self.last_draw = now
        if total:
            width = 30
            filled = int(width * done / total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"\r{self.label}: {phase:<10} [{bar}] {100 * done // total:3d}%"
            if unit == "bytes":
                text += f" {human(done)} of {human(total)}"
        else:
            self.spins += 1
            text = (f"\r{self.label}: {phase:<10} {SPINNER[self.spins % len(SPINNER)]} "
                    f"{now - self.phase_start:.0f} s")
        self._write(text.ljust(72))
        self.drawn = True

    @staticmethod
    def _amount(total: int, unit: str) -> str:
        """Return the " (amount)" suffix of a plain line ("" for open-ended phases)."""
        if not total:
            return " ..."
        if unit == "bytes":
            return f" ({human(total)})"
        return f" ({total} {unit or 'steps'})"

    def close(self) -> None:
        """End the operation: finish an open-ended phase's plain lines and the bar's line."""
        self._end_phase(time.monotonic())
        self.phase = None
        if self.drawn:
            self._write("\n")
            self.drawn = False
