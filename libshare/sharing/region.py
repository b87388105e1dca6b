"""Region images: deterministic build, verify, list and garbage-collect.

Owns ``cfg.regions_dir``: ``images/DIGEST.img`` (one file per distinct image, named by
the hex SHA-256 of its bytes, mode 0644: see IMAGE_MODE), ``groups/GROUP.img`` (a relative symlink to
the group's current image, switched atomically), ``.lock`` and the temporary
``.build-*`` / ``images/.tmp-*`` entries of a build in progress.

Image layout (the guest sees the file as a label-less NVDIMM namespace)::

    0        4 KiB of zeros
    4 KiB    NVDIMM PFN info block (libshare.sharing.pfn): mode RAM, align and
             dataoff 2 MiB, npfns = (size - 2 MiB) / 4 KiB  -> the guest builds an
             fsdax device /dev/pmem0 that starts at 2 MiB
    8 KiB    zeros up to 2 MiB
    2 MiB    EROFS filesystem (mkfs.erofs, uncompressed, 4 KiB blocks,
             -Enoinline_data so every file is block-aligned and DAX-mappable)
    ...      zeros up to the total size, a multiple of 2 MiB

Inside the filesystem every store object lives at a path that depends only on its
content and name: ``/lib/<sha256[:2]>/<sha256>/<name>``, where ``name`` is the SONAME
(else the smallest basename it was seen under). The hash directory makes paths unique
and stable across rebuilds and hosts (adding a library never moves another one), and
the real basename keeps guest ``/proc/PID/maps`` readable ("/.../libc.so.6").
``/.libshare/manifest.json`` lists, per file: path, sha256, build_id, soname, size and
the guest paths it serves, plus the group name. ``/.libshare/manifest.tsv`` says the same
for POSIX sh in guests (libshare/guest/libshare-redirect): one line per guest path,
``sha256 TAB size TAB path-in-image TAB guest-path``, sorted; guest paths holding a tab,
newline or backslash are left out of it (no shell can read them back safely).

The filesystem carries the label ``libshare`` (EROFS ``volume_name``; erofs-utils 1.5 has
no ``-L``, so the superblock is patched after mkfs and its crc32c recomputed): guests find
the region among their /dev/pmem* devices with ``blkid`` by label, not by device order.

Determinism: the staging tree has fixed modes, mkfs.erofs gets ``-T0`` (all times 0),
``--all-root``, ``-x-1`` (no xattrs) and a UUID derived from the manifest; the PFN
uuid derives from the filesystem UUID. The same store objects, selection, group and
erofs-utils version give the byte-identical image on every host; the version is part of
the manifest (``mkfs_erofs``), so a fleet must run one erofs-utils version (1.5 on
Debian 12) to build one file. The group name is part of the manifest,
so two trust groups never share one image file (nor its host page cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.config import Config
from libshare.digest import cached_sha256, copy_sha256, forget, sha256_file
from libshare.domxml import metadata
from libshare.errors import LibshareError, UsageError
from libshare.sharing import pfn
from libshare.sharing.erofs import (
    FEATURE_COMPAT_SB_CHKSUM,
    LAYOUT_FLAT_PLAIN,
    LAYOUT_NAMES,
    SUPER_OFFSET,
    Erofs,
    ErofsError,
    crc32c_raw,
)
from libshare.sharing.store import (
    OBJECT_MODE,
    Progress,
    StoreEntry,
    StoreIndex,
    check_object,
    corrupt_object_problem,
    fsync_dir,
    load_index,
    object_path,
)
from libshare.units import REGION_ALIGN, human, round_up

DATAOFF = REGION_ALIGN
MANIFEST_PATH = "/.libshare/manifest.json"
TSV_MANIFEST_PATH = "/.libshare/manifest.tsv"
#: EROFS volume label of every region filesystem (at most 16 bytes)
FS_LABEL = "libshare"
MANIFEST_VERSION = 1
DIGEST_NAME = re.compile(r"^([0-9a-f]{64})\.img$")
MKFS_VERSION = re.compile(r"^mkfs\.erofs(?:\s+\(erofs-utils\))?\s+v?([0-9][\w.+~:-]*)",
                          re.MULTILINE)
#: seconds between progress ticks while mkfs.erofs runs
TICK = 0.2
MKFS_OPTIONS = ["--quiet", "-x-1", "-T0", "--all-root", "-Enoinline_data"]
CHUNK = 4 * 1024 * 1024
#: QEMU 7.2 opens a memory-backend-file O_RDWR unless readonly=on, which libvirt 9.0 never
#: sets: a 0444 image fails with EACCES once libvirt chowns it to the QEMU user. The
#: guests still cannot change it: access='private' maps it MAP_PRIVATE (copy-on-write).
IMAGE_MODE = 0o644


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

    def as_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class ImageInfo:
    """One image found by :func:`list_images`."""

    path: str
    digest: str
    size: int
    groups: list[str] = field(default_factory=list)
    files: int | None = None
    manifest_group: str | None = None
    mkfs_erofs: str | None = None      # from the manifest (None: built before it was kept)

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


# ---------------------------------------------------------------------------- selection

def parse_selection_file(path: str | os.PathLike[str]) -> list[str]:
    """Return the entries (guest paths or sha256s) listed in ``path``, '#' comments removed."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read selection file {path}: {exc.strerror}") from exc
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


