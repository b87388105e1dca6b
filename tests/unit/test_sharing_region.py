"""Region images: layout, determinism, verify catching corruption, selection, ls, gc."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from libshare import domxml
from libshare.config import Config
from libshare.domxml.devices import region_paths
from libshare.errors import LibshareError
from libshare.sharing.formats import pfn
from libshare.sharing.formats.erofs import EROFS_MAGIC, Erofs
from libshare.sharing.region import build, gc, layout, manifest, verify
from libshare.sharing.store import import_tree, load_index, object_path

LIBDIR = Path("/lib/x86_64-linux-gnu")
LIBS = ["libz.so.1", "libacl.so.1", "libattr.so.1", "libdl.so.2"]
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="no mkfs.erofs")


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


@pytest.fixture
def built(tmp_path: Path) -> tuple[Config, build.BuildResult]:
    cfg = make_cfg(tmp_path)
    return cfg, build.build_region(cfg, "web")


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


def test_verify_catches_flipped_library_byte(built: tuple[Config, build.BuildResult],
                                             tmp_path: Path) -> None:
    _cfg, res = built
    item, start = first_library(res.path)
    bad = corrupt_copy(res.path, tmp_path / "x.img", offset=start + 100)
    problem = verify.verify(bad)
    assert problem and item["path"] in problem and "SHA-256" in problem


def test_verify_catches_bad_checksum(built: tuple[Config, build.BuildResult],
                                     tmp_path: Path) -> None:
    _cfg, res = built
    bad = corrupt_copy(res.path, tmp_path / "x.img", offset=4096 + 1000)  # padding byte
    problem = verify.verify(bad)
    assert problem and "checksum" in problem


def test_verify_catches_truncation(built: tuple[Config, build.BuildResult],
                                   tmp_path: Path) -> None:
    cfg, res = built
    big = build.build_region(cfg, "web", size=8 * MiB)
    bad = corrupt_copy(big.path, tmp_path / "x.img", size=big.size - 2 * MiB)
    assert "npfns" in (verify.verify(bad) or "")
    bad = corrupt_copy(big.path, tmp_path / "y.img", size=big.size - 4096)
    assert "multiple of 2 MiB" in (verify.verify(bad) or "")
    bad = corrupt_copy(res.path, tmp_path / "z.img", size=2 * MiB)
    assert "too small" in (verify.verify(bad) or "")


def test_verify_catches_superblock_and_name(built: tuple[Config, build.BuildResult],
                                            tmp_path: Path) -> None:
    _cfg, res = built
    bad = corrupt_copy(res.path, tmp_path / "x.img", offset=2 * MiB + 1024)
    assert "no EROFS superblock" in (verify.verify(bad) or "")
    bad = corrupt_copy(res.path, tmp_path / "y.img", offset=2 * MiB + 1024 + 40)
    assert "superblock checksum" in (verify.verify(bad) or "")
    # a sound image under another image's digest name
    named = corrupt_copy(res.path, tmp_path / ("0" * 64 + ".img"))
    assert "does not match the file name" in (verify.verify(named) or "")
    assert verify.verify(named, check_name=False) is None


@pytest.mark.parametrize("where", ["gap", "tail", "last"])
def test_verify_catches_nonzero_padding(built: tuple[Config, build.BuildResult],
                                        tmp_path: Path, where: str) -> None:
    """A byte changed at 1 MiB (between the info block and the filesystem) or after the
    filesystem's last block is refused, even without the digest in the file name."""
    _cfg, res = built
    with open(res.path, "rb") as fh:
        fs_end = 2 * MiB + Erofs(fh, offset=2 * MiB).sb.blocks * 4096
    offset = {"gap": 1 * MiB, "tail": fs_end, "last": res.size - 1}[where]
    bad = corrupt_copy(res.path, tmp_path / "pad.img", offset=offset)
    problem = verify.verify(bad) or ""
    assert problem.startswith(f"byte {offset} is not zero"), problem
    assert verify.quick_verify(bad) == problem
    assert verify.quick_verify(res.path) is None


