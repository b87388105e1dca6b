"""Full Debian test guests: a cached, bootable Debian disk image (debootstrap minbase,
Debian's kernel, its own GRUB and initramfs) and the runner that boots qcow2 overlays
of it in the system libvirtd with a qemu-guest-agent channel.

Owns the image cache ``<cache>/debian/<suite>-<packages hash>/<linux-image-amd64
version>/`` (``disk.qcow2``, ``info.json``, ``.complete``) with its build (atomic: temp
dir + rename, under a ``flock``; ``.deb`` files reused from ``<cache>/debian/debs``), the
shape of the guest's domain XML, and the guest life cycle (define, start, wait for
boot, reboot, ALWAYS destroy + undefine + remove the overlay).

The image: an MBR disk with one ext4 partition (label ``lsroot``, root by UUID), GRUB
(i386-pc, ``core.img`` embedded after the MBR, ``/boot/grub/grub.cfg`` booting the
``/vmlinuz`` and ``/initrd.img`` symlinks that Debian's kernel scripts maintain, so an
``update-initramfs -u`` inside the guest takes effect at the next boot), kernel command
line :data:`DEBIAN_CMDLINE` (serial console on ttyS0), hostname ``lsguest``, no network,
no getty but the serial one, timers and other idle units masked, and a oneshot unit that
prints ``LIBSHARE-DEBIAN-BOOTED boot_id=... uptime=... release=...`` on the console once
``multi-user.target`` is reached. The initramfs is initramfs-tools' with ``MODULES=list``
(:data:`INITRAMFS_MODULES` in ``/etc/initramfs-tools/modules``) and zstd, set in
``/etc/initramfs-tools/conf.d/libshare-guest.conf``: ``update-initramfs -u`` takes ~40 s
inside a TCG guest; hooks that need more modules add them (``manual_add_modules``). There
is no D-Bus, hence no logind: reboot with ``systemctl reboot`` (what :meth:`DebianGuest.reboot`
does), not the agent's ``guest-shutdown`` nor ACPI. No loop device and no mount are used
on the host: ``mke2fs -d`` writes the file system straight into the image at its
partition offset and GRUB's ``boot.img``/``core.img`` are written into the raw disk.

API:

- ``debian_image(suite=None, extra_packages=(), cache=None, mirror=None) -> DebianImage``
  (build once, then cached; ``DebianImage.path`` is the base qcow2)
- ``create_overlay(image, path) -> Path`` (qcow2 overlay backed by the image)
- ``debian_domain_xml(name, disk, console_log, memory_mib=512, vcpus=1,
  domain_type='qemu', devices=(), customize=None) -> str`` (``debian_domain_tree``: element)
- ``defined_debian_guest(conn, name, options=None)`` -> context manager yielding a
  ``DefinedDebianGuest`` (``.domain`` can be redefined, e.g. enrolled, before ``.start()``)
- ``running_debian_guest(conn, name, options=None)`` -> context manager yielding a
  booted ``DebianGuest``: ``.agent`` (a :class:`libshare.agent.GuestAgent`),
  ``.exec(argv, stdin=None, timeout=60, check=False) -> ExecResult``,
  ``.sh(script, timeout=60, check=True) -> str`` (stdout), ``.console() -> str``,
  ``.boots()``, ``.wait_booted(timeout, count=1) -> Boot``, ``.reboot(timeout) -> Boot``,
  ``.last_boot``, ``.qemu_pid()``, ``.overlay``, ``.image``, ``.domain``.
- ``image_root(image, workdir=None)`` -> context manager yielding the image's root file
  system mounted read-only on the host (raw copy + read-only loop device; always
  unmounted, detached and removed); ``copy_image_libraries(image, dest)`` copies its
  ``/usr/lib/x86_64-linux-gnu`` out for ``store.import_tree``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from libshare.agent import AgentError, ExecResult, GuestAgent
from libshare.guests.cache import cache_subdir, locked
from libshare.guests.domain import Customizer, _sub, domain_skeleton, finish_domain
from libshare.guests.kernel import _apt_opts, host_suite
from libshare.guests.runner import (
    GuestError,
    GuestTimeout,
    RunningGuest,
    _libvirt,
    cleanup_domain,
    qemu_log_tail,
    run_dir,
)

DEFAULT_SUITE = "bookworm"
#: Packages debootstrap installs (``--variant=minbase --include=...``) besides minbase.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd-sysv", "udev", "kmod", "qemu-guest-agent", "linux-image-amd64",
    "initramfs-tools", "util-linux", "coreutils", "procps", "e2fsprogs", "zstd",
)
#: Modules the image's initramfs loads (``MODULES=list``): enough to mount the root.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4")
#: Units masked in the image: timers, idle jobs and consoles nobody reads.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "man-db.timer",
    "systemd-timesyncd.service", "systemd-tmpfiles-clean.timer",
    "getty-static.service", "getty@tty1.service",
)
HOSTNAME = "lsguest"
ROOT_LABEL = "lsroot"
#: Kernel command line written into the image's grub.cfg.
DEBIAN_CMDLINE = "console=ttyS0,115200 ro"
DISK_MIB = 4096
PARTITION_OFFSET = 1024 * 1024
BOOTED_MARKER = "LIBSHARE-DEBIAN-BOOTED"
#: Bump when the build recipe changes: part of the cache key.
IMAGE_FORMAT = "2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GRUB_DIR = Path("/usr/lib/grub/i386-pc")

#: Not anchored to the start of a line: the marker races serial-getty's prompt on ttyS0
#: ("lsguest login: LIBSHARE-DEBIAN-BOOTED ...", seen in CI), and kernel messages may
#: follow it on the same line.
_BOOTED_RE = re.compile(
    rf"{BOOTED_MARKER} boot_id=([0-9a-f-]{{36}}) uptime=([0-9]+\.[0-9]+) "
    r"release=([0-9][0-9A-Za-z.+_-]*[0-9A-Za-z])")
_BOOTED_UNIT = f"""[Unit]
Description=libshare: tell the host's test runner that boot reached multi-user
DefaultDependencies=no
After=multi-user.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{BOOTED_MARKER} boot_id=$(cat /proc/sys/kernel/random/boot_id) uptime=$(cut -d" " -f1 /proc/uptime) release=$(uname -r)" >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""


