"""Benchmark: the host memory of N identical Debian 12 guests, side by side, without
sharing, with KSM, with libshare, with both, and on hugepages.

Every arm boots N guests (512 MiB, 1 vCPU; TCG, ``--kvm`` for KVM) from a cold start:
new QEMU processes on fresh qcow2 overlays of one prepared disk, so the image and the
workload are the same in every arm. Arms:

- ``none``: no region, KSM off;
- ``ksm``: KSM on with its default knobs (pages_to_scan 100, sleep_millisecs 20);
  ``ksm-fast``: pages_to_scan 5000;
- ``libshare``: enrolled into the bench's region (the libraries of the image), the
  boot-time redirect already installed in the disk, KSM off; ``libshare+ksm``: with KSM's
  default knobs;
- ``hp-none``, ``hp-ksm``, ``hp-libshare``: the same on hugepages (2 MiB pages reserved
  for the arm and given back after it).

Workloads: ``idle`` (booted to multi-user; nginx and the app installed but not started)
and ``service``: each guest runs nginx (Debian's package) serving a static site and
proxying ``/app/`` to a python3 HTTP application (stdlib ``http.server`` with sqlite3,
Debian's python3), started through the guest agent once the guest has booted; a load
generator on the host fetches ``/`` and ``/app/`` from every guest once a second for the
rest of the run. The guests (all with free page reporting on their balloon, as enrolment sets it) have no
network but one virtio-net NIC on QEMU's user-mode
stack (``-netdev user,restrict=on,hostfwd=tcp:127.0.0.1:PORT-:80``, through
``<qemu:commandline>``): the host reaches each guest's port 80 on a loopback port and the
guest reaches nothing.

The disk is prepared once, before anything is timed, and cached: a guest of the Debian
image (with nginx and python3) enrolled into the region gets the workload files, a
static network configuration and ``libshare guest install`` (the redirect script and its
initramfs hook), is powered off, and its overlay becomes the backing file of every
guest's overlay (``libshare image prepare`` does not exist yet). Guests without a region
run the same initramfs hook, which waits 10 s for a region device and boots without.

Samples every 10 s from the start of the guests until ``--duration`` seconds: the host
memory attributable to the guests, Σ guest-RAM mapping + Σ region mapping Pss, taken per
mapping from each QEMU's smaps (never process totals: TCG's translation buffer dominates
those). For guest RAM the bench counts Pss (plus hugetlbfs pages, which smaps leaves out
of Rss and Pss): without KSM it is the mapping's Rss; a page KSM merged stays in every
mapper's Rss, and Pss divides it among them. Also KSM's pages_shared/pages_sharing,
ksmd's CPU seconds (its /proc stat), each guest's Cached and MemAvailable (its agent)
and, every third sample, the file pages each guest has served from the region versus held
in its own page cache (introspection of guest memory, as ``libshare report
--page-cache``; not on hugepages, where reading guest RAM through /proc/PID/mem
allocates every huge page it reads). KSM is host-global: the knobs are restored after each arm (on errors and
Ctrl-C too; KSM off again means ``run`` 2 first, which unmerges), and while a KSM arm runs
other guests on the host are merged too (their number is recorded).

Reports per arm, workload and N: memory after boot (first sample once every guest
booted) and at the end, the saving against ``none``, the time to 90% of the final
saving, ksmd CPU seconds, the saving per added guest (slope between the smallest and
largest N measured), and with hugepages the guest page cache the guests no longer need
(``hp-none``'s Cached less the arm's: what a user can take off each guest's size). Writes
``density.json``, ``density.md`` and ``memory.png``/``saving.png`` (matplotlib, the
``bench`` extra) to ``--out``; prints the command that reproduces it and the machine.

Full run (default): idle at N=1 and N=3 for none, ksm, libshare; idle at N=3 for
ksm-fast, libshare+ksm and the three hugepage arms; service at N=3 for none, ksm,
libshare, libshare+ksm; 300 s each: 15 runs, about 85 minutes on a 2-core host with the
disk prepared. ``--quick``: idle at N=2 for none, ksm-fast, libshare, 150 s each, about
10 minutes. ``--arms``, ``--workloads``, ``--n``, ``--duration`` choose by hand (every
named arm at every named workload and N).

``--policy`` chooses the region's files (default the demo's, ``usr``); ``observed``
builds it from what one guest of the prepared disk caches 60 s after a boot without
a region (introspection), the disk itself prepared against the ``usr`` region.

Needs root and a running system libvirtd. Usage (from the project root):
``.venv/bin/python -m bench.density [--quick] [--out DIR] [--kvm]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lxml import etree

from bench.common import ROOT, machine, print_header, reproduce_command
from libshare import domxml
from libshare.config import Config
from libshare.demo.story import DEMO_POLICY, GROUP
from libshare.domxml.memory import guest_ram_sizes
from libshare.errors import LibshareError
from libshare.sharing import accounting, ksm
from libshare.sharing.region.policy import POLICIES

#: inside the default state directory, which the hook trusts (config.trusted_state_dir)
WORK = Path("/var/lib/libshare/bench-density")
MEMORY_MIB = 512
HUGEPAGE_KB = 2048
SAMPLE_SECONDS = 10.0
SURVEY_EVERY = 3          # page-cache introspection every this many samples
BOOT_TIMEOUT = 900.0
PREPARE_VERSION = "1"     # bump when the prepared disk's recipe changes
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RAM_DIR = Path("/var/lib/libvirt/qemu/ram")   # libvirt's memory_backing_dir (qemu.conf)

ARMS: dict[str, dict[str, Any]] = {
    "none": {"region": False, "ksm": None, "hugepages": False},
    "ksm": {"region": False, "ksm": {"pages_to_scan": 100, "sleep_millisecs": 20},
            "hugepages": False},
    "ksm-fast": {"region": False, "ksm": {"pages_to_scan": 5000, "sleep_millisecs": 20},
                 "hugepages": False},
    "libshare": {"region": True, "ksm": None, "hugepages": False},
    "libshare+ksm": {"region": True, "ksm": {"pages_to_scan": 100, "sleep_millisecs": 20},
                     "hugepages": False},
    "hp-none": {"region": False, "ksm": None, "hugepages": True},
    "hp-ksm": {"region": False, "ksm": {"pages_to_scan": 100, "sleep_millisecs": 20},
               "hugepages": True},
    "hp-libshare": {"region": True, "ksm": None, "hugepages": True},
}
#: the arm each arm is compared with (same workload and N)
BASELINE = {a: ("hp-none" if ARMS[a]["hugepages"] else "none") for a in ARMS}

#: (arm, workload, N) of the full run and of --quick
FULL_PLAN = ([(a, "idle", n) for n in (1, 3) for a in ("none", "ksm", "libshare")]
             + [(a, "idle", 3) for a in ("ksm-fast", "libshare+ksm", "hp-none", "hp-ksm",
                                         "hp-libshare")]
             + [(a, "service", 3) for a in ("none", "ksm", "libshare", "libshare+ksm")])
QUICK_PLAN = [(a, "idle", 2) for a in ("none", "ksm-fast", "libshare")]

WORKLOAD_TEXT = {
    "idle": "booted to multi-user (nginx and the python3 app installed, not started)",
    "service": "nginx serving a static site and proxying /app/ to a python3 HTTP app "
               "(http.server + sqlite3), each guest fetched / and /app/ once a second by "
               "the host over a loopback port forwarded by QEMU's user-mode network",
}

# ------------------------------------------------------------------ the guest's workload

APP = r'''"""libshare bench: a small python3 HTTP application (stdlib only)."""
import hashlib, json, sqlite3, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

db = sqlite3.connect(":memory:", check_same_thread=False)
db.execute("create table hits (path text, at real)")
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            db.execute("insert into hits values (?, julianday('now'))", (self.path,))
            n = db.execute("select count(*) from hits").fetchone()[0]
        body = json.dumps({"path": self.path, "hits": n,
                           "sha256": hashlib.sha256(self.path.encode()).hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
'''

APP_UNIT = """[Unit]
Description=libshare bench: python3 HTTP application
After=network.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/ls-bench/app.py
Restart=on-failure
"""

NGINX_SITE = """server {
    listen 80 default_server;
    root /var/www/html;
    index index.html;
    location /app/ { proxy_pass http://127.0.0.1:8080; }
}
"""

NETWORK = """[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
"""


def site_files() -> dict[str, bytes]:
    """Return the static site: an index page and a few pages and assets (~300 KB)."""
    pages = {f"/var/www/html/page{i}.html":
             (f"<html><body><h1>page {i}</h1>" + "<p>libshare bench</p>" * 200
              + "</body></html>\n").encode() for i in range(8)}
    links = "".join(f'<a href="page{i}.html">page {i}</a> ' for i in range(8))
    pages["/var/www/html/index.html"] = (f"<html><body><h1>libshare bench</h1>{links}"
                                         "</body></html>\n").encode()
    pages["/var/www/html/asset.bin"] = hashlib.sha256(b"bench").digest() * 8192  # 256 KiB
    return pages


def workload_files() -> dict[str, bytes]:
    """Return every file the prepared disk gets for the workloads (path -> bytes)."""
    return {"/usr/local/lib/ls-bench/app.py": APP.encode(),
            "/etc/systemd/system/ls-bench-app.service": APP_UNIT.encode(),
            "/etc/nginx/sites-available/default": NGINX_SITE.encode(),
            "/etc/systemd/network/80-ls-bench.network": NETWORK.encode(),
            **site_files()}


# ------------------------------------------------------------------ host-side helpers

def say(msg: str) -> None:
    """Print a progress line with the time of day on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_nic(port: int, index: int) -> Callable[[etree._Element], None]:
    """Return a customizer adding a virtio-net NIC on QEMU's user-mode stack (restricted:
    the guest reaches nothing) that forwards 127.0.0.1:``port`` to the guest's port 80."""
    def apply(dom: etree._Element) -> None:
        cmd = etree.SubElement(dom, f"{{{QEMU_NS}}}commandline", nsmap={"qemu": QEMU_NS})
        for value in ("-netdev", f"user,id=lsbench0,restrict=on,"
                      f"hostfwd=tcp:127.0.0.1:{port}-:80",
                      "-device", "virtio-net-pci,netdev=lsbench0,bus=pci.0,addr=0x1e,"
                      f"mac=52:54:00:4c:53:{index:02x}"):
            etree.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=value)
    return apply


def free_page_reporting(dom: etree._Element) -> None:
    """Turn on free page reporting on the guest's virtio balloon, as enrolment does: the
    same hardware in every arm but the region device and its NUMA cell."""
    for balloon in dom.findall("devices/memballoon"):
        balloon.set("freePageReporting", "on")


def hugepage_backing(mode: str) -> Callable[[etree._Element], None]:
    """Return a customizer backing guest RAM by hugepages: ``<hugepages/>`` (mode
    "libvirt"), or, where this libvirtd started before any hugetlbfs was mounted (it then
    refuses ``<hugepages/>``), ``<source type='file'/>`` with a hugetlbfs mounted over
    libvirt's memory_backing_dir (mode "file"): the same memory-backend-file on hugetlbfs."""
    def apply(dom: etree._Element) -> None:
        mb = dom.find("memoryBacking")
        if mb is None:
            mb = etree.Element("memoryBacking")
            dom.find("vcpu").addprevious(mb)  # type: ignore[union-attr]
        if mode == "libvirt":
            etree.SubElement(mb, "hugepages")
        else:
            etree.SubElement(mb, "source", type="file")
    return apply


def meminfo_pages(key: str) -> int:
    """Return the host's /proc/meminfo value ``key`` (a page count or kB)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def hugepages_reserved(pages: int) -> Iterator[None]:
    """Add ``pages`` 2 MiB hugepages to the host's pool for the block; give them back
    afterwards, always. Raises LibshareError if the kernel cannot find them."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())
    try:
        knob.write_text(f"{before + pages}\n")
        if meminfo_pages("HugePages_Free") < pages:
            raise LibshareError(f"the kernel found only {meminfo_pages('HugePages_Free')} "
                                f"free hugepages of the {pages} asked for")
        yield
    finally:
        knob.write_text(f"{before}\n")


@contextlib.contextmanager
def hugetlbfs_on_ram_dir() -> Iterator[None]:
    """Mount a hugetlbfs (owned by libvirt-qemu) over libvirt's memory_backing_dir for the
    block, unmounted afterwards. Refuses if a guest's RAM file is there (the folders
    libvirt makes for other running guests are hidden meanwhile)."""
    import grp
    import pwd
    import subprocess

    # libvirt makes an (empty) folder there for every running domain; a file in one is
    # the RAM of a guest backed by files, which a mount must not hide
    if RAM_DIR.is_dir() and any(f.is_file() for f in RAM_DIR.rglob("*")):
        raise LibshareError(f"{RAM_DIR} holds guest RAM files: not mounting over it")
    RAM_DIR.mkdir(parents=True, exist_ok=True)
    uid, gid = pwd.getpwnam("libvirt-qemu").pw_uid, grp.getgrnam("libvirt-qemu").gr_gid
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"mode=0755,uid={uid},gid={gid}",
                    "ls-bench-hugetlbfs", str(RAM_DIR)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(RAM_DIR)], check=False)