def fs_path(entry: StoreEntry) -> str:
    """Return the stable path of ``entry`` inside the region filesystem."""
    return f"/lib/{entry.sha256[:2]}/{entry.sha256}/{entry.name}"


def manifest_bytes(entries: list[StoreEntry], group: str, mkfs_version: str) -> bytes:
    """Return the canonical manifest (JSON, sorted, no timestamps) for ``entries``,
    recording the erofs-utils version ``mkfs_version`` that formats the image."""
    doc = {
        "version": MANIFEST_VERSION,
        "group": group,
        "mkfs_erofs": mkfs_version,
        "files": [{"path": fs_path(e), "sha256": e.sha256, "build_id": e.build_id,
                   "soname": e.soname, "size": e.size, "guest_paths": sorted(e.paths)}
                  for e in sorted(entries, key=lambda x: x.sha256)],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def tsv_manifest_bytes(entries: list[StoreEntry]) -> bytes:
    """Return the text manifest for guests' POSIX sh: one ``sha256\\tsize\\tpath\\t
    guest_path`` line per guest path of each entry, sorted; guest paths a shell ``read``
    could mangle (tab, newline, backslash) are left out."""
    lines = []
    for e in entries:
        for guest in e.paths:
            if any(c in guest for c in "\t\n\r\\") or not guest.startswith("/"):
                continue
            lines.append(f"{e.sha256}\t{e.size}\t{fs_path(e)}\t{guest}\n")
    return "".join(sorted(lines)).encode()


def set_fs_label(fs_image: Path, label: str = FS_LABEL) -> None:
    """Write ``label`` into the EROFS superblock's volume_name of the filesystem image
    ``fs_image`` and recompute the superblock crc32c when the image has one.

    Returns nothing; raises LibshareError if the label is too long or the file is not
    an EROFS image with 4 KiB blocks.
    """
    raw = label.encode()
    if not raw or len(raw) > 16:
        raise LibshareError(f"filesystem label {label!r} must be 1 to 16 bytes")
    with open(fs_image, "r+b") as fh:
        fh.seek(0)
        block = bytearray(fh.read(4096))
        if len(block) != 4096 or int.from_bytes(
                block[SUPER_OFFSET:SUPER_OFFSET + 4], "little") != 0xE0F5E1E2 \
                or block[SUPER_OFFSET + 12] != 12:
            raise LibshareError(f"{fs_image}: not an EROFS image with 4 KiB blocks")
        name = SUPER_OFFSET + 64
        block[name:name + 16] = raw.ljust(16, b"\0")
        compat = int.from_bytes(block[SUPER_OFFSET + 8:SUPER_OFFSET + 12], "little")
        if compat & FEATURE_COMPAT_SB_CHKSUM:
            sb = bytearray(block[SUPER_OFFSET:])
            sb[4:8] = bytes(4)
            block[SUPER_OFFSET + 4:SUPER_OFFSET + 8] = crc32c_raw(bytes(sb)).to_bytes(4, "little")
        fh.seek(0)
        fh.write(block)


def fs_label(fs: Erofs) -> str:
    """Return the volume label of the EROFS filesystem ``fs`` ('' when it has none)."""
    raw = fs.read(SUPER_OFFSET + 64, 16)
    return raw.split(b"\0", 1)[0].decode(errors="replace")


# ---------------------------------------------------------------------------- build

@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    """Hold the regions lock (builds and gc exclude each other)."""
    cfg.regions_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.regions_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stage(store_dir: Path, entries: list[StoreEntry], root: Path, manifest: bytes,
           progress: Progress | None) -> None:
    """Fill the staging tree ``root`` with the objects of ``entries`` and the manifests
    (JSON and TSV).

    Each object is hashed as it is staged (one read: the hard link mkfs.erofs will read,
    or the copy being written), so a store object damaged in place is never published.
    Raises LibshareError naming the first corrupt object.
    """
    total = len(entries)
    for n, e in enumerate(entries, 1):
        if progress:
            progress("stage", n, total, "files")
        dest = root / fs_path(e).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = object_path(store_dir, e.sha256)
        linked = False
        if stat.S_IMODE(src.stat().st_mode) == OBJECT_MODE:
            try:
                os.link(src, dest)
                linked = True
            except OSError:
                pass
        if linked:
            actual = sha256_file(dest)
        else:
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                actual = copy_sha256(fin, fout)
            os.chmod(dest, OBJECT_MODE)
        if actual != e.sha256:
            raise LibshareError(corrupt_object_problem(e, actual))
    meta = root / ".libshare"
    meta.mkdir()
    (meta / "manifest.json").write_bytes(manifest)
    os.chmod(meta / "manifest.json", 0o444)
    (meta / "manifest.tsv").write_bytes(tsv_manifest_bytes(entries))
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


def _write_image(tmp: Path, block: bytes, fs_image: Path, total: int,
                 progress: Progress | None) -> str:
    """Write the whole image to ``tmp`` (fsync'ed); return its hex SHA-256."""
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


def check_group(group: str) -> None:
    """Raise UsageError unless ``group`` is a valid trust-group name (the one rule of
    :func:`libshare.domxml.metadata.check_group`)."""
    metadata.check_group(group, error=UsageError)


def build_region(cfg: Config, group: str, selection: str | list[str] = "all",
                 size: int | None = None, progress: Progress | None = None) -> BuildResult:
    """Build ``group``'s region image from the store and make it the group's current one.

    ``selection``: see :func:`select_entries`. ``size``: total image size wanted
    (rounded up to 2 MiB; LibshareError if the content needs more). Returns a
    :class:`BuildResult`. On any failure or interrupt nothing is left under a digest name
    and the group link is unchanged.
    """
    check_group(group)
    index = load_index(cfg.store_dir)
    entries = select_entries(index, selection)
    if not entries:
        raise LibshareError("nothing to put in the region: the store is empty "
                            "(import libraries with 'libshare store import DIR')")
    for e in entries:
        problem = check_object(cfg.store_dir, e)
        if problem:
            raise LibshareError(problem)
    mkfs = _find_mkfs()
    version = mkfs_erofs_version(mkfs)
    manifest = manifest_bytes(entries, group, version)
    fs_uuid = str(pfn_uuid(hashlib.sha256(b"libshare-region-fs\0" + manifest).digest()))
    images = cfg.regions_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    with _locked(cfg):
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cfg.regions_dir))
        tmp_image: Path | None = None
        try:
            root = staging / "root"
            root.mkdir()
            _stage(cfg.store_dir, entries, root, manifest, progress)
            fs_image = staging / "fs.erofs"
            _mkfs(mkfs, fs_uuid, fs_image, root, progress)
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
                       mkfs_erofs=version)


