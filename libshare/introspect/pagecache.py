"""Page-cache helpers: the files a guest holds in its page cache, read from its memory.

Owns the walk behind ``libshare survey --page-cache``: :func:`super_blocks_head` (the
kernel's ``super_blocks`` list head, found without symbols), :func:`for_each_super_block`,
:func:`super_block_info`, :func:`for_each_mount` (a superblock's mounts),
:func:`for_each_inode` (a superblock's ``s_inodes``, each inode read in one piece),
:func:`survey_page_cache` (every regular file with pages in the cache: path, size,
cached bytes, whether the library region serves it; totals per filesystem) and
:func:`to_json`; :func:`survey_domain_page_cache` does it for a running libvirt domain.

How ``super_blocks`` is found, without symbols: ``init_task.fs->root.mnt->mnt_sb`` is a
superblock; its ``s_list`` ring holds every superblock (slab objects, in the direct map)
and one node that is not in the direct map, the list head in the kernel image's data.

A file's path comes from its inode's first dentry alias, up to the superblock's root,
under the highest directory that is the root of one of the superblock's mounts - a
mount of init's namespace first, then of another namespace (a service's private one),
else a kernel-internal mount (memfd, shm: the path is then from the filesystem's root
and ``mounted`` is False); a file reached only as a mount's root (bind-mounted alone)
gets its bind's path.

Cached bytes are ``inode->i_mapping->nrpages`` pages of :data:`PAGE_SIZE`, what
``fincore`` counts - except on a DAX mount (the library region mounted ``-o dax``),
where ``nrpages`` counts the DAX entries of mmap faults, pages of the host's copy that
use no guest RAM (and that ``fincore`` does not see); those files are
``served_by_region`` and summed apart (``region_bytes``). Non-regular inodes' own
mappings (a block device's buffer cache) are summed per filesystem as
``other_cached_bytes``.

Guest memory is hostile: the superblock list is capped at :data:`MAX_SUPER_BLOCKS`, the
inodes at ``max_inodes`` per walk, a superblock's mounts at :data:`MAX_MOUNTS_PER_SB`,
paths at :data:`~libshare.introspect.helpers.fs.MAX_DEPTH` components of at most 255 bytes; a
list that loops, does not link back or points outside RAM, an inode of another
superblock, an ``nrpages`` above the guest's RAM, end that part of the walk and mark the
result ``partial`` with the reason. It never hangs or allocates without bound.
"""

from __future__ import annotations

import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.introspect.helpers.fs import (
    MAX_DEPTH,
    d_path,
    d_unlinked,
    dentry_name,
    is_region_fs,
)
from libshare.introspect.helpers.lists import list_for_each
from libshare.introspect.kernel import START_KERNEL_MAP, Kernel, WalkError
from libshare.introspect.layout import Layout
from libshare.introspect.memory import PAGE_SIZE

MAX_SUPER_BLOCKS = 4096
#: inodes read in one survey, all superblocks together (a retried superblock counts again)
MAX_INODES = 1 << 20
MAX_MOUNTS_PER_SB = 4096
MAX_ERRORS = 32
#: directory dentries whose path is remembered at once (the memo is dropped beyond)
MAX_DIR_MEMO = 1 << 16
RETRIES = 2
_ERR_PTR_MIN = (1 << 64) - 4095  # ERR_PTR values: MNT_NS_INTERNAL is ERR_PTR(-EINVAL)

KEYS = ("super_block.s_list", "super_block.s_inodes", "super_block.s_dev",
        "super_block.s_root", "super_block.s_type", "super_block.s_id",
        "file_system_type.name", "inode.i_sb", "inode.i_sb_list", "inode.i_mode",
        "inode.i_ino", "inode.i_size", "inode.i_mapping", "inode.i_data", "inode.i_dentry",
        "address_space.nrpages", "dentry.d_u.d_alias", "task_struct.fs", "fs_struct.root",
        "vfsmount.mnt_sb")


