"""Initramfs images for small test guests: a cached base archive and per-test overlays.

Owns the guest's ``/init`` (POSIX sh run by busybox: mounts proc/sys/devtmpfs, loads the
kernel modules in dependency order, runs ``/test.sh`` with its output on the serial
console between ``LIBSHARE-TEST-BEGIN`` and ``LIBSHARE-TEST-END rc=N`` markers, then
``poweroff -f``), the base archive (busybox-static with applet links, modules, /init,
``/etc/libshare.sh`` helpers) cached under ``<cache>/initrd/``, and the small overlay
archive (``/test.sh``, extra files, host binaries with their shared libraries) appended
to the base for each guest. Archives are written by :mod:`libshare.util.cpio`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from libshare.boot.overlay import unpacked_module
from libshare.demo.cache import cache_subdir
from libshare.demo.tiny.kernel import DEFAULT_MODULES, KernelPackage, kernel_modules_order
from libshare.util import cpio
from libshare.util.files import locked

BUSYBOX = Path("/bin/busybox")
BEGIN_MARKER = "LIBSHARE-TEST-BEGIN"
END_MARKER = "LIBSHARE-TEST-END"
READY_MARKER = "LIBSHARE-READY"
BOOTED_MARKER = "LIBSHARE-BOOTED"
INIT_VERSION = "4"  # bump when INIT_SCRIPT / HELPERS / layout change (cache key)

INIT_SCRIPT = f"""#!/bin/sh
# libshare test guest init (generated; see libshare/demo/tiny/initramfs.py)
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
while read -r m; do
    case "$m" in
        "") continue ;;
        "?"*) insmod "/lib/modules/${{m#?}}" 2>/dev/null; continue ;;
    esac
    insmod "/lib/modules/$m" 2>/tmp/insmod.err || \\
        echo "LIBSHARE-INSMOD-FAILED $m: $(cat /tmp/insmod.err)"
done < /etc/libshare-modules
echo "{BOOTED_MARKER} $(cut -d' ' -f1 /proc/uptime)"
rc=127
if [ -f /test.sh ]; then
    echo "{BEGIN_MARKER}"
    cd /
    sh /test.sh
    rc=$?
else
    echo "{BEGIN_MARKER}"
    echo "no /test.sh in the initramfs"
fi
echo "{END_MARKER} rc=$rc"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""

HELPERS = f"""# Helpers for /test.sh: '. /etc/libshare.sh'
# ready [TEXT]: tell the host the guest is ready (prints the ready marker)
ready() {{ echo "{READY_MARKER} $*"; }}
# wait_for_path PATH [SECONDS]: wait until PATH exists; returns 1 on timeout
wait_for_path() {{
    n=$(( ${{2:-10}} * 10 ))
    while [ ! -e "$1" ] && [ "$n" -gt 0 ]; do sleep 0.1; n=$((n - 1)); done
    [ -e "$1" ]
}}
# park: sleep until the host destroys the guest
park() {{ while :; do sleep 3600; done; }}
"""