def pfn_uuid(seed: bytes) -> uuidlib.UUID:
    """Return the UUID derived from ``seed`` (see :func:`libshare.sharing.pfn.uuid_from`)."""
    return uuidlib.UUID(bytes=pfn.uuid_from(seed))


# ---------------------------------------------------------------------------- verify

def read_manifest(fs: Erofs) -> dict[str, Any]:
    """Return the parsed manifest of the region filesystem ``fs``; ErofsError if unusable."""
    ino = fs.lookup(MANIFEST_PATH)
    try:
        doc = json.loads(fs.read_inode(ino))
    except ValueError as exc:
        raise ErofsError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION \
            or not isinstance(doc.get("files"), list):
        raise ErofsError("manifest has an unsupported format")
    return doc


def verify(path: str | os.PathLike[str], check_name: bool = True,
           fsck: bool = False) -> str | None:
    """Return the first problem found in the region image at ``path``, or None if sound.

    Checks, in order: the layout (:func:`quick_verify`: size, zeros, PFN info block,
    EROFS superblock, zeros after the filesystem, a readable manifest), every listed
    file (present, plain layout for DAX, size, SHA-256), the text manifest, optionally
    ``fsck.erofs --extract`` on a copy of the filesystem, and finally, if the file is
    named ``<sha256>.img``, that its SHA-256 matches the name.
    """
    spath = os.fspath(path)
    problem = _verify_path(spath, content=True)
    if problem:
        return problem
    if fsck:
        problem = fsck_region(spath)
        if problem:
            return problem
    m = DIGEST_NAME.match(os.path.basename(os.path.realpath(spath)))
    if check_name and m:
        digest = sha256_file(spath)
        if digest != m.group(1):
            return f"content does not match the file name (SHA-256 is {digest})"
    return None


