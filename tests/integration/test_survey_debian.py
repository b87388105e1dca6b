"""Integration test of ``libshare survey`` on a systemd-based Debian 12 guest (debootstrap
minbase with systemd-sysv, :mod:`libshare.demo.debian.guest`) against ground truth taken
inside the guest: the seed's table (tasks, unique libraries) for today's Debian.

Ground truth comes through the qemu-guest-agent: a ``/bin/sh`` (dash) script that uses
only shell builtins, so that it adds exactly one process to the guest (itself, which it
names with ``$$``), prints pid + name of every task from /proc/*/stat and, per process,
the unique ``.so`` paths of its /proc/PID/maps. The guest is made quiescent (timers
stopped, idle udev workers gone) and the test takes a guest snapshot, surveys with
``--pause`` (the guest is stopped for the walk), then takes a second snapshot. When
both snapshots agree (the script's own process set aside, explicitly: its pid and its
libraries), nothing started or ended around the paused survey, and the survey must
equal them exactly: same (pid, name) set, same library path set.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from libshare.demo.debian.guest import DebianGuest, DebianGuestOptions, running_debian_guest

pytestmark = pytest.mark.integration

#: Builtins only (dash): the one process it adds to the guest is itself.
SNAPSHOT_SCRIPT = r"""
echo "SELF $$"
for d in /proc/[0-9]*; do
    read -r line < "$d/stat" && echo "TASK $line"
done 2>/dev/null
for d in /proc/[0-9]*; do
    seen=" "
    pid=${d#/proc/}
    while read -r a b c e f p; do
        case "$p" in
        *.so*) case "$seen" in
               *" $p "*) ;;
               *) seen="$seen$p "; echo "LIB $pid $p" ;;
               esac ;;
        esac
    done < "$d/maps"
done 2>/dev/null
echo END
"""

_TASK = re.compile(r"^TASK (\d+) \((.*)\) \S")
ATTEMPTS = 5


@dataclass(frozen=True)
class Snapshot:
    """What the guest saw: its own ``self_pid``, ``tasks`` {(pid, /proc name)} and
    ``libs`` {pid: {path}}, the snapshot script's own process included."""

    self_pid: int
    tasks: frozenset[tuple[int, str]]
    libs: dict[int, frozenset[str]]

    def others(self) -> tuple[frozenset[tuple[int, str]], frozenset[str]]:
        """Return the tasks and the union of library paths without the script's own
        process (which must be in the snapshot exactly once, as ``sh``)."""
        own = {t for t in self.tasks if t[0] == self.self_pid}
        assert own == {(self.self_pid, "sh")}, own
        libs = frozenset(p for pid, paths in self.libs.items() if pid != self.self_pid
                         for p in paths)
        return self.tasks - own, libs


def parse_snapshot(text: str) -> Snapshot:
    """Return the Snapshot printed by SNAPSHOT_SCRIPT (complete, or AssertionError)."""
    lines = text.splitlines()
    assert lines and lines[0].startswith("SELF ") and lines[-1] == "END", text[-500:]
    tasks: set[tuple[int, str]] = set()
    libs: dict[int, set[str]] = {}
    for line in lines[1:-1]:
        t = _TASK.match(line)
        if t:
            tasks.add((int(t.group(1)), t.group(2)))
        elif line.startswith("LIB "):
            pid, path = line[4:].split(" ", 1)
            libs.setdefault(int(pid), set()).add(path)
        else:
            raise AssertionError(f"unexpected line from the guest: {line!r}")
    return Snapshot(int(lines[0][5:]), frozenset(tasks),
                    {pid: frozenset(p) for pid, p in libs.items()})


def snapshot(guest: DebianGuest) -> Snapshot:
    """Run SNAPSHOT_SCRIPT in the guest through the agent; return what it printed."""
    res = guest.exec(["/bin/sh", "-c", SNAPSHOT_SCRIPT], timeout=120, check=True)
    return parse_snapshot(res.out)


def identity(snap: Snapshot) -> tuple[frozenset[tuple[int, str]], frozenset[str]]:
    """Return ``snap``'s tasks as (pid, comm) and its libraries, its own process aside."""
    tasks, libs = snap.others()
    return frozenset((pid, proc_comm(n)) for pid, n in tasks), libs


def idle_sign(name: str) -> str:
    """Return a /proc name with a busy workqueue worker's "+desc" written "-desc" (busy
    or not is a matter of the instant)."""
    return re.sub(r"^(kworker/[^+-]*)\+", r"\1-", name)


def proc_comm(name: str) -> str:
    """Return the ``task_struct.comm`` (at most 15 bytes) of a /proc/PID/stat name
    (kernel threads show their full name there, kworkers a "-<workqueue>" suffix)."""
    if name.startswith("kworker/"):
        name = name.split("-", 1)[0]
    return name[:15]


def quiesce(guest: DebianGuest) -> None:
    """Stop what would start processes on its own (timers; the image masks most) and
    wait for systemd to be idle and udev's idle workers to exit."""
    state = guest.exec(["systemctl", "is-system-running", "--wait"], timeout=180)
    assert state.out.strip() in ("running", "degraded"), state.out + state.err
    timers = guest.sh("systemctl list-units --type=timer --state=active --plain "
                      "--no-legend | cut -d' ' -f1").split()
    if timers:
        guest.exec(["systemctl", "stop", *timers], timeout=60, check=True)
    guest.exec(["udevadm", "settle"], timeout=60)
    deadline = time.monotonic() + 120
    previous = None
    while time.monotonic() < deadline:  # until two snapshots 5 s apart agree
        now = identity(snapshot(guest))
        if now == previous:
            return
        previous = now
        time.sleep(5)
    pytest.fail("the Debian guest did not become quiescent within 120 s")


