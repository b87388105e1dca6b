"""Redirect in real Debian 12 TCG guests: boot-time and runtime modes, verified from
inside each guest (/proc/*/maps, fincore of the disk copies) and from the host (each
QEMU's region mapping in /proc/PID/smaps). Boot-time mode on both boot paths: GRUB from
the guest disk (guest A below) and direct kernel boot of the image's own kernel and
initrd from host files (:func:`test_boot_time_redirect_with_direct_kernel_boot`).

One region is built from the cached Debian image's own libraries (the image's root
filesystem is read on the host from a raw copy through a read-only loop device and
imported into the store); two guests of that image are enrolled into it. Guest A gets
boot-time mode (``libshare guest install`` + restart), guest B runtime mode (install
without initramfs and ``libshare redirect``, done by ``libshare daemon`` on the request
the hook left when B started: B is enrolled with ``--redirect runtime``) and a copy of
one library that differs by one byte. Then ``libshare status`` against what each guest
says, a package reinstall in B through dpkg, and ``unredirect`` in both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from libshare import domxml
from libshare.boot import store as boot_store
from libshare.config import Config
from libshare.demo.debian.guest import DebianGuest, DebianGuestOptions, defined_debian_guest
from libshare.demo.debian.image import DebianImage, copy_image_libraries
from libshare.hook import state
from libshare.sharing.accounting import region_usage
from libshare.sharing.formats.erofs import Erofs
from libshare.sharing.region import build, layout, manifest
from libshare.sharing.store import import_tree
from libshare.virt import api, enrol
from tests.support.paths import open_to_qemu, state_base

pytestmark = pytest.mark.integration

GROUP = "lstest-redirect"
LIBDIR = "usr/lib/x86_64-linux-gnu"
LIBSHARE = [sys.executable, "-m", "libshare"]
#: the library guest B gets a one-byte-different copy of (its real file, not the
#: soname symlink), and its package
ODD_SONAME = f"/{LIBDIR}/libacl.so.1"
ODD_PKG = "libacl1"


@dataclass
class Region:
    """The test region built from the Debian image's libraries."""

    cfg: Config
    path: Path
    guest_paths: dict[str, str]         # guest path -> sha256
    image: DebianImage
    odd: str                            # real path of ODD_SONAME in the image


@pytest.fixture(scope="module")
def debian_region(debian_guest_image: DebianImage) -> Iterator[Region]:
    """Yield a region holding every library under the Debian image's
    /usr/lib/x86_64-linux-gnu (read on the host from a raw copy of the image, read-only:
    :func:`~libshare.demo.debian.guest.copy_image_libraries`)."""
    image = debian_guest_image
    with state_base("redirect-") as base:
        tree = copy_image_libraries(image, base / "tree", workdir=base)
        odd = "/" + os.path.relpath(os.path.realpath(tree / ODD_SONAME.lstrip("/")), tree)
        cfg = Config(state_dir=base / "state")
        import_tree(cfg.store_dir, [tree])
        res = build.build_region(cfg, GROUP)
        open_to_qemu(base, cfg)
        with open(res.path, "rb") as fh:
            files = manifest.read_manifest(Erofs(fh, offset=layout.DATAOFF))["files"]
        paths = {g: f["sha256"] for f in files for g in f["guest_paths"]}
        assert odd in paths and odd != ODD_SONAME and f"/{LIBDIR}/libc.so.6" in paths
        print(f"region {res.path}: {res.files} files, {res.size >> 20} MiB")
        yield Region(cfg, Path(res.path), paths, image, odd)


# ------------------------------------------------------------------ guest ground truth

def majmin(text: str) -> str:
    """Return a ``MAJ:MIN`` (decimal) device as /proc/PID/maps prints it (hex)."""
    major, minor = (int(x) for x in text.strip().split(":"))
    return f"{major:02x}:{minor:02x}"