class PageCacheError(LibshareError):
    """The kernel layout lacks what the page-cache walk needs."""


@dataclass(frozen=True)
class SuperBlock:
    """One superblock: its address, ``s_dev`` (kernel encoding), filesystem type name,
    ``s_id`` (device name such as "vda" or "pmem0") and root dentry ``s_root``."""

    addr: int
    dev: int
    fstype: str
    s_id: str
    root: int

    @property
    def devname(self) -> str:
        """Return ``s_dev`` as "major:minor" (as /proc/self/mountinfo shows it)."""
        return f"{self.dev >> 20}:{self.dev & 0xFFFFF}"

    @property
    def served_by_region(self) -> bool:
        """Return True if this is the library region: EROFS on a pmem device."""
        return is_region_fs((self.fstype, self.s_id))


@dataclass(frozen=True)
class Inode:
    """One inode as :func:`for_each_inode` read it: ``ino``, ``mode``, ``size``
    (``i_size``), ``mapping`` (``i_mapping``), ``nrpages`` of that mapping when it is
    the inode's own ``i_data`` (else None: see :func:`mapping_nrpages`), and ``dentry``,
    its first alias (0 if none)."""

    addr: int
    ino: int
    mode: int
    size: int
    mapping: int
    nrpages: int | None
    dentry: int


#: how a mount is reached: from init's mount namespace, from another one (a service's
#: private namespace, devtmpfsd's), or not at all (kernel-internal or detached)
MAIN_NS, OTHER_NS, NO_NS = 2, 1, 0


@dataclass(frozen=True)
class Mount:
    """One ``struct mount`` of a superblock: its root dentry and ``reach``, one of
    :data:`MAIN_NS`, :data:`OTHER_NS`, :data:`NO_NS`."""

    addr: int
    root: int
    reach: int


@dataclass
class CachedFile:
    """A regular file with pages in the guest's page cache. ``path`` is None when the
    inode has no dentry (or its path could not be read); ``mounted`` is False when the
    path is only relative to its filesystem's root (no mount in a namespace reaches it:
    memfd, shm and other kernel-internal files)."""

    dev: str
    fstype: str
    ino: int
    path: str | None
    size: int
    cached_bytes: int
    served_by_region: bool
    mounted: bool = True


@dataclass
class FilesystemCache:
    """Per superblock: where its root is mounted (init's namespace first; None if in no
    namespace), how many inodes were read, how many regular files have cached pages and
    their bytes, and the bytes of non-regular inodes' own mappings
    (``other_cached_bytes``)."""

    dev: str
    fstype: str
    s_id: str
    mount_point: str | None
    served_by_region: bool
    inodes: int = 0
    files: int = 0
    cached_bytes: int = 0
    other_cached_bytes: int = 0
    partial: bool = False


@dataclass
class PageCacheSurvey:
    """The page cache of one guest: ``files`` (largest first), ``filesystems``, and
    ``partial`` with ``errors`` when part of the walk could not be trusted."""

    name: str = ""
    kernel: str = ""
    files: list[CachedFile] = field(default_factory=list)
    filesystems: list[FilesystemCache] = field(default_factory=list)
    inodes: int = 0
    partial: bool = False
    errors: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def cached_bytes(self) -> int:
        """Return the regular files' cached bytes in guest RAM (region files aside)."""
        return sum(f.cached_bytes for f in self.files if not f.served_by_region)

    def region_bytes(self) -> int:
        """Return the region files' ``nrpages`` bytes (DAX entries: the host's copy)."""
        return sum(f.cached_bytes for f in self.files if f.served_by_region)

    def other_cached_bytes(self) -> int:
        """Return the bytes cached for non-regular inodes (block devices' buffer cache)."""
        return sum(fs.other_cached_bytes for fs in self.filesystems)

    def error(self, text: str) -> None:
        """Mark the survey partial because of ``text`` (at most :data:`MAX_ERRORS` kept)."""
        self.partial = True
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)
        elif len(self.errors) == MAX_ERRORS:
            self.errors.append("more errors left out")