class DebianImageError(GuestError):
    """The Debian guest image could not be built."""


@dataclass(frozen=True)
class DebianImage:
    """A built Debian guest image: ``path`` (base qcow2), ``suite``, ``packages`` (the
    ``--include`` list), ``kernel_version`` (the Debian version of ``linux-image-amd64``
    it was keyed by), ``kernel_release`` (``uname -r`` in the guest), ``root_uuid``,
    ``key`` (``<suite>-<hash>/<kernel_version>``) and the ``build_seconds`` it took."""

    path: Path
    suite: str
    packages: tuple[str, ...]
    kernel_version: str
    kernel_release: str
    root_uuid: str
    key: str
    build_seconds: float

    @property
    def directory(self) -> Path:
        """Return the cache directory holding the image."""
        return self.path.parent


# ------------------------------------------------------------------ host apt


def parse_sources_list(text: str) -> list[tuple[str, list[str], list[str]]]:
    """Return ``(uri, suites, components)`` of each ``deb`` line in one-line-format
    sources.list ``text`` (``deb-src`` and comments skipped, ``[options]`` dropped)."""
    out = []
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            out.append((words[1], [words[2]], list(words[3:])))
    return out


def parse_deb822_sources(text: str) -> list[tuple[str, list[str], list[str]]]:
    """Return ``(uri, suites, components)`` for each URI of each enabled ``Types: deb``
    stanza of deb822 ``.sources`` ``text``."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append((uri, fields.get("suites", "").split(),
                        fields.get("components", "").split()))
    return out


def pick_mirror(entries: Sequence[tuple[str, list[str], list[str]]], suite: str) -> str | None:
    """Return the URI of the first entry serving ``suite`` (exactly, not ``-security``
    or ``-updates``) with component ``main``; None if there is none."""
    for uri, suites, components in entries:
        if suite in suites and "main" in components:
            return uri.rstrip("/")
    return None


def host_mirror(suite: str, etc: Path = Path("/etc/apt")) -> str:
    """Return the Debian mirror URL the host's apt sources use for ``suite`` (falling
    back to any host mirror of the host's own suite, then to deb.debian.org)."""
    entries: list[tuple[str, list[str], list[str]]] = []
    with contextlib.suppress(OSError):
        entries += parse_sources_list((etc / "sources.list").read_text())
    for p in sorted((etc / "sources.list.d").glob("*")) if (etc / "sources.list.d").is_dir() else []:
        with contextlib.suppress(OSError):
            if p.suffix == ".list":
                entries += parse_sources_list(p.read_text())
            elif p.suffix == ".sources":
                entries += parse_deb822_sources(p.read_text())
    return pick_mirror(entries, suite) or pick_mirror(entries, host_suite()) or DEFAULT_MIRROR


