"""The built-in demo (``libshare demo``): tiny guests share one library region.

It runs the product path end to end on this host: import the libraries of a few
dynamically linked programs into the store, build the ``demo`` group's region, define
small TCG guests (Debian kernel + busybox, from ``libshare.guests``), enrol them through
the libvirt API (the hook checks the region at start), boot them, and in each guest mount
the region with DAX and bind its libraries over the guest's own before starting the
programs. It then reports what each guest saw (library mappings served by the region
device, page cache growth), what the host sees in each guest's memory without asking it
(``libshare survey``: library mappings and how many the region serves), and what the
host holds (each QEMU's region mapping, the region's page cache counted once). Guests are named ``lsdemo-N`` and are always removed
at the end, on failure too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare import enrol, virt
from libshare.config import Config
from libshare.digest import sha256_file
from libshare.errors import LibshareError
from libshare.guests import GuestOptions, RunningGuest, defined_guest
from libshare.guests.initramfs import shared_libraries
from libshare.introspect.survey import survey_domain
from libshare.sharing import accounting, region
from libshare.sharing.store import import_tree, load_index

GROUP = "demo"
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


def build_demo_region(cfg: Config, say: Callable[[str], None]) -> tuple[region.BuildResult,
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
    built = region.build_region(cfg, GROUP, shas)
    by_sha = {}
    index = load_index(cfg.store_dir)
    for sha in shas:
        by_sha[sha] = region.fs_path(index.entries[sha])
    binds = [(by_sha[sha], guest) for sha, guest in zip(shas, libs, strict=True)]
    return built, binds


def run_demo(cfg: Config, uri: str, guests: int = 2,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; return its report (guests, host figures, region) as a dict."""
    if os.geteuid() != 0:
        raise LibshareError("the demo needs root (system libvirtd, QEMU, region files)")
    if guests < 1 or guests > 8:
        raise LibshareError("--guests must be between 1 and 8")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    built, binds = build_demo_region(cfg, say)
    for d in (cfg.regions_dir, cfg.regions_dir / "images", cfg.regions_dir / "groups"):
        d.chmod(0o755)
    _ensure_traversable(cfg.regions_dir / "images")
    spec = enrol.resolve_region(cfg, GROUP, "nvdimm")
    bind_text = "".join(f"{src} {dst}\n" for src, dst in binds)
    names = [f"{PREFIX}{i + 1}" for i in range(guests)]
    reports: list[GuestReport] = []
    with virt.connect(uri) as conn, contextlib.ExitStack() as stack:
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
                survey={"tasks": seen.tasks,
                        "library_mappings": sum(lib.mappings for lib in seen.libraries),
                        "region_mappings": seen.region_mappings()}))
        page_cache_kb = accounting.page_cache_bytes(spec.path) // 1024
        say("removing the demo guests")
    rss = [r.region_mapping.get("Rss", 0) for r in reports]
    return {
        "region": {"path": built.path, "digest": built.digest, "size": built.size,
                   "files": built.files},
        "guests": [r.as_dict() for r in reports],
        "host": {
            "region_page_cache_kb": page_cache_kb,
            "region_rss_sum_kb": sum(rss),
            "region_pss_sum_kb": sum(r.region_mapping.get("Pss", 0) for r in reports),
            "region_private_dirty_kb": sum(r.region_mapping.get("Private_Dirty", 0)
                                           for r in reports),
            # every guest's mapped region pages as private copies, against the distinct
            # pages actually mapped (the sum of Pss over all mappers counts each once)
            "without_sharing_kb": sum(rss),
            "with_sharing_kb": sum(r.region_mapping.get("Pss", 0) for r in reports),
        },
    }
