"""Canonical store: import, idempotence, symlinks, build-id vs bytes, interrupted imports."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from libshare.sharing import store
from libshare.sharing.store import import_tree, load_index, object_path, resolve_in_root
from libshare.util.digest import sha256_file

LIBDIR = Path("/lib/x86_64-linux-gnu")
LIBS = ["libz.so.1", "libacl.so.1", "libattr.so.1"]
#: objects the tree below gives: its libraries and one plain file (/etc/hostname)
OBJECTS = len(LIBS) + 1


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tiny guest root: a few real libraries, symlinks, and non-ELF files."""
    root = tmp_path / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    for name in LIBS:
        src = LIBDIR / name
        if not src.exists():
            pytest.skip(f"{src} missing")
        shutil.copyfile(src, lib / (name + ".0.0"))
        os.symlink(name + ".0.0", lib / name)
    (root / "lib").symlink_to("usr/lib")                     # merged-usr dir link
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("guest\n")
    os.symlink("/usr/lib/x86_64-linux-gnu/libz.so.1.0.0", root / "etc/abs-libz")
    os.symlink("../../../../../../../../etc/passwd", lib / "escape")  # would leave the tree
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    return root


def test_import_and_index(tmp_path: Path, tree: Path) -> None:
    sdir = tmp_path / "store"
    r = import_tree(sdir, [tree])
    assert len(r.added) == OBJECTS and r.plain == 1
    assert r.skipped_counts() == {}
    idx = load_index(sdir)
    hostname = idx.entries[sha256_file(tree / "etc/hostname")]
    assert hostname.elf_type == store.PLAIN and hostname.paths == ["/etc/hostname"]
    libz = sha256_file(LIBDIR / "libz.so.1")
    e = idx.entries[libz]
    assert e.soname == "libz.so.1" and e.name == "libz.so.1"
    assert "/usr/lib/x86_64-linux-gnu/libz.so.1.0.0" in e.paths
    assert "/usr/lib/x86_64-linux-gnu/libz.so.1" in e.paths      # relative symlink
    assert "/etc/abs-libz" in e.paths                            # absolute link, in root
    assert not any("escape" in p for en in idx.entries.values() for p in en.paths)
    obj = object_path(sdir, libz)
    assert sha256_file(obj) == libz
    assert obj.stat().st_mode & 0o222 == 0                       # read-only
    doc = json.loads((sdir / "index.json").read_text())
    assert doc["build_ids"][e.build_id] == [libz]


def test_import_is_idempotent(tmp_path: Path, tree: Path) -> None:
    sdir = tmp_path / "store"
    import_tree(sdir, [tree])
    before = (sdir / "index.json").read_bytes()
    mtime = (sdir / "index.json").stat().st_mtime_ns
    r = import_tree(sdir, [tree])
    assert r.added == [] and r.paths_added == 0 and not r.index_written
    assert r.known == OBJECTS
    assert (sdir / "index.json").read_bytes() == before
    assert (sdir / "index.json").stat().st_mtime_ns == mtime
    objects = sorted(p.name for p in (sdir / "objects").rglob("*") if p.is_file())
    assert len(objects) == OBJECTS