_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/local", "usr/local/bin",
         "dev", "proc", "sys", "tmp", "run", "mnt", "etc", "lib", "lib/modules", "root", "var")


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """Return the applet install paths busybox knows (``--list-full``, e.g. ``bin/sh``)."""
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def base_entries(kernel: KernelPackage, modules: Sequence[str] = DEFAULT_MODULES,
                 busybox: Path = BUSYBOX) -> list[cpio.Entry]:
    """Return the sorted entries of the base image: directories, /dev/console, busybox
    and its applet symlinks, /init, /etc/libshare.sh, the module files and
    /etc/libshare-modules (their load order)."""
    optional: set[str] = set()
    order = kernel_modules_order(kernel, modules, optional)
    entries: list[cpio.Entry] = [cpio.dir_entry(d) for d in _DIRS]
    entries.append(cpio.chardev_entry("dev/console", 5, 1))
    entries.append(cpio.chardev_entry("dev/null", 1, 3, 0o666))
    entries.append(cpio.chardev_entry("dev/ttyS0", 4, 64))
    entries.append(cpio.file_entry("bin/busybox", busybox.read_bytes(), 0o755))
    for applet in busybox_applets(busybox):
        if applet != "bin/busybox":
            entries.append(cpio.symlink_entry(applet, "/bin/busybox"))
    entries.append(cpio.file_entry("init", INIT_SCRIPT.encode(), 0o755))
    entries.append(cpio.file_entry("etc/libshare.sh", HELPERS.encode(), 0o644))
    entries.append(cpio.file_entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(cpio.file_entry("etc/group", b"root:x:0:\n"))
    plain = []
    for rel in order:
        name, data = unpacked_module(rel, (kernel.modules_dir / rel).read_bytes())
        plain.append(f"?{name}" if rel in optional else name)
        entries.append(cpio.file_entry(f"lib/modules/{name}",
                                       data))
    entries.append(cpio.file_entry("etc/libshare-modules", ("\n".join(plain) + "\n").encode()))
    entries.append(cpio.file_entry("etc/libshare-kernel",
                                   f"{kernel.package} {kernel.version} {kernel.release}\n".encode()))
    return cpio.with_parents(entries)


def base_initramfs(kernel: KernelPackage, modules: Sequence[str] = DEFAULT_MODULES,
                   cache: Path | str | None = None) -> Path:
    """Return the path of the cached base initramfs for ``kernel`` and ``modules``,
    building it on first use (key: kernel package/version, module list, busybox digest,
    init version). The file is mode 0644 under ``<cache>/initrd/``."""
    bb_digest = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:16]
    key_src = "\n".join([kernel.package, kernel.version, ",".join(modules), bb_digest,
                         INIT_VERSION, INIT_SCRIPT, HELPERS])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out_dir = cache_subdir("initrd", cache)
    out = out_dir / f"base-{kernel.release}-{key}.cpio"
    if out.exists():
        return out
    with locked(out_dir / ".lock"):
        if out.exists():
            return out
        blob = cpio.write_archive(base_entries(kernel, modules))
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.chmod(0o644)
        tmp.rename(out)
    return out


# ----------------------------------------------------------- overlay (per test)


def shared_libraries(binary: Path | str) -> list[Path]:
    """Return the shared libraries ``binary`` needs at run time (its ELF interpreter
    included), as absolute host paths resolved by ``ldd``; empty for static binaries."""
    res = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                         check=False, env=dict(os.environ, LC_ALL="C"))
    libs: list[Path] = []
    for line in res.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def binary_entries(binaries: Iterable[Path | str]) -> list[cpio.Entry]:
    """Return entries copying host ``binaries`` and their shared libraries into the image
    at the same paths (symlinks followed, executables mode 0755)."""
    files: dict[str, Path] = {}
    for b in binaries:
        path = Path(b) if os.sep in str(b) else Path(shutil.which(str(b)) or b)
        if not path.exists():
            raise FileNotFoundError(f"binary {b} not found on the host")
        files[str(path)] = path
        for lib in shared_libraries(path):
            files[str(lib)] = lib
    entries = []
    for name, path in files.items():
        real = path.resolve()
        mode = 0o755 if os.access(real, os.X_OK) or ".so" in real.name else 0o644
        entries.append(cpio.file_entry(name, real.read_bytes(), mode))
    return entries


def overlay_archive(
    script: str | None,
    files: Mapping[str, bytes | str | Path] | None = None,
    binaries: Sequence[Path | str] = (),
) -> bytes:
    """Return a small newc archive holding ``/test.sh`` (if ``script`` is given), extra
    ``files`` (guest path -> bytes, text or host Path; mode 0755 if the host file is
    executable or the text starts with ``#!``), and ``binaries`` with their libraries.
    Meant to be appended to a base archive; inode numbers start high to avoid clashes."""
    entries: list[cpio.Entry] = []
    if script is not None:
        entries.append(cpio.file_entry("test.sh", script.encode(), 0o755))
    for name, content in (files or {}).items():
        if isinstance(content, Path):
            data = content.read_bytes()
            mode = stat.S_IMODE(content.stat().st_mode)
        else:
            data = content.encode() if isinstance(content, str) else content
            mode = 0o755 if data.startswith(b"#!") else 0o644
        entries.append(cpio.file_entry(name, data, mode))
    entries.extend(binary_entries(binaries))
    return cpio.write_archive(cpio.with_parents(entries), first_ino=0x100000)


def guest_initrd(base: Path, overlay: bytes, dest: Path) -> Path:
    """Write ``base`` followed by ``overlay`` to ``dest`` (mode 0644); return ``dest``."""
    cpio.append_archive(base, overlay, dest)
    return dest