@dataclass
class GuestView:
    """What one guest says about its library mappings and page cache."""

    region_dev: str | None
    region_maps: int                     # mappings of region libraries on the pmem device
    disk_maps: list[str]                 # "pid path" of mappings of region libraries on disk
    odd_maps: list[str]                  # "dev path" of mappings of the odd library
    disk_cache_bytes: int                # fincore of the disk copies of bound files
    binds: set[str]                      # guest paths with a bind mount on them


def guest_view(g: DebianGuest, reg: Region, drop_caches: bool = False) -> GuestView:
    """Return the :class:`GuestView` of guest ``g`` (read inside it through the agent)."""
    dev = g.sh("findmnt -n -o MAJ:MIN /run/libshare/region || true").strip()
    region_dev = majmin(dev.splitlines()[0]) if dev else None
    maps = g.sh(r"grep -H '\.so' /proc/[0-9]*/maps || true", timeout=120)
    region_maps, disk, odd = 0, [], []
    for line in maps.splitlines():
        m = re.match(r"^/proc/(\d+)/maps:\S+ \S+ \S+ (\S+) \d+\s+(/.*)$", line)
        if not m or m.group(3) not in reg.guest_paths:
            continue
        pid, mdev, path = m.groups()
        if path == reg.odd:
            odd.append(f"{mdev} {path}")
        if mdev == region_dev:
            region_maps += 1
        else:
            disk.append(f"{pid} {path}")
    mountinfo = g.sh("cat /proc/self/mountinfo")
    binds = {line.split()[4] for line in mountinfo.splitlines()
             if line.split()[4] in reg.guest_paths}
    # the disk copies, seen through a non-recursive bind of / (no file binds on it)
    files = " ".join(sorted(binds))
    cache = 0
    if files:
        script = ("set -e; mkdir -p /mnt/lsroot; mount --bind / /mnt/lsroot; "
                  + ("sync; echo 3 > /proc/sys/vm/drop_caches; " if drop_caches else "")
                  + "cd /mnt/lsroot; fincore --bytes --noheadings -o RES "
                  + " ".join("." + p for p in sorted(binds))
                  + "; cd /; umount /mnt/lsroot")
        out = g.sh(script, timeout=120)
        cache = sum(int(x) for x in out.split())
    return GuestView(region_dev, region_maps, disk, odd, cache, binds)


def libshare(*args: str) -> subprocess.CompletedProcess[str]:
    """Return the finished ``libshare ARGS`` of this interpreter."""
    return subprocess.run([*LIBSHARE, *args], capture_output=True, text=True, check=False,
                          timeout=1800)


def flip_last_byte(g: DebianGuest, path: str) -> None:
    """Replace guest file ``path`` by a copy whose last byte differs (new inode)."""
    data = bytearray(g.agent.read_file(path))
    data[-1] ^= 0x01
    g.agent.write_file(path + ".lstest", bytes(data), mode=0o644)
    g.sh(f"mv -f {path}.lstest {path}")


def bounce_buffers(g: DebianGuest) -> str:
    """Return the guest kernel's "software IO TLB: mapped" line ('' when it reserved no
    bounce buffers), from its own log (checked to still hold the boot's first lines)."""
    log = g.sh("dmesg")
    assert "Command line:" in log, log[:400]
    return "\n".join(line for line in log.splitlines() if "software IO TLB: mapped" in line)


def restart(g: DebianGuest, timeout: float = 600) -> float:
    """Power-cycle guest ``g`` and wait for the next boot; return the seconds it took.

    (:meth:`DebianGuest.restart`: a warm reboot under TCG can take minutes after the
    initramfs changed. Not ``systemd-run --on-active=1`` either: a transient timer's
    default AccuracySec is a minute, and it fired up to 56 s late.)"""
    return g.restart(timeout).seconds


