"""The built-in demo (``libshare demo``): guests of one trust group share one library
region, through the product's own redirect.

The default demo runs the whole story on this host with two full Debian 12 guests under
TCG: build (or reuse) the cached Debian image, read the image's libraries on the host
read-only (:func:`libshare.demo.debian.image.image_root`), import them into the store, build
the ``demo`` group's region from them, define the guests ``lsdemo-1``/``lsdemo-2`` and
enrol them through the libvirt API, boot them, ``actions.install`` + restart (boot-time
mode: the initramfs binds the region's identical copies over the guest's files before
``switch_root``), then report what each guest says from inside (library mappings on the
pmem device versus from disk over all processes, page cache of the disk copies), what
the host sees without asking the guests (introspection: region mappings) and what the
host holds (each QEMU's region mapping Rss/Pss/Shared_Clean/Private_Dirty and its
copy-on-write copies, the Anonymous pages; the region's page cache once, host memory for
these libraries with and without sharing).

``--tiny`` keeps the fast variant: busybox guests (Debian kernel) whose own script mounts
the region and binds a few programs' libraries (no ``guest install``). Guests are named
``lsdemo-N`` and are always removed at the end, on failure too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.config import Config
from libshare.demo.debian.guest import DebianGuest, DebianGuestOptions, defined_debian_guest
from libshare.demo.debian.image import DebianImage, debian_image, image_root
from libshare.demo.tiny.initramfs import shared_libraries
from libshare.demo.tiny.runner import GuestOptions, RunningGuest, defined_guest
from libshare.errors import LibshareError
from libshare.introspect.survey import DomainSurvey, survey_domain
from libshare.redirect import actions
from libshare.sharing import accounting
from libshare.sharing.region import build, layout
from libshare.sharing.store import import_tree, load_index
from libshare.util.digest import sha256_file
from libshare.virt import api, enrol

GROUP = "demo"
#: the demo's region policy (``libshare demo --policy``)
DEMO_POLICY = "usr"
#: the idle Debian 12 guest's file page cache, fincore over every file (issue 12)
IDLE_BASELINE_KB = 35_600
PREFIX = "lsdemo-"
PROGRAMS = ("/usr/bin/tail", "/usr/bin/ls", "/usr/bin/sort", "/usr/bin/sha256sum")

GUEST_SCRIPT = r""". /etc/libshare.sh
wait_for_path /dev/pmem0 30 || { echo "error=no /dev/pmem0"; exit 3; }
mkdir -p /mnt/region
cached() { awk '/^Cached:/{print $2}' /proc/meminfo; }
sync; echo 3 > /proc/sys/vm/drop_caches; c0=$(cached)
mount -t erofs -o ro,dax /dev/pmem0 /mnt/region || { echo "error=mount failed"; exit 4; }
grep -q ' /mnt/region erofs [^ ]*dax' /proc/mounts && echo dax=1 || echo dax=0
n=0
while read -r src dst; do
    [ -e "$dst" ] && mount --bind -o ro "/mnt/region$src" "$dst" && n=$((n + 1))
done < /etc/libshare-binds
echo binds=$n
pids=""
for i in 1 2 3; do /usr/bin/tail -f /dev/null & pids="$pids $!"; done
/usr/bin/ls -l /lib/x86_64-linux-gnu > /dev/null
printf 'b\na\n' | /usr/bin/sort > /dev/null
/usr/bin/sha256sum /etc/libshare-binds > /dev/null
sleep 1
dev=$(cat /sys/block/pmem0/dev)
hexdev=$(printf '%02x:%02x' "${dev%:*}" "${dev#*:}")
region=0; disk=0
for p in $pids; do
    while read -r addr perms off mdev ino path; do
        case "$path" in
            *.so*) if [ "$mdev" = "$hexdev" ]; then region=$((region + 1));
                   else disk=$((disk + 1)); echo "disk_map=$path"; fi ;;
        esac
    done < /proc/$p/maps
done
echo maps_region=$region
echo maps_disk=$disk
echo cached_growth_kb=$(( $(cached) - c0 ))
ready demo
park
"""


@dataclass
class GuestReport:
    """What one demo guest reported and what its QEMU maps of the region."""

    name: str
    dax: bool
    binds: int
    maps_region: int
    maps_disk: int
    cached_growth_kb: int
    region_mapping: dict[str, int] = field(default_factory=dict)
    survey: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return dict(self.__dict__)


def _kv(text: str) -> dict[str, str]:
    """Return ``key=value`` lines of guest output as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines()
                if re.match(r"^[a-z_]+=", line))