def apt_proxy_env() -> dict[str, str]:
    """Return ``http_proxy``/``https_proxy`` taken from apt's own proxy settings
    (``Acquire::http::Proxy``, ``Acquire::https::Proxy``), empty if none are set."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True,
                              check=False).stdout
    except FileNotFoundError:
        return {}
    env = {}
    for scheme in ("http", "https"):
        m = re.search(rf'^Acquire::{scheme}::Proxy "([^"]+)";', dump, re.M | re.I)
        if m and m.group(1).upper() not in ("DIRECT", "FALSE"):
            env[f"{scheme}_proxy"] = m.group(1)
    return env


def kernel_meta_version(suite: str, cache: Path) -> str:
    """Return the version of ``linux-image-amd64`` in ``suite``'s own ``main`` archive
    (what debootstrap installs), from the host's apt lists (or the kit's private apt
    tree for another suite); raises DebianImageError if apt does not know it."""
    opts = _apt_opts(suite, cache)
    res = subprocess.run(["apt-cache", *opts, "madison", "linux-image-amd64"],
                         capture_output=True, text=True, check=False,
                         env=dict(os.environ, LC_ALL="C"))
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and re.search(rf"\s{re.escape(suite)}/main\s", f" {parts[2]} "):
            return parts[1]
    raise DebianImageError(f"apt does not know linux-image-amd64 in {suite}/main "
                           f"(run apt-get update): {res.stderr.strip()[-200:]}")


# ------------------------------------------------------------------ image build


def packages_key(suite: str, packages: Sequence[str]) -> str:
    """Return ``<suite>-<hash>``: the cache directory for ``suite`` with ``packages``
    (order and duplicates ignored) and the current :data:`IMAGE_FORMAT`."""
    blob = json.dumps([IMAGE_FORMAT, suite, sorted(set(packages)), DEBIAN_CMDLINE])
    return f"{suite}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, stdin: str | None = None,
         timeout: float = 1200) -> str:
    """Run ``cmd`` (feeding ``stdin``); return stdout, raising DebianImageError with
    the tail of its output on failure."""
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False,
                             input=stdin,
                             env=dict(os.environ, LC_ALL="C", **(env or {})), timeout=timeout)
    except FileNotFoundError as exc:
        raise DebianImageError(f"{cmd[0]} not found (scripts/setup-host installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DebianImageError(f"{cmd[0]} did not finish within {timeout:.0f}s") from exc
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip())[-600:]
        raise DebianImageError(f"{' '.join(cmd[:3])}... failed ({res.returncode}): {tail}")
    return res.stdout


def _load_image(d: Path) -> DebianImage:
    """Return the DebianImage described by ``d/info.json``."""
    info = json.loads((d / "info.json").read_text())
    return DebianImage(
        path=d / "disk.qcow2", suite=info["suite"], packages=tuple(info["packages"]),
        kernel_version=info["kernel_version"], kernel_release=info["kernel_release"],
        root_uuid=info["root_uuid"], key=info["key"], build_seconds=info["build_seconds"],
    )


def debian_image(suite: str | None = None, extra_packages: Sequence[str] = (), *,
                 cache: Path | str | None = None, mirror: str | None = None) -> DebianImage:
    """Return the cached bootable Debian image for ``suite`` (default: the host's, or
    bookworm) with :data:`BASE_PACKAGES` plus ``extra_packages``, building it first if
    needed (a few minutes; serialised across processes by a lock; atomic).

    The key is suite + package list + the version of ``linux-image-amd64`` apt knows for
    that suite; if apt cannot tell (no lists), the newest cached image of that suite and
    package list is used. ``mirror`` defaults to the host's apt source for the suite."""
    suite = suite or host_suite() or DEFAULT_SUITE
    packages = tuple(dict.fromkeys([*BASE_PACKAGES, *extra_packages]))
    root = cache_subdir("debian", cache)
    family = root / packages_key(suite, packages)
    try:
        kver = kernel_meta_version(suite, root.parent)
    except (DebianImageError, OSError) as exc:
        done = sorted((d for d in family.glob("*") if (d / ".complete").exists()),
                      key=lambda d: d.stat().st_mtime) if family.is_dir() else []
        if done:
            return _load_image(done[-1])
        raise DebianImageError(f"cannot key the Debian image: {exc}") from exc
    target = family / kver
    if (target / ".complete").exists():
        return _load_image(target)
    with locked(root / ".lock"):
        if (target / ".complete").exists():
            return _load_image(target)
        for stale in root.glob(".build-*"):  # we hold the lock: nobody else is building
            shutil.rmtree(stale, ignore_errors=True)
        family.mkdir(parents=True, exist_ok=True)
        family.chmod(0o755)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            started = time.monotonic()
            info = _build(build, suite, packages, mirror or host_mirror(suite),
                          root / "debs")
            info.update(suite=suite, packages=list(packages), kernel_version=kver,
                        key=f"{family.name}/{kver}",
                        build_seconds=round(time.monotonic() - started, 1))
            (build / "info.json").write_text(json.dumps(info, indent=1) + "\n")
            (build / ".complete").write_text(f"{family.name}/{kver}\n")
            build.chmod(0o755)
            if target.exists():
                shutil.rmtree(target)
            build.rename(target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return _load_image(target)


def _configure_root(rootfs: Path, root_uuid: str) -> str:
    """Make the debootstrapped ``rootfs`` a quiet, bootable test guest; return the
    kernel release installed in it."""
    releases = sorted(p.name.removeprefix("vmlinuz-") for p in (rootfs / "boot").glob("vmlinuz-*"))
    if not releases:
        raise DebianImageError("debootstrap installed no kernel into the image")
    for link, target in (("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.img")):
        if not (rootfs / link).exists():
            (rootfs / link).unlink(missing_ok=True)
            (rootfs / link).symlink_to(f"boot/{target}-{releases[-1]}")
    etc = rootfs / "etc"
    # a small initramfs that update-initramfs can rebuild inside a TCG guest in ~30 s
    # (MODULES=most with gzip took 9 minutes there)
    (etc / "initramfs-tools" / "conf.d" / "libshare-guest.conf").write_text(
        "# libshare test guest: only the listed modules, zstd\nMODULES=list\nCOMPRESS=zstd\n")
    with open(etc / "initramfs-tools" / "modules", "a") as fh:
        fh.write("".join(f"{m}\n" for m in INITRAMFS_MODULES))
    _run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
          'mount -t proc proc "$1/proc" && chroot "$1" update-initramfs -u -k "$2"',
          "sh", str(rootfs), releases[-1]])
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
                               "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "fstab").write_text(f"UUID={root_uuid}\t/\text4\tdefaults,errors=remount-ro\t0 1\n")
    (etc / "resolv.conf").unlink(missing_ok=True)
    unit = etc / "systemd" / "system" / "libshare-debian-booted.service"
    unit.write_text(_BOOTED_UNIT)
    _run(["systemctl", f"--root={rootfs}", "enable", unit.name])
    _run(["systemctl", f"--root={rootfs}", "mask", *MASKED_UNITS])
    for junk in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"):
        (rootfs / junk).unlink(missing_ok=True)
    # GRUB: modules in /boot/grub/i386-pc, a config booting Debian's symlinks
    grub = rootfs / "boot" / "grub"
    (grub / "i386-pc").mkdir(parents=True, exist_ok=True)
    for f in GRUB_DIR.iterdir():
        if f.suffix in (".mod", ".lst"):
            shutil.copy2(f, grub / "i386-pc" / f.name)
    (grub / "grub.cfg").write_text(
        "# written by libshare/guests/debian.py (no update-grub in this image)\n"
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
        "set timeout=0\nset default=0\ninsmod part_msdos\ninsmod ext2\n"
        "menuentry 'Debian GNU/Linux' {\n"
        f"  search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"  linux /vmlinuz root=UUID={root_uuid} {DEBIAN_CMDLINE}\n"
        "  initrd /initrd.img\n}\n")
    return releases[-1]


