"""Initrd files the boot tests read, written with libshare's own cpio writer: one with
the layout initramfs-tools gives (``/init``, ``scripts/functions``, ``conf/``,
``scripts/init-bottom/ORDER`` running udev's script), optionally compressed and behind
an uncompressed early-microcode archive, and one with dracut's layout."""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

from libshare.util import cpio

#: the ORDER initramfs-tools writes for an initramfs whose only init-bottom script is udev's
UDEV_ORDER = b'/scripts/init-bottom/udev "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'


def initramfs_tools_entries() -> list[cpio.Entry]:
    """Return the members of a minimal initramfs-tools initramfs."""
    return cpio.with_parents([
        cpio.file_entry("init", b"#!/bin/sh\n. /scripts/functions\n", 0o755),
        cpio.file_entry("conf/initramfs.conf", b"MODULES=list\n"),
        cpio.file_entry("conf/conf.d/guest.conf", b"COMPRESS=zstd\n"),
        cpio.file_entry("scripts/functions", b"run_scripts() { . \"$1/ORDER\"; }\n"),
        cpio.file_entry("scripts/init-bottom/udev", b"#!/bin/sh\nexit 0\n", 0o755),
        cpio.file_entry("scripts/init-bottom/ORDER", UDEV_ORDER),
        cpio.file_entry("usr/bin/sh", b"\x7fELF-klibc-sh", 0o755),
        cpio.symlink_entry("bin", "usr/bin"),
    ])


def compress(data: bytes, fmt: str) -> bytes:
    """Return ``data`` compressed as ``fmt`` (gzip, xz, zstd: the host's zstd)."""
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "xz":
        return lzma.compress(data)
    if fmt == "zstd":
        if shutil.which("zstd") is None:
            raise FileNotFoundError("zstd")
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                              check=True).stdout
    raise ValueError(fmt)


def initramfs_tools_initrd(path: Path, fmt: str | None = "gzip",
                           microcode: bool = False) -> Path:
    """Write an initramfs-tools initrd to ``path`` (its archive compressed as ``fmt``,
    None: not compressed), after an uncompressed early-microcode archive when
    ``microcode``; return ``path``."""
    main = cpio.write_archive(initramfs_tools_entries())
    blob = compress(main, fmt) if fmt else main
    if microcode:
        early = cpio.write_archive(cpio.with_parents([cpio.file_entry(
            "kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 100)]))
        blob = early + blob
    path.write_bytes(blob)
    return path


def dracut_initrd(path: Path) -> Path:
    """Write a gzip-compressed initrd with dracut's layout to ``path``; return it."""
    entries = cpio.with_parents([
        cpio.file_entry("init", b"\x7fELF-systemd", 0o755),
        cpio.file_entry("usr/lib/dracut/hooks/pre-pivot/README", b""),
        cpio.file_entry("etc/initrd-release", b"NAME=dracut\n"),
    ])
    path.write_bytes(gzip.compress(cpio.write_archive(entries), mtime=0))
    return path
