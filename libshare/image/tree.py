"""A guest's root tree mounted on the host: what it is, and changing it safely.

Owns what is read from a guest root that is not running: its distribution
(``os-release``) and whether libshare can prepare it (:data:`FAMILIES`), its kernels,
its fstab, its initramfs-tools settings, its free space; where a guest path is on the
host (:func:`resolve` follows the guest's symlinks as the guest would, absolute targets
inside the tree, never out of it), files, links and folders written and removed there,
and the record of what ``image prepare`` wrote (:data:`MARKER`).

:func:`chroot` runs the image's own programs (its initramfs tool, its shell) in a
private mount namespace with /proc, /sys and /dev bound and tmpfs on /tmp, /var/tmp and
/run, so nothing is left mounted and nothing is written to those folders of the image.
Those programs run as root on this host: prepare only images you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import stat
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError, RefusedError
from libshare.redirect.actions import GUEST_STATE_DIR
from libshare.util.files import atomic_write

#: at most this many symbolic links are followed for one path (as the kernel does)
MAX_LINKS = 40
#: what ``image prepare`` wrote into an image (in the guest script's state folder,
#: which the guest's own ``libshare-redirect uninstall`` removes too)
MARKER = f"{GUEST_STATE_DIR}/image.json"
#: distribution families libshare prepares (by os-release ID, then ID_LIKE), and the
#: initramfs tools each may use
FAMILIES: dict[str, str] = {
    "debian": "debian", "ubuntu": "debian", "fedora": "fedora", "rhel": "rhel",
    "centos": "rhel", "rocky": "rhel", "almalinux": "rhel", "suse": "suse",
    "opensuse": "suse", "opensuse-leap": "suse", "opensuse-tumbleweed": "suse",
    "sles": "suse",
}
TOOLS_OF: dict[str, tuple[str, ...]] = {
    "debian": ("initramfs-tools", "dracut"), "fedora": ("dracut",), "rhel": ("dracut",),
    "suse": ("dracut",),
}
#: the environment of programs run in the image (nothing of this host's)
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "LC_ALL": "C", "TERM": "dumb"}
#: folders of the image that must be real folders for :func:`chroot`
CHROOT_DIRS = ("proc", "sys", "dev")
_CHROOT_SH = r"""set -e
r=$1; shift
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
for d in tmp var/tmp run; do
    if [ -d "$r/$d" ] && [ ! -L "$r/$d" ]; then mount -t tmpfs -o mode=1777 tmpfs "$r/$d"; fi
done
exec chroot "$r" "$@"
"""


def resolve(root: Path, guest_path: str) -> Path:
    """Return where ``guest_path`` (absolute, as the guest sees it) is under ``root``,
    following existing symbolic links as the guest would: absolute targets start again
    at ``root``, ``..`` never climbs above it. Missing components are kept as named.
    Raises LibshareError after :data:`MAX_LINKS` links (a loop)."""
    todo = deque(p for p in guest_path.split("/") if p)
    done: list[str] = []
    links = 0
    while todo:
        name = todo.popleft()
        if name in ("", "."):
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        host = root.joinpath(*done, name)
        try:
            mode = os.lstat(host).st_mode
        except OSError:
            done.append(name)
            continue
        if not stat.S_ISLNK(mode):
            done.append(name)
            continue
        links += 1
        if links > MAX_LINKS:
            raise LibshareError(f"too many symbolic links in the image's {guest_path}")
        target = os.readlink(host)
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed([p for p in target.split("/") if p]))
    return root.joinpath(*done)


def read_text(root: Path, guest_path: str) -> str | None:
    """Return the text of the image's file ``guest_path`` (None if it is not a file)."""
    host = resolve(root, guest_path)
    try:
        return host.read_text(errors="replace") if host.is_file() else None
    except OSError:
        return None


# ------------------------------------------------------------------ what the tree is

def os_release_path(root: Path) -> Path | None:
    """Return the image's os-release file (``/etc/os-release``, else
    ``/usr/lib/os-release``), or None when it has none."""
    for guest in ("/etc/os-release", "/usr/lib/os-release"):
        host = resolve(root, guest)
        if host.is_file():
            return host
    return None