def quick_verify(path: str | os.PathLike[str]) -> str | None:
    """Return the first layout problem of the region image at ``path``, or None.

    Cheap, whatever the image's size (reads the first 2 MiB, the filesystem metadata
    it walks to the manifest and QUICK_TAIL bytes at each end of the zero tail, never
    the libraries): file size a multiple of 2 MiB, zeros before and after the PFN info
    block up to 2 MiB, the info block (signature, Fletcher-64, mode, align, dataoff,
    npfns == size), the EROFS superblock (magic, crc32c, block count within the file),
    zeros at the start and end of what follows the filesystem, and a readable
    manifest. Meant for checks with a time limit (the hook's
    prepare check of a domain enrolled without a digest); :func:`verify` does it all.
    """
    return _verify_path(os.fspath(path), content=False)


def _verify_path(spath: str, content: bool) -> str | None:
    """Return the first problem :func:`_verify_open` finds in the regular file ``spath``
    (libraries hashed too when ``content``), or None."""
    try:
        with open(spath, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                return f"{spath}: not a regular file"
            return _verify_open(fh, st.st_size, content=content)
    except OSError as exc:
        return f"{spath}: {exc.strerror or exc}"


def _first_nonzero(data: bytes) -> int:
    """Return the index of the first non-zero byte of ``data`` (-1 if all are zero)."""
    stripped = data.lstrip(b"\0")
    return -1 if not stripped else len(data) - len(stripped)


#: bytes of the zero tail :func:`quick_verify` reads at each end (it must stay cheap
#: however large ``region build --size`` made the image)
QUICK_TAIL = 64 * 1024


def _zero_tail_problem(fh: Any, start: int, size: int, quick: bool = False) -> str | None:
    """Return a problem if a byte of ``fh`` from ``start`` to ``size`` is not zero (with
    ``quick``, only the first and last QUICK_TAIL bytes of that range are read)."""
    if quick and size - start > 2 * QUICK_TAIL:
        ranges = [(start, start + QUICK_TAIL), (size - QUICK_TAIL, size)]
    else:
        ranges = [(start, size)]
    for lo, hi in ranges:
        fh.seek(lo)
        pos = lo
        while pos < hi:
            chunk = fh.read(min(CHUNK, hi - pos))
            if not chunk:
                return f"short read at byte {pos}: image truncated"
            i = _first_nonzero(chunk)
            if i >= 0:
                return (f"byte {pos + i} is not zero: the filesystem ends at byte {start} "
                        "and everything after it must be zero padding")
            pos += len(chunk)
    return None


def _verify_open(fh: Any, size: int, content: bool = True) -> str | None:
    """Return the first problem of the open image ``fh`` of ``size`` bytes: its layout,
    then (``content``) every manifest file's bytes and the text manifest."""
    if size % REGION_ALIGN:
        return f"size {size} is not a multiple of 2 MiB: truncated or padded"
    if size < DATAOFF + REGION_ALIGN:
        return f"image too small ({size} bytes): truncated or not a region image"
    head = fh.read(DATAOFF)
    if len(head) != DATAOFF:
        return "short read of the image head"
    if head[:pfn.INFO_OFFSET] != bytes(pfn.INFO_OFFSET):
        return "the first 4 KiB are not zero"
    block = head[pfn.INFO_OFFSET:pfn.INFO_OFFSET + pfn.BLOCK_SIZE]
    info = pfn.unpack(block)
    problem = pfn.validate(info, size, block)
    if problem:
        return f"PFN info block: {problem}"
    if info.dataoff != DATAOFF:
        return f"PFN info block: dataoff {info.dataoff} (libshare images use {DATAOFF})"
    gap = pfn.INFO_OFFSET + pfn.BLOCK_SIZE
    i = _first_nonzero(head[gap:])
    if i >= 0:
        return (f"byte {gap + i} is not zero: bytes {gap} to {DATAOFF} (between the PFN "
                "info block and the filesystem) must be zero")
    try:
        fs = Erofs(fh, offset=info.dataoff, length=size - info.dataoff)
        problem = _zero_tail_problem(fh, DATAOFF + fs.sb.blocks * fs.sb.block_size, size,
                                     quick=not content)
        if problem:
            return problem
        manifest = read_manifest(fs)
        if not content:
            return None
        for item in manifest["files"]:
            problem = _verify_file(fs, item)
            if problem:
                return problem
        problem = _verify_tsv(fs, manifest)
        if problem:
            return problem
    except ErofsError as exc:
        return f"filesystem: {exc}"
    except (KeyError, TypeError) as exc:
        return f"filesystem: manifest entry malformed ({exc})"
    return None


def _verify_tsv(fs: Erofs, manifest: dict[str, Any]) -> str | None:
    """Return a problem with the text manifest (every line must agree with the JSON
    manifest: guests trust it to pair their file's hash with a region path), or None.
    Images built before the text manifest existed have none: that is not a problem."""
    try:
        ino = fs.lookup(TSV_MANIFEST_PATH)
    except ErofsError:
        return None
    known = {(f["sha256"], str(f["size"]), f["path"], g)
             for f in manifest["files"] for g in f["guest_paths"]}
    for n, line in enumerate(fs.read_inode(ino).decode(errors="replace").splitlines(), 1):
        if tuple(line.split("\t")) not in known:
            return f"{TSV_MANIFEST_PATH} line {n} does not match the JSON manifest"
    return None


def _verify_file(fs: Erofs, item: dict[str, Any]) -> str | None:
    """Return a problem with the manifest entry ``item`` in ``fs``, or None."""
    path = item["path"]
    ino = fs.lookup(path)
    if not ino.is_reg:
        return f"{path}: not a regular file"
    if ino.layout != LAYOUT_FLAT_PLAIN:
        return f"{path}: {LAYOUT_NAMES.get(ino.layout, ino.layout)} layout, DAX needs flat-plain"
    if ino.size != item["size"]:
        return f"{path}: size {ino.size}, manifest says {item['size']}"
    h = hashlib.sha256()
    for chunk in fs.iter_chunks(ino, CHUNK):
        h.update(chunk)
    if h.hexdigest() != item["sha256"]:
        return f"{path}: SHA-256 {h.hexdigest()} does not match the manifest"
    return None


def fsck_region(path: str) -> str | None:
    """Return a problem reported by ``fsck.erofs --extract`` on the image's filesystem.

    erofs-utils 1.5 has no offset option, so the filesystem part is copied to a
    temporary file next to the image first. None if fsck.erofs is not installed.
    """
    tool = shutil.which("fsck.erofs")
    if tool is None:
        return None
    with open(path, "rb") as src, tempfile.NamedTemporaryFile(
            prefix=".fsck-", dir=os.path.dirname(os.path.abspath(path))) as tmp:
        src.seek(DATAOFF)
        shutil.copyfileobj(src, tmp, CHUNK)
        tmp.flush()
        proc = subprocess.run([tool, "--extract", tmp.name], capture_output=True, text=True,
                              check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"fsck.erofs: {lines[-1] if lines else f'exit {proc.returncode}'}"
    return None


# ---------------------------------------------------------------------------- ls / gc

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
        if read_manifests:
            with contextlib.suppress(OSError, ErofsError, ValueError), open(p, "rb") as fh:
                fs = Erofs(fh, offset=DATAOFF)
                doc = read_manifest(fs)
                info.files = len(doc["files"])
                info.manifest_group = doc.get("group")
                info.mkfs_erofs = doc.get("mkfs_erofs")
        out.append(info)
    return out


def region_paths_in_xml(xml: str) -> set[str]:
    """Return the region backing paths a libvirt domain XML refers to.

    nvdimm and virtio-pmem ``<memory>`` devices give their ``<source><path>``;
    ``<shmem name=N>`` gives ``/dev/shm/N`` (libshare.domxml.devices.region_path_of).
    """
    from lxml import etree

    from libshare.domxml.devices import region_path_of

    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    out: set[str] = set()
    for dev in root.iterfind("./devices/*"):
        if dev.tag == "memory" and dev.get("model") not in ("nvdimm", "virtio-pmem"):
            continue
        if dev.tag in ("memory", "shmem"):
            path = region_path_of(dev)
            if path:
                out.add(path)
    return out


def libvirt_region_paths(uri: str) -> set[str]:
    """Return every region path referenced by any domain (defined or running) at ``uri``.

    Raises LibshareError if libvirt cannot be reached: gc must not guess.
    """
    try:
        import libvirt
    except ImportError as exc:
        raise LibshareError("libvirt-python is not installed") from exc
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibshareError(f"cannot connect to libvirt at {uri}: {exc}") from exc
    try:
        out: set[str] = set()
        for dom in conn.listAllDomains(0):
            try:
                out |= region_paths_in_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                if dom.isActive():
                    out |= region_paths_in_xml(dom.XMLDesc(0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we looked
                raise LibshareError(f"libvirt: {exc}") from exc
        return out
    finally:
        conn.close()


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
    Also removes temporaries left by interrupted builds (under the regions lock) and the
    digest-cache entries of removed files. Raises LibshareError, removing nothing, when
    not root or when a QEMU process's mappings cannot be read (a running guest's image
    would lose its protection); with ``dry_run`` those pids are listed in
    ``GcResult.unreadable`` instead.
    """
    if not dry_run and os.geteuid() != 0:
        raise LibshareError("region gc must run as root: it reads every QEMU process's "
                            "mappings to keep running guests' images (--dry-run to look)")
    refs = {os.path.realpath(p) for p in referenced}
    current = set(group_links(cfg).values())
    result = GcResult(dry_run=dry_run)
    images = cfg.regions_dir / "images"
    mapped, unreadable = mapped_images(images, proc) if images.is_dir() else (set(), [])
    if unreadable and not dry_run:
        raise LibshareError(f"cannot read the mappings of QEMU process "
                            f"{', '.join(map(str, unreadable))} (/proc/PID/maps): refusing "
                            "to remove images a running guest may map")
    result.unreadable = unreadable
    with _locked(cfg):
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
        leftovers = list(cfg.regions_dir.glob(".build-*"))
        if images.is_dir():
            leftovers += list(images.glob(".tmp-*"))
        for p in sorted(leftovers):
            result.leftovers.append(str(p))
            if not dry_run:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
        if not dry_run and images.is_dir():
            fsync_dir(images)
        if not dry_run:
            forget(cfg.digest_cache, result.removed)
    return result
