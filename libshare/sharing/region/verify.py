"""Checking a region image: its layout (cheap, for the hook), every file against the
manifest, the zero padding, and optionally fsck.erofs."""


from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from typing import Any

from libshare.sharing.formats import pfn
from libshare.sharing.formats.erofs import (
    LAYOUT_FLAT_PLAIN,
    LAYOUT_NAMES,
    ErofsError,
    FsImage,
    Inode,
)
from libshare.sharing.region import tree
from libshare.sharing.region.layout import (
    CHUNK,
    DATAOFF,
    DIGEST_NAME,
    filesystem_type,
    open_filesystem,
)
from libshare.sharing.region.manifest import TSV_MANIFEST_PATH, read_manifest
from libshare.util.digest import sha256_file
from libshare.util.files import open_regular, os_error
from libshare.util.units import REGION_ALIGN


def verify(path: str | os.PathLike[str], check_name: bool = True,
           fsck: bool = False) -> str | None:
    """Return the first problem found in the region image at ``path``, or None if sound.

    Checks, in order: the layout (:func:`quick_verify`: size, zeros, PFN info block,
    EROFS superblock, zeros after the filesystem, a readable manifest), every listed
    file (present, plain layout for DAX, size, SHA-256), the text manifest, the guest
    trees (every entry's kind, mode, owner, content or target as tree.tsv says, and
    nothing else under /tree), optionally
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
        try:
            digest = sha256_file(spath)
        except OSError as exc:
            return exc.strerror or str(exc)
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


def quick_verify_open(fh: Any) -> str | None:
    """Return the first layout problem (see :func:`quick_verify`) of the region image
    open as ``fh``, a regular file the caller opened and checked; None if sound."""
    return _verify_open(fh, os.fstat(fh.fileno()).st_size, content=False)


def _verify_path(spath: str, content: bool) -> str | None:
    """Return the first problem :func:`_verify_open` finds in the regular file ``spath``
    (libraries hashed too when ``content``), or None. A FIFO or device is refused
    without being waited on. Problems never name ``spath`` (the caller does, once)."""
    try:
        with open_regular(spath) as fh:
            return _verify_open(fh, os.fstat(fh.fileno()).st_size, content=content)
    except OSError as exc:
        return exc.strerror or str(exc)


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
        fs = open_filesystem(fh, offset=info.dataoff, length=size - info.dataoff)
        problem = _zero_tail_problem(fh, DATAOFF + fs.sb.blocks * fs.sb.block_size, size,
                                     quick=not content)
        if problem:
            return problem
        manifest = read_manifest(fs)
        if not content:
            return None
        hashes: dict[int, str] = {}
        for item in manifest["files"]:
            problem = _verify_file(fs, item, hashes)
            if problem:
                return problem
        problem = _verify_tsv(fs, manifest) or _verify_trees(fs, manifest, hashes)
        if problem:
            return problem
    except ErofsError as exc:
        return f"filesystem: {exc}"
    except (KeyError, TypeError) as exc:
        return f"filesystem: manifest entry malformed ({exc})"
    return None


def _verify_tsv(fs: FsImage, manifest: dict[str, Any]) -> str | None:
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


def _sha256(fs: FsImage, ino: Inode, hashes: dict[int, str]) -> str:
    """Return the hex SHA-256 of regular file ``ino`` (remembered per inode in ``hashes``:
    a tree path and its object's /lib path share one inode)."""
    if ino.nid not in hashes:
        h = hashlib.sha256()
        for chunk in fs.iter_chunks(ino, CHUNK):
            h.update(chunk)
        hashes[ino.nid] = h.hexdigest()
    return hashes[ino.nid]


def _walk_fs(fs: FsImage, ino: Inode, path: str, out: dict[str, Inode], limit: int) -> None:
    """Add every entry below directory ``ino`` (at ``path``) to ``out`` (path -> inode);
    ErofsError beyond ``limit`` entries (a loop)."""
    for name, nid in sorted(fs.listdir(ino).items()):
        child = fs.inode(nid)
        out[f"{path}/{name}"] = child
        if len(out) > limit:
            raise ErofsError(f"more than {limit} entries under {tree.TREE_ROOT}")
        if child.is_dir:
            _walk_fs(fs, child, f"{path}/{name}", out, limit)


def _verify_trees(fs: FsImage, manifest: dict[str, Any], hashes: dict[int, str]) -> str | None:
    """Return a problem with the guest trees (``/.libshare/tree.tsv`` must be what the
    manifest says and every line exactly what ``/tree/<tid>`` holds, nothing more: a
    guest binds a whole directory on its word), or None. Images without trees have none."""
    laid = manifest.get("trees") or []
    if not laid:
        return None
    raw = fs.read_inode(fs.lookup(tree.TREE_TSV_PATH))
    if hashlib.sha256(raw).hexdigest() != manifest.get("tree_tsv_sha256"):
        return f"{tree.TREE_TSV_PATH} does not match the manifest"
    lines: dict[str, list[list[str]]] = {}
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        f = line.split("\t")
        if len(f) != 9:
            return f"{tree.TREE_TSV_PATH}: malformed line {line[:80]!r}"
        lines.setdefault(f[0], []).append(f)
    for t in laid:
        tid = t["tid"]
        base = f"{tree.TREE_ROOT}/{tid}"
        found: dict[str, Inode] = {}
        _walk_fs(fs, fs.lookup(base), "", found, 1 << 22)
        want = lines.pop(tid, [])
        if {f[1] for f in want} != set(found):
            extra = sorted(set(found) - {f[1] for f in want})[:1]
            return (f"{base}: the filesystem and {tree.TREE_TSV_PATH} disagree "
                    f"({'extra ' + extra[0] if extra else 'entries missing'})")
        for _tid, path, kind, mode, uid, gid, size, payload, _offer in want:
            problem = _tree_entry(fs, found[path], kind, mode, uid, gid, size, payload,
                                  hashes)
            if problem:
                return f"{base}{path}: {problem}"
    if lines:
        return f"{tree.TREE_TSV_PATH} lists a tree the manifest does not"
    return None


def _tree_entry(fs: FsImage, ino: Inode, kind: str, mode: str, uid: str, gid: str,
                size: str, payload: str, hashes: dict[int, str]) -> str | None:
    """Return how inode ``ino`` differs from its tree.tsv line, or None."""
    fmt = {"d": stat.S_IFDIR, "f": stat.S_IFREG, "l": stat.S_IFLNK}.get(kind)
    if fmt is None or stat.S_IFMT(ino.mode) != fmt:
        return f"kind {kind} in {tree.TREE_TSV_PATH}, mode {ino.mode:o} in the filesystem"
    if kind == "l":
        return None if fs.read_inode(ino).decode("utf-8", "surrogateescape") == payload \
            else "link target differs"
    if f"{stat.S_IMODE(ino.mode):o}" != mode or str(ino.uid) != uid or str(ino.gid) != gid:
        return (f"mode/owner {stat.S_IMODE(ino.mode):o} {ino.uid}:{ino.gid}, "
                f"{tree.TREE_TSV_PATH} says {mode} {uid}:{gid}")
    if kind == "f":
        if ino.layout != LAYOUT_FLAT_PLAIN:
            return f"{LAYOUT_NAMES.get(ino.layout, ino.layout)} layout, DAX needs flat-plain"
        if str(ino.size) != size or _sha256(fs, ino, hashes) != payload:
            return "content does not match its line"
    return None


def _verify_file(fs: FsImage, item: dict[str, Any], hashes: dict[int, str]) -> str | None:
    """Return a problem with the manifest entry ``item`` in ``fs``, or None."""
    path = item["path"]
    ino = fs.lookup(path)
    if not ino.is_reg:
        return f"{path}: not a regular file"
    if ino.layout != LAYOUT_FLAT_PLAIN:
        return f"{path}: {LAYOUT_NAMES.get(ino.layout, ino.layout)} layout, DAX needs flat-plain"
    if ino.size != item["size"]:
        return f"{path}: size {ino.size}, manifest says {item['size']}"
    actual = _sha256(fs, ino, hashes)
    if actual != item["sha256"]:
        return f"{path}: SHA-256 {actual} does not match the manifest"
    return None


def fsck_region(path: str) -> str | None:
    """Return a problem reported by ``fsck.erofs --extract`` (``e2fsck -fn`` for ext4,
    which reads the image at the filesystem's offset) on the image's filesystem, or one
    line saying why it could not run (disk full: the copy needs room); None if sound or
    if the tool is not installed.

    erofs-utils 1.5 has no offset option, so the filesystem part is copied to an
    unnamed temporary file (``O_TMPFILE``: nothing is left behind, even if killed) in
    the image's folder, which fsck.erofs reads as ``/proc/self/fd/N``.
    """
    try:
        with open_regular(path) as fh:
            ext4 = filesystem_type(fh) == "ext4"
    except OSError as exc:
        return f"cannot read {path}: {os_error(exc, path=False)}"
    tool = shutil.which("e2fsck" if ext4 else "fsck.erofs", path="/usr/sbin:/sbin:/usr/bin")
    if tool is None:
        return None
    if ext4:
        proc = subprocess.run([tool, "-fn", f"{path}?offset={DATAOFF}"], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            lines = (proc.stdout or proc.stderr).strip().splitlines()
            return f"e2fsck: {lines[-1] if lines else f'exit {proc.returncode}'}"
        return None
    try:
        with open_regular(path) as src, tempfile.TemporaryFile(
                dir=os.path.dirname(os.path.abspath(path))) as tmp:
            src.seek(DATAOFF)
            shutil.copyfileobj(src, tmp, CHUNK)
            tmp.flush()
            fd = tmp.fileno()
            proc = subprocess.run([tool, "--extract", f"/proc/self/fd/{fd}"],
                                  capture_output=True, text=True, check=False, pass_fds=(fd,))
    except OSError as exc:
        return f"cannot run fsck.erofs on a copy of the filesystem: {os_error(exc)}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"fsck.erofs: {lines[-1] if lines else f'exit {proc.returncode}'}"
    return None
