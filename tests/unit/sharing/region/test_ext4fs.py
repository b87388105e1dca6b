"""Regions on ext4 (``region build --fs ext4``): deterministic, checked like EROFS ones."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from libshare.config import Config
from libshare.sharing.formats.ext4 import Ext4
from libshare.sharing.region import build, ext4fs, layout, manifest, verify
from libshare.sharing.store import import_tree
from tests.support.images import make_guest_tree

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None
                                and not Path("/usr/sbin/mkfs.ext4").exists(),
                                reason="no mkfs.ext4")


def _build(base: Path) -> build.BuildResult:
    cfg = Config(state_dir=base / "state")
    import_tree(cfg.store_dir, [make_guest_tree(base)])
    return build.build_region(cfg, "t", policy="usr", filesystem="ext4")


def test_same_bytes_on_every_build_and_verified(tmp_path: Path) -> None:
    a, b = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert a.digest == b.digest and a.filesystem == "ext4" and a.writer.startswith("mke2fs ")
    assert verify.verify(a.path) is None and verify.verify(a.path, fsck=True) is None
    assert verify.quick_verify(a.path) is None
    with open(a.path, "rb") as fh:
        fs = layout.open_filesystem(fh)
        assert isinstance(fs, Ext4) and fs.sb.label == layout.FS_LABEL
        doc = manifest.read_manifest(fs)
        assert doc["filesystem"] == "ext4" and doc["writer"] == f"mke2fs {ext4fs.mke2fs_version()}"
        tid = a.trees[0]["tid"]
        su = fs.lookup(f"/tree/{tid}/usr/bin/suprog")
        assert su.mode & 0o7777 == 0o4755 and su.layout == 0
        item = next(f for f in doc["files"] if "/usr/bin/prog" in f["guest_paths"])
        prog = fs.lookup(item["path"])
        assert prog.nid == fs.lookup(f"/tree/{tid}/usr/bin/prog").nid      # data once
        assert hashlib.sha256(fs.read_inode(prog)).hexdigest() == item["sha256"]
        assert fs.read_inode(fs.lookup(f"/tree/{tid}/usr/bin/prog2")) == b"prog"
        assert "lost+found" in fs.listdir(fs.inode(2))


def test_verify_finds_a_damaged_file(tmp_path: Path) -> None:
    res = _build(tmp_path)
    data = bytearray(Path(res.path).read_bytes())
    with open(res.path, "rb") as fh:
        fs = layout.open_filesystem(fh)
        doc = manifest.read_manifest(fs)
        item = max(doc["files"], key=lambda f: f["size"])
        _lblk, _n, pblk = fs._extent_list(fs.lookup(item["path"]))[0]
    pos = layout.DATAOFF + pblk * 4096 + 10
    data[pos] ^= 1
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    problem = verify.verify(bad) or ""
    assert item["path"] in problem and "SHA-256" in problem
