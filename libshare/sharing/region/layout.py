"""Region images: their layout, names and paths, shared by build, verify and gc.

Owns ``cfg.regions_dir``: ``images/DIGEST.img`` (one file per distinct image, named by
the hex SHA-256 of its bytes, mode 0644: see IMAGE_MODE), ``groups/GROUP.img`` (a relative symlink to
the group's current image, switched atomically), ``.lock`` and the temporary
``.build-*`` / ``images/.tmp-*`` entries of a build in progress.

Image layout (the guest sees the file as a label-less NVDIMM namespace)::

    0        4 KiB of zeros
    4 KiB    NVDIMM PFN info block (libshare.sharing.formats.pfn): mode RAM, align and
             dataoff 2 MiB, npfns = (size - 2 MiB) / 4 KiB  -> the guest builds an
             fsdax device /dev/pmem0 that starts at 2 MiB
    8 KiB    zeros up to 2 MiB
    2 MiB    EROFS filesystem (libshare.sharing.formats.erofs_write: uncompressed,
             4 KiB blocks, every file block-aligned and DAX-mappable)
    ...      zeros up to the total size, a multiple of 2 MiB

Inside the filesystem every store object lives at a path that depends only on its
content and name: ``/lib/<sha256[:2]>/<sha256>/<name>``, where ``name`` is the SONAME
(else the smallest basename it was seen under). The hash directory makes paths unique
and stable across rebuilds and hosts (adding a library never moves another one), and
the real basename keeps guest ``/proc/PID/maps`` readable ("/.../libc.so.6").
``/.libshare/manifest.json`` lists, per file: path, sha256, build_id, soname, size and
the guest paths it serves, plus the group name. ``/.libshare/manifest.tsv`` says the same
for POSIX sh in guests (libshare/data/guest/libshare-redirect): one line per guest path,
``sha256 TAB size TAB path-in-image TAB guest-path``, sorted; guest paths holding a tab,
newline or backslash are left out of it (no shell can read them back safely).

The filesystem carries the label ``libshare`` (EROFS ``volume_name``): guests find the
region among their /dev/pmem* devices with ``blkid`` by label, not by device order.

Determinism: libshare writes the EROFS filesystem itself, from the tree in memory (no
staging tree, no mkfs.erofs): all times 0, no xattrs, modes and owners as staged, a UUID
derived from the manifest; the PFN uuid derives from the filesystem UUID. The same store
objects, selection and group give the byte-identical image on every host, whatever
erofs-utils it has; the writer's version (``writer`` in the manifest,
:data:`libshare.sharing.formats.erofs_write.WRITER`) changes whenever its bytes would.
(ext4 regions are made by mke2fs: there the e2fsprogs version is the writer.) The group
name is part of the manifest, so two trust groups never share one image file (nor its
host page cache).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid as uuidlib
from typing import BinaryIO

from libshare.config import Config
from libshare.domxml import metadata
from libshare.errors import UsageError
from libshare.sharing.formats import pfn
from libshare.sharing.formats.erofs import (
    EROFS_MAGIC,
    SUPER_OFFSET,
    Erofs,
    FsImage,
)
from libshare.sharing.formats.ext4 import EXT4_MAGIC, Ext4
from libshare.sharing.store import (
    StoreEntry,
)
from libshare.util import files
from libshare.util.units import REGION_ALIGN

DATAOFF = REGION_ALIGN


#: EROFS volume label of every region filesystem (at most 16 bytes)
FS_LABEL = "libshare"


DIGEST_NAME = re.compile(r"^([0-9a-f]{64})\.img$")




CHUNK = 4 * 1024 * 1024


#: QEMU 7.2 opens a memory-backend-file O_RDWR unless readonly=on, which libvirt 9.0 never
#: sets: a 0444 image fails with EACCES once libvirt chowns it to the QEMU user. The
#: guests still cannot change it: access='private' maps it MAP_PRIVATE (copy-on-write).
IMAGE_MODE = 0o644


def fs_path(entry: StoreEntry) -> str:
    """Return the stable path of ``entry`` inside the region filesystem."""
    return f"/lib/{entry.sha256[:2]}/{entry.sha256}/{entry.name}"


#: the filesystems a region may hold (``region build --fs``); the first is the default
FILESYSTEMS = ("erofs", "ext4")


def filesystem_type(fh: BinaryIO, offset: int = DATAOFF) -> str:
    """Return "ext4" if the filesystem at ``offset`` of the open image ``fh`` has ext4's
    magic number, else "erofs" (what a damaged or foreign superblock is checked as)."""
    fh.seek(offset + SUPER_OFFSET)
    head = fh.read(64)
    if len(head) == 64 and int.from_bytes(head[56:58], "little") == EXT4_MAGIC \
            and int.from_bytes(head[:4], "little") != EROFS_MAGIC:
        return "ext4"
    return "erofs"


def open_filesystem(fh: BinaryIO, offset: int = DATAOFF,
                    length: int | None = None) -> FsImage:
    """Return the reader of the region filesystem at ``offset`` of the open image ``fh``:
    EROFS or ext4 (:func:`filesystem_type`); ErofsError if it is not readable."""
    if filesystem_type(fh, offset) == "ext4":
        return Ext4(fh, offset=offset, length=length)
    return Erofs(fh, offset=offset, length=length)


def fs_label(fs: Erofs) -> str:
    """Return the volume label of the EROFS filesystem ``fs`` ('' when it has none)."""
    raw = fs.read(SUPER_OFFSET + 64, 16)
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def pfn_uuid(seed: bytes) -> uuidlib.UUID:
    """Return the UUID derived from ``seed`` (see :func:`libshare.sharing.formats.pfn.uuid_from`)."""
    return uuidlib.UUID(bytes=pfn.uuid_from(seed))


def check_group(group: str) -> None:
    """Raise UsageError unless ``group`` is a valid trust-group name (the one rule of
    :func:`libshare.domxml.metadata.check_group`)."""
    metadata.check_group(group, error=UsageError)


def locked(cfg: Config) -> contextlib.AbstractContextManager[None]:
    """Return the regions lock: a build holds it from its first look at the regions
    directory to the switch of the group link, gc for its whole run, so they exclude
    each other fully (and a build's temporaries only exist while it holds it)."""
    return files.locked(cfg.regions_dir / ".lock")


def remove_leftovers(cfg: Config, dry_run: bool = False) -> list[str]:
    """Remove the temporaries of builds that died (``.build-*`` staging folders and
    ``images/.tmp-*`` files); return their paths, sorted (``dry_run``: only list them).

    Call with the regions lock held: a running build holds it for as long as its
    temporaries exist, so whatever is found then belongs to a build that was killed.
    """
    found = list(cfg.regions_dir.glob(".build-*"))
    images = cfg.regions_dir / "images"
    if images.is_dir():
        found += list(images.glob(".tmp-*"))
    for p in found:
        if dry_run:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return sorted(str(p) for p in found)
