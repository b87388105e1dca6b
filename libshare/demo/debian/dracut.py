"""The Debian test image with Debian's ``dracut`` package instead of initramfs-tools.

Owns a derived image: the cached Debian image (:func:`~libshare.demo.debian.image.debian_image`)
with ``dracut`` installed in it (which removes initramfs-tools) and a small generic
dracut configuration (:data:`DRACUT_CONF`: host-only off, zstd, only the drivers that
mount the root, as initramfs-tools' ``MODULES=list`` does), so that its initramfs is
dracut's. It is made offline, never booted: libshare's own image opening
(:mod:`libshare.image.disk`) on a qcow2 overlay of the cached image, ``apt-get`` in a
chroot from the image's own apt sources (with this host's resolver and apt proxy), run
in a child process with a private mount namespace. The overlay (backed by the cached
image) is cached beside it as ``<image dir>/dracut-<key>/disk.qcow2``, built once under
a lock (a few minutes), atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from libshare.demo.apt import apt_proxy_env
from libshare.demo.cache import publish_build
from libshare.demo.debian.image import DebianImage, DebianImageError, debian_image
from libshare.util.files import locked

#: Bump when the recipe changes: part of the cache key.
DRACUT_FORMAT = "1"
DRACUT_CONF = """# libshare test guest: a small generic initramfs (like MODULES=list of initramfs-tools)
hostonly="no"
compress="zstd"
drivers+=" virtio_pci virtio_blk ext4 "
"""
DRACUT_CONF_PATH = "/etc/dracut.conf.d/10-libshare-guest.conf"
#: refuses to start services while packages are installed in the chroot
POLICY_RC = "#!/bin/sh\nexit 101\n"


def dracut_image(base: DebianImage | None = None) -> DebianImage:
    """Return the cached Debian image whose initramfs dracut builds (derived from
    ``base``, default the cached Debian image), building it first if needed."""
    base = base or debian_image()
    key = hashlib.sha256(json.dumps([DRACUT_FORMAT, DRACUT_CONF, base.key]).encode()
                         ).hexdigest()[:12]
    target = base.directory / f"dracut-{key}"
    if not (target / ".complete").exists():
        with locked(base.directory / ".dracut.lock"):
            if not (target / ".complete").exists():
                _build(base, target)
    return dataclasses.replace(base, path=target / "disk.qcow2",
                               packages=(*base.packages, "dracut"),
                               key=f"{base.key}/dracut-{key}")


def _build(base: DebianImage, target: Path) -> None:
    """Build the derived image into ``target`` (a temporary folder beside it, renamed
    when complete) in a child process with a private mount namespace."""
    work = Path(tempfile.mkdtemp(prefix=".dracut-", dir=base.directory))
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(base.path), str(work / "disk.qcow2")], check=True)
        proc = subprocess.run([sys.executable, "-m", "libshare.demo.debian.dracut",
                               str(work / "disk.qcow2")], capture_output=True, text=True,
                              check=False, timeout=1800)
        if proc.returncode != 0:
            raise DebianImageError(f"building the dracut image failed: "
                                   f"{(proc.stderr or proc.stdout)[-1500:]}")
        (work / "disk.qcow2").chmod(0o644)
        (work / "build.log").write_text(proc.stdout + proc.stderr)
        publish_build(work, target, f"{base.key} dracut {DRACUT_FORMAT}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _chroot(root: Path, *argv: str, env: dict[str, str] | None = None) -> str:
    """Run ``argv`` in the image; return its output (DebianImageError when it fails)."""
    from libshare.image import tree

    proc = tree.chroot(root, list(argv), env=env)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        raise DebianImageError(f"{' '.join(argv)} failed in the image: {out[-1500:]}")
    return out


def install_dracut(overlay: Path) -> None:
    """Install dracut into the Debian image ``overlay`` (opened writable here; run as
    root in a private mount namespace), with :data:`DRACUT_CONF`, and check that its
    initramfs is dracut's afterwards."""
    from libshare.image import disk, tree

    disk.private_mounts()
    info = disk.image_info(overlay)
    with tempfile.TemporaryDirectory(dir=overlay.parent) as tmp, \
            disk.opened(info.path, info.format, info.virtual_size, Path(tmp),
                        writable=True) as op:
        root = op.root
        lists = tree.resolve(root, "/var/lib/apt/lists")
        had_lists = lists.is_dir() and any(p.name.endswith("Packages") for p in lists.iterdir())
        created: list[str] = []
        tree.write_file(root, DRACUT_CONF_PATH, DRACUT_CONF.encode(), 0o644, created)
        tree.write_file(root, "/usr/sbin/policy-rc.d", POLICY_RC.encode(), 0o755, created)
        resolv = tree.resolve(root, "/etc/resolv.conf")
        had_resolv = resolv.exists() or resolv.is_symlink()
        if not had_resolv:
            shutil.copyfile("/etc/resolv.conf", resolv)
        env = {"DEBIAN_FRONTEND": "noninteractive", **apt_proxy_env()}
        try:
            print(_chroot(root, "apt-get", "-q", "update", env=env))
            print(_chroot(root, "apt-get", "-q", "-y", "--no-install-recommends", "install",
                          "dracut", env=env))
            print(_chroot(root, "apt-get", "clean"))
        finally:
            tree.remove_entry(root, "/usr/sbin/policy-rc.d")
            if not had_resolv:
                tree.remove_entry(root, "/etc/resolv.conf")
        if not had_lists:  # ~80 MB the image did not carry before
            for p in lists.iterdir():
                if p.is_file():
                    p.unlink()
        for kernel in tree.kernels(root):
            listing = _chroot(root, "lsinitrd", f"/boot/initrd.img-{kernel}")
            if "dracut modules:" not in listing:
                raise DebianImageError(f"the initramfs of {kernel} is not dracut's")
        if tree.resolve(root, "/usr/sbin/update-initramfs").exists():
            raise DebianImageError("initramfs-tools is still installed after dracut")


if __name__ == "__main__":  # the child process of _build
    install_dracut(Path(sys.argv[1]))
