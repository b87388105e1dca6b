"""The ``usr`` region in real Debian 12 TCG guests, boot-time mode: the guests' whole
/usr served from the region in a few directory binds, verified inside each guest (its
own fincore, /proc/*/maps, mountinfo, kernel log) and from the host (smaps).

One store is filled from the cached Debian image's whole root (read on the host from a
raw copy through a read-only loop device); two regions are built from it: the ``usr``
policy's, built from the image's whole tree with directory binds. One guest (CI time: the demo's
test proves the identical guests, at most 64 binds, every /usr mapping on the pmem
device): before libshare, the host's forecast of what the usr region would serve of its
page cache (``survey --page-cache --forecast``) is checked against its own fincore, and
an ``observed`` region is built from that page cache.
Then its /usr/bin/bash is made to differ by one byte, it gets ``libshare guest
install`` and a restart (the initramfs binds before PID 1 starts). 60 s after boot: the
disk copies of /usr hold at most 5% of the idle baseline of 35.6 MB in its page cache
(at least 95% of it is the region's), /usr/lib is bound whole, every mapping of a /usr
file is on the pmem device but its own bash, every other file of /usr/bin is the
region's; a package upgrade under the directory binds (dpkg -i of a rebuilt ``hostname`` package)
succeeds and its new file is the one used, and its own page cache holds at most half
of what it held before libshare. How the usr region compares with the library region
in boot time and page cache is measured by hand (bench), not in CI.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libshare.config import Config
from libshare.demo import story
from libshare.demo.debian.guest import DebianGuest, DebianGuestOptions
from libshare.demo.debian.image import DebianImage, image_root
from libshare.redirect import actions
from libshare.sharing.accounting import region_usage
from libshare.sharing.region import build
from libshare.sharing.store import import_tree
from libshare.virt import enrol
from tests.integration.test_redirect import flip_last_byte, libshare, start_enrolled
from tests.support.paths import open_to_qemu, state_base

pytestmark = pytest.mark.integration

USR = "lstest-usr"
BASELINE_KB = story.IDLE_BASELINE_KB


@dataclass
class Regions:
    """The usr region built from the image's tree, and what the test needs with it."""

    cfg: Config
    image: DebianImage
    usr: build.BuildResult
    debs: Path


@pytest.fixture(scope="module")
def regions(debian_guest_image: DebianImage) -> Iterator[Regions]:
    image = debian_guest_image
    with state_base("usr-") as base:
        cfg = Config(state_dir=base / "state")
        t0 = time.monotonic()
        with image_root(image, workdir=base) as root:
            tree = import_tree(cfg.store_dir, [root]).trees[0]
        t1 = time.monotonic()
        usr = build.build_region(cfg, USR, policy="usr", trees_wanted=[tree])
        t2 = time.monotonic()
        print(f"import {t1 - t0:.0f} s; usr region {usr.files} files, {usr.size >> 20} MiB, "
              f"{len(usr.trees[0]['offered'])} directories offered, built in "
              f"{t2 - t1:.0f} s")
        open_to_qemu(base, cfg)
        yield Regions(cfg, image, usr, image.directory.parent.parent / "debs")


# ------------------------------------------------------------------ guest ground truth

def view(g: DebianGuest) -> dict[str, Any]:
    """Return the demo's view of guest ``g`` (:func:`libshare.demo.story.guest_view`),
    taken 60 s after its boot (the idle baseline's moment)."""
    story.wait_idle(g)
    return story.guest_view(g)


def line(name: str, v: dict[str, Any]) -> str:
    """Return one report line of a guest's view."""
    return (f"{name}: {v['binds']} binds, disk copies cache {v['cache_kb']} kB, of /usr "
            f"{v['usr_cache_kb']} kB ({100 * v['usr_cache_kb'] / BASELINE_KB:.1f}% of the "
            f"baseline), /usr mappings {v['maps_region']} on the region, {v['maps_disk']} "
            f"elsewhere; boot-time binds {v['bind_seconds']} s; largest: {v['top_cached'][:4]}")


def upgraded_hostname_deb(debs: Path, dest: Path) -> tuple[Path, bytes]:
    """Return a ``hostname`` package one version above the image's, whose /bin/hostname
    has bytes of its own (the image's plus a tail), and those bytes."""
    deb = next(debs.glob("hostname_*.deb"))
    tree = dest / "hostname"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    binary = tree / "bin/hostname"
    data = binary.read_bytes() + b"\0libshare-upgrade\0"
    binary.write_bytes(data)
    control = tree / "DEBIAN/control"
    text = re.sub(r"^Version: (.*)$", r"Version: \1+libshare1", control.read_text(),
                  flags=re.M)
    control.write_text(text)
    md5 = tree / "DEBIAN/md5sums"
    if md5.exists():
        md5.unlink()
    out = dest / "hostname_upgraded.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)],
                   check=True, capture_output=True)
    return out, data


# ------------------------------------------------------------------ the test