def check_layout(layout: Layout) -> None:
    """Raise PageCacheError naming the members the walk needs that ``layout`` lacks."""
    missing = [key for key in KEYS if not layout.has(key)]
    if missing:
        raise PageCacheError(f"kernel layout from {layout.source or 'input'} lacks "
                             f"{', '.join(missing)} (needed for the page-cache survey)")


def _sb_of_task(k: Kernel, task: int) -> int:
    """Return the superblock of ``task``'s root directory (``fs->root.mnt->mnt_sb``)."""
    lay = k.layout
    fs = k.field(task, "task_struct.fs")
    vfsmount = k.u64(fs + lay.off("fs_struct.root") + lay.off("path.mnt"))
    return k.field(vfsmount, "vfsmount.mnt_sb")


def super_blocks_head(k: Kernel) -> int:
    """Return the kernel virtual address of the ``super_blocks`` list head: the one node
    of the superblock ring, entered from ``init_task``'s root, that is not a
    direct-mapped slab object but lies in the kernel image. Raise WalkError if the ring
    breaks or is longer than :data:`MAX_SUPER_BLOCKS` before it is found."""
    off = k.layout.off("super_block.s_list")
    start = _sb_of_task(k, k.info.init_task) + off
    node = start
    for _ in range(MAX_SUPER_BLOCKS + 1):
        if not k.is_direct(node):
            if node < START_KERNEL_MAP:
                raise WalkError(f"superblock list node {node:#x} is neither slab nor kernel data")
            return node
        node = k.u64(node)
        if node == start:
            raise WalkError("the superblock list has no head outside the direct map")
    raise WalkError(f"no superblock list head within {MAX_SUPER_BLOCKS} nodes")


def for_each_super_block(k: Kernel, head: int) -> Iterator[int]:
    """Yield the address of every ``struct super_block`` on the list at ``head``."""
    off = k.layout.off("super_block.s_list")
    for node in list_for_each(k, head, MAX_SUPER_BLOCKS):
        yield node - off


def super_block_info(k: Kernel, sb: int) -> SuperBlock:
    """Return the :class:`SuperBlock` at ``sb``."""
    lay = k.layout
    fstype = k.field(sb, "super_block.s_type")
    name = k.cstring(k.field(fstype, "file_system_type.name"), 32)
    s_id = k.cstring(sb + lay.off("super_block.s_id"), 32)
    return SuperBlock(sb, k.field(sb, "super_block.s_dev", 4),
                      name.decode("ascii", "replace"), s_id.decode("ascii", "replace"),
                      k.field(sb, "super_block.s_root"))


def main_namespace(k: Kernel) -> int:
    """Return the ``mnt_namespace`` address of init's mount namespace (that of
    ``init_task``'s root mount), or 0 if the layout cannot tell."""
    if not k.layout.has("mount.mnt_ns"):
        return 0
    lay = k.layout
    fs = k.field(k.info.init_task, "task_struct.fs")
    vfsmount = k.u64(fs + lay.off("fs_struct.root") + lay.off("path.mnt"))
    return k.field(vfsmount - lay.off("mount.mnt"), "mount.mnt_ns")


def mount_info(k: Kernel, mount: int, main_ns: int = 0) -> Mount:
    """Return the :class:`Mount` of the ``struct mount`` at ``mount``; ``main_ns`` is
    init's namespace (:func:`main_namespace`)."""
    lay = k.layout
    root = k.u64(mount + lay.off("mount.mnt") + lay.off("vfsmount.mnt_root"))
    if not lay.has("mount.mnt_ns"):
        return Mount(mount, root, OTHER_NS)
    ns = k.field(mount, "mount.mnt_ns")
    if ns == 0 or ns >= _ERR_PTR_MIN or not k.valid(ns):
        return Mount(mount, root, NO_NS)
    return Mount(mount, root, MAIN_NS if ns == main_ns else OTHER_NS)