def _build(build: Path, suite: str, packages: Sequence[str], mirror: str,
           debs: Path) -> dict[str, Any]:
    """Build ``build/disk.qcow2``; return the info fields it learnt (kernel_release,
    root_uuid, mirror, size)."""
    for tool in ("debootstrap", "mke2fs", "sfdisk", "grub-mkimage", "qemu-img", "unshare"):
        if shutil.which(tool) is None:
            raise DebianImageError(f"{tool} not found (scripts/setup-host installs it)")
    debs.mkdir(parents=True, exist_ok=True)
    rootfs = build / "root"
    # a private mount namespace: debootstrap's /proc and /sys mounts die with it
    _run(["unshare", "--mount", "--propagation", "private", "debootstrap",
          "--variant=minbase", f"--include={','.join(packages)}", f"--cache-dir={debs}",
          suite, str(rootfs), mirror], env=apt_proxy_env())
    root_uuid = _run(["cat", "/proc/sys/kernel/random/uuid"]).strip()
    release = _configure_root(rootfs, root_uuid)
    raw = build / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(DISK_MIB * 1024 * 1024)
    _run(["sfdisk", "-q", str(raw)],
         stdin=f"label: dos\nstart={PARTITION_OFFSET // 512}, type=83, bootable\n")
    fs_kib = (DISK_MIB * 1024 * 1024 - PARTITION_OFFSET) // 1024
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-U", root_uuid,
          "-E", f"offset={PARTITION_OFFSET}", "-d", str(rootfs), str(raw), f"{fs_kib}k"])
    core = build / "core.img"
    _run(["grub-mkimage", "-O", "i386-pc", "-p", "(,msdos1)/boot/grub", "-o", str(core),
          "biosdisk", "part_msdos", "ext2", "search_fs_uuid"])
    if core.stat().st_size > PARTITION_OFFSET - 512:
        raise DebianImageError("GRUB core.img does not fit before the partition")
    boot = (GRUB_DIR / "boot.img").read_bytes()
    with open(raw, "r+b") as fh:
        fh.write(boot[:440])  # boot code only: keep the disk signature and partition table
        fh.seek(512)
        fh.write(core.read_bytes())
    qcow = build / "disk.qcow2"
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)])
    raw.unlink()
    core.unlink()
    shutil.rmtree(rootfs)
    qcow.chmod(0o644)
    return {"kernel_release": release, "root_uuid": root_uuid, "mirror": mirror,
            "size_bytes": qcow.stat().st_size}