def parse_os_release(text: str) -> dict[str, str]:
    """Return the ``KEY=value`` assignments of os-release ``text`` (quotes removed)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            out[m.group(1)] = value
    return out


@dataclass(frozen=True)
class Distribution:
    """The image's distribution: os-release ``id``, ``version_id``, ``pretty`` name and
    the libshare ``family`` it belongs to (debian, fedora, rhel, suse)."""

    id: str
    version_id: str
    pretty: str
    family: str

    def as_dict(self) -> dict[str, str]:
        """Return the distribution as a JSON-ready dict."""
        return dict(self.__dict__)


def distribution(root: Path) -> Distribution:
    """Return the image's :class:`Distribution`; RefusedError for an image without
    os-release or of a distribution libshare does not prepare."""
    path = os_release_path(root)
    if path is None:
        raise RefusedError("the image has no /etc/os-release: cannot tell its distribution")
    info = parse_os_release(path.read_text(errors="replace"))
    ident = info.get("ID", "").lower()
    words = [ident, *info.get("ID_LIKE", "").lower().split()]
    family = next((FAMILIES[w] for w in words if w in FAMILIES), None)
    if family is None:
        raise RefusedError(f"unknown distribution {ident or '?'!r} (ID in os-release); "
                           "image prepare handles Debian, Ubuntu, Fedora, RHEL-like and "
                           "SUSE images")
    return Distribution(ident, info.get("VERSION_ID", ""), info.get("PRETTY_NAME", ident),
                        family)


def check_tool(dist: Distribution, tool: str) -> None:
    """Raise RefusedError unless ``tool`` (what the script's ``detect`` named) is an
    initramfs tool libshare handles for ``dist``."""
    if tool == "none":
        raise RefusedError(f"the image ({dist.pretty}) has no initramfs tool libshare "
                           "knows (neither initramfs-tools' update-initramfs nor dracut)")
    if tool not in TOOLS_OF[dist.family]:
        raise RefusedError(f"the image ({dist.pretty}) builds its initramfs with {tool}, "
                           f"which libshare does not handle for {dist.family} images")


def _version_key(version: str) -> list[Any]:
    """Return a sort key ordering kernel versions numerically (6.1.0-9 < 6.1.0-10)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p]


def kernels(root: Path) -> list[str]:
    """Return the kernel versions of the image (a ``/lib/modules/VERSION`` folder with a
    kernel: ``/boot/vmlinuz-VERSION`` or ``/lib/modules/VERSION/vmlinuz``), oldest first."""
    found: set[str] = set()
    for folder in ("/lib/modules", "/usr/lib/modules"):
        host = resolve(root, folder)
        if not host.is_dir():
            continue
        for entry in host.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                continue
            if resolve(root, f"/boot/vmlinuz-{entry.name}").is_file() \
                    or (entry / "vmlinuz").is_file():
                found.add(entry.name)
    return sorted(found, key=_version_key)


def fstab(root: Path) -> dict[str, str]:
    """Return the image's fstab as ``{mount point: source}`` (the last line wins)."""
    out = {}
    for line in (read_text(root, "/etc/fstab") or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            out[fields[1].rstrip("/") or "/"] = fields[0]
    return out


def initramfs_tools_modules(root: Path) -> str:
    """Return the image's initramfs-tools ``MODULES`` setting (``most`` unless its
    initramfs.conf or a conf.d file says otherwise; the last one read wins)."""
    value = "most"
    texts = [read_text(root, "/etc/initramfs-tools/initramfs.conf") or ""]
    conf_d = resolve(root, "/etc/initramfs-tools/conf.d")
    if conf_d.is_dir():
        texts += [read_text(root, f"/etc/initramfs-tools/conf.d/{p.name}") or ""
                  for p in sorted(conf_d.iterdir())]
    for text in texts:
        for m in re.finditer(r"^\s*MODULES=[\"']?([a-z]+)", text, re.M):
            value = m.group(1)
    return value


def check_offline_build(root: Path, tool: str) -> None:
    """Raise RefusedError when the image's initramfs cannot be built right on another
    machine: initramfs-tools with ``MODULES=dep`` picks the modules of the machine that
    builds it (this host). (dracut is run ``--no-hostonly`` offline.)"""
    if tool == "initramfs-tools" and initramfs_tools_modules(root) == "dep":
        raise RefusedError("the image's initramfs-tools use MODULES=dep, which selects the "
                           "modules of the machine building the initramfs (offline, this "
                           "host): set MODULES=most or list in the image first")


def largest_initramfs(root: Path) -> int:
    """Return the size in bytes of the image's largest initramfs in /boot (0 if none)."""
    boot = resolve(root, "/boot")
    sizes = [p.stat().st_size for p in boot.iterdir()
             if p.name.startswith("initr") and p.is_file() and not p.is_symlink()] \
        if boot.is_dir() else []
    return max(sizes, default=0)


def check_free_space(root: Path, margin: int = 16 << 20) -> dict[str, int]:
    """Raise RefusedError ("the image is full") unless the filesystems of the image's
    / and /boot have room for libshare's files and a rebuilt initramfs next to the old
    one (twice the largest initramfs, plus ``margin``); return the free bytes of each."""
    need_boot = 2 * largest_initramfs(root) + margin
    out = {}
    for guest, need in (("/", margin), ("/boot", need_boot)):
        st = os.statvfs(resolve(root, guest))
        free = st.f_bavail * st.f_frsize
        out[guest] = free
        if free < need or st.f_favail < 100:
            raise RefusedError(f"the image is full: its {guest} has {free >> 20} MiB "
                               f"({st.f_favail} inodes) free; preparing it needs "
                               f"{need >> 20} MiB (the initramfs is rebuilt next to the old)")
    return out


# ------------------------------------------------------------------ changing the tree

def make_dirs(root: Path, guest_dir: str, created: list[str]) -> Path:
    """Create the image's folder ``guest_dir`` and its missing parents (mode 0755),
    appending each created guest path to ``created``; return its host path. Raises
    LibshareError if a component exists and is not a folder."""
    current = "/"
    host = root
    for name in [p for p in guest_dir.split("/") if p]:
        current = posixpath.join(current, name)
        host = resolve(root, current)
        if not host.exists():  # (a dangling link's missing target: made inside the tree)
            host.mkdir(mode=0o755, parents=True)
            created.append(current)
        elif not host.is_dir():
            raise LibshareError(f"the image's {current} is not a folder")
    return host


def _entry(root: Path, guest_path: str, created: list[str]) -> Path:
    """Return the host path of the image's ``guest_path`` itself (its folder resolved
    and created if missing; the last component never followed)."""
    folder, name = posixpath.split(guest_path)
    return make_dirs(root, folder, created) / name


def write_file(root: Path, guest_path: str, data: bytes, mode: int,
               created: list[str]) -> dict[str, Any]:
    """Write ``data`` to the image's ``guest_path`` (replacing what is there, a link
    included, atomically) with ``mode``; return its record ``{path, sha256, mode}``."""
    atomic_write(_entry(root, guest_path, created), data, mode=mode)
    return {"path": guest_path, "sha256": hashlib.sha256(data).hexdigest(), "mode": mode}


def write_link(root: Path, guest_path: str, target: str, created: list[str]
               ) -> dict[str, Any]:
    """Make the image's ``guest_path`` a symbolic link to ``target`` (replacing what is
    there); return its record ``{path, link}``."""
    host = _entry(root, guest_path, created)
    tmp = host.with_name(f".{host.name}.libshare")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, host)
    return {"path": guest_path, "link": target}