def for_each_mount(k: Kernel, sb: int, limit: int = MAX_MOUNTS_PER_SB) -> Iterator[int]:
    """Yield the ``struct mount`` address of every mount of superblock ``sb``
    (``s_mounts``: a list of ``mnt_instance`` or a chain of ``mnt_next_for_sb``); nothing
    when the layout has neither. Raise WalkError on a loop or beyond ``limit``."""
    lay = k.layout
    if not lay.has("super_block.s_mounts"):
        return
    head = sb + lay.off("super_block.s_mounts")
    if lay.has("mount.mnt_instance"):
        off = lay.off("mount.mnt_instance")
        for node in list_for_each(k, head, limit):
            yield node - off
        return
    if not lay.has("mount.mnt_next_for_sb"):
        return
    seen: set[int] = set()
    mount = k.u64(head)
    while mount:
        if mount in seen or len(seen) >= limit:
            raise WalkError(f"superblock {sb:#x}: mount chain loops or exceeds {limit}")
        seen.add(mount)
        yield mount
        mount = k.field(mount, "mount.mnt_next_for_sb")


class _InodeReader:
    """Offsets of the inode members the walk reads, and the span that holds them all, so
    that each inode is one read."""

    def __init__(self, lay: Layout) -> None:
        self.sb_list = lay.off("inode.i_sb_list")
        self.mode = lay.off("inode.i_mode")
        self.ino = lay.off("inode.i_ino")
        self.size = lay.off("inode.i_size")
        self.mapping = lay.off("inode.i_mapping")
        self.i_data = lay.off("inode.i_data")
        self.nrpages = self.i_data + lay.off("address_space.nrpages")
        self.dentry = lay.off("inode.i_dentry")
        self.i_sb = lay.off("inode.i_sb")
        self.alias = lay.off("dentry.d_u.d_alias")
        self.span = max(self.sb_list + 16, self.mode + 2, self.ino + 8, self.size + 8,
                        self.mapping + 8, self.nrpages + 8, self.dentry + 8, self.i_sb + 8)

    def parse(self, addr: int, raw: bytes) -> tuple[Inode, int, int, int]:
        """Return the Inode in ``raw`` (read at ``addr``) and its ``i_sb``,
        ``i_sb_list.next`` and ``i_sb_list.prev``."""
        def u64(off: int) -> int:
            return int.from_bytes(raw[off:off + 8], "little")

        mapping = u64(self.mapping)
        own = mapping == addr + self.i_data
        first = u64(self.dentry)
        size, = struct.unpack_from("<q", raw, self.size)
        inode = Inode(addr, u64(self.ino), int.from_bytes(raw[self.mode:self.mode + 2], "little"),
                      size, mapping, u64(self.nrpages) if own else None,
                      first - self.alias if first else 0)
        return inode, u64(self.i_sb), u64(self.sb_list), u64(self.sb_list + 8)


def for_each_inode(k: Kernel, sb: int, limit: int = MAX_INODES) -> Iterator[Inode]:
    """Yield every inode on superblock ``sb``'s ``s_inodes`` list. Raise WalkError on a
    loop, a node that does not link back, an inode of another superblock, or more than
    ``limit`` inodes."""
    rd = _InodeReader(k.layout)
    head = sb + k.layout.off("super_block.s_inodes")
    parsed: dict[int, tuple[Inode, int]] = {}

    def links(node: int) -> tuple[int, int]:
        addr = node - rd.sb_list  # one read per inode: its fields and its list links
        inode, i_sb, nxt, back = rd.parse(addr, k.read(addr, rd.span))
        parsed[node] = (inode, i_sb)
        return nxt, back

    for node in list_for_each(k, head, limit, links, f"superblock {sb:#x}: inode list"):
        inode, i_sb = parsed.pop(node)
        if i_sb != sb:
            raise WalkError(f"superblock {sb:#x}: inode {inode.addr:#x} belongs to {i_sb:#x}")
        yield inode


def mapping_nrpages(k: Kernel, mapping: int) -> int:
    """Return ``nrpages`` of the ``struct address_space`` at ``mapping``."""
    return k.field(mapping, "address_space.nrpages")


