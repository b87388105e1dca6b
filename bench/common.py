"""What every benchmark prints: the machine it ran on and the command that reproduces it."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Return hostname, CPU model, core count, memory (MiB), kernel and Python version."""
    cpu = "unknown"
    mem_kb = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_mib": mem_kb // 1024, "kernel": platform.release(),
            "python": platform.python_version()}


ROOT = Path(__file__).resolve().parents[1]


def reproduce_command(module: str, argv: Sequence[str] | None = None) -> str:
    """Return the shell command that reruns benchmark ``module`` (e.g. ``bench.hook``)
    with the same arguments, from the project root."""
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", module, *args])
    return f"cd {shlex.quote(str(ROOT))} && {cmd}"


def print_header(title: str, module: str) -> None:
    """Print the benchmark title, the command that reproduces it and the machine."""
    m = machine()
    print(f"# {title}")
    print(f"command: {reproduce_command(module)}")
    print(f"machine: {m['hostname']}, {m['cpu']}, {m['cores']} cores, "
          f"{m['memory_mib']} MiB, kernel {m['kernel']}, Python {m['python']}")


def median(values: Sequence[float]) -> float:
    """Return the median of ``values`` (0.0 when empty)."""
    return statistics.median(values) if values else 0.0