def smaps_line(name: str, fields: dict[str, int]) -> str:
    """Return one report line of a QEMU's region mapping."""
    return (f"{name}: region Rss {fields.get('Rss', 0)} kB, Pss {fields.get('Pss', 0)} kB, "
            f"Shared_Clean {fields.get('Shared_Clean', 0)} kB, "
            f"Private_Dirty {fields.get('Private_Dirty', 0)} kB, "
            f"copied (Anonymous) {fields.get('Anonymous', 0)} kB")


def start_enrolled(stack: contextlib.ExitStack, conn: Any, opts: DebianGuestOptions,
                   specs: dict[str, Any]) -> list[DebianGuest]:
    """Define a Debian guest for each name of ``specs`` (removed when ``stack`` closes),
    enrol it with its region spec and start them all, not waiting for their boot;
    return the guests in that order."""
    doms = [stack.enter_context(defined_debian_guest(conn, n, opts)) for n in specs]
    for n, spec in specs.items():
        enrol.enable_domain(conn, n, spec)
    return [d.start(wait=False) for d in doms]


# ------------------------------------------------------------------ the test

def test_boot_time_and_runtime_redirect(libvirt_conn: Any, domain_name: Callable[[], str],
                                        debian_region: Region) -> None:
    reg = debian_region
    spec = enrol.resolve_region(reg.cfg, GROUP, "nvdimm")
    opts = DebianGuestOptions(image=reg.image, boot_timeout=420)
    name_a, name_b = domain_name(), domain_name()
    with contextlib.ExitStack() as stack:
        a, b = start_enrolled(stack, libvirt_conn, opts,
                              {name_a: spec, name_b: replace(spec, redirect="runtime")})
        # the hook asked for B's automatic redirect at 'started', and only for B
        assert state.read_request(reg.cfg.state_dir, name_b) is not None
        assert state.read_request(reg.cfg.state_dir, name_a) is None
        a.wait_booted()
        b.wait_booted()

        # redirect before install is refused with one line
        proc = libshare("redirect", name_b)
        assert proc.returncode == 1 and "guest install" in proc.stderr, proc
        assert proc.stderr.count("\n") == 1

        # ---- A: boot-time mode (what the initramfs holds now is what unredirect restores)
        initramfs_before = a.sh('lsinitramfs "/boot/initrd.img-$(uname -r)" | grep libshare'
                                ' || true', timeout=300)
        proc = libshare("guest", "install", name_a, "--json")
        assert proc.returncode == 0, proc.stderr
        inst = json.loads(proc.stdout)
        print("install A:", inst)
        assert inst["initramfs"] == "updated" and inst["initramfs_entries"] > 0
        assert (inst["boot"]["path"], inst["boot"]["mode"]) == ("grub", "boot"), inst["boot"]
        # enrolment's maxMemory made A's kernel reserve bounce buffers; update-grub puts
        # libshare's drop-in (swiotlb=noforce) on its command line from the next boot
        assert bounce_buffers(a)
        assert any("swiotlb=noforce from the next boot" in d for d in inst["boot"]["done"])
        print(f"A restarted in {restart(a):.0f}s (multi-user at uptime "
              f"{a.last_boot.uptime if a.last_boot else '?'} s)")
        assert "swiotlb=noforce" in a.sh("cat /proc/cmdline")
        assert bounce_buffers(a) == ""
        print("A kernel log:", a.sh("dmesg | grep -i libshare || true").strip())

        # ---- B: runtime mode by the daemon (install + redirect), one library one byte off
        flip_last_byte(b, reg.odd)
        proc = libshare("--state-dir", str(reg.cfg.state_dir), "daemon", "--until-idle",
                        "--poll", "2", "--json")
        print("daemon:", proc.stdout.strip()[:600], proc.stderr[-600:])
        assert proc.returncode == 0, proc.stderr
        assert [h["action"] for h in json.loads(proc.stdout)["handled"]] == ["ok"]
        outcome = state.read_outcome(reg.cfg.state_dir, name_b)
        assert outcome and outcome["ok"] and outcome["installed_now"], outcome
        red = outcome["report"]
        print("redirect B:", {k: v for k, v in red.items() if k != "differs"})
        assert reg.odd in red["differs"] and red["binds_total"] > 10
        # by hand again: nothing left to do
        proc = libshare("redirect", name_b, "--json", "--no-restart")
        assert proc.returncode == 0, proc.stderr
        again = json.loads(proc.stdout)
        assert again["bound"] == 0 and again["binds_total"] == red["binds_total"]

        va = guest_view(a, reg)
        vb = guest_view(b, reg, drop_caches=True)
        pid_a, pid_b = a.qemu_pid(), b.qemu_pid()
        assert pid_a and pid_b
        map_a, map_b = region_usage(pid_a, reg.path), region_usage(pid_b, reg.path)
        print(f"A: {va.region_maps} region-library mappings on pmem {va.region_dev}, "
              f"{len(va.disk_maps)} on disk, {len(va.binds)} binds, disk copies in page "
              f"cache {va.disk_cache_bytes} bytes")
        print(f"B: {vb.region_maps} region-library mappings on pmem {vb.region_dev}, "
              f"{len(vb.disk_maps)} on disk ({len(vb.odd_maps)} of {reg.odd}), "
              f"{len(vb.binds)} binds, disk copies in page cache {vb.disk_cache_bytes} bytes")
        print(smaps_line("QEMU A", map_a))
        print(smaps_line("QEMU B", map_b))
        # A: everything from the region since boot, and its page cache never held them
        assert va.region_dev and va.region_maps > 50
        assert va.disk_maps == [], va.disk_maps
        assert va.disk_cache_bytes == 0
        assert reg.odd in va.binds
        # B: the same, except the one-byte-different library, which stays its own
        assert vb.region_dev and vb.region_maps > 50
        assert [x for x in vb.disk_maps if not x.endswith(reg.odd)] == []
        assert vb.odd_maps and reg.odd not in vb.binds
        assert all(not x.startswith(vb.region_dev or "?") for x in vb.odd_maps)
        assert vb.disk_cache_bytes == 0      # nothing maps the disk copies any more
        # host: one shared copy, never a private one
        for fields in (map_a, map_b):
            assert fields["Shared_Clean"] > 0 and fields["Anonymous"] == 0, fields
        # libshare status agrees with what the guests say
        proc = libshare("--state-dir", str(reg.cfg.state_dir), "status", name_a, name_b,
                        "--json", "--agent-timeout", "120")
        assert proc.returncode == 0, proc.stderr
        rows = {r["name"]: r for r in json.loads(proc.stdout)["domains"]}
        print("status:", {n: {k: r.get(k) for k in ("redirect", "auto_redirect", "guest")}
                          for n, r in rows.items()})
        assert rows[name_a]["redirect"] == "off" and rows[name_b]["redirect"] == "runtime"
        assert rows[name_b]["auto_redirect"]["state"] == "ok"
        for name, view, g in ((name_a, va, a), (name_b, vb, b)):
            gst = rows[name]["guest"]
            # the binds the guest's kernel holds: mounts of the region device but the
            # region's own mount (a path bound twice, e.g. through /lib -> usr/lib,
            # counts twice there and once in view.binds)
            mounts = g.sh("awk '/ - (erofs|ext4) \\/dev\\/pmem/ && "
                          "$5 != \"/run/libshare/region\" {print $5}' /proc/self/mountinfo")
            targets = mounts.split()
            print(f"{name}: {len(targets)} region mounts, {len(set(targets))} paths, "
                  f"{len(view.binds)} region files bound")
            assert gst["files_redirected"] == len(targets), gst
            assert view.binds <= set(targets)
            # taken moments apart, and each count includes its own counting processes
            # (status: sh, grep, sed, sort, join map ~60 region libraries between them)
            assert view.region_maps - 20 <= gst["maps_region"] <= view.region_maps + 120, \
                (gst, view.region_maps)
        assert rows[name_a]["guest"]["maps_disk"] == 0
        assert rows[name_a]["guest"]["mode"] == "boot"
        assert rows[name_b]["guest"]["mode"] == "runtime"

        # ---- dpkg in B: reinstalling the odd library's package restores the original
        # bytes, and the post-invoke hook binds it from the region again
        deb = next((reg.image.directory.parent.parent / "debs").glob(f"{ODD_PKG}_*.deb"))
        b.agent.write_file(f"/root/{deb.name}", deb.read_bytes())
        out = b.exec(["dpkg", "-i", f"/root/{deb.name}"], timeout=300)
        print("dpkg -i:", out.rc, out.err[-500:])
        assert out.rc == 0, out.err
        assert b.sh(f"findmnt -n -o TARGET {reg.odd} || true").strip() == reg.odd
        # and a reinstall of an already redirected package also works
        other = next((reg.image.directory.parent.parent / "debs").glob("zlib1g_*.deb"))
        b.agent.write_file(f"/root/{other.name}", other.read_bytes())
        out = b.exec(["dpkg", "-i", f"/root/{other.name}"], timeout=300)
        assert out.rc == 0, out.err
        libz = b.sh(f"readlink -f /{LIBDIR}/libz.so.1").strip()
        assert libz in reg.guest_paths
        assert b.sh(f"findmnt -n -o TARGET {libz} || true").strip() == libz

        # ---- unredirect: both guests as before (A after a restart)
        for g in (a, b):
            proc = libshare("unredirect", g.name, "--json")
            assert proc.returncode == 0, proc.stderr
            print(f"unredirect {g.name}:", proc.stdout.strip().replace("\n", " ")[:400])
            # the drop-in went with the other files; update-grub ran without it
            assert json.loads(proc.stdout)["grub"] == "updated", proc.stdout
        restart(a)
        assert "swiotlb" not in a.sh("cat /proc/cmdline")
        for g in (a, b):
            left = g.sh("grep -c ' /usr/lib/' /proc/self/mountinfo || true").strip()
            assert left == "0", g.sh("cat /proc/self/mountinfo")
            files = g.sh("ls -d /usr/sbin/libshare-redirect /etc/initramfs-tools/hooks/libshare "
                         "/etc/apt/apt.conf.d/80libshare /etc/dpkg/dpkg.cfg.d/libshare "
                         "/var/lib/libshare /run/libshare 2>/dev/null || true").strip()
            assert files == "", files
        # the image's own conf/conf.d/libshare-guest.conf matches too: compare with before
        assert a.sh('lsinitramfs "/boot/initrd.img-$(uname -r)" | grep libshare || true',
                    timeout=300) == initramfs_before
        view = guest_view(a, reg)
        assert view.region_maps == 0 and view.region_dev is None