def _ensure_traversable(path: Path) -> None:
    """Make ``path`` and its parents up to / traversable by QEMU's user (o+x)."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o005)


def _survey_summary(seen: DomainSurvey) -> dict[str, Any]:
    """Return the demo's figures of a guest survey: tasks, library mappings and those
    the region serves."""
    return {"tasks": seen.tasks, "library_mappings": seen.library_mappings(),
            "region_mappings": seen.region_mappings()}


def _host_figures(mappings: list[dict[str, int]], page_cache_kb: int) -> dict[str, int]:
    """Return the host figures of the demo from each guest QEMU's region mapping (smaps
    fields in kB) and the region's page cache."""
    rss = sum(m.get("Rss", 0) for m in mappings)
    pss = sum(m.get("Pss", 0) for m in mappings)
    return {
        "region_page_cache_kb": page_cache_kb,
        "region_rss_sum_kb": rss,
        "region_pss_sum_kb": pss,
        # copies are the mappings' anonymous pages; Private_Dirty also counts dirty page
        # cache of the freshly built image (see libshare.sharing.accounting)
        "region_copied_kb": sum(accounting.copied_kb(m) for m in mappings),
        "region_private_dirty_kb": sum(m.get("Private_Dirty", 0) for m in mappings),
        # every guest its own copy of the pages it maps, against the distinct pages
        # actually mapped (the sum of Pss over all mappers counts each page once)
        "without_sharing_kb": rss,
        "with_sharing_kb": pss,
    }


def build_tiny_region(cfg: Config, say: Callable[[str], None]) -> tuple[build.BuildResult,
                                                                        list[tuple[str, str]]]:
    """Import the demo programs' libraries and build the ``demo`` region; return the build
    result and the (path in region, guest path) pairs to bind in the guests."""
    libs: dict[str, Path] = {}
    for prog in PROGRAMS:
        for lib in shared_libraries(prog):
            libs[str(lib)] = lib
    if not libs:
        raise LibshareError("found no shared libraries for the demo programs (ldd)")
    tree = cfg.state_dir / "demo-tree"
    shutil.rmtree(tree, ignore_errors=True)
    for guest_path, host in libs.items():
        dest = tree / guest_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host.resolve(), dest)
    say(f"importing {len(libs)} libraries into the store")
    import_tree(cfg.store_dir, [tree])
    shas = [sha256_file(tree / g.lstrip("/")) for g in libs]
    shutil.rmtree(tree, ignore_errors=True)
    say("building the demo region")
    built = build.build_region(cfg, GROUP, shas)
    by_sha = {}
    index = load_index(cfg.store_dir)
    for sha in shas:
        by_sha[sha] = layout.fs_path(index.entries[sha])
    binds = [(by_sha[sha], guest) for sha, guest in zip(shas, libs, strict=True)]
    return built, binds