class _Paths:
    """Paths of one superblock's dentries: the dentry chain up to the superblock's root,
    anchored at the highest dentry that is the root of a mount of init's namespace,
    else of another namespace, else of any mount; directories remembered."""

    def __init__(self, k: Kernel, mounts: list[Mount]) -> None:
        self.k = k
        self.parent_off = k.layout.off("dentry.d_parent")
        # per reach, the mounts at least that reachable by root dentry (the first wins)
        self.anchors = {reach: {m.root: m for m in reversed(mounts) if m.reach >= reach}
                        for reach in (MAIN_NS, OTHER_NS, NO_NS)}
        self.memo: dict[int, dict[int, tuple[Mount | None, str]]] = {
            reach: {} for reach in self.anchors}
        self.mount_paths: dict[int, str] = {}

    def mount_path(self, mount: Mount) -> str:
        """Return where ``mount`` is mounted ("/" for a namespace root)."""
        if mount.addr not in self.mount_paths:
            vfsmount = mount.addr + self.k.layout.off("mount.mnt")
            self.mount_paths[mount.addr] = d_path(self.k, vfsmount, mount.root)
        return self.mount_paths[mount.addr]

    def _dir(self, dentry: int, reach: int) -> tuple[Mount | None, str]:
        """Return (anchoring mount of at least ``reach`` or None, path below it) of
        directory ``dentry``."""
        memo, anchors = self.memo[reach], self.anchors[reach]
        chain: list[int] = []
        d = dentry
        for _ in range(MAX_DEPTH + 1):
            if d in memo:
                mount, rel = memo[d]
                break
            parent = self.k.u64(d + self.parent_off)
            if parent == d:  # the superblock's root (or a detached subtree's)
                mount, rel = anchors.get(d), ""
                memo[d] = (mount, rel)
                break
            chain.append(d)
            d = parent
        else:
            raise WalkError(f"path of dentry {dentry:#x} deeper than {MAX_DEPTH} components")
        for d in reversed(chain):
            anchor = anchors.get(d) if mount is None else None
            if anchor is not None:
                mount, rel = anchor, ""
            else:
                rel = f"{rel}/{dentry_name(self.k, d).decode('utf-8', 'surrogateescape')}"
            memo[d] = (mount, rel)
        if len(memo) > MAX_DIR_MEMO:
            memo.clear()
        return mount, rel

    def path(self, dentry: int) -> tuple[str, bool]:
        """Return the path of file ``dentry`` and whether a mount in a namespace
        reaches it (if not, the path is from its filesystem's root). A file reached
        through a directory that is a mount's root gets the path under the highest such
        mount (of init's namespace first); a file that is itself a mount's root only
        (bind-mounted alone), its bind mount's path."""
        k = self.k
        parent = k.u64(dentry + self.parent_off)
        if parent == dentry:
            raise WalkError(f"file dentry {dentry:#x} is its own parent")
        name = dentry_name(k, dentry).decode("utf-8", "surrogateescape")
        path, mounted = "", False
        for reach in (MAIN_NS, OTHER_NS):
            mount, rel = self._dir(parent, reach)
            if mount is not None:
                path, mounted = self.mount_path(mount).rstrip("/") + f"{rel}/{name}", True
                break
            if dentry in self.anchors[reach]:
                path, mounted = self.mount_path(self.anchors[reach][dentry]), True
                break
        else:
            _mount, rel = self._dir(parent, NO_NS)
            path = f"{rel}/{name}"
        if d_unlinked(k, dentry):
            path += " (deleted)"
        return path, mounted


@dataclass
class _SbWalk:
    """What one attempt at one superblock gathered."""

    fs: FilesystemCache
    files: list[CachedFile] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    broken: str = ""   # why the inode list walk ended early ("" if it did not)
    mappings: set[int] = field(default_factory=set)  # other inodes' mappings counted


