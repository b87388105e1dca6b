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
from tests.support.fs import fill, small_tmpfs, within
from tests.support.images import shared_object

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

    def stale(path: str, follow: bool = True) -> object:
        ident = real(path, follow)
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


# ---------------------------------------------------------------------------- faults

def test_a_fifo_replacing_a_file_during_the_walk_is_skipped(
        tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk saw regular files; one becomes a FIFO before it is identified, another
    right after (before its copy): neither blocks the import, both are skipped."""
    sdir = tmp_path / "store"
    real = store.identify
    lib = tree / "usr/lib/x86_64-linux-gnu"

    def swap(path: str, *args: object, **kw: object) -> object:
        if path.endswith("libz.so.1.0.0"):
            os.unlink(path)
            os.mkfifo(path)
        ident = real(path, *args, **kw)  # type: ignore[arg-type]
        if path.endswith("libacl.so.1.0.0"):
            os.unlink(path)
            os.mkfifo(path)
        return ident

    monkeypatch.setattr(store, "identify", swap)
    with within(20):
        r = import_tree(sdir, [tree])
    reasons = {Path(s.path).name: s.reason for s in r.skipped}
    assert reasons["libz.so.1.0.0"] == "cannot read: is a FIFO, not a regular file"
    assert reasons["libacl.so.1.0.0"] == "cannot read: is a FIFO, not a regular file"
    assert r.index_written and [e.soname for e in load_index(sdir).entries.values()
                                if e.elf_type != store.PLAIN] == ["libattr.so.1"]
    assert (lib / "libz.so.1.0.0").is_fifo()


def test_bad_names_are_skipped_and_reported(tmp_path: Path) -> None:
    """A SONAME that cannot be a file name (300 bytes, a newline, not UTF-8) or a guest
    path that is not UTF-8 or holds a control character: skipped with the reason, and
    nothing else is lost."""
    root = tmp_path / "root"
    shared_object(root / "long.so", "l" * 300)
    shared_object(root / "newline.so", "lib\nsplit.so.1")
    shared_object(root / "latin1.so", b"lib\xe9.so.1")
    shared_object(root / "good.so", "libgood.so.1")
    shutil.copyfile(root / "good.so", os.fsdecode(bytes(root) + b"/bad\xffname.so"))
    shutil.copyfile(root / "good.so", root / "tab\there.so")
    r = import_tree(tmp_path / "store", [root])
    reasons = {Path(s.path).name: s.reason for s in r.skipped}
    assert reasons == {"long.so": "SONAME longer than 255 bytes",
                       "newline.so": "SONAME holds a control character",
                       "latin1.so": "SONAME not valid UTF-8",
                       os.fsdecode(b"bad\xffname.so"): "guest path not valid UTF-8",
                       "tab\there.so": "guest path holds a control character"}
    entries = list(load_index(tmp_path / "store").entries.values())
    assert [(e.soname, e.paths) for e in entries] == [("libgood.so.1", ["/good.so"])]
    assert r.as_dict()["skipped_counts"]["SONAME longer than 255 bytes"] == 1
    json.dumps(r.as_dict())  # reportable, even with undecodable names


def test_names_of_an_older_index_fall_back_to_a_valid_one() -> None:
    """An index written before names were checked still names every region file well."""
    sha = "ab" * 32
    entry = store.StoreEntry(sha, 10, None, "x" * 300, "ET_DYN", ["/lib/bad\nname.so",
                                                                   "/lib/good.so"])
    assert entry.name == "good.so"
    assert store.StoreEntry(sha, 10, None, "s\n", "ET_DYN", ["/a\udcff"]).name == sha


def test_objects_left_unindexed_by_a_killed_import_are_removed(tmp_path: Path,
                                                               tree: Path) -> None:
    sdir = tmp_path / "store"
    import_tree(sdir, [tree])
    orphan = object_path(sdir, "cd" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"copied, renamed, then SIGKILL before the index was written")
    r = import_tree(sdir, [tree])
    assert r.orphans_removed == ["cd" * 32] and not orphan.exists()
    assert {p.name for p in (sdir / "objects").rglob("*") if p.is_file()} == \
        set(load_index(sdir).entries)


def store_consistent(sdir: Path) -> None:
    """Assert every object file of the store at ``sdir`` is indexed, and every indexed
    object is stored whole."""
    index = load_index(sdir)
    stored = {p.name for p in (sdir / "objects").rglob("*") if p.is_file()}
    assert stored == set(index.entries), (len(stored), len(index.entries))
    for e in index.entries.values():
        store.stat_object(sdir, e)         # raises for one missing or of another size
    assert not (sdir / "tmp").is_dir() or list((sdir / "tmp").iterdir()) == []


def big_tree(base: Path, nbytes: int) -> Path:
    """Return a tree of distinct libraries of this host, ``nbytes`` bytes at least."""
    root = base / "big"
    root.mkdir()
    total = 0
    seen: set[int] = set()
    for src in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("lib*.so.*")):
        if total >= nbytes:
            break
        st = src.stat()
        if src.is_symlink() or st.st_ino in seen or st.st_size < 64 * 1024:
            continue
        seen.add(st.st_ino)
        shutil.copyfile(src, root / src.name)
        total += st.st_size
    if total < nbytes:
        pytest.skip("not enough libraries on this host")
    return root


def test_disk_full_import_is_one_line_and_leaves_the_store_consistent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from libshare import cli
    tree = big_tree(tmp_path, 30 << 20)
    with small_tmpfs(tmp_path / "small", "20m") as small:
        state = small / "state"
        rc = cli.main(["--state-dir", str(state), "store", "import", str(tree)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith("libshare: store import failed: No space left on device")
        assert "Traceback" not in err
        store_consistent(state / "store")
        # the index could still be written: what was stored is kept, and usable
        assert len(load_index(state / "store").entries) > 0
        # even when the index itself cannot be written: nothing unindexed is left
        shutil.rmtree(state)
        ballast = fill(small, leave=0)
        rc = cli.main(["--state-dir", str(state), "store", "import", str(tree)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        if (state / "store").is_dir():
            store_consistent(state / "store")
        ballast.unlink()


def test_proven_objects_are_not_hashed_again(tmp_path: Path, tree: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An import proves each object's hash; the next import reads none of them again
    while their files are unchanged, and a write in place (mtime moves) is caught."""
    sdir = tmp_path / "store"
    import_tree(sdir, [tree])
    proofs = store.load_proofs(sdir)
    assert set(proofs) == set(load_index(sdir).entries)
    hashed: list[str] = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    r = import_tree(sdir, [tree])
    assert hashed == [] and r.repaired == [] and r.known == OBJECTS
    libz = sha256_file(LIBDIR / "libz.so.1")
    damage(object_path(sdir, libz))
    r = import_tree(sdir, [tree])
    assert r.repaired == [libz] and len(hashed) == 1
    assert store.is_proven(sdir, libz, object_path(sdir, libz).stat().st_size,
                           store.load_proofs(sdir))