def test_quick_verify_of_a_large_image_reads_only_the_ends_of_its_tail(
        tmp_path: Path) -> None:
    """A 64 MiB image: a byte in the middle of the zero tail escapes quick_verify (it
    reads QUICK_TAIL bytes at each end, so a 4 GiB image costs what a small one does)
    but not verify; one near either end is caught by both."""
    cfg = make_cfg(tmp_path)
    res = build.build_region(cfg, "web", size=64 * MiB)
    with open(res.path, "rb") as fh:
        fs_end = 2 * MiB + Erofs(fh, offset=2 * MiB).sb.blocks * 4096
    middle = (fs_end + res.size) // 2
    bad = corrupt_copy(res.path, tmp_path / "mid.img", offset=middle)
    assert verify.quick_verify(bad) is None
    assert (verify.verify(bad) or "").startswith(f"byte {middle} is not zero")
    for offset in (fs_end + verify.QUICK_TAIL - 1, res.size - verify.QUICK_TAIL):
        bad = corrupt_copy(res.path, tmp_path / f"{offset}.img", offset=offset)
        assert (verify.quick_verify(bad) or "").startswith(f"byte {offset} is not zero")


def test_quick_verify_reads_no_library(built: tuple[Config, build.BuildResult],
                                       tmp_path: Path) -> None:
    """quick_verify checks the layout only; verify also hashes every library."""
    _cfg, res = built
    _item, start = first_library(res.path)
    bad = corrupt_copy(res.path, tmp_path / "lib.img", offset=start)
    assert verify.quick_verify(bad) is None
    assert "does not match the manifest" in (verify.verify(bad) or "")
    assert "PFN info block" in (verify.quick_verify(
        corrupt_copy(res.path, tmp_path / "pfn.img", offset=4096 + 100)) or "")
    assert "truncated" in (verify.quick_verify(
        corrupt_copy(res.path, tmp_path / "t.img", size=res.size - 2 * MiB)) or "")


def test_verify_with_fsck(built: tuple[Config, build.BuildResult]) -> None:
    if shutil.which("fsck.erofs") is None:
        pytest.skip("no fsck.erofs")
    assert verify.verify(built[1].path, fsck=True) is None


def test_interrupted_build_leaves_nothing(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path)
    first = build.build_region(cfg, "web")
    real = build._write_image

    def interrupted(tmp: Path, *args: object, **kw: object) -> str:
        tmp.write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_region(cfg, "web", size=40 * MiB)
    monkeypatch.setattr(build, "_write_image", real)
    names = sorted(p.name for p in (cfg.regions_dir / "images").iterdir())
    assert names == [first.digest + ".img"]
    assert not list(cfg.regions_dir.glob(".build-*"))
    assert os.path.realpath(cfg.group_region_link("web")) == first.path


def test_ls_and_gc(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    old = build.build_region(cfg, "web")
    new = build.build_region(cfg, "web", size=16 * MiB)
    kept = build.build_region(cfg, "db")
    assert new.digest != old.digest
    infos = {i.digest: i for i in gc.list_images(cfg)}
    assert infos[new.digest].groups == ["web"] and infos[old.digest].groups == []
    assert infos[kept.digest].files == len(LIBS)
    (cfg.regions_dir / ".build-dead").mkdir()        # leftover of a killed build
    dry = gc.gc(cfg, set(), dry_run=True)
    assert dry.removed == [old.path] and Path(old.path).exists()
    # a domain still referencing the old image by path keeps it
    res = gc.gc(cfg, {old.path})
    assert res.removed == [] and "referenced" in res.kept[old.path]
    assert old.path in json.loads(cfg.digest_cache.read_text())
    res = gc.gc(cfg, {str(cfg.group_region_link("web"))})
    assert res.removed == [old.path] and not Path(old.path).exists()
    assert res.freed == old.size
    assert Path(new.path).exists() and Path(kept.path).exists()
    assert not (cfg.regions_dir / ".build-dead").exists()
    cached = json.loads(cfg.digest_cache.read_text())
    assert old.path not in cached and new.path in cached     # gc pruned the digest cache


def fake_proc(base: Path, maps: dict[str, str | None]) -> Path:
    """A /proc with one QEMU per pid: maps text, or None for maps it cannot read."""
    proc = base / "proc"
    for pid, text in maps.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "comm").write_text("qemu-system-x86\n")
        if text is None:
            (proc / pid / "maps").mkdir()           # reading it fails like EACCES would
        else:
            (proc / pid / "maps").write_text(text)
    return proc


