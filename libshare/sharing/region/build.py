"""Building a group's region image from the store and making it the group's current one.

Selection of store objects, staging them (:mod:`libshare.sharing.region.staging`: in
memory for EROFS, on disk for ext4), writing the image in one pass (the PFN head, the
filesystem, the zero tail; hashed as it is written, the store objects the store has not
proved checked as they are read), and publishing under the regions lock: the image as
``images/DIGEST.img``, then the group's link switched atomically. On any failure or
interrupt nothing is published. The image layout, names and the determinism rules are
described once, in :mod:`libshare.sharing.region.layout`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import itertools
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.config import Config
from libshare.errors import LibshareError, UsageError
from libshare.sharing.formats import erofs_write, pfn
from libshare.sharing.formats.erofs import ErofsError
from libshare.sharing.region import ext4fs
from libshare.sharing.region import policy as policies
from libshare.sharing.region import tree as trees
from libshare.sharing.region.layout import (
    CHUNK,
    DATAOFF,
    FILESYSTEMS,
    FS_LABEL,
    IMAGE_MODE,
    check_group,
    fs_path,
    locked,
    pfn_uuid,
    remove_leftovers,
)
from libshare.sharing.region.manifest import manifest_bytes, tsv_manifest_bytes
from libshare.sharing.region.staging import DiskStaging, MemoryStaging, Staging
from libshare.sharing.store import (
    StoreEntry,
    StoreIndex,
    is_proven,
    load_index,
    load_proofs,
    object_file,
    stat_object,
)
from libshare.sharing.store import locked as store_locked
from libshare.util.digest import cached_sha256, remember, stat_key
from libshare.util.files import fsync_dir, os_error, read_regular
from libshare.util.progress import Progress
from libshare.util.units import REGION_ALIGN, human, round_up


@dataclass
class BuildResult:
    """What :func:`build_region` produced."""

    path: str            # the image, named by its digest
    digest: str          # hex SHA-256 of the image file
    size: int            # bytes, a multiple of 2 MiB
    files: int           # libraries in the image
    group: str
    link: str            # the group's stable path (symlink to ``path``)
    fs_size: int         # bytes of the EROFS filesystem
    data_size: int       # sum of the library sizes
    new: bool            # False if an identical image already existed
    writer: str          # what wrote the filesystem (also in the manifest)
    filesystem: str = "erofs"  # erofs or ext4
    policy: str = "select"   # what chose the files (region.policy), "select" for a list
    trees: list[dict[str, Any]] = field(default_factory=list)  # guest trees laid out

    def as_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return dict(self.__dict__)


# ---------------------------------------------------------------------------- selection

#: bytes of a selection file read at most
MAX_SELECTION = 64 * 1024 * 1024


def parse_selection_file(path: str | os.PathLike[str]) -> list[str]:
    """Return the entries (guest paths or sha256s) listed in ``path``, '#' comments
    removed. Raises LibshareError (exit 1) if it is missing, not a regular file, larger
    than MAX_SELECTION or not UTF-8 text."""
    try:
        text = read_regular(path, MAX_SELECTION, f"selection file {path}").decode()
    except OSError as exc:
        raise LibshareError(f"cannot read selection file {path}: "
                            f"{os_error(exc, path=False)}") from exc
    except UnicodeDecodeError as exc:
        raise LibshareError(f"selection file {path} is not UTF-8 text ({exc.reason} at "
                            f"byte {exc.start})") from exc
    out = []
    for line in text.splitlines():
        item = line.split("#", 1)[0].strip()
        if item:
            out.append(item)
    return out


def select_entries(index: StoreIndex, selection: str | list[str]) -> list[StoreEntry]:
    """Return the store entries chosen by ``selection``, sorted by sha256.

    ``selection`` is "all" (every object), a path to a selection file, or a list of
    guest paths / hex sha256s. A guest path selects every object seen at that path
    (different trees may hold different versions there: each gets its own region path,
    and a guest uses the one whose SHA-256 matches its file); a sha256 selects exactly
    that object. Raises LibshareError naming the first unknown entry.
    """
    if selection == "all":
        chosen = list(index.entries.values())
    else:
        items = parse_selection_file(selection) if isinstance(selection, str) else selection
        by_path = index.by_path()
        picked: dict[str, StoreEntry] = {}
        for item in items:
            shas = [item.lower()] if re.fullmatch(r"[0-9a-fA-F]{64}", item) \
                else by_path.get(item, [])
            if not shas or any(sha not in index.entries for sha in shas):
                raise LibshareError(f"selection: {item} is not in the store "
                                    "(import it with 'libshare store import')")
            for sha in shas:
                picked[sha] = index.entries[sha]
        chosen = list(picked.values())
    return sorted(chosen, key=lambda e: e.sha256)


# ---------------------------------------------------------------------------- build


def _stage(store_dir: Path, entries: list[StoreEntry], stage: Staging, manifest: bytes,
           progress: Progress | None, rpaths: dict[str, str],
           in_trees: frozenset[str] = frozenset()) -> None:
    """Put the objects of ``entries`` (at their region paths ``rpaths``, by SHA-256) and
    the manifests (JSON and TSV) in ``stage``.

    Each object is hashed once (as it is staged on disk, as the image is written in
    memory) unless the store proved it and its file is unchanged since (:func:`libshare.
    sharing.store.is_proven`), so a store object damaged in place is never published
    (LibshareError naming it; also for one missing or of the wrong size).
    """
    total = len(entries)
    proofs = load_proofs(store_dir)
    for n, e in enumerate(entries, 1):
        if progress:
            progress("stage", n, total, "files")
        st = stat_object(store_dir, e)
        stage.add_object(rpaths[e.sha256], object_file(store_dir, e.sha256), st, e,
                         is_proven(store_dir, e.sha256, e.size, proofs, st))
    stage.mkdir("/.libshare")
    stage.write("/.libshare/manifest.json", manifest, 0o444)
    stage.write("/.libshare/manifest.tsv", tsv_manifest_bytes(entries, in_trees, rpaths),
                0o444)


#: fallocate(2) mode that shifts a file's blocks up to insert a hole (ext4, xfs)
FALLOC_FL_INSERT_RANGE = 0x20


def _insert_head(path: Path, length: int) -> bool:
    """Insert ``length`` bytes (a multiple of the filesystem's block size) of hole at the
    start of the file ``path``, in place; return False where the filesystem cannot."""
    try:
        libc = _libc()
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return libc.fallocate(fd, FALLOC_FL_INSERT_RANGE, ctypes.c_long(0),
                              ctypes.c_long(length)) == 0
    finally:
        os.close(fd)


def _image_in_place(tmp: Path, block: bytes, fs_image: Path, total: int,
                    progress: Progress | None) -> tuple[str, os.stat_result] | None:
    """Make the filesystem image ``fs_image`` the whole image at ``tmp`` without copying
    it: insert the 2 MiB head in front of its blocks (``fallocate`` INSERT_RANGE), write
    the head and the zero tail, then hash it (one read, mostly from the page cache)
    while it is fsync'ed; return its hex SHA-256 and its stat while it had those bytes,
    or None (nothing changed) where the filesystem cannot."""
    if not _insert_head(fs_image, DATAOFF):
        return None
    os.replace(fs_image, tmp)
    with open(tmp, "r+b") as out:
        out.write(_head(block))
        out.seek(0, os.SEEK_END)
        pad = total - out.tell()
        zeros = bytes(min(CHUNK, max(pad, 0)))
        while pad > 0:           # real zeros, as _write_image writes them
            n = min(pad, len(zeros))
            out.write(zeros[:n])
            pad -= n
        out.flush()
        os.fchmod(out.fileno(), IMAGE_MODE)
        before = os.fstat(out.fileno())
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(os.fsync, out.fileno())   # the disk writes, we read
            h = hashlib.sha256()
            done = 0
            with open(tmp, "rb") as back:
                while chunk := back.read(CHUNK):
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress("hash", done, total, "bytes")
            synced.result()
        if stat_key(os.fstat(out.fileno())) != stat_key(before):
            raise LibshareError(f"{tmp} changed while being hashed")
    return h.hexdigest(), before


def _write_image(tmp: Path, block: bytes, fs_image: Path, total: int,
                 progress: Progress | None) -> tuple[str, os.stat_result]:
    """Write the whole image to ``tmp`` (fsync'ed); return its hex SHA-256 and its stat
    once written. The filesystem image becomes it in place where its filesystem allows
    (:func:`_image_in_place`), else it is copied behind the head."""
    done = _image_in_place(tmp, block, fs_image, total, progress)
    if done is not None:
        return done

    def pieces() -> Iterator[bytes]:
        yield _head(block)
        with open(fs_image, "rb") as fs:
            while chunk := fs.read(CHUNK):
                yield chunk

    return _write_stream(tmp, pieces(), total, progress)


def _write_plan(tmp: Path, block: bytes, fs_plan: erofs_write.Plan, total: int,
                progress: Progress | None,
                proved: Callable[[erofs_write.File, str], None]) -> tuple[str, os.stat_result]:
    """Write the whole image to ``tmp``: the head, the EROFS filesystem ``fs_plan``
    (:meth:`~libshare.sharing.formats.erofs_write.Plan.chunks`, each store object read
    once and, where ``proved`` is asked, hashed), the zero tail; fsync it; return its hex
    SHA-256 and its stat once written. Raises LibshareError if a store object changed."""
    try:
        return _write_stream(tmp, itertools.chain([_head(block)], fs_plan.chunks(proved)),
                             total, progress)
    except ErofsError as exc:
        raise LibshareError(f"region build: {exc}") from exc


def _head(block: bytes) -> bytes:
    """Return the image's first DATAOFF bytes: zeros, the PFN info ``block``, zeros."""
    head = bytes(pfn.INFO_OFFSET) + block
    return head + bytes(DATAOFF - len(head))


#: bytes written between two starts of write-back (sync_file_range): the disk works
#: while the build goes on, and the final fsync has little left to wait for
WRITEBACK = 32 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2


def _write_stream(tmp: Path, pieces: Iterable[bytes], total: int,
                  progress: Progress | None) -> tuple[str, os.stat_result]:
    """Write ``pieces`` to the new file ``tmp`` and real zeros up to ``total`` bytes,
    fsync it; return the hex SHA-256 of what was written and the file's stat then.

    The SHA-256 is computed in a thread of its own (hashlib releases the GIL), beside the
    reads and writes; write-back is started every WRITEBACK bytes. LibshareError if the
    pieces are longer than ``total``.
    """
    h = hashlib.sha256()
    todo: queue.Queue[bytes | None] = queue.Queue(maxsize=16)

    def hasher() -> None:
        while (item := todo.get()) is not None:
            h.update(item)

    worker = threading.Thread(target=hasher, name="region-hash", daemon=True)
    worker.start()
    written = started = 0
    try:
        with open(tmp, "wb") as out:
            fd = out.fileno()

            def put(piece: bytes) -> None:
                nonlocal written, started
                out.write(piece)
                todo.put(piece)
                written += len(piece)
                if written - started >= WRITEBACK:
                    out.flush()
                    _start_writeback(fd, started, written - started)
                    started = written
                if progress:
                    progress("write", written, total, "bytes")

            for piece in pieces:
                put(piece)
            if written > total:
                raise LibshareError(f"region build: {written} bytes for an image of {total}")
            # write real zeros: a sparse hole would cost a guest nothing, but we want the
            # size on disk to be honest and stable
            zeros = bytes(min(CHUNK, total - written))
            while written < total:
                put(zeros[:min(len(zeros), total - written)])
            out.flush()
            os.fchmod(fd, IMAGE_MODE)
            os.fsync(fd)
            st = os.fstat(fd)
    finally:
        todo.put(None)
        worker.join()
    return h.hexdigest(), st


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` of ``fd`` to disk without waiting
    (``sync_file_range``); returns nothing, does nothing where the call is missing."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().sync_file_range(fd, ctypes.c_long(offset), ctypes.c_long(length),
                                SYNC_FILE_RANGE_WRITE)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """Return the C library (for the calls Python's os module lacks)."""
    return ctypes.CDLL(None, use_errno=True)


def _start_removal(path: Path) -> subprocess.Popen[bytes] | None:
    """Start removing the tree ``path`` in a process of its own (``rm -rf``: tens of
    thousands of links and directories for a whole /usr, removed while the image is
    hashed and written); return it, or None if it cannot start (the caller's
    ``shutil.rmtree`` then removes the tree)."""
    try:
        return subprocess.Popen(["rm", "-rf", "--one-file-system", "--", str(path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None


def _publish_digest(cfg: Config, final: Path, digest: str, st: os.stat_result) -> None:
    """Record the digest of the image just published at ``final`` in the digest cache
    (the hook's prepare check reads it: a cold hash of a multi-GiB image could exceed
    the hook's time limit); ``st`` is its stat while it was hashed. Raises
    LibshareError if the file is not that one any more."""
    now = final.stat()
    if stat_key(now, ctime=False) != stat_key(st, ctime=False):   # a rename moves ctime
        raise LibshareError(f"{final} changed while being built")
    remember(cfg.digest_cache, os.path.realpath(final), now, digest)


def switch_group_link(cfg: Config, group: str, image: Path) -> Path:
    """Point ``group``'s stable link at ``image`` atomically; return the link path."""
    link = cfg.group_region_link(group)
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(image, link.parent)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)
    return link


def build_region(cfg: Config, group: str, selection: str | list[str] = "all",
                 size: int | None = None, progress: Progress | None = None,
                 policy: str | None = None, trees_wanted: list[str] | None = None,
                 observed: set[str] | None = None, filesystem: str = "erofs") -> BuildResult:
    """Build ``group``'s region image from the store and make it the group's current one.

    ``selection``: "all" (what ``policy`` chooses: :func:`~libshare.sharing.region.
    policy.plan_region`, default ``libraries``, over the trees ``trees_wanted`` and the
    ``observed`` paths), or a list / selection file (see :func:`select_entries`; then no
    policy and no guest tree). ``filesystem``: "erofs" (default) or "ext4"
    (:mod:`libshare.sharing.region.ext4fs`). ``size``: total image size wanted (rounded
    up to 2 MiB; LibshareError if the content needs more). Returns a
    :class:`BuildResult`. On any failure or interrupt nothing is left under a digest name
    and the group link is unchanged; an OSError (disk full) becomes one LibshareError.

    Holds the regions lock from start to end (gc waits; the temporaries of builds that
    were killed are removed first) and the store's shared lock (no import or removal
    changes the objects while they are selected, staged and published).
    """
    check_group(group)
    if isinstance(selection, str) and selection != "all":
        selection = parse_selection_file(selection)
    if selection != "all" and (policy is not None or trees_wanted):
        raise UsageError("a selection and a policy or trees exclude each other")
    if filesystem not in FILESYSTEMS:
        raise UsageError(f"unknown filesystem {filesystem!r} (one of {', '.join(FILESYSTEMS)})")
    writer = erofs_write.WRITER if filesystem == "erofs" else \
        f"mke2fs {ext4fs.mke2fs_version()}"
    want = _Wanted(policy, trees_wanted, observed, filesystem)
    try:
        with locked(cfg), store_locked(cfg.store_dir, shared=True), _gc_paused():
            remove_leftovers(cfg)
            return _build_locked(cfg, group, selection, size, writer, progress, want)
    except OSError as exc:
        raise LibshareError(f"region build failed: {os_error(exc)}; nothing was "
                            "published") from exc


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (yields nothing): a whole
    /usr is some hundred thousand small objects (index entries, nodes, slots) made and
    kept for the build's length, which the collector would walk over and over (a
    seventh of the build's time, none of them garbage); what cycles the build leaves
    are collected when it is enabled again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True)
class _Wanted:
    """What :func:`build_region` was asked for besides a selection."""

    policy: str | None
    trees: list[str] | None
    observed: set[str] | None
    filesystem: str


#: writes the whole image to a path: (path, PFN block, total bytes) -> (digest, stat)
ImageWriter = Callable[[Path, bytes, int], tuple[str, os.stat_result]]


def _filesystem(cfg: Config, filesystem: str, entries: list[StoreEntry],
                rpaths: dict[str, str], laid: list[trees.LaidTree], manifest: bytes,
                fs_uuid: str, staging: Path, progress: Progress | None,
                remover: list[subprocess.Popen[bytes]]) -> tuple[int, ImageWriter]:
    """Stage the region's content for ``filesystem`` (the objects ``entries`` at their
    region paths ``rpaths``) and make its filesystem; return its size in bytes and what
    writes the whole image.

    EROFS: staged in memory, planned (:class:`~libshare.sharing.formats.erofs_write.
    Plan`), written later in one pass. ext4: staged under ``staging``, formatted by
    mkfs.ext4, the staging tree then removed in the background (its process appended to
    ``remover``, for the caller to wait for).
    """
    in_trees = frozenset(e.path for t in laid for e in t.entries if e.kind == "f")
    if filesystem == "erofs":
        mem = MemoryStaging()
        _stage(cfg.store_dir, entries, mem, manifest, progress, rpaths, in_trees)
        mem.apply(trees.stage_trees(mem, laid, rpaths))
        fs_plan = erofs_write.Plan(mem.root, uuidlib.UUID(fs_uuid).bytes, FS_LABEL.encode())
        return fs_plan.size, lambda tmp, block, total: _write_plan(
            tmp, block, fs_plan, total, progress, mem.proved)
    disk = DiskStaging(staging / "root")
    disk.root.mkdir()
    _stage(cfg.store_dir, entries, disk, manifest, progress, rpaths, in_trees)
    patch = trees.stage_trees(disk, laid, rpaths)
    disk.fix_dir_modes()
    fs_image = staging / "fs.ext4"
    if progress:
        progress("mkfs.ext4", 0, 0)
    ext4fs.mkfs_ext4(disk.root, fs_image, fs_uuid, patch)
    proc = _start_removal(disk.root)          # mkfs has read it: gone while we write
    if proc is not None:
        remover.append(proc)
    return fs_image.stat().st_size, lambda tmp, block, total: _write_image(
        tmp, block, fs_image, total, progress)


def _build_locked(cfg: Config, group: str, selection: str | list[str], size: int | None,
                  writer: str, progress: Progress | None, want: _Wanted) -> BuildResult:
    """Build and publish ``group``'s image (see :func:`build_region`; the caller holds
    the locks); return the :class:`BuildResult`."""
    index = load_index(cfg.store_dir)
    if selection == "all":
        plan = policies.plan_region(cfg.store_dir, index,
                                    want.policy or policies.DEFAULT_POLICY, want.trees,
                                    want.observed)
    else:
        plan = policies.Plan("select", select_entries(index, selection))
    entries = plan.entries
    if not entries:
        what = "the store is empty" if not index.entries else \
            f"the {plan.policy} policy chooses nothing in the store"
        raise LibshareError(f"nothing to put in the region: {what} (import a guest tree "
                            "with 'libshare store import DIR')")
    laid = [t for t in (trees.lay_out(r, plan.chosen) for r in plan.records) if t.entries]
    rpaths = {e.sha256: fs_path(e) for e in entries}
    tree_tsv = trees.tsv_bytes(laid)
    manifest = manifest_bytes(entries, group, writer, plan.policy,
                              [t.summary() for t in laid], tree_tsv, want.filesystem,
                              rpaths)
    fs_uuid = str(pfn_uuid(hashlib.sha256(b"libshare-region-fs\0" + manifest).digest()))
    images = cfg.regions_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cfg.regions_dir))
    tmp_image: Path | None = None
    remover: list[subprocess.Popen[bytes]] = []
    try:
        fs_size, write = _filesystem(cfg, want.filesystem, entries, rpaths, laid, manifest,
                                     fs_uuid, staging, progress, remover)
        need = DATAOFF + round_up(fs_size, REGION_ALIGN)
        total = need if size is None else round_up(size, REGION_ALIGN)
        if total < need:
            raise LibshareError(f"--size {human(size or 0)} is too small: the region "
                                f"needs {human(need)} ({need} bytes)")
        block = pfn.build(total, DATAOFF, pfn.uuid_from(
            hashlib.sha256(b"libshare-region-pfn\0" + uuidlib.UUID(fs_uuid).bytes).digest()))
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".img", dir=images)
        os.close(fd)
        tmp_image = Path(name)
        digest, written = write(tmp_image, block, total)
        final = cfg.region_image(digest)
        # an existing image of that name is reused only if its bytes still match
        new = not (final.exists() and cached_sha256(final, cfg.digest_cache) == digest)
        if new:
            os.replace(tmp_image, final)
        else:
            tmp_image.unlink()
        tmp_image = None
        fsync_dir(images)
        if new:
            _publish_digest(cfg, final, digest, written)
        link = switch_group_link(cfg, group, final)
    finally:
        if tmp_image is not None:
            with contextlib.suppress(OSError):
                tmp_image.unlink()
        for proc in remover:
            proc.wait()
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(path=str(final), digest=digest, size=total, files=len(entries),
                       group=group, link=str(link), fs_size=fs_size,
                       data_size=sum(e.size for e in entries), new=new,
                       writer=writer,
                       filesystem=want.filesystem, policy=plan.policy,
                       trees=[t.summary() for t in laid])
