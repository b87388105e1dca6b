"""Reading a domain's initrd on the host: its archives in order (an early-microcode
archive, then a compressed one), its members, the generator that made it, and refusals
of what cannot be read (one line each)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from libshare.boot import initrd
from libshare.util import cpio
from tests.support.initrds import compress, dracut_initrd, initramfs_tools_initrd


@pytest.mark.parametrize("fmt,microcode", [(None, False), ("gzip", False), ("xz", True),
                                           ("gzip", True), ("zstd", True)])
def test_initramfs_tools_initrd_is_recognised(tmp_path: Path, fmt: str | None,
                                              microcode: bool) -> None:
    if fmt == "zstd" and shutil.which("zstd") is None:
        pytest.skip("no zstd on this host")
    path = initramfs_tools_initrd(tmp_path / "initrd.img", fmt, microcode)
    info = initrd.inspect(path)
    assert info.kind == initrd.INITRAMFS_TOOLS
    assert info.archives == (("cpio",) if microcode else ()) + (fmt or "cpio",)
    assert "scripts/init-bottom/ORDER" in info.names and "bin" in info.names
    assert ("kernel/x86/microcode/GenuineIntel.bin" in info.names) == microcode
    assert info.size == path.stat().st_size and len(info.sha256) == 64


def test_dracut_and_unknown(tmp_path: Path) -> None:
    assert initrd.inspect(dracut_initrd(tmp_path / "d.img")).kind == initrd.DRACUT
    other = tmp_path / "o.img"
    other.write_bytes(cpio.write_archive([cpio.file_entry("init", b"#!/bin/sh\n", 0o755)]))
    assert initrd.inspect(other).kind == initrd.UNKNOWN
    # an initramfs-tools initrd that lost its init-bottom ORDER cannot be extended
    assert initrd.classify(["init", "scripts/functions", "conf/initramfs.conf"]) == \
        initrd.UNKNOWN


def test_what_follows_a_compressed_archive_is_no_error(tmp_path: Path) -> None:
    """An initrd libshare extended before (gzip archive, then an uncompressed one)."""
    path = initramfs_tools_initrd(tmp_path / "i.img", "gzip")
    with open(path, "ab") as fh:
        fh.write(b"\0" * (-path.stat().st_size % 4))
        fh.write(cpio.write_archive([cpio.file_entry("extra", b"x")]))
    assert initrd.inspect(path).kind == initrd.INITRAMFS_TOOLS


@pytest.mark.parametrize("case,match", [
    ("missing", "cannot read initrd"),
    ("directory", "not a regular file"),
    ("garbage", "unknown data at offset 0"),
    ("empty", "holds no archive"),
    ("broken gzip", "broken gzip archive"),
    ("bad cpio", "bad cpio header"),
    ("no tool", "lz4-compressed and lz4 is not installed"),
])
def test_unreadable_initrds_are_refused_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, match: str) -> None:
    path = tmp_path / "initrd.img"
    if case == "directory":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"MZ\x90\x00" + b"\x01" * 200)
    elif case == "empty":
        path.write_bytes(b"\0" * 512)
    elif case == "broken gzip":
        path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(7, 200)))
    elif case == "bad cpio":
        path.write_bytes(cpio.write_archive([cpio.file_entry("a", b"x")])[:-40] + b"Z" * 40)
    elif case == "no tool":
        monkeypatch.setattr(initrd.shutil, "which", lambda _name: None)
        path.write_bytes(b"\x02\x21\x4c\x18" + b"\0" * 64)
    with pytest.raises(initrd.InitrdError, match=match) as info:
        initrd.inspect(path)
    assert "\n" not in str(info.value)


def test_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed archive that unpacks past the bound ends the read with one line."""
    big = cpio.write_archive([cpio.file_entry("f", b"\0" * (1 << 20))])
    path = tmp_path / "bomb.img"
    path.write_bytes(compress(big, "gzip"))
    monkeypatch.setattr(initrd, "MAX_UNPACKED", 1 << 16)
    with pytest.raises(initrd.InitrdError, match="unpacks to more than"):
        initrd.inspect(path)
    monkeypatch.setattr(initrd, "MAX_INITRD", 10)
    with pytest.raises(initrd.InitrdError, match="larger than"):
        initrd.inspect(path)