def other_guests(conn: Any, mine: set[str]) -> int:
    """Return how many running domains on ``conn`` are not the bench's."""
    return sum(1 for d in conn.listAllDomains() if d.isActive() and d.name() not in mine)


def guest_sh(g: Any, script: str, timeout: float = 600.0, tries: int = 4) -> str:
    """Run ``script`` in guest ``g`` through its agent; return its stdout. The script
    must be idempotent: an agent that stops answering (a TCG guest on a busy host can
    miss libvirt's agent deadline) is waited for and the script run again."""
    from libshare.redirect.agent import AgentError, AgentTimeout

    for attempt in range(tries):
        try:
            return str(g.sh(script, timeout=timeout))
        except AgentTimeout:
            raise
        except AgentError as exc:
            if attempt == tries - 1:
                raise
            say(f"{g.name}: {exc}; waiting for its agent")
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    g.agent.ping()
                    break
                except AgentError:
                    time.sleep(5)
    return ""


# ------------------------------------------------------------------ preparation

@dataclasses.dataclass
class Setup:
    """What every arm shares: the bench's libshare configuration, the region spec, the
    prepared disk (a DebianImage whose path is the prepared overlay) and the region's
    guest paths."""

    cfg: Config
    spec: domxml.RegionSpec
    disk: Any
    guest_files: dict[str, int]
    region: dict[str, Any]
    #: seconds after its boot each guest compacts its memory (None: never; --compact)
    compact_after: float | None = None
    #: the free page reporting order each guest is set to once booted (None: the
    #: kernel's, pageblock_order 9 = 2 MiB; --report-order)
    report_order: int | None = None