def check_entry(root: Path, record: Mapping[str, Any]) -> str:
    """Return the state of a written file or link (a record of :func:`write_file` or
    :func:`write_link`) in the image: "ok", "missing" or "changed"."""
    host = resolve(root, posixpath.dirname(record["path"])) / posixpath.basename(
        record["path"])
    if "link" in record:
        if not host.is_symlink():
            return "missing" if not os.path.lexists(host) else "changed"
        return "ok" if os.readlink(host) == record["link"] else "changed"
    if host.is_symlink() or not host.is_file():
        return "missing"
    digest = hashlib.sha256(host.read_bytes()).hexdigest()
    mode = stat.S_IMODE(host.stat().st_mode)
    return "ok" if digest == record["sha256"] and mode == record.get("mode", mode) else "changed"


def remove_entry(root: Path, guest_path: str) -> bool:
    """Remove the image's file or link ``guest_path`` (never a folder); return True if
    there was one."""
    host = resolve(root, posixpath.dirname(guest_path)) / posixpath.basename(guest_path)
    if os.path.lexists(host) and (host.is_symlink() or not host.is_dir()):
        host.unlink()
        return True
    return False


def remove_dirs(root: Path, guest_dirs: Sequence[str]) -> list[str]:
    """Remove those of the image's folders ``guest_dirs`` that are empty, deepest
    first; return the ones removed."""
    gone = []
    for guest in sorted(guest_dirs, key=lambda p: p.count("/"), reverse=True):
        host = resolve(root, guest)
        with contextlib.suppress(OSError):
            host.rmdir()
            gone.append(guest)
    return gone


def read_marker(root: Path) -> dict[str, Any] | None:
    """Return the record ``image prepare`` left in the image (None if there is none or
    it cannot be read)."""
    text = read_text(root, MARKER)
    if text is None:
        return None
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict):
            return data
    return None


def write_marker(root: Path, record: dict[str, Any], created: list[str]) -> None:
    """Store ``record`` as the image's :data:`MARKER`."""
    write_file(root, MARKER, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n",
               0o644, created)


# ------------------------------------------------------------------ running its programs

def chroot(root: Path, argv: Sequence[str], stdin: bytes | None = None,
           env: Mapping[str, str] | None = None, timeout: float = 1800.0
           ) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside the image (chroot into ``root``, see the module doc) with
    :data:`CHROOT_ENV` plus ``env``; return the finished process (its status is the
    caller's to judge). Raises RefusedError if the image lacks /proc, /sys or /dev
    folders, LibshareError if it cannot be run at all."""
    for name in CHROOT_DIRS:
        host = root / name
        if host.is_symlink() or not host.is_dir():
            raise RefusedError(f"the image has no /{name} folder: cannot run its programs")
    try:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _CHROOT_SH, "sh",
             str(root), *argv],
            input=stdin, capture_output=True, timeout=timeout, check=False,
            env={**CHROOT_ENV, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LibshareError(f"cannot run {argv[0]} in the image: {exc}") from exc