def run_tiny_demo(cfg: Config, uri: str, guests: int = 2,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the tiny demo (busybox guests whose own script binds the region's files);
    return its report (guests, host figures, region) as a dict."""
    if os.geteuid() != 0:
        raise LibshareError("the demo needs root (system libvirtd, QEMU, region files)")
    if guests < 1 or guests > 8:
        raise LibshareError("--guests must be between 1 and 8")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    built, binds = build_tiny_region(cfg, say)
    for d in (cfg.regions_dir, cfg.regions_dir / "images", cfg.regions_dir / "groups"):
        d.chmod(0o755)
    _ensure_traversable(cfg.regions_dir / "images")
    spec = enrol.resolve_region(cfg, GROUP, "nvdimm")
    bind_text = "".join(f"{src} {dst}\n" for src, dst in binds)
    names = [f"{PREFIX}{i + 1}" for i in range(guests)]
    reports: list[GuestReport] = []
    with api.connect(uri) as conn, contextlib.ExitStack() as stack:
        running: list[RunningGuest] = []
        for name in names:
            defined = stack.enter_context(defined_guest(conn, name, GUEST_SCRIPT, GuestOptions(
                binaries=PROGRAMS, files={"/etc/libshare-binds": bind_text})))
            outcome = enrol.enable_domain(conn, name, spec)
            say(f"{name}: {outcome.message}")
            t0 = time.monotonic()
            running.append(defined.start())
            say(f"{name}: started ({time.monotonic() - t0:.1f} s)")
        outputs = []
        for guest in running:
            guest.wait_ready(timeout=300)
            outputs.append(_kv(guest.result().output))
            say(f"{guest.name}: ready")
        # read the QEMUs' mappings only once every guest has mapped its libraries
        for guest, out in zip(running, outputs, strict=True):
            seen = survey_domain(conn, guest.name, pause=True,
                                 cache_dir=cfg.state_dir / "introspect")
            pid = guest.qemu_pid()
            reports.append(GuestReport(
                name=guest.name, dax=out.get("dax") == "1",
                binds=int(out.get("binds", 0)),
                maps_region=int(out.get("maps_region", 0)),
                maps_disk=int(out.get("maps_disk", 0)),
                cached_growth_kb=int(out.get("cached_growth_kb", 0)),
                region_mapping=accounting.region_usage(pid, spec.path) if pid else {},
                survey=_survey_summary(seen)))
        page_cache_kb = accounting.page_cache_bytes(spec.path) // 1024
        say("removing the demo guests")
    return {
        "region": {"path": built.path, "digest": built.digest, "size": built.size,
                   "files": built.files},
        "guests": [r.as_dict() for r in reports],
        "host": _host_figures([r.region_mapping for r in reports], page_cache_kb),
    }


# ------------------------------------------------------------------ the Debian demo

#: seconds one Debian guest may take to boot under TCG (two boot at once on 2 cores)
BOOT_TIMEOUT = 600.0


class _Clock:
    """Progress lines with the seconds elapsed since the demo started."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        """Return the seconds since the demo started."""
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        self.say(f"[{self.elapsed():5.0f} s] {msg}")


def import_image(cfg: Config, image: DebianImage, say: Callable[[str], None]) -> list[str]:
    """Import the Debian image's whole root (read on the host through
    :func:`~libshare.demo.debian.image.image_root`, read-only) into the store; return its
    tree (``trees_wanted`` of :func:`~libshare.sharing.region.build.build_region`)."""
    with image_root(image, workdir=cfg.state_dir) as root:
        imported = import_tree(cfg.store_dir, [root])
    say(f"imported the image into the store ({imported.files_seen} files, "
        f"{len(imported.added)} new objects)")
    return imported.trees


def build_image_region(cfg: Config, image: DebianImage, say: Callable[[str], None],
                       policy: str = DEMO_POLICY) -> build.BuildResult:
    """Import the Debian image (:func:`import_image`) and build the ``demo`` group's
    region from its tree with ``policy``; return the build result."""
    return build.build_region(cfg, GROUP, policy=policy,
                              trees_wanted=import_image(cfg, image, say))


#: run inside a guest: the region's device (if mounted), the binds on it (mountinfo:
#: mounts of the pmem device but the region's own), the page cache of the root
#: filesystem's own copies (fincore through a non-recursive bind of /, which sees under
#: the binds: all of them, those under /usr, the largest), every mapping of a /usr file
#: with its device, and the boot-time apply's log line
GUEST_VIEW = r"""
rdev=$(findmnt -n -o MAJ:MIN /run/libshare/region 2>/dev/null | tr -d ' ')
echo "region_dev=$rdev"
awk '/ - (erofs|ext4) \/dev\/pmem/ && $5 != "/run/libshare/region" {n++}
     END {print "binds=" n+0}' /proc/self/mountinfo
mkdir -p /mnt/lsroot
mount --bind / /mnt/lsroot
(cd /mnt/lsroot && find . -xdev -type f -print0 | xargs -0 fincore -b -n -o RES,FILE \
    2>/dev/null) | sort -rn > /tmp/lsview
umount /mnt/lsroot
awk '{s += $1} END {print "cache=" s+0}' /tmp/lsview
awk '$2 ~ /^\.\/usr\// {s += $1} END {print "usr_cache=" s+0}' /tmp/lsview
head -5 /tmp/lsview | sed 's/^/top=/'
rm -f /tmp/lsview
for m in /proc/[0-9]*/maps; do
    pid=${m#/proc/}; pid=${pid%/maps}
    awk -v pid="$pid" '$6 ~ "^/usr/" {print "map=" pid " " $4 " " $6}' "$m" 2>/dev/null
done
dmesg | grep 'libshare-redirect: bound' | tail -1 | sed 's/^/kmsg=/'
exit 0
"""


def _majmin(text: str) -> str:
    """Return a decimal ``MAJ:MIN`` as /proc/PID/maps prints it (hex)."""
    major, minor = (int(x) for x in text.strip().split(":"))
    return f"{major:02x}:{minor:02x}"


def guest_view(g: DebianGuest) -> dict[str, Any]:
    """Return what guest ``g`` itself says (read inside it through the agent): the
    region's device (as maps print it, None without a region mounted), its binds, every
    process's mappings of /usr files on the pmem device versus elsewhere (the first 20
    of those), the page cache its disk copies hold (``cache_kb``: every file of its
    root filesystem; ``usr_cache_kb``: those under /usr, what the region can serve;
    ``top_cached``: the largest) and how long the boot-time binds took (``bind_seconds``,
    from the kernel log; None if not bound at boot)."""
    kv: dict[str, list[str]] = {}
    for line in g.sh(GUEST_VIEW, timeout=600).splitlines():
        key, _, value = line.partition("=")
        kv.setdefault(key, []).append(value)
    region = kv.get("region_dev", [""])[0]
    rdev = _majmin(region) if region else None
    maps = [m.split(" ", 2) for m in kv.get("map", []) if m.count(" ") >= 2]
    other = [f"{pid} {path}" for pid, dev, path in maps if dev != rdev]
    seconds = re.search(r" in ([0-9.]+) s", kv.get("kmsg", [""])[0])
    return {"region_device": rdev, "binds": int(kv.get("binds", ["0"])[0]),
            "maps_region": len(maps) - len(other), "maps_disk": len(other),
            "disk_maps": other[:20], "cache_kb": int(kv.get("cache", ["0"])[0]) // 1024,
            "usr_cache_kb": int(kv.get("usr_cache", ["0"])[0]) // 1024,
            "top_cached": kv.get("top", []),
            "bind_seconds": float(seconds.group(1)) if seconds else None}


def wait_idle(g: DebianGuest, seconds: float = 60.0) -> None:
    """Wait until guest ``g`` has been up ``seconds`` (the idle baseline's moment)."""
    up = float(g.sh("cut -d' ' -f1 /proc/uptime"))
    if up < seconds:
        time.sleep(seconds - up)


def parallel(fn: Callable[[DebianGuest], Any], guests: list[DebianGuest]) -> list[Any]:
    """Run ``fn`` on every guest at once (one thread each); return the results in order,
    raising the first error."""
    pool = ThreadPoolExecutor(max_workers=len(guests))
    try:
        results = list(pool.map(fn, guests))
    except BaseException:
        # do not wait for the other guests' long waits (minutes under TCG): the caller's
        # cleanup removes the guests, which ends those waits with an error
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def run_debian_demo(cfg: Config, uri: str, guests: int = 2, mode: str = "boot",
                    say: Callable[[str], None] = print,
                    policy: str = DEMO_POLICY) -> dict[str, Any]:
    """Run the demo with full Debian 12 guests and the product's redirect; return its
    report (``region``, ``guests``, ``host``, ``seconds``) as a dict. Each guest's
    report holds what it says before libshare (``before``: its page cache after its
    first boot, 60 s idle) and after (``after``, the same 60 s after the redirected
    boot; plus mappings and binds).

    ``mode`` "boot": ``actions.install`` then a restart (boot-time mode: the initramfs
    binds the region's copies before ``switch_root``); "runtime": ``actions.install``
    without initramfs, then ``actions.redirect`` (binds now, services restarted).
    ``policy``: what the region holds (:mod:`libshare.sharing.region.policy`; ``usr``:
    every file of the image's /usr)."""
    if os.geteuid() != 0:
        raise LibshareError("the demo needs root (system libvirtd, QEMU, loop devices)")
    if guests < 1 or guests > 4:
        raise LibshareError("--guests must be between 1 and 4 for Debian guests")
    if mode not in ("boot", "runtime"):
        raise LibshareError(f"unknown redirect mode {mode!r} (boot or runtime)")
    clock = _Clock(say)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    clock("Debian 12 guest image (built once, then cached; ~75 s to build)")
    image = debian_image()
    clock(f"image {image.path}")
    built = build_image_region(cfg, image, clock, policy)
    clock(f"region {built.path}: {built.files} files ({policy} policy), "
          f"{built.size >> 20} MiB")
    for d in (cfg.state_dir, cfg.regions_dir, cfg.regions_dir / "images",
              cfg.regions_dir / "groups"):
        d.chmod(0o755)
    _ensure_traversable(cfg.regions_dir / "images")
    spec = enrol.resolve_region(cfg, GROUP, "nvdimm")
    names = [f"{PREFIX}{i + 1}" for i in range(guests)]
    opts = DebianGuestOptions(image=image, boot_timeout=BOOT_TIMEOUT)
    timings: dict[str, float] = {}
    with api.connect(uri) as conn, contextlib.ExitStack() as stack:
        defined = []
        for name in names:
            defined.append(stack.enter_context(defined_debian_guest(conn, name, opts)))
            outcome = enrol.enable_domain(conn, name, spec)
            clock(f"{name}: {outcome.message}")
        running = [d.start(wait=False) for d in defined]
        clock("booting " + ", ".join(names) + " (TCG)")
        for g in running:
            boot = g.wait_booted()
            clock(f"{g.name}: booted in {boot.seconds:.0f} s")
        timings["boot"] = clock.elapsed()

        def before(g: DebianGuest) -> dict[str, Any]:
            wait_idle(g)
            return guest_view(g)

        befores = parallel(before, running)
        clock("read the guests' page cache before libshare (fincore, 60 s idle)")

        def setup(g: DebianGuest) -> str:
            rep = actions.install(g.domain, update_initramfs=mode == "boot")
            if rep.initramfs.startswith("failed"):
                raise LibshareError(f"{g.name}: initramfs {rep.initramfs}")
            clock(f"{g.name}: guest install done in {rep.seconds:.0f} s "
                  f"({rep.identical} libraries identical to the region's, initramfs "
                  f"{rep.initramfs})")
            if mode == "boot":
                # a power cycle, not a warm reboot: see DebianGuest.restart
                b = g.restart()
                clock(f"{g.name}: restarted (power cycle) in {b.seconds:.0f} s")
                return "boot-time"
            red = actions.redirect(g.domain)
            clock(f"{g.name}: redirected {red.binds_total} files in {red.seconds:.0f} s")
            return "runtime"

        clock(f"installing libshare in the guests ({mode} mode)")
        modes = parallel(setup, running)
        timings["redirect"] = clock.elapsed()
        def after(g: DebianGuest) -> dict[str, Any]:
            if mode == "boot":
                wait_idle(g)
            return guest_view(g)

        views = parallel(after, running)
        clock("read the guests' own view (maps, fincore)")
        reports = []
        for g, view, m, pre in zip(running, views, modes, befores, strict=True):
            seen = survey_domain(conn, g.name, pause=True,
                                 cache_dir=cfg.state_dir / "introspect")
            pid = g.qemu_pid()
            usage = accounting.region_usage(pid, spec.path) if pid else {}
            reports.append({
                "name": g.name, "mode": m, **view,
                "before": {k: pre[k] for k in ("cache_kb", "usr_cache_kb", "top_cached")},
                # pages of the region this guest touched (host view, as QEMU maps them):
                # without the region it would hold them in its own page cache
                "guest_cache_saved_kb": usage.get("Rss", 0),
                "region_mapping": usage,
                "survey": _survey_summary(seen)})
        clock("surveyed the guests from the host (introspection, smaps)")
        page_cache_kb = accounting.page_cache_bytes(spec.path) // 1024
        clock("removing the demo guests")
    clock("done")
    timings["total"] = clock.elapsed()
    return {
        "region": {"path": built.path, "digest": built.digest, "size": built.size,
                   "files": built.files, "image": str(image.path), "policy": policy,
                   "directories_offered": sum(len(t["offered"]) for t in built.trees)},
        "idle_baseline_kb": IDLE_BASELINE_KB,
        "guests": reports,
        "host": _host_figures([r["region_mapping"] for r in reports], page_cache_kb),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def run_demo(cfg: Config, uri: str, guests: int = 2, say: Callable[[str], None] = print,
             tiny: bool = False, mode: str = "boot",
             policy: str = DEMO_POLICY) -> dict[str, Any]:
    """Run the demo (Debian guests, or the tiny busybox one with ``tiny``); return its
    report as a dict (``kind`` says which)."""
    if tiny:
        return {"kind": "tiny", **run_tiny_demo(cfg, uri, guests, say)}
    return {"kind": "debian", **run_debian_demo(cfg, uri, guests, mode, say, policy)}
