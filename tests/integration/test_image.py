"""``libshare image prepare|status|unprepare`` on real disk images, offline, and the
clones of prepared templates booted for the first time.

The template is a qcow2 overlay of the cached Debian 12 image (initramfs-tools), or of the derived image whose initramfs Debian's dracut package builds
(:func:`libshare.demo.debian.dracut.dracut_image`). One region is built from the Debian
image's libraries. Ground truth: the image's files read on the host through a raw copy
on a read-only loop device (:func:`libshare.demo.debian.image.image_root`, not the code
under test), its initramfs listed with zstd and cpio, and, in booted clones, the
guest's own /proc (through the agent) and each QEMU's /proc/PID/smaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from libshare.config import Config
from libshare.demo.debian.guest import DebianGuest, DebianGuestOptions, defined_debian_guest
from libshare.demo.debian.image import DebianImage, create_overlay, image_root
from libshare.demo.story import GROUP, build_image_region
from libshare.redirect import actions
from libshare.report import region_guest_files
from libshare.sharing.accounting import smaps
from libshare.virt import enrol
from tests.support.paths import make_test_dir

pytestmark = pytest.mark.integration

LIBSHARE = [sys.executable, "-m", "libshare"]


@dataclass
class Region:
    """The test region, built from the Debian image's libraries."""

    cfg: Config
    path: Path
    digest: str
    guest_paths: dict[str, int]          # guest path -> size
    image: DebianImage
    work: Path