def test_boot_time_redirect_with_direct_kernel_boot(
        libvirt_conn: Any, domain_name: Callable[[], str], debian_region: Region) -> None:
    """A guest booting the image's kernel and initrd from host files (<os><kernel>,
    <initrd>) never boots the initramfs it rebuilds: guest install builds libshare's own
    initrd and switches the definition to it; after one power cycle every library
    mapping of every process is on the region (the guest's /proc/*/maps), status says
    how and, before the power cycle, why not; disable gives the exact definition back.
    (libshare's initrd goes under the state directory of the enrolment, inside
    TEST_ROOT, which the hook trusts.)"""
    reg = debian_region
    spec = enrol.resolve_region(reg.cfg, GROUP, "nvdimm")
    opts = DebianGuestOptions(image=reg.image, boot_timeout=420, direct_kernel_boot=True)
    name = domain_name()
    uuid = None
    try:
        with defined_debian_guest(libvirt_conn, name, opts) as d:
            uuid = d.domain.UUIDString()
            before = domxml.parse(api.inactive_xml(d.domain))
            enrol.enable_domain(libvirt_conn, name, spec)
            g = d.start()
            cmdline = g.sh("cat /proc/cmdline").strip()
            assert "BOOT_IMAGE=" not in cmdline and "root=UUID=" in cmdline, cmdline

            proc = libshare("guest", "install", name, "--json")
            assert proc.returncode == 0, proc.stderr
            inst = json.loads(proc.stdout)
            boot = inst["boot"]
            print("install:", {k: inst[k] for k in ("initramfs", "seconds")}, boot)
            ours = str(boot_store.initrd_path(reg.cfg.state_dir, uuid))
            assert (boot["path"], boot["mode"], boot["initrd"]) == \
                ("direct-kernel", "boot", ours), boot
            assert inst["initramfs"].startswith("not rebuilt")
            defined = domxml.boot_of(domxml.parse(api.inactive_xml(d.domain)))
            assert defined["libshare_initrd"] == ours and defined["initrd"] == ours
            proc = libshare("status", name, "--json", "--no-introspect",
                            "--agent-timeout", "120")
            assert proc.returncode == 0, proc.stderr
            tb = json.loads(proc.stdout)["domains"][0]["this_boot"]
            print("status before the power cycle:", tb)
            assert tb["binds"] is False and "direct kernel boot" in tb["why"] \
                and "next start" in tb["why"], tb

            print(f"restarted in {restart(g):.0f}s")
            # enable put swiotlb=noforce on the domain's command line: no bounce buffers
            assert "swiotlb=noforce" in g.sh("cat /proc/cmdline")
            assert bounce_buffers(g) == ""
            print("kernel log:", g.sh("dmesg | grep -i libshare || true").strip()[-800:])
            print("boot record:", g.sh("cat /run/libshare/boot.out || true")[:400])
            view = guest_view(g, reg)
            print(f"{view.region_maps} region-library mappings on pmem {view.region_dev}, "
                  f"{len(view.disk_maps)} on disk, {len(view.binds)} binds, disk copies in "
                  f"page cache {view.disk_cache_bytes} bytes")
            assert view.region_dev and view.region_maps > 50
            assert view.disk_maps == [], view.disk_maps
            assert view.disk_cache_bytes == 0
            proc = libshare("status", name, "--json", "--no-introspect",
                            "--agent-timeout", "120")
            assert proc.returncode == 0, proc.stderr
            row = json.loads(proc.stdout)["domains"][0]
            print("status after:", row["this_boot"], {k: row["guest"].get(k) for k in (
                "mode", "boot_via", "files_redirected", "maps_region", "maps_disk")})
            assert row["this_boot"] == {"binds": True, "how": "boot", "why": None}
            assert row["guest"]["boot_via"] == "host" and row["guest"]["maps_disk"] == 0

            proc = libshare("disable", name)
            assert proc.returncode == 0, proc.stderr
            after = domxml.parse(api.inactive_xml(d.domain))
            assert etree.tostring(after, method="c14n") == \
                etree.tostring(before, method="c14n")
            assert not boot_store.domain_dir(reg.cfg.state_dir, uuid).exists()
    finally:
        if uuid is not None:
            boot_store.remove(reg.cfg.state_dir, uuid)


def test_refused_without_region_device(libvirt_conn: Any, domain_name: Callable[[], str],
                                       debian_region: Region) -> None:
    """A guest without the region device: one line, exit 1, nothing installed."""
    opts = DebianGuestOptions(image=debian_region.image, boot_timeout=420)
    name = domain_name()
    with defined_debian_guest(libvirt_conn, name, opts) as d:
        g = d.start()
        for args in (["guest", "install", name], ["redirect", name]):
            proc = libshare(*args)
            assert proc.returncode == 1, proc
            assert "no library region device" in proc.stderr and proc.stderr.count("\n") == 1
        assert g.sh("ls /usr/sbin/libshare-redirect /run/libshare 2>/dev/null || true") == ""
