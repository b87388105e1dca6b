"""Live migration, save/restore and managedsave of a redirected guest, between this
host's system libvirtd and a second libvirt host in its own mount namespace
(:mod:`tests.integration.second_host`), whose hook is this checkout's.

The guest is a tiny-kit guest enrolled through the product path; its own script mounts
the region with DAX and binds the region's copies of a few programs' libraries (as the
tiny demo does), keeps ``tail`` running on them and prints a ``TICK`` line every two
seconds: the binds in place, ``tail``'s library mappings on the region device versus
disk, and the SHA-256 of a bound library read now. The source's state directory is
hidden from the second host, which has its own libshare state with the region image of
the same digest built from the same inputs (at another path).

Ground truth: the guest's TICK lines (its own /proc) after each step, each QEMU's
/proc/PID/smaps for the region mapping, and the files the hooks left on each host.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare.config import Config
from libshare.demo.story import PROGRAMS, build_tiny_region
from libshare.demo.tiny.kernel import KernelPackage
from libshare.demo.tiny.runner import GuestOptions, RunningGuest, defined_guest
from libshare.sharing.accounting import smaps
from libshare.virt import enrol
from tests.integration.second_host import STATE_IN_NS, SecondHost, free_port, second_host

pytestmark = pytest.mark.integration

GROUP = "demo"

SCRIPT = r""". /etc/libshare.sh
wait_for_path /dev/pmem0 30 || { echo "error=no /dev/pmem0"; exit 3; }
mkdir -p /mnt/region
mount -t erofs -o ro,dax /dev/pmem0 /mnt/region || { echo "error=mount failed"; exit 4; }
n=0
while read -r src dst; do
    [ -e "$dst" ] && mount --bind -o ro "/mnt/region$src" "$dst" && n=$((n + 1))
done < /etc/libshare-binds
/usr/bin/tail -f /dev/null &
tailpid=$!
read -r first < /etc/libshare-binds
lib=${first#* }
dev=$(cat /sys/block/pmem0/dev)
hexdev=$(printf '%02x:%02x' "${dev%:*}" "${dev#*:}")
sleep 1
ready binds=$n
i=0
while :; do
    i=$((i + 1))
    region=0; disk=0
    while read -r addr perms off mdev ino path; do
        case "$path" in
            *.so*) if [ "$mdev" = "$hexdev" ]; then region=$((region + 1));
                   else disk=$((disk + 1)); fi ;;
        esac
    done < /proc/$tailpid/maps
    binds=$(( $(grep -c '^/dev/pmem0 ' /proc/mounts) - 1 ))
    sum=$(sha256sum "$lib" | cut -c1-64)
    echo "TICK $i binds=$binds maps_region=$region maps_disk=$disk sum=$sum lib=$lib"
    sleep 2
done
"""
_TICK = re.compile(r"^TICK (\d+) binds=(\d+) maps_region=(\d+) maps_disk=(\d+) "
                   r"sum=([0-9a-f]{64}) lib=(\S+)\s*$", re.M)


def _append_console(dom: Any) -> None:
    """Make the serial console append to its file: the destination's QEMU opens it too."""
    for el in dom.iter("source"):
        if el.getparent().tag in ("serial", "console"):
            el.set("append", "on")


def virsh(*args: str, uri: str = "qemu:///system", timeout: float = 300
          ) -> subprocess.CompletedProcess[str]:
    """Return the finished ``virsh -c URI ARGS``."""
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                          check=False, timeout=timeout)


def tick(g: RunningGuest, after: int = 0, timeout: float = 120.0, since: int = 0
         ) -> dict[str, Any]:
    """Wait for a TICK line numbered above ``after`` on ``g``'s console (from character
    ``since`` on: a new boot counts from 1 again); return its fields."""
    deadline = time.monotonic() + timeout
    while True:
        ticks = [m for m in _TICK.finditer(g.console(), since) if int(m.group(1)) > after]
        if ticks:
            m = ticks[-1]
            return {"i": int(m.group(1)), "binds": int(m.group(2)),
                    "maps_region": int(m.group(3)), "maps_disk": int(m.group(4)),
                    "sum": m.group(5), "lib": m.group(6)}
        if time.monotonic() > deadline:
            raise AssertionError(f"no TICK after {after} within {timeout:.0f} s:\n"
                                 + g.console()[-1500:])
        time.sleep(0.5)