def run_survey(name: str, *extra: str) -> dict[str, Any]:
    """Run ``libshare survey NAME --json EXTRA...`` as a user would; return the domain."""
    proc = subprocess.run([sys.executable, "-m", "libshare", "survey", name, "--json", *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr or proc.stdout[-2000:]
    dom: dict[str, Any] = json.loads(proc.stdout)["domains"][0]
    return dom


def seed_table(dom: dict[str, Any], top: int | None = None) -> str:
    """Return the seed-style table of one survey: tasks, unique libraries, and the top
    libraries by pages resident in the guest (all of them unless ``top``)."""
    libs = sorted(dom["libraries"], key=lambda lib: (-lib["resident_pages"], lib["path"]))
    pages = sum(lib["resident_pages"] for lib in libs)
    out = [f"guest {dom['name']} (kernel {dom['kernel']})",
           f"  tasks (processes)     {dom['tasks']:6d}   threads {dom['threads']}",
           f"  unique libraries      {len(libs):6d}",
           f"  library pages resident {pages:5d}   ({pages * 4096 / 1e6:.1f} MB)",
           f"  {'RESIDENT':>8}  {'MAPS':>4}  {'PROCS':>5}  {'BUILD-ID':16}  LIBRARY"]
    for lib in libs[:top]:
        out.append(f"  {lib['resident_pages']:8d}  {lib['mappings']:4d}  {lib['processes']:5d}  "
                   f"{(lib['build_id'] or '-')[:16]:16}  {lib['path']}")
    return "\n".join(out)


def test_survey_matches_systemd_debian_guest(
        libvirt_conn: Any, domain_name: Callable[[], str]) -> None:
    import libvirt

    name = domain_name()
    with running_debian_guest(libvirt_conn, name, DebianGuestOptions(memory_mib=512)) as guest:
        quiesce(guest)
        for _attempt in range(ATTEMPTS):
            before = snapshot(guest)
            dom = run_survey(name, "--pause")
            assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            after = snapshot(guest)
            # each snapshot's own shell is a new pid, absent from the paused survey
            assert before.self_pid != after.self_pid
            if identity(before) == identity(after):
                break
            print("guest changed around the survey; again:",
                  identity(before)[0] ^ identity(after)[0])
        else:
            pytest.fail(f"the guest's task list kept changing in {ATTEMPTS} attempts")
        tasks, libs = after.others()
        # An idle kworker's /proc name ends with the workqueue it last ran, which the
        # snapshots themselves change (agent I/O): a name that differs between the two
        # snapshots is checked by its comm only, every other name exactly.
        unsure = {pid for pid, n in before.others()[0] ^ tasks}
        assert all(proc_comm(n).startswith("kworker/") for pid, n in tasks if pid in unsure)
        print()
        print(seed_table(dom))
        print(f"  survey: {dom['wall_seconds']}s wall, {dom['cpu_seconds']}s CPU, "
              f"scanned={dom['scanned']}")
        assert dom["name"] == name
        assert dom["kernel"] == guest.image.kernel_release
        assert not dom["partial"], dom["errors"]
        got_comms = {(t["pid"], t["comm"]) for t in dom["task_list"]}
        want_comms = {(pid, proc_comm(n)) for pid, n in tasks}
        assert got_comms == want_comms, (f"only in survey: {got_comms - want_comms}; "
                                          f"only in guest: {want_comms - got_comms}")
        # A kworker's workqueue suffix may change and change back between the snapshots
        # (it ran another queue meanwhile): every kworker's name is checked for its comm
        # and the shape of a suffix, every other task's name exactly.
        workers = {pid for pid, n in tasks if n.startswith("kworker/")}
        got = {(t["pid"], idle_sign(t["name"])) for t in dom["task_list"]
               if t["pid"] not in workers}
        want = {(pid, idle_sign(n)) for pid, n in tasks if pid not in workers}
        assert got == want, f"only in survey: {got - want}; only in guest: {want - got}"
        odd = [t["name"] for t in dom["task_list"] if t["pid"] in workers
               and not re.fullmatch(re.escape(t["comm"]) + r"([-+][\w.:/-]+)?", t["name"])]
        assert not odd, odd
        print(f"  {len(unsure)} kworker name(s) changed between the snapshots; "
              f"{len(workers)} compared by comm and suffix shape")
        assert dom["tasks"] == len(tasks)
        assert before.self_pid not in {t["pid"] for t in dom["task_list"]}
        got_libs = {lib["path"] for lib in dom["libraries"]}
        assert got_libs == libs, (f"only in survey: {sorted(got_libs - libs)}; "
                                  f"only in guest: {sorted(libs - got_libs)}")
        # a systemd guest: PID 1 is systemd, which maps libsystemd-shared
        names = dict(tasks)
        assert names[1] == "systemd"
        assert any("libsystemd-shared" in p for p in libs)
        assert {"systemd-journal", "systemd-udevd", "qemu-ga"} <= set(names.values())
        assert len(tasks) >= 40 and len(libs) >= 15
        assert all(lib["resident_pages"] > 0 for lib in dom["libraries"])
