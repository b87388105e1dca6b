"""The region images on this host: listing them with their groups, which ones a running
QEMU maps, and removing those nothing needs (``region gc``)."""


from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.config import Config
from libshare.errors import LibshareError
from libshare.sharing.formats.erofs import ErofsError
from libshare.sharing.region.layout import (
    DATAOFF,
    DIGEST_NAME,
    locked,
    open_filesystem,
    remove_leftovers,
)
from libshare.sharing.region.manifest import read_manifest
from libshare.util.digest import forget
from libshare.util.files import fsync_dir, open_regular


@dataclass
class ImageInfo:
    """One image found by :func:`list_images`."""

    path: str
    digest: str
    size: int
    groups: list[str] = field(default_factory=list)
    files: int | None = None
    manifest_group: str | None = None
    writer: str | None = None          # what wrote the filesystem (manifest; None: unknown)
    filesystem: str | None = None      # erofs or ext4 (from the manifest)

    def as_dict(self) -> dict[str, Any]:
        """Return the image description as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class GcResult:
    """What :func:`gc` removed (or would remove with ``dry_run``) and what it kept."""

    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)     # path -> reason
    freed: int = 0
    leftovers: list[str] = field(default_factory=list)     # temporaries of dead builds
    dry_run: bool = False
    unreadable: list[int] = field(default_factory=list)    # QEMU pids not looked at

    def as_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return dict(self.__dict__)


def group_links(cfg: Config) -> dict[str, str]:
    """Return group name -> real path of its current image (dangling links included)."""
    gdir = cfg.regions_dir / "groups"
    out: dict[str, str] = {}
    if gdir.is_dir():
        for link in sorted(gdir.iterdir()):
            if link.name.endswith(".img") and not link.name.startswith(".") \
                    and link.is_symlink():
                out[link.name[:-4]] = os.path.realpath(link)
    return out


def list_images(cfg: Config, read_manifests: bool = True) -> list[ImageInfo]:
    """Return every image under the images directory with the groups pointing at it."""
    images = cfg.regions_dir / "images"
    links = group_links(cfg)
    out: list[ImageInfo] = []
    if not images.is_dir():
        return out
    for p in sorted(images.iterdir()):
        m = DIGEST_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        real = os.path.realpath(p)
        info = ImageInfo(path=str(p), digest=m.group(1), size=p.stat().st_size,
                         groups=sorted(g for g, t in links.items() if t == real))
        doc = image_manifest(p) if read_manifests else None
        if doc is not None:
            info.files = len(doc["files"])
            info.manifest_group = doc.get("group")
            info.writer = manifest_writer(doc)
            info.filesystem = doc.get("filesystem", "erofs")
        out.append(info)
    return out


def manifest_writer(doc: dict[str, Any]) -> str | None:
    """Return what wrote the filesystem of the image whose manifest is ``doc``
    ("libshare-erofs 1", "mke2fs 1.47.0", "mkfs.erofs 1.5" for images built before
    libshare wrote EROFS itself), None if the manifest does not say."""
    for key, tool in (("writer", ""), ("mkfs_erofs", "mkfs.erofs "), ("mke2fs", "mke2fs ")):
        value = doc.get(key)
        if isinstance(value, str) and value:
            return tool + value
    return None


def image_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the manifest of the region image at ``path``, None if it cannot be read."""
    with contextlib.suppress(OSError, ErofsError, ValueError), open_regular(path) as fh:
        return read_manifest(open_filesystem(fh, offset=DATAOFF))
    return None


def _is_qemu(proc: str, pid: str) -> bool:
    """Return True if process ``pid`` (under the proc mount ``proc``) is a QEMU."""
    try:
        with open(f"{proc}/{pid}/comm") as fh:
            return fh.read().startswith("qemu")
    except OSError:
        return False


def mapped_images(images_dir: Path, proc: str = "/proc") -> tuple[set[str], list[int]]:
    """Return (real paths of files under ``images_dir`` mapped by any process now, pids of
    QEMU processes whose ``maps`` could not be read).

    A running QEMU keeps its region file mapped even after its group moved on; such a
    file must survive gc (live migration and the running guest still need it). Only
    root can read another user's ``/proc/PID/maps``: the second list says which guests
    were not looked at. Processes that exit during the scan are ignored. ``proc`` is the
    proc mount (tests pass a fake one).
    """
    prefix = os.path.realpath(images_dir) + "/"
    out: set[str] = set()
    unreadable: list[int] = []
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(f"{proc}/{pid}/maps") as fh:
                for line in fh:
                    i = line.find(prefix)
                    if i >= 0:
                        out.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            if os.path.exists(f"{proc}/{pid}") and _is_qemu(proc, pid):
                unreadable.append(int(pid))
    return out, sorted(unreadable)


def gc(cfg: Config, referenced: Iterable[str], dry_run: bool = False,
       proc: str = "/proc") -> GcResult:
    """Remove images that no path in ``referenced`` resolves to; return a :class:`GcResult`.

    Never removes a group's current image nor an image mapped by a running process.
    Also removes temporaries left by interrupted builds and the digest-cache entries of
    removed files. Everything is read and removed under the regions lock (the group
    links too: a build that makes an image current holds it until the link is switched).
    Raises LibshareError, removing nothing, when not root or when a QEMU process's
    mappings cannot be read (a running guest's image would lose its protection); with
    ``dry_run`` those pids are listed in ``GcResult.unreadable`` instead.
    """
    if not dry_run and os.geteuid() != 0:
        raise LibshareError("region gc must run as root: it reads every QEMU process's "
                            "mappings to keep running guests' images (--dry-run to look)")
    refs = {os.path.realpath(p) for p in referenced}
    result = GcResult(dry_run=dry_run)
    images = cfg.regions_dir / "images"
    with locked(cfg):
        current = set(group_links(cfg).values())
        mapped, unreadable = mapped_images(images, proc) if images.is_dir() else (set(), [])
        if unreadable and not dry_run:
            raise LibshareError(f"cannot read the mappings of QEMU process "
                                f"{', '.join(map(str, unreadable))} (/proc/PID/maps): "
                                "refusing to remove images a running guest may map")
        result.unreadable = unreadable
        for info in list_images(cfg, read_manifests=False):
            real = os.path.realpath(info.path)
            if real in current:
                result.kept[info.path] = "current image of group " + ", ".join(info.groups)
            elif real in refs:
                result.kept[info.path] = "referenced by a libvirt domain"
            elif real in mapped:
                result.kept[info.path] = "mapped by a running process"
            else:
                result.removed.append(info.path)
                result.freed += info.size
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(info.path)
        result.leftovers = remove_leftovers(cfg, dry_run)
        if not dry_run and images.is_dir():
            fsync_dir(images)
        if not dry_run:
            forget(cfg.digest_cache, result.removed)
    return result


def current_holdings(cfg: Config) -> dict[str, list[str]]:
    """Return SHA-256 -> sorted groups whose current image holds that library (read
    from each current image's manifest; an unreadable image holds nothing here)."""
    out: dict[str, set[str]] = {}
    for info in list_images(cfg, read_manifests=False):
        doc = image_manifest(info.path) if info.groups else None
        for item in doc["files"] if doc else []:
            if isinstance(item, dict) and isinstance(item.get("sha256"), str):
                out.setdefault(item["sha256"], set()).update(info.groups)
    return {sha: sorted(groups) for sha, groups in sorted(out.items())}
