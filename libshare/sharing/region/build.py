"""Building a group's region image from the store and making it the group's current one.

Selection of store objects, staging them (hashed as they are staged), mkfs.erofs with
the options that make the result deterministic, the PFN head and zero tail, and
publishing under the regions lock: the image as ``images/DIGEST.img``, then the group's
link switched atomically. On any failure or interrupt nothing is published. The image
layout, names and the determinism rules are described once, in
:mod:`libshare.sharing.region.layout`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.config import Config
from libshare.errors import LibshareError, UsageError
from libshare.sharing.formats import pfn
from libshare.sharing.region import ext4fs
from libshare.sharing.region import policy as policies
from libshare.sharing.region import tree as trees
from libshare.sharing.region.layout import (
    CHUNK,
    DATAOFF,
    FILESYSTEMS,
    IMAGE_MODE,
    check_group,
    fs_path,
    locked,
    pfn_uuid,
    remove_leftovers,
    set_fs_label,
)
from libshare.sharing.region.manifest import manifest_bytes, tsv_manifest_bytes
from libshare.sharing.store import (
    OBJECT_MODE,
    StoreEntry,
    StoreIndex,
    check_object,
    corrupt_object_problem,
    is_proven,
    load_index,
    load_proofs,
    object_path,
)
from libshare.sharing.store import locked as store_locked
from libshare.util.digest import cached_sha256, copy_sha256, sha256_file
from libshare.util.files import fsync_dir, open_regular, os_error, read_regular
from libshare.util.progress import Progress
from libshare.util.units import REGION_ALIGN, human, round_up

MKFS_VERSION = re.compile(r"^mkfs\.erofs(?:\s+\(erofs-utils\))?\s+v?([0-9][\w.+~:-]*)",
                          re.MULTILINE)
#: seconds between progress ticks while mkfs.erofs runs
TICK = 0.2
MKFS_OPTIONS = ["--quiet", "-x-1", "-T0", "--all-root", "-Enoinline_data"]


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
    mkfs_erofs: str      # erofs-utils version that formatted it (also in the manifest)
    filesystem: str = "erofs"  # erofs or ext4 (mkfs_erofs is "" for ext4)
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



def _stage(store_dir: Path, entries: list[StoreEntry], root: Path, manifest: bytes,
           progress: Progress | None, in_trees: frozenset[str] = frozenset()) -> None:
    """Fill the staging tree ``root`` with the objects of ``entries`` and the manifests
    (JSON and TSV).

    Each object is hashed as it is staged (one read: the hard link mkfs.erofs will read,
    or the copy being written) unless the store proved it and its file is unchanged
    since (:func:`libshare.sharing.store.is_proven`), so a store object damaged in place
    is never published. Raises LibshareError naming the first corrupt object.
    """
    total = len(entries)
    proofs = load_proofs(store_dir)
    for n, e in enumerate(entries, 1):
        if progress:
            progress("stage", n, total, "files")
        dest = root / fs_path(e).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = object_path(store_dir, e.sha256)
        proven = is_proven(store_dir, e.sha256, e.size, proofs)
        linked = False
        if stat.S_IMODE(src.stat().st_mode) == OBJECT_MODE:
            try:
                os.link(src, dest)
                linked = True
            except OSError:
                pass
        if linked and proven:
            actual = e.sha256            # unchanged since an import proved it
        elif linked:
            actual = sha256_file(dest)
        else:
            with open_regular(src) as fin, open(dest, "wb") as fout:
                actual = copy_sha256(fin, fout)
            os.chmod(dest, OBJECT_MODE)
        if actual != e.sha256:
            raise LibshareError(corrupt_object_problem(e, actual))
    meta = root / ".libshare"
    meta.mkdir()
    (meta / "manifest.json").write_bytes(manifest)
    os.chmod(meta / "manifest.json", 0o444)
    (meta / "manifest.tsv").write_bytes(tsv_manifest_bytes(entries, in_trees))
    os.chmod(meta / "manifest.tsv", 0o444)
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
        os.utime(dirpath, (0, 0))


def _find_mkfs() -> str:
    """Return the path of mkfs.erofs; raise LibshareError if it is not installed."""
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        raise LibshareError("mkfs.erofs not found (install erofs-utils)")
    return mkfs


@functools.lru_cache(maxsize=4)
def mkfs_erofs_version(mkfs: str) -> str:
    """Return the erofs-utils version of the mkfs.erofs at ``mkfs`` ("1.5"), "unknown"
    when neither ``mkfs.erofs --version`` nor dpkg tells it.

    erofs-utils 1.5 prints "mkfs.erofs 1.5" and then rejects ``--version`` (exit 1);
    later versions print "mkfs.erofs (erofs-utils) 1.7.1". Images are byte-identical
    only for identical inputs and the same version: it goes into the manifest.
    """
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run([mkfs, "--version"], capture_output=True, text=True,
                              check=False, timeout=10)
        m = MKFS_VERSION.search(proc.stdout + "\n" + proc.stderr)
        if m:
            return m.group(1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "erofs-utils"],
                              capture_output=True, text=True, check=False, timeout=10)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    return "unknown"


def _mkfs(mkfs: str, fs_uuid: str, out: Path, root: Path,
          progress: Progress | None = None) -> None:
    """Run mkfs.erofs and label the result (FS_LABEL); raise LibshareError with its last
    error line on failure. While it runs, ``progress("mkfs.erofs", seconds, 0)`` ticks
    every TICK seconds (total 0: no known end, the printer shows elapsed time)."""
    cmd = [mkfs, *MKFS_OPTIONS, f"-U{fs_uuid}", str(out), str(root)]
    start = time.monotonic()
    if progress:
        progress("mkfs.erofs", 0, 0)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            while True:
                try:
                    stdout, stderr = proc.communicate(timeout=TICK)
                    break
                except subprocess.TimeoutExpired:
                    if progress:
                        progress("mkfs.erofs", int(time.monotonic() - start), 0)
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0 or not out.exists():
        lines = (stderr or stdout).strip().splitlines()
        raise LibshareError(f"mkfs.erofs failed: {lines[-1] if lines else proc.returncode}")
    set_fs_label(out)


#: fallocate(2) mode that shifts a file's blocks up to insert a hole (ext4, xfs)
FALLOC_FL_INSERT_RANGE = 0x20


def _insert_head(path: Path, length: int) -> bool:
    """Insert ``length`` bytes (a multiple of the filesystem's block size) of hole at the
    start of the file ``path``, in place; return False where the filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return libc.fallocate(fd, FALLOC_FL_INSERT_RANGE, ctypes.c_long(0),
                              ctypes.c_long(length)) == 0
    finally:
        os.close(fd)


def _image_in_place(tmp: Path, block: bytes, fs_image: Path, total: int,
                    progress: Progress | None) -> str | None:
    """Make the filesystem image ``fs_image`` the whole image at ``tmp`` without copying
    it: insert the 2 MiB head in front of its blocks (``fallocate`` INSERT_RANGE), write
    the head and the zero tail, hash it (one read, mostly from the page cache), fsync;
    return its hex SHA-256, or None (nothing changed) where the filesystem cannot."""
    if not _insert_head(fs_image, DATAOFF):
        return None
    os.replace(fs_image, tmp)
    h = hashlib.sha256()
    head = bytes(pfn.INFO_OFFSET) + block
    head += bytes(DATAOFF - len(head))
    with open(tmp, "r+b") as out:
        out.write(head)
        out.seek(0, os.SEEK_END)
        pad = total - out.tell()
        zeros = bytes(min(CHUNK, max(pad, 0)))
        while pad > 0:           # real zeros, as _write_image writes them
            n = min(pad, len(zeros))
            out.write(zeros[:n])
            pad -= n
        out.flush()
        out.seek(0)
        done = 0
        while chunk := out.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress("hash", done, total, "bytes")
        os.fchmod(out.fileno(), IMAGE_MODE)
        os.fsync(out.fileno())
    return h.hexdigest()


def _write_image(tmp: Path, block: bytes, fs_image: Path, total: int,
                 progress: Progress | None) -> str:
    """Write the whole image to ``tmp`` (fsync'ed); return its hex SHA-256. The
    filesystem image becomes it in place where its filesystem allows
    (:func:`_image_in_place`), else it is copied behind the head."""
    digest = _image_in_place(tmp, block, fs_image, total, progress)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    head = bytes(pfn.INFO_OFFSET) + block
    head += bytes(DATAOFF - len(head))
    written = 0
    with open(tmp, "wb") as out:
        out.write(head)
        h.update(head)
        written += len(head)
        with open(fs_image, "rb") as fs:
            while chunk := fs.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                written += len(chunk)
                if progress:
                    progress("write", written, total, "bytes")
        pad = total - written
        zeros = bytes(min(CHUNK, pad))
        while pad > 0:  # write real zeros: a sparse hole would cost a guest nothing, but
            n = min(pad, len(zeros))  # we want the size on disk to be honest and stable
            out.write(zeros[:n])
            h.update(zeros[:n])
            pad -= n
        if progress:
            progress("write", total, total, "bytes")
        out.flush()
        os.fchmod(out.fileno(), IMAGE_MODE)
        os.fsync(out.fileno())
    return h.hexdigest()


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
    if filesystem == "erofs":
        mkfs = _find_mkfs()
        version = mkfs_erofs_version(mkfs)
    else:
        mkfs, version = "", ext4fs.mke2fs_version()
    want = _Wanted(policy, trees_wanted, observed, filesystem)
    try:
        with locked(cfg), store_locked(cfg.store_dir, shared=True):
            remove_leftovers(cfg)
            return _build_locked(cfg, group, selection, size, mkfs, version, progress, want)
    except OSError as exc:
        raise LibshareError(f"region build failed: {os_error(exc)}; nothing was "
                            "published") from exc


@dataclass(frozen=True)
class _Wanted:
    """What :func:`build_region` was asked for besides a selection."""

    policy: str | None
    trees: list[str] | None
    observed: set[str] | None
    filesystem: str


def _build_locked(cfg: Config, group: str, selection: str | list[str], size: int | None,
                  mkfs: str, version: str, progress: Progress | None,
                  want: _Wanted) -> BuildResult:
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
    for e in entries:
        problem = check_object(cfg.store_dir, e)
        if problem:
            raise LibshareError(problem)
    tree_tsv = trees.tsv_bytes(laid)
    manifest = manifest_bytes(entries, group, version, plan.policy,
                              [t.summary() for t in laid], tree_tsv, want.filesystem)
    fs_uuid = str(pfn_uuid(hashlib.sha256(b"libshare-region-fs\0" + manifest).digest()))
    images = cfg.regions_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cfg.regions_dir))
    tmp_image: Path | None = None
    try:
        root = staging / "root"
        root.mkdir()
        _stage(cfg.store_dir, entries, root, manifest, progress,
               frozenset(e.path for t in laid for e in t.entries if e.kind == "f"))
        patch = trees.stage_trees(root, laid, {e.sha256: fs_path(e) for e in entries})
        fs_image = staging / f"fs.{want.filesystem}"
        if want.filesystem == "erofs":
            _mkfs(mkfs, fs_uuid, fs_image, root, progress)
            trees.patch_inodes(fs_image, patch)
        else:
            if progress:
                progress("mkfs.ext4", 0, 0)
            ext4fs.mkfs_ext4(root, fs_image, fs_uuid, patch)
        fs_size = fs_image.stat().st_size
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
        digest = _write_image(tmp_image, block, fs_image, total, progress)
        final = cfg.region_image(digest)
        # an existing image of that name is reused only if its bytes still match
        # (this also primes the digest cache the hook's prepare check reads: a cold
        # hash of a multi-GiB image could exceed the hook's time limit)
        new = not (final.exists() and cached_sha256(final, cfg.digest_cache) == digest)
        if new:
            os.replace(tmp_image, final)
        else:
            tmp_image.unlink()
        tmp_image = None
        fsync_dir(images)
        if new and cached_sha256(final, cfg.digest_cache) != digest:
            raise LibshareError(f"{final} changed while being built")
        link = switch_group_link(cfg, group, final)
    finally:
        if tmp_image is not None:
            with contextlib.suppress(OSError):
                tmp_image.unlink()
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(path=str(final), digest=digest, size=total, files=len(entries),
                       group=group, link=str(link), fs_size=fs_size,
                       data_size=sum(e.size for e in entries), new=new,
                       mkfs_erofs=version if want.filesystem == "erofs" else "",
                       filesystem=want.filesystem, policy=plan.policy,
                       trees=[t.summary() for t in laid])




# ---------------------------------------------------------------------------- verify























# ---------------------------------------------------------------------------- ls / gc