def region_mapping(pid: int, path: str) -> dict[str, int]:
    """Return the smaps counters (kB) of process ``pid``'s mappings of file ``path``."""
    maps = [m for m in smaps(pid) if m.path == path]
    assert maps, f"process {pid} does not map {path}"
    keys = ("Rss", "Pss", "Shared_Clean", "Private_Dirty", "Anonymous")
    return {k: sum(m.counters.get(k, 0) for m in maps) for k in keys}


def nonzero_kb(path: Path) -> int:
    """Return how many kB of the file ``path`` are in pages that are not all zeros."""
    data = path.read_bytes()
    zero = bytes(4096)
    return sum(4 for i in range(0, len(data), 4096) if data[i:i + 4096] != zero)


def dst_status(dst: SecondHost, name: str) -> dict[str, Any]:
    """Return the ``libshare status --json`` row of ``name`` on the second host."""
    proc = dst.libshare("status", name, "--json", "--no-agent", "--no-introspect")
    assert proc.returncode == 0, proc.stderr
    row: dict[str, Any] = json.loads(proc.stdout)["domains"][0]
    return row


def check_guest(g: RunningGuest, after: int, want_sum: str, binds: int, since: int = 0
                ) -> int:
    """Check the guest's next TICK: its binds, its libraries mapped from the region
    only, the bound library's bytes; return the TICK's number."""
    t = tick(g, after, since=since)
    assert t["binds"] == binds and t["maps_region"] > 0 and t["maps_disk"] == 0, t
    assert t["sum"] == want_sum, t
    return int(t["i"])