def _mounts_of(k: Kernel, sb: SuperBlock, main_ns: int, errors: list[str]) -> list[Mount]:
    """Return the mounts of ``sb`` (those read before a break, which goes to ``errors``)."""
    mounts: list[Mount] = []
    try:
        for m in for_each_mount(k, sb.addr):
            mounts.append(mount_info(k, m, main_ns))
    except WalkError as exc:
        errors.append(f"{sb.fstype} {sb.devname}: mounts: {exc}")
    return mounts


def _walk_sb(k: Kernel, sb: SuperBlock, budget: list[int], ram_pages: int,
             counted: set[int], main_ns: int) -> _SbWalk:
    """Return one attempt at the cached files of ``sb``; at most ``budget[0]`` inodes are
    read (it is decremented). A regular file whose ``i_mapping`` is not its own is
    counted once per mapping (``counted`` holds those already counted elsewhere)."""
    errors: list[str] = []
    mounts = _mounts_of(k, sb, main_ns, errors)
    paths = _Paths(k, mounts)
    mount_point = None
    where = sorted((m for m in mounts if m.reach > NO_NS and m.root == sb.root),
                   key=lambda m: -m.reach)
    if where:
        try:
            mount_point = paths.mount_path(where[0])
        except WalkError as exc:
            errors.append(f"{sb.fstype} {sb.devname}: mount point: {exc}")
    out = _SbWalk(FilesystemCache(sb.devname, sb.fstype, sb.s_id, mount_point,
                                  sb.served_by_region), errors=errors)
    label = f"{sb.fstype} {sb.devname}"
    try:
        for inode in for_each_inode(k, sb.addr, limit=max(budget[0], 0)):
            budget[0] -= 1
            out.fs.inodes += 1
            regular = stat.S_ISREG(inode.mode)
            nrpages = inode.nrpages
            if nrpages is None:
                if not regular or inode.mapping in counted or inode.mapping in out.mappings:
                    continue  # a device node's mapping is its block device's: counted there
                nrpages = mapping_nrpages(k, inode.mapping)
                out.mappings.add(inode.mapping)
            if nrpages == 0:
                continue
            if nrpages > ram_pages:
                errors.append(f"{label}: inode {inode.ino}: nrpages {nrpages} exceeds "
                              f"guest RAM ({ram_pages} pages)")
                continue
            if not regular:
                out.fs.other_cached_bytes += nrpages * PAGE_SIZE
                continue
            path: str | None = None
            mounted = False
            if inode.dentry:
                try:
                    path, mounted = paths.path(inode.dentry)
                except WalkError as exc:
                    errors.append(f"{label}: inode {inode.ino}: path: {exc}")
            out.files.append(CachedFile(sb.devname, sb.fstype, inode.ino, path, inode.size,
                                        nrpages * PAGE_SIZE, sb.served_by_region, mounted))
            out.fs.files += 1
            out.fs.cached_bytes += nrpages * PAGE_SIZE
    except WalkError as exc:
        out.broken = f"{label}: inodes: {exc}"
    return out