def create_overlay(image: DebianImage | Path | str, path: Path | str) -> Path:
    """Create (replacing any old one) a qcow2 overlay at ``path`` backed by ``image``;
    return ``path``. The overlay is made readable by QEMU (mode 0644)."""
    base = image.path if isinstance(image, DebianImage) else Path(image)
    out = Path(path)
    out.unlink(missing_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(out)])
    out.chmod(0o644)
    return out


#: Where the image's shared libraries live (what a region built from it holds).
IMAGE_LIBDIR = "usr/lib/x86_64-linux-gnu"


@contextlib.contextmanager
def image_root(image: DebianImage | Path | str, workdir: Path | str | None = None
               ) -> Iterator[Path]:
    """Mount the root file system of a Debian image read-only on the host and yield the
    mount point (a :class:`~pathlib.Path`); everything is undone when the block ends,
    on errors too: unmounted, loop device detached, temporary files removed.

    The qcow2 is converted to a raw copy (``qemu-img convert``; sparse) in a temporary
    directory under ``workdir`` (default: next to the image cache); the partition at
    :data:`PARTITION_OFFSET` is attached to a read-only loop device and mounted
    ``ro,noload`` (ext4 without journal replay), so neither the cached image nor the raw
    copy is ever written. Raises DebianImageError if a step fails."""
    base = image.path if isinstance(image, DebianImage) else Path(image)
    parent = Path(workdir) if workdir is not None else base.parent.parent.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".root-", dir=parent))
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, tmp, ignore_errors=True)
        raw = tmp / "disk.raw"
        _run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)])
        loop = _run(["losetup", "--find", "--show", "--read-only",
                     "--offset", str(PARTITION_OFFSET), str(raw)]).strip()
        undo.callback(subprocess.run, ["losetup", "-d", loop], check=False,
                      capture_output=True)
        mnt = tmp / "root"
        mnt.mkdir()
        _run(["mount", "-t", "ext4", "-o", "ro,noload", loop, str(mnt)])
        undo.callback(subprocess.run, ["umount", str(mnt)], check=False, capture_output=True)
        yield mnt


