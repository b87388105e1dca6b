"""Region build: the image layout, determinism across hosts, selection and size, the
text manifest and label, and builds that must publish nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from libshare.config import Config
from libshare.errors import LibshareError
from libshare.sharing.formats import erofs_write, pfn
from libshare.sharing.formats.erofs import EROFS_MAGIC, Erofs
from libshare.sharing.region import build, layout, manifest, staging, tree, verify
from libshare.sharing.store import import_tree, load_index, object_path, save_index
from tests.support.fs import fill, small_tmpfs
from tests.support.images import (
    LIBDIR,
    LIBS,
    MiB,
    make_cfg,
    needs_mkfs,
)

pytestmark = needs_mkfs


def test_layout(built: tuple[Config, build.BuildResult]) -> None:
    cfg, res = built
    data = Path(res.path).read_bytes()
    assert res.size == len(data) and len(data) % (2 * MiB) == 0
    assert res.digest == hashlib.sha256(data).hexdigest()
    assert Path(res.path) == cfg.region_image(res.digest)
    assert os.path.realpath(cfg.group_region_link("web")) == res.path
    assert data[:4096] == bytes(4096)
    block = data[4096:8192]
    info = pfn.unpack(block)
    assert pfn.validate(info, len(data), block) is None
    assert info.dataoff == 2 * MiB and info.npfns == (len(data) - 2 * MiB) // 4096
    assert int.from_bytes(data[2 * MiB + 1024:2 * MiB + 1028], "little") == EROFS_MAGIC
    with open(res.path, "rb") as fh:
        fs = Erofs(fh, offset=2 * MiB)
        doc = manifest.read_manifest(fs)
        assert doc["group"] == "web" and len(doc["files"]) == len(LIBS) == res.files
        for item in doc["files"]:
            sha = item["sha256"]
            assert item["path"] == f"/lib/{sha[:2]}/{sha}/{item['soname']}"
            ino = fs.lookup(item["path"])
            assert hashlib.sha256(fs.read_inode(ino)).hexdigest() == sha
            assert ino.layout == 0  # flat-plain: block aligned, DAX-mappable
            assert item["guest_paths"]
    assert verify.verify(res.path) is None


def test_deterministic_across_hosts(tmp_path: Path) -> None:
    a = make_cfg(tmp_path / "a", mtime=1_000_000)
    b = make_cfg(tmp_path / "b", mtime=1_700_000_000, reverse=True)
    ra = build.build_region(a, "web")
    rb = build.build_region(b, "web")
    assert ra.digest == rb.digest
    assert Path(ra.path).read_bytes() == Path(rb.path).read_bytes()
    again = build.build_region(a, "web")
    assert again.digest == ra.digest and not again.new
    other = build.build_region(a, "db")   # another trust group never shares the file
    assert other.digest != ra.digest


def test_selection_file_and_size(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    idx = load_index(cfg.store_dir)
    sel = tmp_path / "sel"
    libz = next(e for e in idx.entries.values() if e.soname == "libz.so.1")
    sel.write_text("# libraries for the web tier\n"
                   "/usr/lib/x86_64-linux-gnu/libacl.so.1\n"
                   f"{libz.sha256}   # by hash\n\n")
    res = build.build_region(cfg, "web", str(sel), size=20 * MiB)
    assert res.files == 2 and res.size == 20 * MiB
    assert verify.verify(res.path) is None
    res2 = build.build_region(cfg, "web", str(sel), size=19 * MiB)  # rounded up
    assert res2.size == 20 * MiB
    with pytest.raises(LibshareError, match="too small"):
        build.build_region(cfg, "web", str(sel), size=2 * MiB)
    sel.write_text("/usr/lib/nothing.so\n")
    with pytest.raises(LibshareError, match="not in the store"):
        build.build_region(cfg, "web", str(sel))


def test_empty_store_and_bad_group(tmp_path: Path) -> None:
    cfg = Config(state_dir=tmp_path / "s")
    with pytest.raises(LibshareError, match="empty"):
        build.build_region(cfg, "web")
    with pytest.raises(LibshareError, match="invalid group"):
        build.build_region(cfg, "../etc")






















def test_interrupted_build_leaves_nothing(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path)
    first = build.build_region(cfg, "web")
    real = build._write_stream

    def interrupted(tmp: Path, *args: object, **kw: object) -> str:
        tmp.write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_region(cfg, "web", size=40 * MiB)
    monkeypatch.setattr(build, "_write_stream", real)
    names = sorted(p.name for p in (cfg.regions_dir / "images").iterdir())
    assert names == [first.digest + ".img"]
    assert not list(cfg.regions_dir.glob(".build-*"))
    assert os.path.realpath(cfg.group_region_link("web")) == first.path










def test_rebuild_repairs_a_damaged_image_and_primes_digest_cache(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    first = build.build_region(cfg, "web")
    assert first.path in cfg.digest_cache.read_text()   # the hook's check will be a stat
    os.chmod(first.path, 0o644)
    with open(first.path, "r+b") as fh:                  # bit rot under the digest name
        fh.seek(first.size - 1)
        fh.write(b"\x01")
    again = build.build_region(cfg, "web")
    assert again.digest == first.digest and again.new
    assert verify.verify(again.path) is None


def test_text_manifest_and_label(built: tuple[Config, build.BuildResult],
                                 tmp_path: Path) -> None:
    """Guests' POSIX sh reads manifest.tsv and finds the filesystem by its label."""
    _cfg, res = built
    with open(res.path, "rb") as fh:
        fs = Erofs(fh, offset=2 * MiB)       # the superblock crc still checks
        assert layout.fs_label(fs) == layout.FS_LABEL == "libshare"
        doc = manifest.read_manifest(fs)
        tsv = fs.read_inode(fs.lookup(manifest.TSV_MANIFEST_PATH)).decode()
        trees = fs.read_inode(fs.lookup(tree.TREE_TSV_PATH)).decode()
    # the guest paths of the imported tree's files come with their modes in tree.tsv;
    # manifest.tsv has the others (here the links to them)
    in_tree = {line.split("\t")[1] for line in trees.splitlines()
               if line.split("\t")[2] == "f"}
    want = sorted(f"{f['sha256']}\t{f['size']}\t{f['path']}\t{g}"
                  for f in doc["files"] for g in f["guest_paths"] if g not in in_tree)
    assert tsv.splitlines() == want and (tsv.endswith("\n") or not want)
    assert len(in_tree) >= len(LIBS) and in_tree <= {g for f in doc["files"]
                                                    for g in f["guest_paths"]}
    # blkid (what guests use) sees the label on the filesystem part of the image
    blkid = shutil.which("blkid")
    if blkid:
        fs_only = tmp_path / "fs.img"
        with open(res.path, "rb") as src, open(fs_only, "wb") as dst:
            src.seek(2 * MiB)
            shutil.copyfileobj(src, dst)
        out = subprocess.run([blkid, "-p", "-o", "export", str(fs_only)],
                             capture_output=True, text=True, check=False).stdout
        assert "TYPE=erofs" in out and "LABEL=libshare" in out, out




