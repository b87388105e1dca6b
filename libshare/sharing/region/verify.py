"""Checking a region image: its layout (cheap, for the hook), every file against the
manifest, the zero padding, and optionally fsck.erofs."""


from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any

from libshare.sharing.formats import pfn
from libshare.sharing.formats.erofs import (
    LAYOUT_FLAT_PLAIN,
    LAYOUT_NAMES,
    Erofs,
    ErofsError,
)
from libshare.sharing.region.layout import CHUNK, DATAOFF, DIGEST_NAME
from libshare.sharing.region.manifest import TSV_MANIFEST_PATH, read_manifest
from libshare.util.digest import sha256_file
from libshare.util.files import open_regular, os_error
from libshare.util.units import REGION_ALIGN


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
    """Return a problem reported by ``fsck.erofs --extract`` on the image's filesystem,
    or one line saying why it could not run (disk full: the copy needs room); None if
    sound or if fsck.erofs is not installed.

    erofs-utils 1.5 has no offset option, so the filesystem part is copied to an
    unnamed temporary file (``O_TMPFILE``: nothing is left behind, even if killed) in
    the image's folder, which fsck.erofs reads as ``/proc/self/fd/N``.
    """
    tool = shutil.which("fsck.erofs")
    if tool is None:
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