def test_usr_region_serves_the_page_cache(libvirt_conn: Any, domain_name: Callable[[], str],
                                          regions: Regions, tmp_path: Path) -> None:
    reg = regions
    spec = enrol.resolve_region(reg.cfg, USR, "nvdimm")
    opts = DebianGuestOptions(image=reg.image, boot_timeout=600)
    name = domain_name()
    with contextlib.ExitStack() as stack:
        (g,) = start_enrolled(stack, libvirt_conn, opts, {name: spec})
        g.wait_booted()

        # ---- before libshare: what it caches, and what the host forecasts of it
        before = view(g)
        state = str(reg.cfg.state_dir)
        proc = libshare("--state-dir", state, "survey", "--page-cache", "--forecast", USR,
                        name, "--json")
        assert proc.returncode in (0, 1) and proc.stdout, proc.stderr   # 1: partial walk
        rows = {r["policy"]: r for r in json.loads(proc.stdout)["forecast"]["policies"]}
        stop_kb = rows["usr"]["guests"][0]["stop_caching"] // 1024
        print(f"before: {before['cache_kb']} kB cached ({before['usr_cache_kb']} kB of "
              f"/usr, fincore); forecast: usr would serve {stop_kb} kB, libraries "
              f"{rows['libraries']['guests'][0]['stop_caching'] // 1024} kB, elf "
              f"{rows['elf']['guests'][0]['stop_caching'] // 1024} kB")
        assert abs(stop_kb - before["usr_cache_kb"]) <= max(0.1 * before["usr_cache_kb"], 512)
        # the observed policy: what it holds in its page cache (before libshare: a DAX
        # mount's files are the host's pages, never observed)
        proc = libshare("--state-dir", state, "region", "build", "--group", USR, "--policy",
                        "observed", "--json")
        assert proc.returncode == 0, proc.stderr
        obs = json.loads(proc.stdout)
        print(f"observed region: {obs['files']} files, {obs['data_size'] >> 10} kB")
        assert 100 < obs["files"] < reg.usr.files and obs["policy"] == "observed"

        # ---- its own bash, libshare installed, restarted: the initramfs binds
        flip_last_byte(g, "/usr/bin/bash")
        g.sh("chmod 755 /usr/bin/bash")
        odd_bash = g.sh("sha256sum /usr/bin/bash").split()[0]
        rep = actions.install(g.domain)
        assert rep.initramfs == "updated", rep
        boot = g.restart(timeout=900)
        print(f"install {rep.seconds:.0f} s ({rep.identical} files identical), restart "
              f"{boot.seconds:.0f} s")
        vu = view(g)
        print(line("usr region, own bash", vu))
        assert 0 < vu["binds"] == int(g.sh("wc -l < /run/libshare/binds"))
        assert vu["usr_cache_kb"] <= 0.05 * BASELINE_KB, vu["top_cached"]
        assert vu["maps_region"] > 100
        assert g.sh("findmnt -n -o TARGET /usr/lib").strip() == "/usr/lib"      # whole
        # its own bash, on its disk, and nothing else of /usr from it
        assert g.sh("sha256sum /usr/bin/bash").split()[0] == odd_bash
        assert g.sh("findmnt -n /usr/bin/bash || true").strip() == ""  # not bound
        out = g.sh("bash -c 'cat /proc/$$/maps; true' | awk '$6 ~ \"^/usr/\" {print $4, $6}'")
        own = [ln for ln in out.splitlines() if not ln.startswith(vu["region_device"])]
        assert own and all(ln.endswith("/usr/bin/bash") for ln in own), out
        assert all(m.endswith("/usr/bin/bash") for m in vu["disk_maps"]), vu["disk_maps"]
        devs = g.sh("find /usr/bin -maxdepth 1 -type f ! -name bash -printf '%D\\n' | sort -u")
        assert devs.split() == [g.sh("stat -c %d /run/libshare/region").strip()], devs
        # host: QEMU maps the region's page cache, never a copy-on-write copy of it (one
        # QEMU here: Private_Clean; the demo's test sees two share it, Shared_Clean)
        pid = g.qemu_pid()
        assert pid
        fields = region_usage(pid, spec.path)
        assert fields["Rss"] > 0 and fields["Anonymous"] == 0, fields
        assert fields.get("Private_Dirty", 0) == 0, fields

        # ---- a package upgrade under directory binds (/usr/share, /usr/lib)
        assert g.sh("findmnt -n -o TARGET /usr/share").strip() == "/usr/share"
        deb, new_bytes = upgraded_hostname_deb(reg.debs, tmp_path)
        g.agent.write_file(f"/root/{deb.name}", deb.read_bytes())
        res = g.exec(["dpkg", "-i", f"/root/{deb.name}"], timeout=600)
        print("dpkg -i:", res.rc, res.err[-300:])
        assert res.rc == 0, res.err
        assert g.agent.read_file("/usr/bin/hostname") == new_bytes
        assert g.sh("hostname").strip() == "lsguest"
        after = g.sh("findmnt -rn -o TARGET | grep -c '^/usr' || true").strip()
        print(f"after the upgrade: {after} binds under /usr; dpkg says "
              + g.sh("dpkg-query -W hostname").strip())
        assert g.sh("findmnt -n -o TARGET /usr/lib || true").strip() == "/usr/lib"
        assert g.sh("findmnt -n -o TARGET /usr/bin/ls || true").strip() == "/usr/bin/ls"
        assert g.sh("findmnt -n /usr/bin/hostname || true").strip() == ""

        # ---- what it caches of its own now, against before libshare
        print(f"file page cache in its own RAM: {before['cache_kb']} kB before libshare, "
              f"{vu['cache_kb']} kB with the usr region")
        assert 2 * vu["cache_kb"] <= before["cache_kb"], (before, vu)
