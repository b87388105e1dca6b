"""A second libvirt "host" on this machine, for migration tests.

Its own ``libvirtd`` and ``virtlogd`` run in a mount namespace of their own where
``/etc/libvirt`` (with a qemu hook that runs this checkout's shim), ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt``, ``/etc/libshare``
(a libshare.toml) and ``/var/lib/libshare`` (the destination's libshare state) are
folders of its own under its ``base`` (a fresh folder in /var/tmp: outside
/var/lib/libshare, where the test state directories live, which that host's own state
covers); paths of the first host it must not see (the source's state directory) are
hidden behind an empty folder. Files both hosts' QEMUs open (disks, consoles, save
files) must live outside /var/lib/libshare too. It has another ``host_uuid``, is
reached through its own socket (:attr:`SecondHost.uri`), and takes migrations on
127.0.0.1. Everything is torn down when the block ends: its domains destroyed and
undefined, both daemons stopped by pid, the folders removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: the folders of its own the second host gets (the host's paths, bound over)
PRIVATE = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
           "/var/cache/libvirt", "/etc/libshare")
#: where its libshare state is, as its hook and its libshare see it
STATE_IN_NS = "/var/lib/libshare"
DAEMON_ENV = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C"
_START = f"""set -e
b=$1; shift
for p in {' '.join(PRIVATE)}; do mount --bind "$b$p" "$p"; done
for h in "$@"; do mount --bind "$b/empty" "$h"; done
mount --bind "$b/state" {STATE_IN_NS}
{DAEMON_ENV} virtlogd -d -p "$b/virtlogd.pid"
{DAEMON_ENV} libvirtd -d -p "$b/libvirtd.pid"
"""
HOOK = f"""#!/bin/sh
# the second host's qemu hook: this checkout's shim with this checkout's interpreter
exec {sys.executable} {ROOT / 'hooks' / 'qemu'} "$@"
"""


@dataclass
class SecondHost:
    """A running second host: its ``base`` folder, connection ``uri``, libshare state
    folder ``state`` (a host path; :data:`STATE_IN_NS` inside) and libvirtd ``pid``."""

    base: Path
    uri: str
    state: Path
    pid: int

    def connect(self) -> Any:
        """Return a new libvirt connection to the second host."""
        import libvirt

        return libvirt.open(self.uri)

    def qemu_pid(self, name: str) -> int | None:
        """Return the pid of domain ``name``'s QEMU on the second host, or None."""
        from libshare.virt.process import qemu_pid

        return qemu_pid(name, self.base / "run/libvirt/qemu")

    def inside(self, *argv: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Return the finished ``argv`` run in the second host's mount namespace (it sees
        that host's /run/libvirt, /etc/libshare and libshare state)."""
        return subprocess.run(["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", *argv],
                              capture_output=True, text=True, check=False, timeout=timeout)

    def libshare(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Return the finished ``libshare ARGS`` run as on the second host."""
        return self.inside(sys.executable, "-m", "libshare", "-c", "qemu:///system", *args)


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _layout(base: Path) -> None:
    """Write the second host's configuration under ``base``."""
    etc = base / "etc/libvirt"
    (etc / "hooks").mkdir(parents=True)
    (etc / "qemu").mkdir()
    for name in ("libvirt.conf", "qemu.conf", "virtlogd.conf"):
        if Path("/etc/libvirt", name).exists():
            shutil.copy2(Path("/etc/libvirt", name), etc / name)
    if Path("/etc/libvirt/nwfilter").is_dir():
        shutil.copytree("/etc/libvirt/nwfilter", etc / "nwfilter")
    (etc / "libvirtd.conf").write_text(
        "# the second libvirt host of the migration tests\n"
        f'host_uuid = "{uuid.uuid4()}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
    (etc / "hooks" / "qemu").write_text(HOOK)
    (etc / "hooks" / "qemu").chmod(0o755)
    for p in PRIVATE[1:]:
        (base / p.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if Path("/var/cache/libvirt/qemu").is_dir():  # QEMU's capabilities: no re-probe
        shutil.copytree("/var/cache/libvirt/qemu", base / "var/cache/libvirt/qemu",
                        dirs_exist_ok=True)
    (base / "etc/libshare/libshare.toml").write_text(
        f'state_dir = "{STATE_IN_NS}"\nlog_level = "info"\n')
    for d in ("state", "empty"):
        (base / d).mkdir(mode=0o755)


def _stop(pidfile: Path) -> None:
    """Stop the daemon whose pid ``pidfile`` holds and wait until it is gone."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def _clean_domains(host: SecondHost) -> None:
    """Destroy and undefine every domain of the second host (managed saves too), then
    kill any QEMU it leaves behind."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        conn = host.connect()
        for dom in conn.listAllDomains():
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        conn.close()
    for pidfile in (host.base / "run/libvirt/qemu").glob("*.pid"):
        _stop(pidfile)


@contextlib.contextmanager
def second_host(hide: Sequence[Path] = (), timeout: float = 120.0) -> Iterator[SecondHost]:
    """Start a second libvirt host (in a fresh folder under /var/tmp, short enough for a
    unix socket path) that cannot see the paths ``hide``; yield its
    :class:`SecondHost`; always torn down afterwards."""
    base = Path(tempfile.mkdtemp(prefix=f"ls-host2-p{os.getpid()}-", dir="/var/tmp"))
    base.chmod(0o755)
    made: list[Path] = []
    for point in ("/etc/libshare", STATE_IN_NS):  # mount points on this host (empty folders)
        if not Path(point).exists():
            Path(point).mkdir(parents=True)
            made.append(Path(point))
    host = SecondHost(base, f"qemu+unix:///system?socket={base}/run/libvirt/libvirt-sock",
                      base / "state", 0)
    try:
        _layout(base)
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _START,
                        "sh", str(base), *map(str, hide)], check=True, timeout=60)
        deadline = time.monotonic() + timeout
        while True:
            try:
                host.pid = int((base / "libvirtd.pid").read_text())
                host.connect().close()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    log = base / "var/log/libvirt/libvirtd.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"the second libvirtd did not answer: {exc}\n{tail}") \
                        from exc
                time.sleep(0.3)
        yield host
    finally:
        _clean_domains(host)
        _stop(base / "libvirtd.pid")
        _stop(base / "virtlogd.pid")
        for mp in made:
            with contextlib.suppress(OSError):
                mp.rmdir()
        shutil.rmtree(base, ignore_errors=True)
