"""The EROFS writer: the kernel and fsck.erofs are the judges of what it writes.

The kernel's view comes from a loop mount (root, loop devices); erofs-utils' fsck.erofs
checks and extracts every file; the reader (libshare.sharing.formats.erofs) is only
used where neither can say (the bytes of the superblock).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from libshare.sharing.formats import erofs_write as ew
from libshare.sharing.formats.erofs import Erofs, ErofsError

UUID = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes

needs_mount = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None
    or "erofs" not in Path("/proc/filesystems").read_text(),
    reason="needs root, loop devices and the kernel's erofs")
needs_fsck = pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="no fsck.erofs")


def write(root: ew.Dir, out: Path, label: bytes = b"libshare") -> ew.Plan:
    """Write the filesystem of ``root`` to ``out``; return its plan."""
    plan = ew.Plan(root, UUID, label)
    with open(out, "wb") as fh:
        for piece in plan.chunks():
            fh.write(piece)
    assert out.stat().st_size == plan.size
    return plan


@contextlib.contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    """Mount ``image`` read-only (loop) at ``where``; yield it; unmount."""
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def sample(tmp_path: Path) -> ew.Dir:
    """Return a tree with what regions hold and the edges of the format: hard links,
    setuid, an owner above 65535 (extended inode), symlinks, an empty file and directory,
    a directory of many blocks, names sorting before '.', a 255-byte name, a name that is
    not UTF-8."""
    big = tmp_path / "big"
    if not big.exists():
        big.write_bytes(os.urandom(3 * 4096 + 17))
    root = ew.Dir(0o755)
    lib = root.entries[b"lib"] = ew.Dir(0o755)
    f = ew.File(0o444, size=big.stat().st_size, path=str(big),
                expect=hashlib.sha256(big.read_bytes()).hexdigest())
    lib.entries[b"big"] = f
    root.entries[b"hard"] = f
    root.entries[b"+plus"] = ew.File(0o4755, uid=70000, gid=5, size=3, data=b"abc")
    root.entries[b"-dash"] = ew.File(0o640, uid=0, gid=42, size=1, data=b"d")
    root.entries[b"empty"] = ew.File(0o644, size=0, data=b"")
    root.entries[b"void"] = ew.Dir(0o700)
    root.entries[b"link"] = ew.Symlink(0o777, target=b"lib/big")
    root.entries[b"x" * 255] = ew.File(0o600, size=2, data=b"xx")
    root.entries[b"caf\xe9"] = ew.File(0o644, size=5, data=b"latin")
    many = root.entries[b"many"] = ew.Dir(0o750, uid=1000, gid=1000)
    for i in range(700):
        many.entries[f"n{i:04d}-{'y' * (i % 50)}".encode()] = ew.File(0o644, size=1,
                                                                      data=bytes([i % 256]))
    deep = many
    for d in range(4):
        sub = ew.Dir(0o755)
        deep.entries[b"d%d" % d] = sub
        deep = sub
    return root


@needs_mount
def test_the_kernel_reads_what_was_written(tmp_path: Path) -> None:
    root = sample(tmp_path)
    proved: list[tuple[str, bool]] = []
    plan = ew.Plan(root, UUID, b"libshare")
    img = tmp_path / "fs.img"
    with open(img, "wb") as fh:
        for piece in plan.chunks(lambda f, sha: proved.append((str(f.path), sha == f.expect))):
            fh.write(piece)
    assert proved == [(str(tmp_path / "big"), True)]
    with mounted(img, tmp_path / "m") as m:
        assert (m / "lib/big").read_bytes() == (tmp_path / "big").read_bytes()
        a, b = os.stat(m / "lib/big"), os.stat(m / "hard")
        assert a.st_ino == b.st_ino and a.st_nlink == 2 and stat.S_IMODE(a.st_mode) == 0o444
        st = os.stat(m / "+plus")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 70000, 5)
        assert (m / "+plus").read_bytes() == b"abc"
        assert os.readlink(m / "link") == "lib/big"
        assert (m / "link").read_bytes() == (tmp_path / "big").read_bytes()
        assert (m / "empty").read_bytes() == b"" and os.listdir(m / "void") == []
        assert stat.S_IMODE(os.stat(m / "void").st_mode) == 0o700
        assert (m / ("x" * 255)).read_bytes() == b"xx"
        assert (m / os.fsdecode(b"caf\xe9")).read_bytes() == b"latin"
        names = os.listdir(m / "many")
        assert len(names) == 701 and "d0" in names
        for i in (0, 123, 350, 699):             # lookups in every block of the directory
            name = f"n{i:04d}-{'y' * (i % 50)}"
            assert (m / "many" / name).read_bytes() == bytes([i % 256])
        assert os.stat(m / "many").st_nlink == 3 and os.stat(m).st_nlink == 5
        assert (m / "many/d0/d1/d2/d3").is_dir()
        assert sorted(os.listdir(m)) == sorted(os.fsdecode(n) for n in root.entries)
        assert all(os.lstat(m / p).st_mtime == 0 for p in ("lib", "hard", "link", "many"))
        blkid = subprocess.run(["blkid", "-p", "-o", "export", str(img)],
                               capture_output=True, text=True, check=False).stdout
        assert "TYPE=erofs" in blkid and "LABEL=libshare" in blkid, blkid
    assert plan.size % 4096 == 0


@needs_fsck
def test_fsck_erofs_checks_and_extracts_every_file(tmp_path: Path) -> None:
    img = tmp_path / "fs.img"
    write(sample(tmp_path), img)
    out = tmp_path / "x"
    proc = subprocess.run(["fsck.erofs", f"--extract={out}", str(img)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (out / "lib/big").read_bytes() == (tmp_path / "big").read_bytes()
    assert len(os.listdir(out / "many")) == 701


def test_same_tree_same_bytes_and_files_are_block_aligned(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write(sample(tmp_path), a)
    write(sample(tmp_path), b)
    assert a.read_bytes() == b.read_bytes()
    with open(a, "rb") as fh:
        fs = Erofs(fh)              # the superblock checksum holds
        assert fs.sb.root_nid == 36 and fs.sb.build_time == 0
        ino = fs.lookup("/lib/big")
        assert ino.layout == 0 and ino.raw_blkaddr * 4096 % 4096 == 0
        assert fs.read_inode(ino) == (tmp_path / "big").read_bytes()
        # directories and symlinks keep their last partial block after the inode
        assert fs.lookup("/lib").layout == 2 and fs.lookup("/link").layout == 2
        many = fs.lookup("/many")
        assert many.layout == 2 and many.size > 4 * 4096 and many.raw_blkaddr != 0xFFFFFFFF
        assert len(fs.listdir(many)) == 701 and fs.read_inode(fs.lookup("/link")) == b"lib/big"


def test_bad_trees_are_refused(tmp_path: Path) -> None:
    for bad in (b"", b".", b"..", b"a/b", b"a\0b", b"n" * 256):
        with pytest.raises(ErofsError, match="invalid file name"):
            ew.Plan(ew.Dir(0o755, entries={bad: ew.File(0o644, size=0, data=b"")}), UUID)
    sub = ew.Dir(0o755)
    with pytest.raises(ErofsError, match="two names"):
        ew.Plan(ew.Dir(0o755, entries={b"a": sub, b"b": sub}), UUID)
    loop = ew.Dir(0o755)
    loop.entries[b"self"] = loop
    with pytest.raises(ErofsError, match="two names"):
        ew.Plan(ew.Dir(0o755, entries={b"a": loop}), UUID)
    with pytest.raises(ErofsError, match="16 bytes"):
        ew.Plan(ew.Dir(0o755), UUID, b"l" * 17)


def test_a_file_that_changed_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"12345")
    root = ew.Dir(0o755, entries={b"f": ew.File(0o444, size=5, path=str(src))})
    plan = ew.Plan(root, UUID)
    src.write_bytes(b"123")
    with pytest.raises(ErofsError, match="3 bytes, 5 expected"):
        b"".join(plan.chunks())
    src.unlink()
    os.symlink("/etc/passwd", src)              # a path is never followed
    with pytest.raises(OSError):
        b"".join(plan.chunks())