def prepared_key(image: Any, digest: str) -> str:
    """Return the cache key of the prepared disk: image, region, guest files, workload."""
    from libshare.redirect.actions import GUEST_FILES, guest_file_bytes

    h = hashlib.sha256(f"{PREPARE_VERSION}\0{image.key}\0{digest}\0".encode())
    for f in GUEST_FILES:
        h.update(f"{f.path}\0{f.link}\0".encode())
        if f.source:
            h.update(guest_file_bytes(f.source))
    for path, data in sorted(workload_files().items()):
        h.update(path.encode() + b"\0" + data)
    return h.hexdigest()[:16]


def prepare_disk(conn: Any, image: Any, cfg: Config, spec: domxml.RegionSpec,
                 domain_type: str) -> Any:
    """Return the prepared disk (a DebianImage at the cached overlay), preparing it when
    it is not cached yet: a guest enrolled into the region gets the workload files, its
    network configuration and ``libshare guest install``; it is checked to serve HTTP
    through its forwarded port, then powered off."""
    from libshare.demo.cache import cache_subdir
    from libshare.demo.debian.guest import DebianGuestOptions, defined_debian_guest
    from libshare.redirect import actions
    from libshare.virt import enrol

    d = cache_subdir("density") / prepared_key(image, spec.digest or "")
    disk = d / "disk.qcow2"
    if (d / ".complete").exists():
        return dataclasses.replace(image, path=disk)
    d.mkdir(parents=True, exist_ok=True)
    name = f"lstest-p{os.getpid()}-dens-prep"
    port = free_port()
    say(f"preparing the disk in {name} (once; cached in {d})")
    opts = DebianGuestOptions(image=image, boot_timeout=BOOT_TIMEOUT, domain_type=domain_type,
                              customize=[user_nic(port, 0)], memory_mib=MEMORY_MIB)
    with defined_debian_guest(conn, name, opts) as defined:
        enrol.enable_domain(conn, name, spec)
        g = defined.start()
        files = workload_files()
        guest_sh(g, "mkdir -p " + " ".join(sorted({os.path.dirname(p) for p in files})))
        for path, data in files.items():
            g.agent.write_file(path, data, mode=0o644)
        # --no-reload: a daemon-reload takes minutes in a TCG guest on a busy host; the
        # new unit is loaded when first started
        guest_sh(g, "systemctl --no-reload disable nginx 2>/dev/null; "
                 "systemctl --no-reload enable systemd-networkd")
        guest_sh(g, "systemctl start systemd-networkd ls-bench-app; systemctl restart nginx")
        body = fetch(port, "/app/check", timeout=30.0, tries=30)
        if b"hits" not in body:
            raise LibshareError(f"the prepared guest does not serve its app: {body[:200]!r}")
        say("the prepared guest serves / and /app/ through its forwarded port")
        guest_sh(g, "systemctl stop nginx ls-bench-app")
        rep = actions.install(g.domain, update_initramfs=True)
        if rep.initramfs.startswith("failed"):
            raise LibshareError(f"guest install: initramfs {rep.initramfs}")
        say(f"guest install: {rep.identical} libraries identical to the region's, "
            f"initramfs {rep.initramfs} ({rep.seconds:.0f} s)")
        guest_sh(g, "sync")
        g.agent.command("guest-exec", {"path": "/bin/systemctl", "arg": ["poweroff"]})
        deadline = time.monotonic() + 300
        while g.is_active():
            if time.monotonic() > deadline:
                raise LibshareError("the prepared guest did not power off")
            time.sleep(1)
        shutil.copyfile(g.overlay, disk)
    disk.chmod(0o644)
    (d / "info.json").write_text(json.dumps({"image": str(image.path), "region": spec.digest,
                                             "install": rep.as_dict()}, indent=1) + "\n")
    (d / ".complete").write_text("ok\n")
    return dataclasses.replace(image, path=disk)


