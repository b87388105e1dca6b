"""``libshare daemon`` under a real systemd, in its hardened unit, against the real
libvirtd: a systemd-nspawn container booted from this host's own root (an overlay, so
nothing is written to it), with libvirt's socket, the interpreter and a state
directory bound in, and every libvirt unit of the image masked (the container must
never start a libvirtd or stop the host's guests).

Checked: the unit starts; the daemon reaches libvirt (a request for a domain libvirt
does not know is dropped as gone, which takes a lookup through the socket); it writes
its state directory and nothing else (a probe in the same sandbox); its journal lines
carry the identifier ``libshare`` and their priorities.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libshare.redirect import unit
from tests.support.paths import PROJECT_ROOT

SOCKET = Path("/run/libvirt/libvirt-sock")
#: units of the host's image the container must never run
MASK_PATTERNS = ("*virt*", "libvirt*", "postgresql*", "lvm2*", "dm-event*",
                 "blk-availability*", "systemd-timesyncd*", "ssh*", "cron*")
TARGET = """[Unit]
Description=libshare unit test: the journal and nothing else
DefaultDependencies=no
Wants=systemd-journald.service systemd-journald.socket
"""
PROBE = """import os, socket
out = {}
for path in ("/etc/libshare-probe", "/usr/libshare-probe", "/var/lib/libshare/probe"):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        os.unlink(path)
        out[path] = "written"
    except OSError as exc:
        out[path] = exc.strerror
for fam in ("AF_INET", "AF_INET6"):
    try:
        socket.socket(getattr(socket, fam), socket.SOCK_DGRAM).close()
        out[fam] = "allowed"
    except OSError as exc:
        out[fam] = exc.strerror
out["CapEff"] = [x.split()[1] for x in open("/proc/self/status") if x.startswith("CapEff")][0]
print("PROBE " + __import__("json").dumps(out), flush=True)
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (systemd-nspawn: Debian package systemd-container)"
    if not SOCKET.is_socket():
        return f"no libvirt socket at {SOCKET}"
    return None


def _masks() -> list[str]:
    names: set[str] = set()
    for folder in (Path("/lib/systemd/system"), Path("/etc/systemd/system")):
        for pattern in MASK_PATTERNS:
            names.update(p.name for p in folder.glob(pattern)
                         if p.suffix in (".service", ".socket", ".timer", ".target"))
    return [f"--bind-ro=/dev/null:/etc/systemd/system/{n}" for n in sorted(names)]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _in(init: int, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(init), "-a", *argv], capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def booted(work: Path, state: Path, units: dict[str, str]) -> Iterator[int]:
    """Yield the pid of systemd booted in a container over this host's root, with
    ``units`` (name: text) in its /etc/systemd/system and ``state`` as its
    /var/lib/libshare; powered off afterwards."""
    view = work / "rootview"
    view.mkdir()
    binds = []
    for name, text in units.items():
        (work / name).write_text(text)
        binds.append(f"--bind-ro={work / name}:/etc/systemd/system/{name}")
    for path in dict.fromkeys([sys.prefix, sys.base_prefix, str(PROJECT_ROOT)]):
        binds.append(f"--bind-ro={os.path.realpath(path)}")
    script = (f"mount --bind / {view} && exec systemd-nspawn --quiet --register=no "
              f"--keep-unit --volatile=overlay -D {view} --private-network "
              f"--console=passive \"$@\"")
    log = open(work / "boot.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script, "nspawn", *_masks(),
                             f"--bind={SOCKET}:{SOCKET}", f"--bind={state}:/var/lib/libshare",
                             *binds, "-b", "systemd.unit=libshare-test.target"],
                            stdout=log, stderr=subprocess.STDOUT)
    init = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            if kids and _in(kids[0], "systemctl", "is-system-running").stdout.strip() in (
                    "running", "degraded"):
                init = kids[0]
                break
            time.sleep(0.5)
        if not init:
            text = (work / "boot.log").read_text(errors="replace")[-800:]
            pytest.skip(f"no systemd could be booted in a container here: {text}")
        yield init
    finally:
        if init:
            _in(init, "systemctl", "poweroff")
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def test_daemon_runs_in_its_hardened_unit_under_systemd(scratch_dir: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state = scratch_dir / "state"
    (state / "requests").mkdir(parents=True)
    (state / "requests" / "bad.json").write_text("garbage")
    (state / "requests" / "lstest-gone.json").write_text(json.dumps(
        {"domain": "lstest-gone", "requested_at": time.time()}))
    text = unit.render_unit(extra_args=["--state-dir", "/var/lib/libshare"],
                            state_dir="/var/lib/libshare")
    (state / "probe.py").write_text(PROBE)
    probe = "\n".join(
        f"ExecStart={sys.executable} /var/lib/libshare/probe.py" if line.startswith("ExecStart=")
        else "Type=oneshot" if line.startswith("Type=") else line
        for line in text.splitlines() if not line.startswith("Restart")) + "\n"
    with booted(scratch_dir, state, {unit.UNIT_NAME: text, "libshare-probe.service": probe,
                                     "libshare-test.target": TARGET}) as init:
        res = _in(init, "systemctl", "start", unit.UNIT_NAME)
        assert res.returncode == 0, res.stderr
        log = state / "log" / "daemon.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(
                log.read_text().splitlines() if log.exists() else []) < 2:
            time.sleep(0.5)
        events = {e["domain"]: e for e in map(json.loads, log.read_text().splitlines())}
        assert events["lstest-gone"]["message"] == "request dropped: the domain is gone"
        assert events["bad"]["event"] == "dropped"
        assert _in(init, "systemctl", "is-active", unit.UNIT_NAME).stdout.strip() == "active"
        journal = [json.loads(x) for x in _in(init, "journalctl", "-t", "libshare", "-o",
                                              "json", "--no-pager").stdout.splitlines()]
        prio = {j["MESSAGE"].split(":")[1].strip(): j["PRIORITY"] for j in journal}
        assert prio == {"bad": "4", "lstest-gone": "6"}, journal
        assert _in(init, "systemctl", "start", "libshare-probe.service").returncode == 0
        out = _in(init, "journalctl", "-u", "libshare-probe", "-o", "cat", "--no-pager").stdout
    found = json.loads(next(x for x in out.splitlines() if x.startswith("PROBE "))[6:])
    assert found["/var/lib/libshare/probe"] == "written"
    assert found["/etc/libshare-probe"] == found["/usr/libshare-probe"] == \
        "Read-only file system"
    assert found["AF_INET"] == found["AF_INET6"] == "Address family not supported by protocol"
    assert int(found["CapEff"], 16) == 0