@pytest.fixture(scope="module")
def region(debian_guest_image: DebianImage) -> Iterator[Region]:
    """Yield a region of every library of the Debian image (the demo's recipe, group
    GROUP, in a state folder of its own under TEST_ROOT, which the hook trusts) and a
    work folder for disks that QEMU can traverse, outside /var/lib/libshare (the second
    host of the migration covers that with its own state)."""
    image = debian_guest_image
    top = make_test_dir(f"image-p{os.getpid()}-")
    work = Path(tempfile.mkdtemp(prefix=f"libshare-image-p{os.getpid()}-", dir="/var/tmp"))
    try:
        work.chmod(0o755)
        cfg = Config(state_dir=top / "state")
        cfg.state_dir.mkdir(mode=0o755)
        built = build_image_region(cfg, image, print, policy="libraries")
        paths = region_guest_files(built.path)
        for d in (cfg.regions_dir, cfg.regions_dir / "images", cfg.regions_dir / "groups"):
            d.chmod(0o755)
        yield Region(cfg, Path(built.path), built.digest, paths, image, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def libshare(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Return the finished ``libshare [--state-dir STATE] ARGS`` of this interpreter."""
    pre = ["--state-dir", str(state)] if state else []
    return subprocess.run([*LIBSHARE, *pre, *args], capture_output=True, text=True,
                          check=False, timeout=1800)


def image_cmd(action: str, disk: Path, reg: Region, *extra: str) -> dict[str, Any]:
    """Return the JSON report of a successful ``libshare image ACTION DISK``."""
    proc = libshare("image", action, str(disk), "--json", *extra, state=reg.cfg.state_dir)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def refused(disk: Path, reg: Region, match: str, action: str = "prepare") -> None:
    """Check that ``libshare image ACTION DISK`` is refused with one line matching
    ``match`` and leaves the image's bytes as they were."""
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    proc = libshare("image", action, str(disk), "--group", GROUP, state=reg.cfg.state_dir) \
        if action == "prepare" else libshare("image", action, str(disk),
                                             state=reg.cfg.state_dir)
    assert proc.returncode == 1, proc
    lines = [x for x in proc.stderr.splitlines() if x.startswith("libshare: ")]
    assert len(lines) == 1 and re.search(match, lines[0]), proc.stderr
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


def initramfs_listing(root: Path, kernel: str) -> list[str]:
    """Return the file names in the image's initramfs of ``kernel``, read with zstd and
    cpio on the host (the images compress with zstd, no early microcode archive)."""
    data = (root / "boot" / f"initrd.img-{kernel}").read_bytes()
    assert data[:4] == b"\x28\xb5\x2f\xfd", data[:8]
    raw = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    out = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True,
                         check=True).stdout
    return out.decode().splitlines()


def shipped(path: str) -> bytes | None:
    """Return this libshare's bytes of guest file ``path`` (None for the unit link)."""
    f = next(f for f in actions.GUEST_FILES if f.path == path)
    return actions.guest_file_bytes(f.source) if f.source else None


# ------------------------------------------------------------------ offline

def test_prepare_status_unprepare(region: Region, libvirt_conn: Any,
                                  domain_name: Callable[[], str]) -> None:
    reg = region
    tpl = create_overlay(reg.image, reg.work / "t1.qcow2")
    base = reg.image.path.stat()
    kernel = reg.image.kernel_release

    st = image_cmd("status", tpl, reg)
    assert st["prepared"] is False and st["distribution"]["id"] == "debian"
    assert st["initramfs_tool"] == "initramfs-tools"
    assert [(k["version"], k["script"], k["hook"]) for k in st["kernels"]] == \
        [(kernel, False, False)]

    rep = image_cmd("prepare", tpl, reg, "--group", GROUP)
    print("prepare:", rep["seconds"], rep["primed"])
    assert rep["action"] == "prepared" and rep["current"] and rep["group"] == GROUP
    assert rep["region_digest"] == reg.digest
    wanted = [f.path for f in actions.GUEST_FILES if not f.path.startswith("/usr/lib/dracut/")]
    assert [f["path"] for f in rep["files"]] == wanted
    assert [(k["version"], k["script"], k["hook"]) for k in rep["kernels"]] == \
        [(kernel, True, True)]
    assert rep["primed"]["identical"] > 300 and rep["primed"]["differs"] == 0

    # ground truth, read without libshare: the files, the verdicts, the initramfs
    with image_root(tpl, reg.work) as root:
        for path in wanted:
            host = root / path.lstrip("/")
            data = shipped(path)
            if data is None:
                assert os.readlink(host) == "/etc/systemd/system/libshare-redirect.service"
            else:
                assert host.read_bytes() == data, path
        assert (root / "usr/lib/dracut/modules.d/90libshare").exists() is False
        # the verdict table: "guest-path TAB key TAB sha256" per line
        libc = "usr/lib/x86_64-linux-gnu/libc.so.6"
        table = (root / "var/lib/libshare/verdicts.tsv").read_text()
        rows = {ln.split("\t")[0]: ln.split("\t") for ln in table.splitlines() if ln}
        assert rows["/" + libc][2] == hashlib.sha256((root / libc).read_bytes()).hexdigest()
        listing = initramfs_listing(root, kernel)
        assert "usr/lib/libshare/libshare-redirect" in listing
        assert "scripts/init-bottom/libshare" in listing
        for tool in ("blkid", "mount", "dd", "sha256sum", "timeout"):
            assert f"usr/lib/libshare/bin/{tool}" in listing, tool
        for mod in ("nfit", "nd_pmem", "dax_pmem", "erofs"):
            assert any(re.search(rf"/{mod}\.ko", x) for x in listing), mod
        marker = json.loads((root / "var/lib/libshare/image.json").read_text())
        assert marker["group"] == GROUP and marker["kernels"] == [kernel]

    # again: unchanged, nothing written
    mtime = tpl.stat().st_mtime_ns
    again = image_cmd("prepare", tpl, reg, "--group", GROUP)
    assert again["action"] == "unchanged" and tpl.stat().st_mtime_ns == mtime
    st = image_cmd("status", tpl, reg)
    assert st["prepared"] and st["current"] and st["group"] == GROUP
    assert {f["state"] for f in st["files"]} == {"ok"}

    # in use: attached to a loop device, held by a QEMU process, a stopped clone's backing
    loop = subprocess.run(["losetup", "-f", "--show", "-r", str(tpl)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        refused(tpl, reg, f"attached to {loop}")
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    pidfile = reg.work / "qsd.pid"
    subprocess.run(["qemu-storage-daemon", "--blockdev",
                    f"driver=file,node-name=f,filename={tpl}", "--blockdev",
                    "driver=qcow2,node-name=d,file=f", "--daemonize", "--pidfile",
                    str(pidfile)], check=True)
    pid = int(pidfile.read_text())
    try:
        refused(tpl, reg, "in use: QEMU cannot lock it")
        refused(tpl, reg, "in use", action="unprepare")
        st = image_cmd("status", tpl, reg)
        assert st["in_use"] and "lock" in st["in_use"] and st["prepared"] is None
    finally:
        os.kill(pid, 15)
        while Path(f"/proc/{pid}").exists():
            os.sched_yield()
    clone = create_overlay(tpl, reg.work / "clone.qcow2")
    name = domain_name()
    libvirt_conn.defineXML(f"""<domain type='qemu'><name>{name}</name>
      <memory unit='MiB'>256</memory><os><type arch='x86_64'>hvm</type></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{clone}'/><target dev='vda' bus='virtio'/></disk></devices>
      </domain>""")
    refused(tpl, reg, f"disk chain of domain {name}")
    st = image_cmd("status", tpl, reg)
    assert name in (st["in_use"] or "")
    libvirt_conn.lookupByName(name).undefine()
    clone.unlink()

    # unprepare: exactly what was written goes, the initramfs has no libshare any more
    rep = image_cmd("unprepare", tpl, reg)
    assert rep["action"] == "unprepared"
    assert [(k["script"], k["hook"]) for k in rep["kernels"]] == [(False, False)]
    assert all(f["removed"] for f in rep["files"])
    with image_root(tpl, reg.work) as root:
        for f in actions.GUEST_FILES:
            assert not os.path.lexists(root / f.path.lstrip("/")), f.path
        assert not (root / "var/lib/libshare").exists()
        assert (root / "etc/initramfs-tools/hooks").is_dir()     # the image's own folder
        assert not [x for x in initramfs_listing(root, kernel) if "usr/lib/libshare" in x]
    assert image_cmd("status", tpl, reg)["prepared"] is False
    refused(tpl, reg, "not prepared by libshare", action="unprepare")
    after = reg.image.path.stat()
    assert (after.st_size, after.st_mtime_ns) == (base.st_size, base.st_mtime_ns)


def _small_disk(path: Path, files: dict[str, bytes | str], size_mib: int = 64,
                table: bool = True) -> Path:
    """Write a raw disk image ``path`` holding one ext4 filesystem (in an MBR partition
    at 1 MiB, or the whole disk) with busybox as /bin/sh and ``files``; return it."""
    tree = path.with_suffix(".tree")
    for d in ("bin", "proc", "sys", "dev", "tmp", "run", "etc", "boot", "usr/sbin",
              "lib/modules"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", tree / "bin/busybox")
    os.symlink("busybox", tree / "bin/sh")
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        if isinstance(data, str) and data.startswith("#!"):
            (tree / name).chmod(0o755)
    with open(path, "wb") as fh:
        fh.truncate(size_mib << 20)
    offset = 1 << 20 if table else 0
    if table:
        subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\nstart=2048, type=83\n",
                       check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={offset}", "-d",
                    str(tree), str(path), f"{(size_mib << 10) - (offset >> 10)}k"], check=True)
    shutil.rmtree(tree)
    return path


def test_images_it_cannot_handle_are_refused_unchanged(region: Region) -> None:
    """An unknown distribution, no initramfs tool, a full image (a whole-disk
    filesystem, no partition table), an image without any guest root: refused with
    the reason, the disk's bytes unchanged."""
    reg = region
    debian = 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n'
    alpine = _small_disk(reg.work / "alpine.raw", {"etc/os-release": "ID=alpine\n"})
    refused(alpine, reg, "unknown distribution 'alpine'")
    bare = _small_disk(reg.work / "bare.raw", {"etc/os-release": debian})
    refused(bare, reg, "has no initramfs tool libshare knows")
    kernel = "6.1.0-1-amd64"
    full = _small_disk(reg.work / "full.raw", {
        "etc/os-release": debian,
        "usr/sbin/update-initramfs": "#!/bin/sh\nexit 0\n",
        "usr/share/initramfs-tools/hook-functions": "",
        f"lib/modules/{kernel}/modules.dep": "",
        f"boot/vmlinuz-{kernel}": b"k",
        f"boot/initrd.img-{kernel}": b"\x01" * (24 << 20)}, table=False)
    refused(full, reg, r"the image is full: its /boot has \d+ MiB")
    empty = reg.work / "empty.raw"
    with open(empty, "wb") as fh:
        fh.truncate(16 << 20)
    refused(empty, reg, "no filesystem of the image holds a guest root")
    refused(empty, reg, "no filesystem of the image holds a guest root", action="status")


# ------------------------------------------------------------------ booted clones

def majmin(text: str) -> str:
    """Return a ``MAJ:MIN`` (decimal) device as /proc/PID/maps prints it (hex)."""
    major, minor = (int(x) for x in text.strip().split(":"))
    return f"{major:02x}:{minor:02x}"


@dataclass
class Inside:
    """What a guest says: the region's device, mappings of region libraries on it and
    on disk, its binds, how they were made, and what its boot-time redirect hashed."""

    region_dev: str | None
    region_maps: int
    disk_maps: list[str]
    binds: int
    mode: str
    boot_log: str


def inside(g: DebianGuest, reg: Region) -> Inside:
    """Return the :class:`Inside` view of guest ``g`` (read through its agent)."""
    def sh(script: str, timeout: float = 60.0) -> str:
        return g.agent.exec(["/bin/sh", "-c", script], timeout=timeout, check=True).out

    dev = sh("findmnt -n -o MAJ:MIN /run/libshare/region || true").strip()
    region_dev = majmin(dev.splitlines()[0]) if dev else None
    maps = sh(r"grep -H '\.so' /proc/[0-9]*/maps || true", timeout=120)
    region_maps, disk = 0, []
    for line in maps.splitlines():
        m = re.match(r"^/proc/(\d+)/maps:\S+ \S+ \S+ (\S+) \d+\s+(/.*)$", line)
        if not m or m.group(3) not in reg.guest_paths:
            continue
        if m.group(2) == region_dev:
            region_maps += 1
        else:
            disk.append(f"{m.group(1)} {m.group(3)}")
    kv = actions.parse_kv(sh("/usr/sbin/libshare-redirect status", timeout=120))
    log = sh("cat /run/libshare/log 2>/dev/null || true")
    return Inside(region_dev, region_maps, disk, int(kv.get("binds", 0)),
                  str(kv.get("mode")), log)


def region_mapping(g: DebianGuest, reg: Region) -> dict[str, int]:
    """Return the smaps counters (kB, Anonymous included) of ``g``'s QEMU mapping of the
    region, summed over its mappings of the region file."""
    pid = g.qemu_pid()
    assert pid
    maps = [m for m in smaps(pid) if m.path == str(reg.path)]
    assert maps, f"QEMU {pid} does not map {reg.path}"
    keys = ("Rss", "Pss", "Shared_Clean", "Private_Dirty", "Anonymous")
    return {k: sum(m.counters.get(k, 0) for m in maps) for k in keys}


def check_first_boot(guests: list[DebianGuest], reg: Region) -> None:
    """Check every guest's first boot from inside (every region library mapped from the
    region, binds made in the initramfs, nothing hashed thanks to the primed verdicts)
    and from the host (each QEMU maps the region without a private page)."""
    views = []
    for g in guests:
        v = inside(g, reg)
        views.append(v)
        print(f"{g.name}: {v.region_maps} region-library mappings on {v.region_dev}, "
              f"{len(v.disk_maps)} on disk, {v.binds} binds ({v.mode}); boot log: "
              f"{v.boot_log.strip()[-200:]}")
        assert len(g.boots()) == 1                       # the first boot, no restart
        assert v.region_dev and v.region_maps > 50
        assert v.disk_maps == [], v.disk_maps
        assert v.mode == "boot" and v.binds > 300
        # nothing hashed at boot: the verdicts prepare primed offline were used
        assert re.search(r"bound \d+ \(.*, 0 hashed, \d+ from cache;", v.boot_log), \
            v.boot_log
    rows = [region_mapping(g, reg) for g in guests]
    for g, row in zip(guests, rows, strict=True):
        print(f"{g.name}: QEMU region mapping {row}")
        assert row["Anonymous"] == 0 and row["Private_Dirty"] == 0, row
        assert row["Rss"] > 0, row
        if len(guests) > 1:  # the same page cache pages in every QEMU
            assert row["Shared_Clean"] > 0, row
    print(f"host: region Rss sum {sum(r['Rss'] for r in rows)} kB, Pss sum "
          f"{sum(r['Pss'] for r in rows)} kB (one copy)")


@contextlib.contextmanager
def clones(conn: Any, guests: list[tuple[str, DebianImage]], reg: Region
           ) -> Iterator[list[DebianGuest]]:
    """Yield the guests ``(name, image)``, each on a fresh overlay of its image, enrolled
    into the region and booted for the first time, at once (no guest install, no
    reboot)."""
    spec = enrol.resolve_region(reg.cfg, GROUP, "nvdimm")
    with contextlib.ExitStack() as stack:
        defined = [stack.enter_context(defined_debian_guest(
            conn, n, DebianGuestOptions(image=image, boot_timeout=900)))
            for n, image in guests]
        for n, _image in guests:
            enrol.enable_domain(conn, n, spec)
        started = [d.start(wait=False) for d in defined]
        for g in started:
            g.wait_booted()
        yield started


def test_clones_of_prepared_templates_share_from_their_first_boot(
        region: Region, libvirt_conn: Any, domain_name: Callable[[], str]) -> None:
    """A template of each initramfs tool: initramfs-tools, and Debian's dracut package
    (the template gets the dracut module, not the initramfs-tools hook). One clone of
    each boots for the first time (no guest install, no reboot), both at once: each
    binds in its initramfs (the second in dracut's pre-pivot hook, which keeps the boot
    record status reads) with nothing to hash, and both QEMUs share the region's pages:
    one copy on the host. Migration is proven with the tiny kit (test_migration)."""
    from libshare.demo.debian.dracut import dracut_image

    reg = region
    tpl = create_overlay(reg.image, reg.work / "template.qcow2")
    rep = image_cmd("prepare", tpl, reg, "--group", GROUP)
    assert rep["current"] and rep["initramfs_tool"] == "initramfs-tools", rep
    t0 = time.monotonic()
    dimage = dracut_image(reg.image)
    t1 = time.monotonic()
    dtpl = create_overlay(dimage, reg.work / "dracut.qcow2")
    drep = image_cmd("prepare", dtpl, reg, "--group", GROUP)
    assert drep["initramfs_tool"] == "dracut" and drep["current"], drep
    paths = [f["path"] for f in drep["files"]]
    assert "/usr/lib/dracut/modules.d/90libshare/module-setup.sh" in paths
    assert not [p for p in paths if p.startswith("/etc/initramfs-tools/")]
    t2 = time.monotonic()
    print(f"timing: prepare (initramfs-tools) {rep['seconds']['total']} s, dracut image "
          f"{t1 - t0:.1f} s, prepare (dracut) {drep['seconds']['total']} s")
    with clones(libvirt_conn, [(domain_name(), replace(reg.image, path=tpl)),
                               (domain_name(), replace(dimage, path=dtpl))], reg) as guests:
        t3 = time.monotonic()
        print(f"timing: both clones booted in {t3 - t2:.1f} s")
        dracut = guests[1]
        assert "initramfs-tools" not in dracut.sh(
            "dpkg -l | grep -E '^ii +(initramfs-tools|dracut) ' || true")
        check_first_boot(guests, reg)
        kmsg = dracut.sh("dmesg | grep libshare-redirect || true")
        print("dracut clone's kernel log:", kmsg.strip()[-400:])
        assert "libshare-redirect: bound" in kmsg
        kv = actions.parse_kv(dracut.sh("/usr/sbin/libshare-redirect status"))
        assert (kv.get("boot_ran"), kv.get("boot_via"), kv.get("boot_rc")) == \
            ("1", "guest", "0"), kv
        print(f"timing: checks {time.monotonic() - t3:.1f} s")
