"""Benchmark: ``libshare survey`` wall and CPU time on a running guest.

Measures, on one running TCG guest (a busybox guest on Debian's kernel with dynamically
linked programs and ``--extra`` more sleeping processes, booted here and always removed,
or an existing running domain given by name):

1. the first survey of a boot: scanning guest RAM for the kernel's BTF, ``init_task``
   and the banner, then the walk (``cold``);
2. later surveys, the kernel found from the per-boot cache (``warm``), median of
   ``--runs``; the same with ``--pause`` (suspend/resume around the walk);
3. the whole command line ``python -m libshare survey DOMAIN --json`` as a user runs it
   (interpreter start-up included), median of 3, CPU from the child's rusage.

Needs root and a running system libvirtd. Usage (from the project root):
``/opt/libshare-venv/bin/python -m bench.survey [DOMAIN] [--runs N] [--extra N] [--json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import machine, median, print_header, reproduce_command

PROGRAMS = ["/usr/bin/sleep", "/usr/bin/cat", "/usr/bin/tail", "/usr/bin/xz",
            "/usr/bin/openssl", "/usr/bin/zstd"]


def guest_script(extra: int) -> str:
    """Return the bench guest's /test.sh: programs that block forever, then ``ready``."""
    lines = [". /etc/libshare.sh",
             "/usr/bin/sleep 100000 | /usr/bin/cat >/dev/null &",
             "/usr/bin/tail -f /dev/null &",
             "/usr/bin/sleep 100001 | /usr/bin/xz -dc >/dev/null &",
             "/usr/bin/sleep 100002 | /usr/bin/openssl dgst -sha256 >/dev/null &",
             "/usr/bin/sleep 100003 | /usr/bin/zstd -dc >/dev/null &"]
    lines += [f"/usr/bin/sleep {200000 + i} &" for i in range(extra)]
    lines += ["sleep 2", "ready", "park"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def bench_guest(conn: Any, extra: int) -> Iterator[str]:
    """Boot the bench guest (named ``lstest-p<PID>-bench-survey``, always removed) and
    yield its name once its programs run."""
    from libshare.guests import GuestOptions, running_guest

    name = f"lstest-p{os.getpid()}-bench-survey"
    options = GuestOptions(binaries=PROGRAMS, memory_mib=256)
    with running_guest(conn, name, guest_script(extra), options) as guest:
        guest.wait_ready(timeout=180)
        yield name


def measure(conn: Any, name: str, runs: int) -> dict[str, Any]:
    """Return the timings (seconds) and counts of surveys of running domain ``name``."""
    from libshare.introspect.survey import survey_domain

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lsbench-") as cache:
        cache_dir = Path(cache)
        cold = survey_domain(conn, name, cache_dir=cache_dir)
        assert cold.scanned
        out["cold"] = {"wall": cold.wall_seconds, "cpu": cold.cpu_seconds}
        out["tasks"], out["threads"] = cold.tasks, cold.threads
        out["libraries"] = len(cold.libraries)
        out["kernel"] = cold.kernel
        out["partial"] = cold.partial
        for label, pause in (("warm", False), ("warm_paused", True)):
            walls, cpus = [], []
            for _ in range(runs):
                s = survey_domain(conn, name, pause=pause, cache_dir=cache_dir)
                assert not s.scanned
                walls.append(s.wall_seconds)
                cpus.append(s.cpu_seconds)
            out[label] = {"wall": median(walls), "cpu": median(cpus),
                          "wall_min": min(walls), "wall_max": max(walls)}
        walls, cpus = [], []
        env = dict(os.environ, LIBSHARE_STATE_DIR=str(cache_dir))
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "libshare", "survey", name, "--json"],
                           check=True, capture_output=True, env=env)
            walls.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out["cli"] = {"wall": median(walls), "cpu": median(cpus)}
    return out


def main() -> int:
    """Run the benchmark; print a report (or JSON); return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("domain", nargs="?", help="an existing running domain (default: boot one)")
    ap.add_argument("--runs", type=int, default=10, help="warm surveys to time (median)")
    ap.add_argument("--extra", type=int, default=20,
                    help="extra sleeping processes in the booted guest (default 20: ~75 tasks)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()

    import libvirt

    conn = libvirt.open("qemu:///system")
    ctx = contextlib.nullcontext(args.domain) if args.domain else bench_guest(conn, args.extra)
    with ctx as name:
        result = measure(conn, name, args.runs)
    result["domain"] = "booted busybox guest" if not args.domain else args.domain
    if args.json:
        print(json.dumps({"command": reproduce_command("bench.survey"), "machine": machine(),
                          "result": result}, indent=2))
        return 0
    print_header("libshare survey: wall and CPU time on a running guest", "bench.survey")
    print(f"guest: {result['domain']}, kernel {result['kernel']}, {result['tasks']} tasks "
          f"({result['threads']} threads), {result['libraries']} libraries"
          f"{', PARTIAL' if result['partial'] else ''}")
    for label, text in (("cold", "first survey of a boot (RAM scan + walk)"),
                        ("warm", f"later surveys (cached kernel), median of {args.runs}"),
                        ("warm_paused", f"later surveys with --pause, median of {args.runs}"),
                        ("cli", "whole command line incl. Python start-up, median of 3")):
        r = result[label]
        print(f"{text:58s} wall {r['wall'] * 1000:8.1f} ms   CPU {r['cpu'] * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