def scout_page_cache(conn: Any, disk: Any, cfg: Config, domain_type: str) -> set[str]:
    """Boot one guest of the prepared ``disk`` without a region, idle 60 s after its
    boot (the idle baseline's moment), and return the guest paths of the files in its
    page cache (introspection, as ``region build --policy observed``)."""
    from libshare.demo.debian.guest import DebianGuestOptions, defined_debian_guest
    from libshare.demo.story import wait_idle
    from libshare.introspect.pagecache import survey_domain_page_cache
    from libshare.sharing.region.policy import observed_paths

    name = f"lstest-p{os.getpid()}-dens-scout"
    opts = DebianGuestOptions(image=disk, memory_mib=MEMORY_MIB, boot_timeout=BOOT_TIMEOUT,
                              domain_type=domain_type, customize=[free_page_reporting])
    with defined_debian_guest(conn, name, opts) as defined:
        g = defined.start()
        wait_idle(g)
        seen = survey_domain_page_cache(conn, name, pause=True,
                                        cache_dir=cfg.state_dir / "introspect")
    if seen.partial:
        say(f"{name}: the page-cache walk ended partial: {seen.errors[:2]}")
    return observed_paths([seen])


def setup(conn: Any, domain_type: str, policy: str) -> Setup:
    """Build (or reuse) the image, the bench's region (its files chosen by ``policy``,
    :mod:`libshare.sharing.region.policy`) and the prepared disk; return the Setup."""
    from libshare import report
    from libshare.demo.debian.image import debian_image
    from libshare.demo.story import import_image
    from libshare.sharing.region import build
    from libshare.virt import enrol

    image = debian_image(extra_packages=("nginx", "python3"))
    say(f"image {image.path}")
    WORK.mkdir(parents=True, exist_ok=True)
    cfg = Config(state_dir=WORK / "state")
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    # observed: the disk is prepared against the usr region, then the region is rebuilt
    # from what a guest of that disk caches without a region (the guests' plan is then
    # made again at their boot, as after any rebuild of their group's region)
    trees = import_image(cfg, image, say)
    built = build.build_region(cfg, GROUP, policy="usr" if policy == "observed" else policy,
                               trees_wanted=trees)
    for p in (WORK.parent, WORK, cfg.state_dir, cfg.regions_dir, cfg.regions_dir / "images",
              cfg.regions_dir / "groups"):
        p.chmod(0o755)
    spec = enrol.resolve_region(cfg, GROUP, "nvdimm")
    say(f"region {built.path} ({built.policy} policy): {built.files} files, "
        f"{built.size >> 20} MiB")
    disk = prepare_disk(conn, image, cfg, spec, domain_type)
    if policy == "observed":
        seen = scout_page_cache(conn, disk, cfg, domain_type)
        built = build.build_region(cfg, GROUP, policy="observed", trees_wanted=trees,
                                   observed=seen)
        spec = enrol.resolve_region(cfg, GROUP, "nvdimm")
        say(f"region {built.path} (observed policy, {len(seen)} paths cached): "
            f"{built.files} files, {built.size >> 20} MiB")
    guest_paths = report.region_guest_files(built.path)
    return Setup(cfg, spec, disk, guest_paths,
                 {"path": built.path, "digest": built.digest, "files": built.files,
                  "size": built.size, "policy": policy})


# ------------------------------------------------------------------ one run