def test_same_build_id_different_bytes_two_objects(tmp_path: Path, tree: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    data = bytearray((LIBDIR / "libz.so.1").read_bytes())
    data[-1] ^= 0x55
    (other / "libz.so.1").write_bytes(bytes(data))
    sdir = tmp_path / "store"
    import_tree(sdir, [tree, other])
    idx = load_index(sdir)
    bid = idx.entries[sha256_file(LIBDIR / "libz.so.1")].build_id
    assert bid is not None
    assert len(idx.by_build_id()[bid]) == 2


def test_resolve_in_root_never_escapes(tree: Path) -> None:
    root = str(tree)
    assert resolve_in_root(root, "/etc/abs-libz") == \
        str(tree / "usr/lib/x86_64-linux-gnu/libz.so.1.0.0")
    esc = resolve_in_root(root, "/usr/lib/x86_64-linux-gnu/escape")
    assert esc == str(tree / "etc/passwd")
    assert resolve_in_root(root, "/loop1") is None
    assert resolve_in_root(root, "/lib/x86_64-linux-gnu/libz.so.1") == \
        str(tree / "usr/lib/x86_64-linux-gnu/libz.so.1.0.0")


def test_interrupted_import_leaves_nothing_visible(tmp_path: Path, tree: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sdir = tmp_path / "store"
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_second(src: str, dst: str) -> None:
        if str(dst).startswith(str(sdir / "objects")):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # the user hits ^C between copy and rename
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        import_tree(sdir, [tree])
    monkeypatch.setattr(store.os, "replace", real_replace)
    # no temporary left, no half object under a hash name, no index written
    assert list((sdir / "tmp").iterdir()) == []
    for obj in (sdir / "objects").rglob("*"):
        if obj.is_file():
            assert sha256_file(obj) == obj.name
    assert not (sdir / "index.json").exists()
    # the next import completes the job
    r = import_tree(sdir, [tree])
    assert len(load_index(sdir).entries) == OBJECTS
    assert len(r.added) == OBJECTS


def test_stale_temporaries_are_removed(tmp_path: Path, tree: Path) -> None:
    sdir = tmp_path / "store"
    (sdir / "tmp").mkdir(parents=True)
    (sdir / "tmp" / "deadbeef.half").write_bytes(b"\x7fELF partial")
    import_tree(sdir, [tree])
    assert list((sdir / "tmp").iterdir()) == []


def test_file_changing_during_import_is_refused(tmp_path: Path, tree: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sdir = tmp_path / "store"
    real = store.identify

    def stale(path: str) -> object:
        ident = real(path)
        if str(path).endswith("libz.so.1.0.0"):
            with open(path, "ab") as fh:   # the file grows after it was identified
                fh.write(b"x")
        return ident

    monkeypatch.setattr(store, "identify", stale)
    r = import_tree(sdir, [tree])
    assert any(s.reason == "file changed while being imported" for s in r.skipped)
    assert len(r.added) == OBJECTS - 1
    assert all(sha256_file(p) == p.name
               for p in (sdir / "objects").rglob("*") if p.is_file())


def test_missing_dir(tmp_path: Path) -> None:
    from libshare.errors import LibshareError
    with pytest.raises(LibshareError, match="not a directory"):
        import_tree(tmp_path / "s", [tmp_path / "nope"])


def damage(path: Path, offset: int = 100) -> None:
    """Flip one byte of ``path`` in place (same size), as bit rot or a stray write would."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, store.OBJECT_MODE)


def test_reimport_repairs_an_object_damaged_in_place(tmp_path: Path, tree: Path) -> None:
    sdir = tmp_path / "store"
    import_tree(sdir, [tree])
    libz = sha256_file(LIBDIR / "libz.so.1")
    obj = object_path(sdir, libz)
    size = obj.stat().st_size
    damage(obj)
    assert obj.stat().st_size == size and sha256_file(obj) != libz
    r = import_tree(sdir, [tree])
    assert r.repaired == [libz] and r.as_dict()["repaired"] == [libz]
    assert r.known == OBJECTS and r.added == []
    assert sha256_file(obj) == libz and obj.stat().st_mode & 0o777 == store.OBJECT_MODE
    assert import_tree(sdir, [tree]).repaired == []


def test_by_path_keeps_every_object_seen_at_a_path(tmp_path: Path, tree: Path) -> None:
    """Two trees with different bytes at one guest path: both objects stay selectable."""
    other = tmp_path / "other/usr/lib/x86_64-linux-gnu"
    other.mkdir(parents=True)
    data = bytearray((LIBDIR / "libz.so.1").read_bytes())
    data[-1] ^= 0x55
    (other / "libz.so.1.0.0").write_bytes(bytes(data))
    sdir = tmp_path / "store"
    import_tree(sdir, [tree, tmp_path / "other"])
    want = sorted([sha256_file(LIBDIR / "libz.so.1"), store.sha256_file(
        other / "libz.so.1.0.0")])
    assert load_index(sdir).by_path()["/usr/lib/x86_64-linux-gnu/libz.so.1.0.0"] == want