def test_gc_keeps_mapped_images_and_refuses_blind(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path)
    old = build.build_region(cfg, "web")
    build.build_region(cfg, "web", size=16 * MiB)
    line = f"7f00-7f10 r--p 00000000 08:01 12 {old.path}\n"
    res = gc.gc(cfg, set(), proc=str(fake_proc(tmp_path / "a", {"42": line})))
    assert res.removed == [] and "mapped" in res.kept[old.path]
    blind = str(fake_proc(tmp_path / "b", {"43": None}))
    with pytest.raises(LibshareError, match="QEMU process 43"):
        gc.gc(cfg, set(), proc=blind)
    assert Path(old.path).exists()
    dry = gc.gc(cfg, set(), dry_run=True, proc=blind)
    assert dry.unreadable == [43] and dry.removed == [old.path]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LibshareError, match="must run as root"):
        gc.gc(cfg, set(), proc=str(fake_proc(tmp_path / "c", {})))
    assert Path(old.path).exists()
    assert gc.gc(cfg, set(), dry_run=True, proc=blind).removed == [old.path]


def test_region_paths_in_xml() -> None:
    xml = """<domain type='qemu'><name>lstest-x</name><devices>
      <memory model='nvdimm' access='private'><source><path>/r/a.img</path><pmem/></source>
        <target><size unit='KiB'>4096</size><node>0</node><readonly/></target></memory>
      <memory model='dimm'><target><size unit='KiB'>4096</size><node>0</node></target></memory>
      <memory model='virtio-pmem'><source><path>/r/b.img</path></source></memory>
      <shmem name='libshare-web'><model type='ivshmem-plain'/></shmem>
    </devices></domain>"""
    assert region_paths(domxml.parse(xml)) == {"/r/a.img", "/r/b.img",
                                               "/dev/shm/libshare-web"}


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
    want = sorted(f"{f['sha256']}\t{f['size']}\t{f['path']}\t{g}"
                  for f in doc["files"] for g in f["guest_paths"])
    assert tsv.splitlines() == want and tsv.endswith("\n")
    assert len(want) >= len(LIBS)
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


def test_verify_catches_text_manifest_mismatch(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A text manifest line that pairs a hash with another path is refused."""
    cfg = make_cfg(tmp_path)
    idx = load_index(cfg.store_dir)
    entries = sorted(idx.entries.values(), key=lambda e: e.sha256)
    good = manifest.tsv_manifest_bytes(entries).decode().splitlines()
    assert all(len(line.split("\t")) == 4 for line in good)
    a, b = entries[0], entries[1]
    swapped = f"{a.sha256}\t{a.size}\t{layout.fs_path(b)}\t{sorted(a.paths)[0]}"
    monkeypatch.setattr(build, "tsv_manifest_bytes", lambda e: (swapped + "\n").encode())
    res = build.build_region(cfg, "web")
    problem = verify.verify(res.path)
    assert problem and "manifest.tsv line 1" in problem, problem


def test_set_fs_label_rejects_bad_input(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(8192))
    with pytest.raises(LibshareError, match="not an EROFS"):
        layout.set_fs_label(junk)
    with pytest.raises(LibshareError, match="1 to 16 bytes"):
        layout.set_fs_label(junk, "x" * 17)


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
