"""Region images for tests: a guest-like tree of a few of this host's libraries, a store
filled from it, real region images (built once per process and size, then copied into
a test's state directory) and copies of an image damaged at chosen places."""



from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from libshare.config import Config
from libshare.sharing.formats.erofs import Erofs
from libshare.sharing.region import manifest
from libshare.sharing.store import import_tree
from libshare.util.units import MiB

LIBDIR = Path("/lib/x86_64-linux-gnu")


LIBS = ["libz.so.1", "libacl.so.1", "libattr.so.1", "libdl.so.2"]



#: marks tests that build region images
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="no mkfs.erofs")


def make_tree(base: Path, mtime: int, reverse: bool = False) -> Path:
    root = base / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    for name in sorted(LIBS, reverse=reverse):
        src = LIBDIR / name
        if not src.exists():
            pytest.skip(f"{src} missing")
        shutil.copyfile(src, lib / name)
        os.utime(lib / name, (mtime, mtime))
    return root


def make_cfg(base: Path, mtime: int = 1_000_000, reverse: bool = False) -> Config:
    cfg = Config(state_dir=base / "state")
    import_tree(cfg.store_dir, [make_tree(base, mtime, reverse)])
    return cfg





_BUILT: dict[int | None, Path] = {}


def region_image(state_dir: Path, size: int | None = None) -> Path:
    """Return a real region image (LIBS, group ``g``, ``size`` bytes or as small as
    they allow) at ``state_dir/regions/images/DIGEST.img``, where the hook serves
    images from; built once per process and size (needs mkfs.erofs: ``needs_mkfs``)."""
    from libshare.sharing.region import build

    if size not in _BUILT:
        base = Path(tempfile.mkdtemp(prefix="libshare-test-region-"))
        atexit.register(shutil.rmtree, base, True)
        res = build.build_region(make_cfg(base), "g", size=size)
        _BUILT[size] = Path(res.path)
    src = _BUILT[size]
    dst = state_dir / "regions" / "images" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return dst


def shared_object(path: Path, soname: str | bytes) -> Path:
    """Link a tiny x86-64 shared object with DT_SONAME ``soname`` (any bytes: too long,
    with a newline...) at ``path`` (``bytes`` paths allowed); skips without gcc."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to link a test library")
    path.parent.mkdir(parents=True, exist_ok=True)
    name = soname if isinstance(soname, bytes) else soname.encode()
    subprocess.run([b"gcc", b"-shared", b"-nostdlib", b"-o", bytes(path),
                    b"-Wl,-soname," + name, b"-x", b"c", b"/dev/null"], check=True,
                   capture_output=True)
    return path


def corrupt_copy(src: str, dst: Path, offset: int | None = None, size: int | None = None
                 ) -> Path:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    if offset is not None:
        with open(dst, "r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([byte[0] ^ 0x01]))
    if size is not None:
        os.truncate(dst, size)
    return dst


def first_library(image: str) -> tuple[dict[str, Any], int]:
    """Return the manifest entry of the first library in ``image`` and the offset of its
    first byte in the image file."""
    with open(image, "rb") as fh:
        fs = Erofs(fh, offset=2 * MiB)
        item = manifest.read_manifest(fs)["files"][0]
        ino = fs.lookup(item["path"])
    return item, 2 * MiB + ino.raw_blkaddr * 4096

__all__ = ["LIBDIR", "LIBS", "MiB", "corrupt_copy", "first_library", "make_cfg", "make_tree",
           "needs_mkfs", "region_image"]
