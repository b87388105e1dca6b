"""The Debian test image: a cached, bootable Debian disk image (debootstrap minbase,
Debian's kernel, its own GRUB and initramfs), qcow2 overlays of it, and read-only access
to its root filesystem from the host.

Owns the image cache ``<cache>/debian/<suite>-<packages hash>/<linux-image-amd64
version>/`` (``disk.qcow2``, ``info.json``, ``.complete``) with its build (atomic: temp
dir + rename, under a ``flock``; ``.deb`` files reused from ``<cache>/debian/debs``),
and, for guests with direct kernel boot, the image's own kernel and initrd copied out
of its /boot (``boot/vmlinuz``, ``boot/initrd.img`` there: :func:`boot_files`).

The image: an MBR disk with one ext4 partition (label ``lsroot``, root by UUID), GRUB
(i386-pc, ``core.img`` embedded after the MBR, ``/boot/grub/grub.cfg`` booting the
``/vmlinuz`` and ``/initrd.img`` symlinks that Debian's kernel scripts maintain, so an
``update-initramfs -u`` inside the guest takes effect at the next boot), kernel command
line :data:`DEBIAN_CMDLINE` (serial console on ttyS0; Debian's ``update-grub`` is there
and regenerates an equivalent grub.cfg from :data:`GRUB_DEFAULTS`), hostname ``lsguest``, no network,
no getty but the serial one, timers and other idle units masked, and a oneshot unit that
prints ``LIBSHARE-DEBIAN-BOOTED boot_id=... uptime=... release=...`` on the console once
``multi-user.target`` is reached. The initramfs is initramfs-tools' with ``MODULES=list``
(:data:`INITRAMFS_MODULES` in ``/etc/initramfs-tools/modules``) and zstd, set in
``/etc/initramfs-tools/conf.d/libshare-guest.conf``: ``update-initramfs -u`` takes ~40 s
inside a TCG guest; hooks that need more modules add them (``manual_add_modules``). There
is no D-Bus, hence no logind. No loop device and no mount are used to build it:
``mke2fs -d`` writes the file system straight into the image at its partition offset and
GRUB's ``boot.img``/``core.img`` are written into the raw disk.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libshare.demo.apt import apt_options, apt_proxy_env, host_mirror, host_suite, run
from libshare.demo.cache import cache_subdir
from libshare.demo.lifecycle import (
    GuestError,
)
from libshare.util.files import locked

DEFAULT_SUITE = "bookworm"


#: Packages debootstrap installs (``--variant=minbase --include=...``) besides minbase.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd-sysv", "udev", "kmod", "qemu-guest-agent", "linux-image-amd64",
    "initramfs-tools", "util-linux", "coreutils", "procps", "e2fsprogs", "zstd",
    # update-grub, as in every Debian install booting with GRUB (the GRUB code itself
    # is written from the host's grub-pc-bin at build time)
    "grub2-common", "grub-pc-bin",
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


#: The image's serial console (its kernel command line and GRUB's /etc/default/grub).
DEBIAN_CONSOLE = "console=ttyS0,115200"
#: Kernel command line written into the image's grub.cfg.
DEBIAN_CMDLINE = f"{DEBIAN_CONSOLE} ro"
#: The image's /etc/default/grub: what update-grub in the guest makes of it boots as
#: the grub.cfg written at build time does (serial console, no menu).
GRUB_DEFAULTS = f"""# written by libshare/demo/debian/image.py
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{DEBIAN_CONSOLE}"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB_DISABLE_RECOVERY=true
"""


DISK_MIB = 4096


PARTITION_OFFSET = 1024 * 1024


BOOTED_MARKER = "LIBSHARE-DEBIAN-BOOTED"


#: Bump when the build recipe changes: part of the cache key.
IMAGE_FORMAT = "3"


GRUB_DIR = Path("/usr/lib/grub/i386-pc")


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


def kernel_meta_version(suite: str, cache: Path) -> str:
    """Return the version of ``linux-image-amd64`` in ``suite``'s own ``main`` archive
    (what debootstrap installs), from the host's apt lists (or the kit's private apt
    tree for another suite); raises DebianImageError if apt does not know it."""
    opts = apt_options(suite, cache)
    res = subprocess.run(["apt-cache", *opts, "madison", "linux-image-amd64"],
                         capture_output=True, text=True, check=False,
                         env=dict(os.environ, LC_ALL="C"))
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and re.search(rf"\s{re.escape(suite)}/main\s", f" {parts[2]} "):
            return parts[1]
    raise DebianImageError(f"apt does not know linux-image-amd64 in {suite}/main "
                           f"(run apt-get update): {res.stderr.strip()[-200:]}")


def packages_key(suite: str, packages: Sequence[str]) -> str:
    """Return ``<suite>-<hash>``: the cache directory for ``suite`` with ``packages``
    (order and duplicates ignored) and the current :data:`IMAGE_FORMAT`."""
    blob = json.dumps([IMAGE_FORMAT, suite, sorted(set(packages)), DEBIAN_CMDLINE])
    return f"{suite}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, stdin: str | None = None,
         timeout: float = 1200) -> str:
    """Run ``cmd`` (feeding ``stdin``); return stdout, raising DebianImageError on failure."""
    return run(cmd, env=env, stdin=stdin, timeout=timeout, error=DebianImageError)


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
    (etc / "default").mkdir(exist_ok=True)
    (etc / "default" / "grub").write_text(GRUB_DEFAULTS)
    for f in GRUB_DIR.iterdir():
        if f.suffix in (".mod", ".lst"):
            shutil.copy2(f, grub / "i386-pc" / f.name)
    (grub / "grub.cfg").write_text(
        "# written by libshare/demo/debian/image.py at build time (update-grub in the "
        "guest replaces it from /etc/default/grub)\n"
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


@dataclass(frozen=True)
class BootFiles:
    """The kernel and initrd of an image's /boot, copied out for direct kernel boot, and
    the kernel command line that boots the image's root with them."""

    kernel: Path
    initrd: Path
    cmdline: str


def boot_files(image: DebianImage) -> BootFiles:
    """Return the image's ``/boot/vmlinuz-RELEASE`` and ``/boot/initrd.img-RELEASE``
    (what GRUB boots in it, byte for byte), copied once into ``boot/`` of the image's
    cache folder (mode 0644, under the cache lock; read through :func:`image_root`),
    for a domain that boots them with ``<os><kernel>``/``<initrd>``."""
    folder = image.directory / "boot"
    out = BootFiles(folder / "vmlinuz", folder / "initrd.img",
                    f"root=UUID={image.root_uuid} {DEBIAN_CMDLINE}")
    if out.kernel.exists() and out.initrd.exists():
        return out
    with locked(image.directory.parent.parent / ".lock"):
        if out.kernel.exists() and out.initrd.exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=".boot-", dir=image.directory))
        try:
            with image_root(image) as root:
                rel = image.kernel_release
                shutil.copyfile(root / "boot" / f"vmlinuz-{rel}", tmp / "vmlinuz")
                shutil.copyfile(root / "boot" / f"initrd.img-{rel}", tmp / "initrd.img")
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