def copy_image_libraries(image: DebianImage | Path | str, dest: Path | str,
                         libdirs: Sequence[str] = (IMAGE_LIBDIR,),
                         workdir: Path | str | None = None) -> Path:
    """Copy the image's library directories ``libdirs`` (relative to its root; symlinks
    kept as symlinks) into ``dest``, at the same relative paths, through
    :func:`image_root`; return ``dest``, ready for ``store.import_tree(store, [dest])``
    (guest paths are then the paths inside the image)."""
    out = Path(dest)
    with image_root(image, workdir) as root:
        for d in libdirs:
            shutil.copytree(root / d.strip("/"), out / d.strip("/"), symlinks=True,
                            dirs_exist_ok=True)
    return out


# ------------------------------------------------------------------ domain XML


def debian_domain_tree(
    name: str,
    disk: Path | str,
    console_log: Path | str,
    *,
    memory_mib: int = 512,
    vcpus: int = 1,
    domain_type: str = "qemu",
    devices: Sequence[str | etree._Element] = (),
    customize: Customizer | Sequence[Customizer] | None = None,
) -> etree._Element:
    """Return the ``<domain>`` element of a Debian test guest ``name`` booting from the
    qcow2 ``disk`` (virtio) through its own boot loader, serial console to
    ``console_log``, a qemu-guest-agent channel, a virtio balloon, no network;
    poweroff/crash destroy, reboot restarts. ``devices`` are appended (a
    ``<memballoon>`` among them replaces the default one); ``customize`` callbacks then
    edit the root element in place."""
    # console_append: a power cycle (DebianGuest.restart) starts a new QEMU on the same
    # console file, and the boot count relies on the earlier boots' lines
    dom, os_el, devs = domain_skeleton(name, console_log, memory_mib=memory_mib, vcpus=vcpus,
                                       domain_type=domain_type, on_reboot="restart",
                                       balloon="virtio", console_append=True)
    _sub(os_el, "boot", dev="hd")
    disk_el = etree.Element("disk", type="file", device="disk")
    _sub(disk_el, "driver", name="qemu", type="qcow2")
    _sub(disk_el, "source", file=str(disk))
    _sub(disk_el, "target", dev="vda", bus="virtio")
    devs.insert(0, disk_el)
    channel = _sub(devs, "channel", type="unix")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    finish_domain(dom, devs, devices, customize)
    return dom


def debian_domain_xml(name: str, disk: Path | str, console_log: Path | str,
                      **kwargs: Any) -> str:
    """Return :func:`debian_domain_tree` (same arguments) serialised as a string."""
    tree = debian_domain_tree(name, disk, console_log, **kwargs)
    return etree.tostring(tree, pretty_print=True, encoding="unicode")


# ------------------------------------------------------------------ runner


@dataclass
class DebianGuestOptions:
    """How to boot a Debian test guest: ``image`` (None: :func:`debian_image` with
    ``suite``/``extra_packages``), RAM, vCPUs, extra ``devices`` XML, ``customize``
    callbacks, ``domain_type`` (``qemu`` = TCG), ``boot_timeout`` seconds per boot,
    ``cache`` root, ``keep_files`` (keep the run dir's console.log; the overlay always goes)."""

    image: DebianImage | None = None
    suite: str | None = None
    extra_packages: Sequence[str] = ()
    memory_mib: int = 512
    vcpus: int = 1
    devices: Sequence[str | etree._Element] = ()
    customize: Sequence[Customizer] = field(default_factory=list)
    domain_type: str = "qemu"
    boot_timeout: float = 180.0
    cache: Path | str | None = None
    keep_files: bool = False


@dataclass(frozen=True)
class Boot:
    """One boot of a guest as its console reported it: ``index`` (1 = first boot of this
    run), ``boot_id``, guest ``uptime`` seconds when multi-user was reached, kernel
    ``release``, and host ``seconds`` from start (or reboot request) to agent answer."""

    index: int
    boot_id: str
    uptime: float
    release: str
    seconds: float