def fetch(port: int, path: str, timeout: float = 5.0, tries: int = 1) -> bytes:
    """Return the body of http://127.0.0.1:PORT/PATH (``tries`` attempts a second apart);
    raise OSError after the last failure."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
                return bytes(r.read())
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(1)
    return b""


class LoadGenerator(threading.Thread):
    """Fetches / and /app/ from one guest once a second until ``stop`` is set or the
    deadline passes; counts successes, failures and latencies."""

    def __init__(self, port: int, deadline: float, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.deadline, self.stop = port, deadline, stop
        self.ok = self.failed = 0
        self.latencies: list[float] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            for path in ("/", f"/app/{n}"):
                t0 = time.monotonic()
                try:
                    fetch(self.port, path)
                    self.ok += 1
                    self.latencies.append(time.monotonic() - t0)
                except OSError:
                    self.failed += 1
            n += 1
            self.stop.wait(1.0)

    def summary(self) -> dict[str, Any]:
        """Return requests ok/failed and the median latency (ms)."""
        lat = sorted(self.latencies)
        return {"ok": self.ok, "failed": self.failed,
                "median_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None}


def guest_meminfo(g: Any) -> dict[str, int] | None:
    """Return, from the guest's agent, its Cached, MemAvailable, MemFree, AnonPages,
    Slab and SUnreclaim (kB, /proc/meminfo) and ``pid1_rss`` (systemd's VmRSS, kB), or
    None."""
    from libshare.redirect.agent import AgentError

    try:
        text = g.agent.exec(["/bin/sh", "-c", "cat /proc/meminfo; grep VmRSS /proc/1/status"],
                            timeout=10).out
    except (AgentError, OSError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Cached", "MemAvailable", "MemFree", "AnonPages", "Slab", "SUnreclaim",
                   "VmRSS") and rest.split():
            out["pid1_rss" if key == "VmRSS" else key] = int(rest.split()[0])
    return out


def qemu_sample(pid: int | None, ram_sizes: list[int], region: str | None) -> dict[str, int]:
    """Return one QEMU's guest-RAM and region figures (kB) from one smaps read."""
    if pid is None:
        return {}
    try:
        maps = accounting.smaps(pid)
    except OSError:
        return {}
    ram = accounting.summed(accounting.guest_ram_mappings(maps, ram_sizes))
    out = {"ram_rss_kb": ram["Rss"], "ram_pss_kb": ram["Pss"],
           "ram_hugetlb_kb": ram["Private_Hugetlb"] + ram["Shared_Hugetlb"],
           "ram_kb": ram["Pss"] + ram["Private_Hugetlb"] + ram["Shared_Hugetlb"]}
    if region:
        reg = accounting.summed(accounting.region_mappings(maps, region))
        out.update(region_rss_kb=reg["Rss"], region_pss_kb=reg["Pss"],
                   region_anon_kb=reg["Anonymous"])
    merged = ksm.process_ksm(pid)
    if merged:
        out["ksm_merging_pages"] = merged.get("ksm_merging_pages", 0)
    return out


def page_cache_sample(conn: Any, name: str, st: Setup) -> dict[str, Any] | None:
    """Return the guest's file pages served by the region versus held in its own page
    cache (introspection, as ``libshare report --page-cache``), or None."""
    from libshare import report
    from libshare.introspect.pagecache import survey_domain_page_cache

    try:
        seen = survey_domain_page_cache(conn, name, cache_dir=st.cfg.state_dir / "introspect")
    except LibshareError:
        return None
    return {**report.servable(seen.files, st.guest_files),
            "cpu_seconds": round(seen.cpu_seconds, 3), "partial": seen.partial}


def run_arm(conn: Any, st: Setup, arm: str, workload: str, n: int, duration: float,
            domain_type: str, hp_mode: list[str]) -> dict[str, Any]:
    """Boot ``n`` guests for ``arm`` and ``workload`` from a cold start, sample them for
    ``duration`` seconds from their start, remove them; return the run's record."""
    spec = ARMS[arm]
    with contextlib.ExitStack() as stack:
        knobs = {**spec["ksm"], "run": 1} if spec["ksm"] else {"run": 0}
        before = stack.enter_context(ksm.knobs_set(knobs))
        if spec["hugepages"]:
            stack.enter_context(hugepages_reserved(n * MEMORY_MIB * 1024 // HUGEPAGE_KB + 8))
            if hp_mode[0] == "file":
                stack.enter_context(hugetlbfs_on_ram_dir())
        return _run_guests(conn, st, arm, workload, n, duration, domain_type, hp_mode,
                           stack, before)


def _start_guests(conn: Any, st: Setup, arm: str, n: int, domain_type: str,
                  hp_mode: list[str], stack: contextlib.ExitStack) -> list[tuple[Any, int]]:
    """Define and start the arm's ``n`` guests; return (guest, forwarded port) pairs."""
    from libshare.demo.debian.guest import DebianGuestOptions, defined_debian_guest
    from libshare.demo.lifecycle import GuestError
    from libshare.virt import enrol

    spec = ARMS[arm]
    defined = []
    for i in range(n):
        port = free_port()
        custom = [user_nic(port, i + 1), free_page_reporting]
        if spec["hugepages"]:
            custom.append(hugepage_backing(hp_mode[0]))
        opts = DebianGuestOptions(image=st.disk, memory_mib=MEMORY_MIB,
                                  boot_timeout=BOOT_TIMEOUT, domain_type=domain_type,
                                  customize=custom)
        name = f"lstest-p{os.getpid()}-dens-{arm.replace('+', '-')}-{i + 1}"
        d = stack.enter_context(defined_debian_guest(conn, name, opts))
        if spec["region"]:
            enrol.enable_domain(conn, name, st.spec)
        defined.append((d, port))
    try:
        return [(d.start(wait=False), port) for d, port in defined]
    except GuestError as exc:
        if not spec["hugepages"] or hp_mode[0] != "libvirt" or "hugetlbfs" not in str(exc):
            raise
        raise _HugetlbfsUnseen(str(exc)) from exc


class _HugetlbfsUnseen(LibshareError):
    """libvirtd refused ``<hugepages/>``: it saw no hugetlbfs when it started."""


def _run_guests(conn: Any, st: Setup, arm: str, workload: str, n: int, duration: float,
                domain_type: str, hp_mode: list[str], stack: contextlib.ExitStack,
                ksm_before: dict[str, str]) -> dict[str, Any]:
    """The body of :func:`run_arm` once KSM and hugepages are set up."""
    load_start = os.getloadavg()
    guests = _start_guests(conn, st, arm, n, domain_type, hp_mode, stack)
    t0 = time.monotonic()
    say(f"{arm}/{workload}/N={n}: started {', '.join(g.name for g, _ in guests)}")
    mine = {g.name for g, _ in guests}
    booted: dict[str, float] = {}
    errors: list[str] = []
    stop = threading.Event()
    loads: dict[str, LoadGenerator] = {}
    compacted: dict[str, float] = {}
    stack.callback(stop.set)

    def boot(g: Any, port: int) -> None:
        try:
            g.wait_booted()
            booted[g.name] = time.monotonic() - t0
            if workload == "service":
                guest_sh(g, "systemctl start nginx ls-bench-app")
                fetch(port, "/", timeout=10, tries=60)
                # until the run ends (stop), which is never later than this bound
                loads[g.name] = LoadGenerator(port, t0 + BOOT_TIMEOUT + duration + 60, stop)
                loads[g.name].start()
            if st.report_order is not None:
                # report free blocks from 2^order pages up (the kernel's default is 2
                # MiB: a guest's scattered free pages cost the host as used ones)
                guest_sh(g, f"echo {st.report_order} > "
                            "/sys/module/page_reporting/parameters/page_reporting_order")
            if st.compact_after is not None and not stop.wait(st.compact_after):
                # free whole 2 MiB blocks: free page reporting gives the host back only
                # those, and a guest's scattered free pages cost the host as used ones
                guest_sh(g, "echo 1 > /proc/sys/vm/compact_memory")
                compacted[g.name] = round(time.monotonic() - t0, 1)
        except Exception as exc:  # recorded; the run goes on with the others
            errors.append(f"{g.name}: {exc}"[:500])

    pool = ThreadPoolExecutor(max_workers=n)
    stack.callback(pool.shutdown, wait=False, cancel_futures=True)
    for g, port in guests:
        pool.submit(boot, g, port)
    layout = {}
    for g, _ in guests:
        live = domxml.parse(g.domain.XMLDesc(0))
        enr = domxml.enrolment(live)
        layout[g.name] = (guest_ram_sizes(live), enr.region if enr else None)
    ksmd0 = ksm.ksmd_cpu_seconds() or 0.0
    samples = []
    k = 0
    all_booted_at: float | None = None
    while True:
        t = time.monotonic() - t0
        host = ksm.host_ksm()
        sample: dict[str, Any] = {
            "t": round(t, 1), "ksm": {key: host["counters"].get(key, 0)
                                      for key in ("pages_shared", "pages_sharing",
                                                  "ksm_zero_pages")},
            "ksmd_cpu_s": round((host["ksmd_cpu_seconds"] or 0.0) - ksmd0, 2), "guests": {}}
        for g, _ in guests:
            ram_sizes, region = layout[g.name]
            row: dict[str, Any] = qemu_sample(g.qemu_pid(), ram_sizes, region)
            row["booted"] = g.name in booted
            if row["booted"]:
                row["meminfo"] = guest_meminfo(g)
                # never on hugepages: reading a private hugetlbfs mapping through
                # /proc/PID/mem allocates every huge page it reads (seen: 182 -> 512 MiB)
                if k % SURVEY_EVERY == 0 and not ARMS[arm]["hugepages"]:
                    row["page_cache"] = page_cache_sample(conn, g.name, st)
            sample["guests"][g.name] = row
        rows = sample["guests"].values()
        sample["total_kb"] = sum(r.get("ram_kb", 0) + r.get("region_pss_kb", 0) for r in rows)
        sample["all_booted"] = len(booted) == n
        samples.append(sample)
        k += 1
        if all_booted_at is None and sample["all_booted"]:
            all_booted_at = t
        # at least --duration, and two samples after every guest booted (TCG on a busy
        # host may boot slower than the duration)
        if t >= duration and ((all_booted_at is not None and t - all_booted_at >= 15)
                              or t >= BOOT_TIMEOUT):
            break
        if errors and len(errors) >= n:
            break
        time.sleep(max(0.0, t0 + k * SAMPLE_SECONDS - time.monotonic()))
    stop.set()
    views = {}
    if ARMS[arm]["region"]:
        from libshare.status import guest_view

        for g, _ in guests:
            if g.name in booted:
                views[g.name] = guest_view(g.domain, timeout=60)
    record = {"arm": arm, "workload": workload, "n": n, "duration_s": duration,
              "compacted_at_s": compacted,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "boot_s": {name.rsplit("-", 1)[1]: round(v, 1) for name, v in booted.items()},
              "errors": errors, "other_running_guests": other_guests(conn, mine),
              "ksm_knobs": ksm.host_ksm()["knobs"], "ksm_knobs_before": ksm_before,
              "hugepages": hp_mode[0] if ARMS[arm]["hugepages"] else None,
              "load": {name: lg.summary() for name, lg in loads.items()},
              "guest_views": views, "samples": samples}
    say(f"{arm}/{workload}/N={n}: {samples[-1]['total_kb'] / 1024:.0f} MiB at the end, "
        f"boots {sorted(record['boot_s'].values())} s, errors {len(errors)}")
    return record


# ------------------------------------------------------------------ results

def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one summary row per run: memory after boot and at the end (MiB), saving
    against the baseline arm (same workload and N), time to 90% of the final saving,
    ksmd CPU seconds, guest Cached at the end, saving per added guest."""
    by_key = {(r["arm"], r["workload"], r["n"]): r for r in runs}
    rows = []
    for r in runs:
        s = r["samples"]
        booted = next((x for x in s if x["all_booted"]), None)
        base = by_key.get((BASELINE[r["arm"]], r["workload"], r["n"]))
        cached = [g["meminfo"]["Cached"] for g in s[-1]["guests"].values()
                  if g.get("meminfo")]
        row: dict[str, Any] = {
            "arm": r["arm"], "workload": r["workload"], "n": r["n"],
            "after_boot_mib": round(booted["total_kb"] / 1024, 1) if booted else None,
            "boot_s": max(r["boot_s"].values()) if r["boot_s"] else None,
            "end_mib": round(s[-1]["total_kb"] / 1024, 1),
            "ksmd_cpu_s": s[-1]["ksmd_cpu_s"],
            "region_copies_kb": sum(g.get("region_anon_kb", 0)
                                    for g in s[-1]["guests"].values()),
            "guest_cached_mib": round(sum(cached) / len(cached) / 1024, 1) if cached else None,
            "saving_mib": None, "saving_at_s": None, "t90_s": None}
        if base is not None and base is not r:
            bs = base["samples"]
            last = min(len(s), len(bs)) - 1     # the last moment both runs sampled
            final = (bs[last]["total_kb"] - s[last]["total_kb"]) / 1024
            row["saving_mib"] = round(final, 1)
            row["saving_at_s"] = s[last]["t"]
            if final > 0:
                for a, b in zip(s, bs, strict=False):
                    if (b["total_kb"] - a["total_kb"]) / 1024 >= 0.9 * final:
                        row["t90_s"] = a["t"]
                        break
        rows.append(row)
    for row in rows:
        same = sorted((x for x in rows if x["arm"] == row["arm"]
                       and x["workload"] == row["workload"] and x["saving_mib"] is not None),
                      key=lambda x: x["n"])
        row["saving_per_added_guest_mib"] = None
        if len(same) >= 2 and same[-1]["n"] > same[0]["n"]:
            row["saving_per_added_guest_mib"] = round(
                (same[-1]["saving_mib"] - same[0]["saving_mib"])
                / (same[-1]["n"] - same[0]["n"]), 1)
        hp = by_key.get(("hp-none", row["workload"], row["n"]))
        row["cache_not_needed_mib"] = None
        if ARMS[row["arm"]]["hugepages"] and ARMS[row["arm"]]["region"] and hp is not None:
            base_cached = [g["meminfo"]["Cached"] for g in hp["samples"][-1]["guests"].values()
                           if g.get("meminfo")]
            if base_cached and row["guest_cached_mib"] is not None:
                row["cache_not_needed_mib"] = round(
                    sum(base_cached) / len(base_cached) / 1024 - row["guest_cached_mib"], 1)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    """Return the results as a markdown document: how it ran and one table row per run."""
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    m = doc["machine"]
    lines = [f"# bench.density ({doc['plan']})", "",
             f"command: `{doc['command']}`  ",
             f"machine: {m['hostname']}, {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB, "
             f"kernel {m['kernel']}, Python {m['python']}; guests {doc['domain_type']} "
             f"(TCG when qemu), {MEMORY_MIB} MiB, 1 vCPU, Debian 12", "",
             "Host memory attributable to the guests = sum of guest-RAM mapping Pss (+ "
             "hugetlbfs pages) + sum of region mapping Pss, from each QEMU's smaps; saving "
             "against `none` (`hp-none` for hugepage arms) at the same workload and N.", "",
             f"Region of the `libshare` arms: {doc['region'].get('files')} files, "
             f"{doc['region'].get('size', 0) >> 20} MiB, the "
             f"`{doc['region'].get('policy', 'libraries')}` policy.", "",
             "Free page reporting (the guests' page_reporting_order): "
             + ("the kernel's, 2 MiB blocks" if doc.get("report_order") is None else
                f"order {doc['report_order']}, blocks of {4 << doc['report_order']} KiB "
                "and up (--report-order)") + ".", ""]
    for w in sorted({r["workload"] for r in doc["summary"]}):
        lines.append(f"- `{w}`: {WORKLOAD_TEXT[w]}")
    lines += ["", "| arm | workload | N | boot s | after boot MiB | end MiB | saving MiB | "
              "t90 s | ksmd CPU s | per added guest MiB | guest Cached MiB | "
              "cache not needed MiB | copies kB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["summary"]:
        lines.append("| " + " | ".join(cell(r[k]) for k in (
            "arm", "workload", "n", "boot_s", "after_boot_mib", "end_mib", "saving_mib",
            "t90_s", "ksmd_cpu_s", "saving_per_added_guest_mib", "guest_cached_mib",
            "cache_not_needed_mib", "region_copies_kb")) + " |")
    notes = [f"- {r['arm']}/{r['workload']}/N={r['n']}: {e}" for r in doc["runs"]
             for e in r["errors"]]
    others = {r["other_running_guests"] for r in doc["runs"]}
    loads = [x for r in doc["runs"] for x in (r["loadavg_start"][0], r["loadavg_end"][0])] or [0.0]
    lines += ["", f"Other guests running on the host during the runs: {sorted(others)} "
              "(KSM arms merge them too; their pages are not counted). 1-minute load "
              f"average at the runs' starts and ends: {min(loads):.1f} to {max(loads):.1f}."]
    notes += [f"- {f['arm']}/{f['workload']}/N={f['n']} failed: {f['error']}"
              for f in doc.get("failed", [])]
    if notes:
        lines += ["", "Errors:", *notes]
    return "\n".join(lines) + "\n"


def plots(doc: dict[str, Any], out: Path) -> list[str]:
    """Write memory.png (host memory over time per arm, per workload at its largest N)
    and saving.png (saving against N per arm); return the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    workloads = sorted({r["workload"] for r in runs})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        nmax = max(r["n"] for r in runs if r["workload"] == w)
        for r in runs:
            if r["workload"] == w and r["n"] == nmax:
                ax.plot([s["t"] for s in r["samples"]],
                        [s["total_kb"] / 1024 for s in r["samples"]], label=r["arm"])
        ax.set_title(f"{w}, N={nmax}")
        ax.set_xlabel("seconds since the guests started")
        ax.set_ylabel("host memory of the guests (MiB)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for arm in ARMS:
            pts = sorted((r["n"], r["saving_mib"]) for r in doc["summary"]
                         if r["workload"] == w and r["arm"] == arm and r["saving_mib"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arm)
        ax.set_title(f"{w}: saving against the arm without sharing")
        ax.set_xlabel("guests (N)")
        ax.set_ylabel("MiB saved at the end")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "saving.png", dpi=100)
    plt.close(fig)
    return ["memory.png", "saving.png"]


# ------------------------------------------------------------------ main

def plan_of(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Return the (arm, workload, N) runs the arguments ask for, baselines first."""
    if args.arms or args.workloads or args.n:
        arms = args.arms.split(",") if args.arms else list(ARMS)
        plan = [(a, w, n) for w in (args.workloads or "idle").split(",")
                for n in (int(x) for x in (args.n or "1").split(",")) for a in arms]
    else:
        plan = QUICK_PLAN if args.quick else FULL_PLAN
    for arm, w, n in plan:
        if arm not in ARMS or w not in WORKLOAD_TEXT or n < 1:
            raise SystemExit(f"bench.density: unknown arm, workload or N: {arm} {w} {n}")
    return sorted(plan, key=lambda p: (ARMS[p[0]]["hugepages"], p[0] != BASELINE[p[0]]))


def _interrupted(_signum: int, _frame: Any) -> None:
    """SIGTERM: unwind like Ctrl-C (guests removed, KSM and hugepages given back)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    p = argparse.ArgumentParser(prog="bench.density", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the 10-minute subset")
    p.add_argument("--duration", type=float, help="seconds per run (300; --quick 150)")
    p.add_argument("--arms", help=f"comma-separated arms ({', '.join(ARMS)})")
    p.add_argument("--workloads", help="comma-separated workloads (idle, service)")
    p.add_argument("--n", help="comma-separated guest counts")
    p.add_argument("--kvm", action="store_true", help="KVM guests (type='kvm') instead of TCG")
    p.add_argument("--policy", default=DEMO_POLICY, choices=POLICIES,
                   help=f"what the region holds (default {DEMO_POLICY}, as the demo's)")
    p.add_argument("--compact", type=float, metavar="SECONDS",
                   help="each guest compacts its memory this long after its boot "
                        "(echo 1 > /proc/sys/vm/compact_memory; default: never)")
    p.add_argument("--report-order", type=int, metavar="ORDER", choices=range(0, 10),
                   help="each guest, once booted, reports free blocks of 2^ORDER pages "
                        "and up to the host (page_reporting.page_reporting_order; "
                        "default: the kernel's 9, 2 MiB)")
    p.add_argument("--out", type=Path, help="results folder (bench/results/density[-quick])")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.density: needs root (system libvirtd, KSM, hugepages)", file=sys.stderr)
        return 1
    plan = plan_of(args)
    duration = args.duration or (150.0 if args.quick else 300.0)
    out = args.out or ROOT / "bench" / "results" / ("density-quick" if args.quick else "density")
    domain_type = "kvm" if args.kvm else "qemu"
    signal.signal(signal.SIGTERM, _interrupted)
    print_header("libshare density: N guests against KSM", "bench.density")
    print(f"plan: {len(plan)} runs of {duration:.0f} s: "
          + ", ".join(f"{a}/{w}/N={n}" for a, w, n in plan))
    from libshare.virt import api

    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    hp_mode = ["libvirt"]
    with api.connect("qemu:///system") as conn:
        st = setup(conn, domain_type, args.policy)
        st.compact_after = args.compact
        st.report_order = args.report_order
        for arm, w, n in plan:
            try:
                try:
                    runs.append(run_arm(conn, st, arm, w, n, duration, domain_type, hp_mode))
                except _HugetlbfsUnseen:
                    say("libvirtd saw no hugetlbfs when it started: backing guest RAM by "
                        f"files on a hugetlbfs mounted over {RAM_DIR} instead")
                    hp_mode[0] = "file"
                    runs.append(run_arm(conn, st, arm, w, n, duration, domain_type, hp_mode))
            except Exception as exc:  # one failed run does not lose the others
                say(f"{arm}/{w}/N={n} failed: {exc}")
                failed.append({"arm": arm, "workload": w, "n": n, "error": str(exc)[:1000]})
    doc = {"plan": "quick" if args.quick else ("custom" if args.arms or args.n else "full"),
           "command": reproduce_command("bench.density"), "machine": machine(),
           "domain_type": domain_type, "duration_s": duration, "region": st.region,
           "report_order": st.report_order, "workloads": WORKLOAD_TEXT,
           "summary": summarise(runs), "failed": failed, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "density.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "density.md").write_text(markdown(doc))
    try:
        written = plots(doc, out) if runs else []
    except ImportError:
        written = []
        print("bench.density: matplotlib is missing (pip install -e '.[bench]'): no plots",
              file=sys.stderr)
    print(markdown(doc))
    if failed:
        print(f"bench.density: {len(failed)} runs failed", file=sys.stderr)
    print(f"written: {', '.join(['density.json', 'density.md', *written])} in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
