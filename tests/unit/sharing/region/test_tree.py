"""The guest trees of a region: what is held and offered, one copy of the data, exact
modes and owners, and a verify that trusts nothing it did not check."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from libshare.config import Config
from libshare.sharing import trees
from libshare.sharing.formats.erofs import SUPER_OFFSET, Erofs, crc32c_raw
from libshare.sharing.region import build, layout, manifest, policy, tree, verify
from libshare.sharing.store import import_tree
from tests.support.images import make_guest_tree, needs_mkfs


def _laid(tmp_path: Path, chosen: object) -> tree.LaidTree:
    sdir = tmp_path / "store"
    digest = import_tree(sdir, [make_guest_tree(tmp_path)]).trees[0]
    return tree.lay_out(trees.load_tree(sdir, digest), chosen,  # type: ignore[arg-type]
                        extra=[("/usr/sbin/libshare-redirect", 0o755, b"#!/bin/sh\n"),
                               ("/opt/none/x", 0o644, b"x")])


def test_usr_tree_is_whole_and_offers_depth_two(tmp_path: Path) -> None:
    laid = _laid(tmp_path, policy._under_usr)
    held = {e.path for e in laid.entries}
    assert "/usr/local/bin" in held and "/usr/share/empty" in held   # empty dirs too
    assert "/usr/sbin/libshare-redirect" in held and "/opt/none/x" not in held
    assert "/etc" not in held and "/" not in held
    assert {"/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share"} <= laid.offered
    assert "/usr" not in laid.offered                                # never the top
    assert not any(d.startswith("/usr/local") for d in laid.offered)  # stays writable
    assert "/usr/share/empty" not in laid.offered                    # nothing to serve


def test_partial_choice_offers_only_complete_directories(tmp_path: Path) -> None:
    laid = _laid(tmp_path, lambda e: e.path.startswith("/usr/lib/x86_64-linux-gnu/"))
    held = {e.path for e in laid.entries}
    assert laid.offered == {"/usr/lib/x86_64-linux-gnu"}
    assert "/usr/lib/x86_64-linux-gnu/libz.so" in held          # its link comes along
    assert "/usr/bin" not in held and "/usr/lib/modules" not in held
    assert "/usr/lib" in held and "/usr/lib" not in laid.offered  # incomplete


@needs_mkfs
def test_image_holds_each_object_once_with_exact_metadata(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path / "state")
    root = make_guest_tree(tmp_path)
    import_tree(cfg.store_dir, [root])
    res = build.build_region(cfg, "t", policy="usr")
    assert res.policy == "usr" and len(res.trees) == 1
    tid = res.trees[0]["tid"]
    with open(res.path, "rb") as fh:
        fs = Erofs(fh, offset=layout.DATAOFF)
        doc = manifest.read_manifest(fs)
        base = f"/tree/{tid}/usr/bin"
        prog, su, sg = (fs.lookup(f"{base}/{n}") for n in ("prog", "suprog", "sgprog"))
        obj = fs.lookup(next(f["path"] for f in doc["files"]
                             if "/usr/bin/prog" in f["guest_paths"]))
        assert prog.nid == obj.nid                        # one inode: the data once
        assert prog.mode & 0o7777 == 0o755 and (prog.uid, prog.gid) == (0, 0)
        assert su.mode & 0o7777 == 0o4755 and su.nid != prog.nid   # setuid: its own
        assert obj.mode & 0o7000 == 0                     # /lib copies never setuid
        if os.geteuid() == 0:
            assert (sg.mode & 0o7777, sg.gid) == (0o2755, 42)
        assert fs.lookup(f"/tree/{tid}/usr/share/doc/pkg/copyright").mode & 0o777 == 0o644
        tsv = fs.read_inode(fs.lookup(tree.TREE_TSV_PATH)).decode()
    assert f"{tid}\t/usr/bin\td\t755\t0\t0\t-\t-\t1\n" in tsv
    assert f"{tid}\t/usr/bin/prog2\tl\t-\t-\t-\t-\tprog\t0\n" in tsv
    # the data of the image is about the data of the objects, not twice it
    data = sum(e["size"] for e in doc["files"])
    assert res.fs_size < data + 2 * 1024 * 1024
    assert verify.verify(res.path) is None


@needs_mkfs
def test_verify_catches_a_tree_that_lies(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path / "state")
    import_tree(cfg.store_dir, [make_guest_tree(tmp_path)])
    res = build.build_region(cfg, "t", policy="usr")
    data = bytearray(Path(res.path).read_bytes())
    # flip the offered flag's neighbour: a mode digit of /usr/bin in tree.tsv
    with open(res.path, "rb") as fh:
        fs = Erofs(fh, offset=layout.DATAOFF)
        ino = fs.lookup(tree.TREE_TSV_PATH)
        raw = fs.read_inode(ino)
    at = raw.index(b"\t/usr/bin\td\t755") + len(b"\t/usr/bin\td\t")
    pos = layout.DATAOFF + ino.raw_blkaddr * 4096 + at
    data[pos:pos + 3] = b"777"
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    assert "tree.tsv does not match the manifest" in (verify.verify(bad) or "")
    # a tree whose files differ from its listing (patched inode mode) is caught too
    data = bytearray(Path(res.path).read_bytes())
    with open(res.path, "rb") as fh:
        fs = Erofs(fh, offset=layout.DATAOFF)
        tid = res.trees[0]["tid"]
        su = fs.lookup(f"/tree/{tid}/usr/bin/suprog")
        pos = layout.DATAOFF + fs.sb.meta_blkaddr * 4096 + su.nid * 32 + 4
    data[pos:pos + 2] = (0o100755).to_bytes(2, "little")
    sb = layout.DATAOFF + SUPER_OFFSET          # the inode may be in block 0: re-sign it
    data[sb + 4:sb + 8] = bytes(4)
    data[sb + 4:sb + 8] = crc32c_raw(bytes(data[sb:layout.DATAOFF + 4096])).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    problem = verify.verify(bad) or ""
    assert "suprog" in problem and "4755" in problem, problem


@needs_mkfs
def test_deterministic(tmp_path: Path) -> None:
    digests = []
    for n in ("a", "b"):
        cfg = Config(state_dir=tmp_path / n / "state")
        import_tree(cfg.store_dir, [make_guest_tree(tmp_path / n)])
        digests.append(build.build_region(cfg, "t", policy="usr").digest)
        shutil.rmtree(tmp_path / n / "guest")
    assert digests[0] == digests[1]
    assert hashlib.sha256(b"").hexdigest() not in digests