def test_migrate_save_restore_managedsave(libvirt_conn: Any, domain_name: Callable[[], str],
                                          guest_kernel: KernelPackage,
                                          scratch_dir: Path) -> None:
    src = Config(state_dir=scratch_dir / "src-state")
    built, binds = build_tiny_region(src, print)
    for d in (src.state_dir, src.regions_dir, src.regions_dir / "images",
              src.regions_dir / "groups"):
        d.chmod(0o755)
    spec = enrol.resolve_region(src, GROUP, "nvdimm")
    region_kb = built.size // 1024
    want_sum = hashlib.sha256(Path(f"/{binds[0][1].lstrip('/')}").resolve().read_bytes()
                              ).hexdigest()
    name = domain_name()
    opts = GuestOptions(kernel=guest_kernel, memory_mib=256, binaries=PROGRAMS,
                        files={"/etc/libshare-binds": "".join(f"{s} {d}\n" for s, d in binds)},
                        customize=[_append_console])
    with second_host(hide=[src.state_dir]) as dst, \
            defined_guest(libvirt_conn, name, SCRIPT, opts) as defined:
        enrol.enable_domain(libvirt_conn, name, spec)
        g = defined.start()
        g.wait_ready(timeout=300)
        last = check_guest(g, 0, want_sum, len(binds))
        src_pid = g.qemu_pid()
        assert src_pid
        before = region_mapping(src_pid, spec.path)
        print(f"source QEMU {src_pid}: {before} (region {region_kb} kB)")
        assert before["Anonymous"] == 0 and before["Private_Dirty"] == 0
        migrate = ["migrate", "--live", "--persistent", "--verbose", name, dst.uri,
                   "--migrateuri", f"tcp://127.0.0.1:{free_port()}"]

        # a destination without the region image refuses; the source runs on unchanged
        t0 = time.monotonic()
        proc = virsh(*migrate)
        print(f"refused in {time.monotonic() - t0:.2f} s: {proc.stderr.strip()}")
        assert proc.returncode != 0 and "has no region image with digest" in proc.stderr
        assert g.is_active() and g.qemu_pid() == src_pid
        last = check_guest(g, last, want_sum, len(binds))
        assert region_mapping(src_pid, spec.path) == before or \
            region_mapping(src_pid, spec.path)["Anonymous"] == 0

        # the destination builds the same image from the same inputs: the same digest
        dcfg = Config(state_dir=dst.state)
        rebuilt, _ = build_tiny_region(dcfg, print)
        assert rebuilt.digest == built.digest and rebuilt.path != built.path
        dst_image = f"{STATE_IN_NS}/regions/images/{built.digest}.img"

        # live migration: the guest keeps its binds and reads the region on the destination
        t0 = time.monotonic()
        proc = virsh(*migrate)
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        job = virsh("domjobinfo", name, "--completed", uri=dst.uri).stdout
        downtime = re.search(r"Total downtime:\s+(\d+)\s+(\w+)", job)
        print(f"migrated in {took:.1f} s, downtime "
              + (" ".join(downtime.groups()) if downtime else "?"))
        assert not g.is_active()
        dconn = dst.connect()
        ddom = dconn.lookupByName(name)
        assert ddom.isActive()
        live = ddom.XMLDesc(0)
        assert dst_image in live and str(src.state_dir) not in live, live
        last = check_guest(g, last, want_sum, len(binds))
        dst_pid = dst.qemu_pid(name)
        assert dst_pid and dst_pid != src_pid
        after = region_mapping(dst_pid, dst_image)
        print(f"destination QEMU {dst_pid} after migration: {after} "
              f"(non-zero part of the region: {nonzero_kb(Path(built.path))} kB)")
        # the limitation: QEMU copies the region's RAM through the stream into private
        # pages (share=off); status shows them as the region mapping's Private_Dirty
        assert after["Anonymous"] > 0 and after["Anonymous"] <= region_kb
        record = json.loads((dst.state / "running" / f"{name}.json").read_text())
        assert record["region"] == dst_image and record["pid"] == dst_pid
        # libvirt defines the source's persistent definition on the destination as it
        # was (the hook sees only the live XML): status shows its region MISSING, and
        # 'libshare enable' on the destination moves it to this host's image
        row = dst_status(dst, name)
        assert row["region"] == spec.path and row["region_ok"] is False, row
        assert row["memory"]["region_path"] == dst_image
        assert row["memory"]["region"]["Anonymous"] == after["Anonymous"], row["memory"]
        print("destination status:", row["memory"]["region"])
        text = dst.libshare("status", name, "--no-agent", "--no-introspect").stdout
        assert f"{name}: {after['Anonymous']} kB of its region are private copies" in text
        proc = dst.libshare("enable", name, "--group", GROUP, "--json")
        assert proc.returncode == 0, proc.stderr
        row = dst_status(dst, name)
        assert row["region_ok"] is True and row["region"] != spec.path, row
        assert row["state_dir"] == STATE_IN_NS, row

        # save and restore on the destination; a restore without the image is refused
        saved = dst.base / "saved.img"   # both hosts see it (not the state dirs)
        proc = virsh("save", name, str(saved), uri=dst.uri)
        assert proc.returncode == 0, proc.stderr
        image = dst.state / "regions/images" / f"{built.digest}.img"
        image.rename(image.with_suffix(".away"))
        proc = virsh("restore", str(saved), uri=dst.uri)
        assert proc.returncode != 0 and "has no region image" in proc.stderr, proc
        image.with_suffix(".away").rename(image)
        t0 = time.monotonic()
        proc = virsh("restore", str(saved), uri=dst.uri)
        assert proc.returncode == 0, proc.stderr
        print(f"restored in {time.monotonic() - t0:.1f} s")
        last = check_guest(g, last, want_sum, len(binds))
        restored = region_mapping(dst.qemu_pid(name) or 0, dst_image)
        print(f"after restore: {restored}")
        assert restored["Anonymous"] > 0

        # managedsave, then start: restored from the managed save
        proc = virsh("managedsave", name, uri=dst.uri)
        assert proc.returncode == 0, proc.stderr
        assert not dconn.lookupByName(name).isActive()
        proc = virsh("start", name, uri=dst.uri)
        assert proc.returncode == 0, proc.stderr
        last = check_guest(g, last, want_sum, len(binds))
        managed = region_mapping(dst.qemu_pid(name) or 0, dst_image)
        print(f"after managedsave and start: {managed}")
        # a power cycle (a new QEMU process, from the persistent definition) shares again
        ddom = dconn.lookupByName(name)
        ddom.destroy()
        since = len(g.console())
        ddom.create()
        last = check_guest(g, 0, want_sum, len(binds), since=since)
        fresh = region_mapping(dst.qemu_pid(name) or 0, row["region"])
        print(f"after a power cycle: {fresh}")
        assert fresh["Anonymous"] == 0 and fresh["Private_Dirty"] == 0, fresh
        hooks = [json.loads(line) for line in
                 (dst.state / "log" / "hook.log").read_text().splitlines()]
        print("destination hook:", [(h["op"], h["sub"], h["result"]) for h in hooks])
        assert ("restore", "begin", 1) in [(h["op"], h["sub"], h["status"]) for h in hooks]
        dconn.close()