def test_build_refuses_a_store_object_damaged_in_place(tmp_path: Path) -> None:
    """Same size, one byte changed: nothing is published and the group link stays."""
    cfg = make_cfg(tmp_path)
    first = build.build_region(cfg, "web")
    idx = load_index(cfg.store_dir)
    libz = next(e for e in idx.entries.values() if e.soname == "libz.so.1")
    obj = object_path(cfg.store_dir, libz.sha256)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = sorted(p.name for p in (cfg.regions_dir / "images").iterdir())
    for mode in (0o644, 0o555):            # copied (not linkable) and hard-linked objects
        os.chmod(obj, mode)
        with pytest.raises(LibshareError, match=f"store object {libz.sha256} .*corrupt"):
            build.build_region(cfg, "web", size=16 * MiB)
        assert sorted(p.name for p in (cfg.regions_dir / "images").iterdir()) == before
        assert os.path.realpath(cfg.group_region_link("web")) == first.path
        assert not list(cfg.regions_dir.glob(".build-*"))
    import_tree(cfg.store_dir, [tmp_path / "root"])          # re-import repairs it
    again = build.build_region(cfg, "web", size=16 * MiB)
    assert verify.verify(again.path) is None


def test_select_by_guest_path_takes_every_object_seen_there(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    other = tmp_path / "other/usr/lib/x86_64-linux-gnu"
    other.mkdir(parents=True)
    data = bytearray((LIBDIR / "libz.so.1").read_bytes())
    data[-1] ^= 0x55
    (other / "libz.so.1").write_bytes(bytes(data))
    import_tree(cfg.store_dir, [tmp_path / "other"])
    res = build.build_region(cfg, "web", ["/usr/lib/x86_64-linux-gnu/libz.so.1"])
    assert res.files == 2
    with open(res.path, "rb") as fh:
        files = manifest.read_manifest(Erofs(fh, offset=2 * MiB))["files"]
    assert len({f["path"] for f in files}) == 2
    assert all("/usr/lib/x86_64-linux-gnu/libz.so.1" in f["guest_paths"] for f in files)
    assert verify.verify(res.path) is None


def test_the_next_build_removes_the_temporaries_of_killed_builds(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    build.build_region(cfg, "web")
    dead = cfg.regions_dir / ".build-killed"
    (dead / "root/lib").mkdir(parents=True)                  # SIGKILLed while staging
    tmp = cfg.regions_dir / "images" / ".tmp-killed.img"
    tmp.write_bytes(b"half an image")                       # SIGKILLed while writing
    build.build_region(cfg, "web", size=16 * MiB)
    assert not dead.exists() and not tmp.exists()
    assert not list(cfg.regions_dir.glob(".build-*"))


def test_names_an_older_store_holds_never_break_a_build(tmp_path: Path) -> None:
    """An index written before names were checked: a 300-byte SONAME, a newline in a
    SONAME and in a guest path, a guest path that is not UTF-8. The build still
    succeeds and publishes an image that verify accepts."""
    cfg = make_cfg(tmp_path)
    index = load_index(cfg.store_dir)
    entries = sorted(index.entries.values(), key=lambda e: e.sha256)
    entries[0].soname = "l" * 300
    entries[1].soname = "lib\nsplit.so.1"
    entries[2].paths += ["/usr/lib/bad\nname.so", "/usr/lib/not-utf8-\udcff.so"]
    save_index(cfg.store_dir, index)
    res = build.build_region(cfg, "web")
    assert res.files == len(LIBS)
    assert verify.verify(res.path) is None
    with open(res.path, "rb") as fh:
        doc = manifest.read_manifest(Erofs(fh, offset=2 * MiB))
    names = {f["path"].rsplit("/", 1)[1] for f in doc["files"]}
    assert not any("\n" in n or len(n) > 255 for n in names)


def test_disk_full_build_is_one_line_and_publishes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from libshare import cli
    with small_tmpfs(tmp_path / "small", "20m") as small:
        cfg = make_cfg(small)
        ballast = fill(small, leave=256 * 1024)
        rc = cli.main(["--state-dir", str(cfg.state_dir), "region", "build", "--group",
                       "web"])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "No space left on device" in err and "nothing was published" in err
        images = cfg.regions_dir / "images"
        assert not images.is_dir() or list(images.iterdir()) == []
        assert not cfg.group_region_link("web").exists()
        assert not list(cfg.regions_dir.glob(".build-*"))
        ballast.unlink()
        res = build.build_region(cfg, "web")       # room again: it builds
        assert verify.verify(res.path) is None


def test_a_build_after_import_hashes_no_proven_object(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects the store proved are written without hashing them; one written in place
    since (its mtime moved) is hashed as it is written and refused."""
    cfg = make_cfg(tmp_path)
    hashed: list[str] = []
    real = staging.MemoryStaging.proved

    def spy(self: staging.MemoryStaging, f: erofs_write.File, actual: str) -> None:
        hashed.append(str(f.path))
        real(self, f, actual)

    monkeypatch.setattr(staging.MemoryStaging, "proved", spy)
    res = build.build_region(cfg, "web")
    assert hashed == [] and verify.verify(res.path) is None
    obj = object_path(cfg.store_dir, sorted(load_index(cfg.store_dir).entries)[0])
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[200] ^= 1
    obj.write_bytes(bytes(data))
    os.chmod(obj, 0o555)
    with pytest.raises(LibshareError, match="corrupt"):
        build.build_region(cfg, "web")
    assert len(hashed) == 1


def test_the_image_is_the_same_made_in_place_or_copied(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An ext4 filesystem image becomes the region image in place (the head inserted in
    front of its blocks) where the filesystem allows, else it is copied: same bytes."""
    calls: list[bool] = []
    real = build._insert_head
    monkeypatch.setattr(build, "_insert_head",
                        lambda p, n: calls.append(real(p, n)) or calls[-1])
    a = build.build_region(make_cfg(tmp_path / "a"), "web", filesystem="ext4")
    monkeypatch.setattr(build, "_insert_head", lambda p, n: False)
    b = build.build_region(make_cfg(tmp_path / "b"), "web", size=a.size, filesystem="ext4")
    assert a.digest == b.digest and verify.verify(a.path) is None
    if os.statvfs(tmp_path).f_bsize == 4096 and calls == [True]:
        # no hole left in the tail: real zeros (ext4's own image may be sparse)
        assert Path(a.path).stat().st_blocks * 512 >= a.size - a.fs_size - layout.DATAOFF