def survey_page_cache(k: Kernel, name: str = "", retries: int = RETRIES,
                      max_inodes: int = MAX_INODES) -> PageCacheSurvey:
    """Return the :class:`PageCacheSurvey` of the kernel ``k``: every regular file with
    pages in its page cache, per filesystem totals. A superblock whose inode list breaks
    (a running guest freeing inodes under the walk) is read again, caches dropped, up to
    ``retries`` times, then kept as far as it was read and marked partial. At most
    ``max_inodes`` inodes are read in all. Raise PageCacheError if the layout lacks the
    members the walk needs; every inconsistency of guest memory ends in a result marked
    partial."""
    check_layout(k.layout)
    t0, c0 = time.perf_counter(), time.process_time()
    out = PageCacheSurvey(name, k.info.release)
    ram_pages = k.mem.ram_size // PAGE_SIZE
    budget = [max_inodes]
    sbs: list[int] = []
    try:
        for addr in for_each_super_block(k, super_blocks_head(k)):
            sbs.append(addr)  # those before a break are walked
    except WalkError as exc:
        out.error(f"superblock list: {exc}")
    try:
        main_ns = main_namespace(k)
    except WalkError as exc:
        main_ns = 0
        out.error(f"init's mount namespace: {exc}")
    counted: set[int] = set()
    for addr in sbs:
        walk: _SbWalk | None = None
        error = ""
        for attempt in range(retries + 1):
            if attempt:
                k.invalidate()
            try:
                info = super_block_info(k, addr)
            except WalkError as exc:
                error = f"superblock {addr:#x}: {exc}"
                continue
            walk = _walk_sb(k, info, budget, ram_pages, counted, main_ns)
            if not walk.broken or budget[0] <= 0:
                break
        if walk is None:
            out.error(error)
            continue
        counted |= walk.mappings
        for text in walk.errors:
            out.error(text)
        if walk.broken:
            walk.fs.partial = True
            out.error(walk.broken)
        out.filesystems.append(walk.fs)
        out.files.extend(walk.files)
        out.inodes += walk.fs.inodes
        if budget[0] <= 0:
            out.error(f"stopped after {max_inodes} inodes")
            break
    total = out.cached_bytes() + out.other_cached_bytes()
    if total > k.mem.ram_size:
        out.error(f"{total} bytes counted in a guest of {k.mem.ram_size} bytes of RAM")
    out.files.sort(key=lambda f: (-f.cached_bytes, f.path is None, f.path or "", f.ino))
    out.cpu_seconds = time.process_time() - c0
    out.wall_seconds = time.perf_counter() - t0
    return out


def to_json(s: PageCacheSurvey) -> dict[str, Any]:
    """Return the JSON object of one guest's page-cache survey: ``files``,
    ``filesystems``, totals (``cached_bytes`` in guest RAM, ``region_bytes``,
    ``other_cached_bytes``), ``partial`` and ``errors``."""
    return {
        "name": s.name, "kernel": s.kernel, "page_size": PAGE_SIZE,
        "files": [{"dev": f.dev, "fstype": f.fstype, "ino": f.ino, "path": f.path,
                   "mounted": f.mounted, "size": f.size, "cached_bytes": f.cached_bytes,
                   "served_by_region": f.served_by_region} for f in s.files],
        "filesystems": [{"dev": fs.dev, "fstype": fs.fstype, "s_id": fs.s_id,
                         "mount_point": fs.mount_point,
                         "served_by_region": fs.served_by_region, "inodes": fs.inodes,
                         "files": fs.files, "cached_bytes": fs.cached_bytes,
                         "other_cached_bytes": fs.other_cached_bytes,
                         "partial": fs.partial} for fs in s.filesystems],
        "inodes": s.inodes, "cached_bytes": s.cached_bytes(),
        "region_bytes": s.region_bytes(), "other_cached_bytes": s.other_cached_bytes(),
        "partial": s.partial, "errors": s.errors,
        "cpu_seconds": round(s.cpu_seconds, 4), "wall_seconds": round(s.wall_seconds, 4),
    }


def survey_domain_page_cache(conn: Any, name: str, pause: bool = False,
                             backend: str = "proc", layout: Layout | None = None,
                             cache_dir: Path | None = None,
                             pause_timeout: float = 60.0) -> PageCacheSurvey:
    """Return the page-cache survey of running domain ``name`` on libvirt connection
    ``conn`` (see :func:`libshare.introspect.session.look` for the other arguments; a
    paused walk is not retried). ``cpu_seconds``/``wall_seconds`` cover the whole call."""
    from libshare.introspect.session import look

    with look(conn, name, pause, backend, layout, cache_dir, pause_timeout) as seen:
        out = survey_page_cache(seen.kernel, seen.name, retries=0 if pause else RETRIES)
    if seen.expired:
        out.error(seen.expiry_message())
    out.wall_seconds, out.cpu_seconds = seen.wall_seconds, seen.cpu_seconds
    return out
