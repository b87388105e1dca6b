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





def make_guest_tree(base: Path) -> Path:
    """Return a small guest root under ``base``: /usr/bin (an executable, a script, a
    setuid copy, a group-owned setgid copy when run as root, a link), /usr/sbin, /usr/lib
    (libraries with a SONAME link, a fake kernel module, a systemd unit whose name holds
    a backslash), /usr/share (documents, an empty file, a name with a space, an empty
    directory), empty /usr/local directories, and /etc/copyright holding the same bytes
    as a /usr/share document."""
    root = base / "guest"
    binp, sbin = root / "usr/bin", root / "usr/sbin"
    lib = root / "usr/lib/x86_64-linux-gnu"
    for d in (binp, sbin, lib, root / "usr/lib/modules/6.1.0/kernel",
              root / "usr/lib/systemd/system", root / "usr/share/doc/pkg",
              root / "usr/share/doc/other", root / "usr/share/empty",
              root / "usr/local/bin", root / "usr/local/share", root / "etc"):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("libz.so.1", "libacl.so.1"):
        src = LIBDIR / name
        if not src.exists():
            pytest.skip(f"{src} missing")
        shutil.copyfile(src, lib / name)
    os.symlink("libz.so.1", lib / "libz.so")
    true = Path(os.path.realpath("/usr/bin/true"))
    for name, mode in (("prog", 0o755), ("suprog", 0o4755), ("sgprog", 0o2755)):
        shutil.copyfile(true, binp / name)
        if name == "sgprog" and os.geteuid() == 0:
            os.chown(binp / name, 0, 42)              # before chmod: chown clears setgid
        os.chmod(binp / name, mode)
    (binp / "hello").write_text("#!/bin/sh\necho hello\n")
    os.chmod(binp / "hello", 0o755)
    os.symlink("prog", binp / "prog2")
    (sbin / "sprog").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(sbin / "sprog", 0o755)
    # a relocatable x86-64 ELF header: what a kernel module starts with
    head = b"\x7fELF\x02\x01\x01" + bytes(9) + (1).to_bytes(2, "little") \
        + (62).to_bytes(2, "little") + bytes(44)
    (root / "usr/lib/modules/6.1.0/kernel/foo.ko").write_bytes(head + b"module" * 100)
    (root / "usr/lib/systemd/system/system-foo\\x2dbar.slice").write_text("[Unit]\n")
    doc = "Copyright: someone\n" * 50
    (root / "usr/share/doc/pkg/copyright").write_text(doc)
    (root / "usr/share/doc/pkg/empty").write_text("")
    (root / "usr/share/doc/other/read me").write_text("hello\n")
    (root / "etc/copyright").write_text(doc)
    return root


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

__all__ = ["LIBDIR", "LIBS", "MiB", "corrupt_copy", "first_library", "make_cfg",
           "make_guest_tree", "make_tree", "needs_mkfs", "region_image", "shared_object"]