def console_boots(text: str) -> list[tuple[str, float, str]]:
    """Return ``(boot_id, uptime, release)`` of each boot marker in console ``text``."""
    return [(m.group(1), float(m.group(2)), m.group(3))
            for m in _BOOTED_RE.finditer(text.replace("\r", ""))]


class DebianGuest(RunningGuest):
    """A started Debian test guest; destroyed, undefined and its overlay removed when
    the :func:`defined_debian_guest`/:func:`running_debian_guest` block ends. Console,
    liveness and QEMU pid come from :class:`~libshare.guests.runner.RunningGuest`."""

    def __init__(self, conn: Any, name: str, domain: Any, console_log: Path, overlay: Path,
                 image: DebianImage, boot_timeout: float) -> None:
        super().__init__(conn, name, domain, console_log)
        self.overlay = overlay
        self.image = image
        self.boot_timeout = boot_timeout
        self.agent = GuestAgent.for_domain(domain)
        self.last_boot: Boot | None = None

    def boots(self) -> list[tuple[str, float, str]]:
        """Return ``(boot_id, uptime, release)`` of every boot the console reported."""
        return console_boots(self.console())

    def wait_booted(self, timeout: float | None = None, count: int = 1) -> Boot:
        """Wait until the console shows ``count`` boots reaching multi-user and the agent
        answers ``guest-ping``; return that :class:`Boot`. Raises GuestTimeout after
        ``timeout`` seconds (default: the options' boot timeout) and GuestError if the
        guest stops first."""
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while len(self.boots()) < count:
            if not self.is_active():
                raise GuestError(f"guest {self.name} stopped while booting:\n"
                                 + self.console()[-2000:])
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest {self.name} did not reach multi-user within "
                                   f"{timeout:.0f}s:\n" + self.console()[-2000:])
            time.sleep(0.5)
        while True:
            try:
                self.agent.ping()
                break
            except AgentError as exc:
                if not self.is_active():
                    raise GuestError(f"guest {self.name} stopped after booting: {exc}") from exc
                if time.monotonic() > deadline:
                    raise GuestTimeout(f"guest {self.name} booted but its agent did not "
                                       f"answer within {timeout:.0f}s: {exc}") from exc
            time.sleep(0.5)
        boot_id, uptime, release = self.boots()[count - 1]
        self.last_boot = Boot(count, boot_id, uptime, release, time.monotonic() - self.started)
        return self.last_boot

    def exec(self, argv: Sequence[str], stdin: bytes | str | None = None,
             timeout: float = 60.0, check: bool = False) -> ExecResult:
        """Run ``argv`` in the guest through the agent; return its ExecResult."""
        return self.agent.exec(argv, stdin=stdin, timeout=timeout, check=check)

    def sh(self, script: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``script`` with ``/bin/sh -c`` in the guest; return its stdout text
        (AgentError on a non-zero exit when ``check``)."""
        return self.agent.exec(["/bin/sh", "-c", script], timeout=timeout, check=check).out

    def reboot(self, timeout: float | None = None) -> Boot:
        """Reboot the guest with ``systemctl reboot`` run through the agent, and wait for
        the new boot; return it. Raises GuestTimeout if it does not come back in time.

        (The image has no D-Bus, so no logind: the agent's ``guest-shutdown`` (which runs
        ``shutdown -r +0``) and the ACPI power button do nothing in it.)"""
        count = self._systemctl("reboot")
        return self.wait_booted(timeout, count=count)

    def restart(self, timeout: float | None = None, stop_timeout: float = 180.0) -> Boot:
        """Power-cycle the guest: ``systemctl poweroff`` through the agent, wait until
        libvirt sees the domain stopped, start it again, and wait for the new boot;
        return it. Raises GuestTimeout if it does not stop or come back in time.

        Tests and the demo use this rather than :meth:`reboot`: a warm reset keeps
        QEMU's TCG translations of the old kernel's pages, and GRUB's relocator then
        copies a new initramfs/kernel layout over them one self-modifying-code fault per
        byte (seen: 1.2 KB/s, reboots of 5-10 minutes). A new QEMU process has none."""
        count = self._systemctl("poweroff")
        deadline = time.monotonic() + stop_timeout
        while self.is_active():
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest {self.name} did not power off within "
                                   f"{stop_timeout:.0f}s")
            time.sleep(0.5)
        libvirt = _libvirt()
        try:
            self.domain.create()
        except libvirt.libvirtError as exc:
            raise GuestError(f"cannot start {self.name} again: {exc}\n"
                             f"{qemu_log_tail(self.name)}") from exc
        return self.wait_booted(timeout, count=count)

    def _systemctl(self, action: str) -> int:
        """Start ``systemctl ACTION`` (reboot, poweroff) in the guest through guest-exec,
        which answers before the command runs (the agent dies with the old system), and
        restart the boot clock; return the boot count the next boot will have."""
        count = len(self.boots()) + 1
        self.started = time.monotonic()
        try:
            self.agent.command("guest-exec", {"path": "/bin/systemctl", "arg": [action]})
        except AgentError as exc:
            verb = {"poweroff": "power off"}.get(action, action)
            raise GuestError(f"cannot {verb} {self.name}: {exc}") from exc
        return count


class DefinedDebianGuest:
    """A defined, not yet started Debian test guest (callers may redefine ``domain``
    through libvirt, e.g. enrol it, before :meth:`start`)."""

    def __init__(self, conn: Any, name: str, domain: Any, console_log: Path, overlay: Path,
                 image: DebianImage, boot_timeout: float) -> None:
        self.conn = conn
        self.name = name
        self.domain = domain
        self.console_log = console_log
        self.overlay = overlay
        self.image = image
        self.boot_timeout = boot_timeout

    def start(self, wait: bool = True) -> DebianGuest:
        """Start the domain as now defined; return the :class:`DebianGuest`, booted
        (multi-user reached, agent answering) unless ``wait`` is False."""
        libvirt = _libvirt()
        self.console_log.unlink(missing_ok=True)
        try:
            dom = self.conn.lookupByName(self.name)
            dom.create()
        except libvirt.libvirtError as exc:
            raise GuestError(f"cannot start test guest {self.name}: {exc}\n"
                             f"{qemu_log_tail(self.name)}") from exc
        guest = DebianGuest(self.conn, self.name, dom, self.console_log, self.overlay,
                            self.image, self.boot_timeout)
        if wait:
            guest.wait_booted()
        return guest


@contextlib.contextmanager
def defined_debian_guest(conn: Any, name: str, options: DebianGuestOptions | None = None
                         ) -> Iterator[DefinedDebianGuest]:
    """Define (not start) Debian test guest ``name`` on a fresh overlay of the cached
    image and yield a :class:`DefinedDebianGuest`; on leaving the block the domain is
    destroyed and undefined and the overlay removed, always (the run directory too,
    unless ``options.keep_files``)."""
    libvirt = _libvirt()
    options = options or DebianGuestOptions()
    image = options.image or debian_image(options.suite, options.extra_packages,
                                          cache=options.cache)
    cleanup_domain(conn, name)
    rdir = run_dir(name, options.cache)
    console = rdir / "console.log"
    overlay = rdir / "disk.qcow2"
    try:
        console.unlink(missing_ok=True)
        create_overlay(image, overlay)
        xml = debian_domain_xml(name, overlay, console, memory_mib=options.memory_mib,
                                vcpus=options.vcpus, domain_type=options.domain_type,
                                devices=options.devices, customize=list(options.customize))
        try:
            dom = conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise GuestError(f"cannot define test guest {name}: {exc}") from exc
        yield DefinedDebianGuest(conn, name, dom, console, overlay, image,
                                 options.boot_timeout)
    finally:
        cleanup_domain(conn, name)
        overlay.unlink(missing_ok=True)
        if not options.keep_files:
            shutil.rmtree(rdir, ignore_errors=True)


@contextlib.contextmanager
def running_debian_guest(conn: Any, name: str, options: DebianGuestOptions | None = None,
                         *, wait: bool = True) -> Iterator[DebianGuest]:
    """Define, start and (unless ``wait`` is False) wait for Debian test guest ``name``
    to boot; yield the :class:`DebianGuest`. Always cleaned up as in
    :func:`defined_debian_guest`."""
    with defined_debian_guest(conn, name, options) as defined:
        yield defined.start(wait=wait)
