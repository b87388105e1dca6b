"""Unit tests of the newc cpio writer and the initramfs overlay (no root, no libvirt)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from libshare.demo.tiny.initramfs import INIT_SCRIPT, overlay_archive
from libshare.demo.tiny.runner import parse_console
from libshare.util import cpio


def _sample() -> list[cpio.Entry]:
    return [
        cpio.dir_entry("etc"),
        cpio.file_entry("etc/hello", b"hello world\n"),
        cpio.file_entry("init", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.symlink_entry("bin/sh", "/bin/busybox"),
        cpio.chardev_entry("dev/console", 5, 1),
        cpio.file_entry("empty", b""),
        cpio.file_entry("odd", b"x" * 5),
    ]


def test_archive_is_deterministic_and_aligned() -> None:
    a = cpio.write_archive(_sample())
    assert a == cpio.write_archive(_sample())
    assert len(a) % 4 == 0
    assert a.startswith(b"070701")
    assert b"TRAILER!!!\0" in a


def test_header_fields() -> None:
    blob = cpio.write_archive([cpio.file_entry("init", b"abc", 0o755)], first_ino=7)
    fields = [int(blob[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size = fields[:7]
    assert (ino, uid, gid, nlink, mtime, size) == (7, 0, 0, 1, 0, 3)
    assert mode == stat.S_IFREG | 0o755
    assert fields[11] == len("init") + 1  # namesize counts the NUL
    assert blob[110:115] == b"init\0"
    assert blob[116:119] == b"abc"  # 110 + 5 = 115, padded to 116


def test_round_trip_including_concatenation() -> None:
    base = cpio.write_archive(_sample())
    over = cpio.write_archive([cpio.file_entry("test.sh", b"exit 0\n", 0o755)], first_ino=100)
    entries = cpio.read_archive(base + over)
    assert [e.name for e in entries] == [e.name for e in _sample()] + ["test.sh"]
    by_name = {e.name: e for e in entries}
    assert by_name["etc/hello"].data == b"hello world\n"
    assert by_name["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISLNK(by_name["bin/sh"].mode)
    assert (by_name["dev/console"].rdev_major, by_name["dev/console"].rdev_minor) == (5, 1)
    assert stat.S_ISCHR(by_name["dev/console"].mode)


def test_read_archive_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        cpio.read_archive(b"not a cpio archive")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_extracts_our_archive(tmp_path: Path) -> None:
    blob = cpio.write_archive([e for e in _sample() if not e.name.startswith("dev/")])
    subprocess.run(["cpio", "-i", "--quiet", "--no-absolute-filenames", "-d"],
                   input=blob, cwd=tmp_path, check=True)
    assert (tmp_path / "etc/hello").read_bytes() == b"hello world\n"
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/sh").is_symlink()
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "empty").stat().st_size == 0


def test_overlay_has_script_parents_and_files(tmp_path: Path) -> None:
    host = tmp_path / "tool"
    host.write_bytes(b"\x7fELF fake")
    host.chmod(0o750)
    blob = overlay_archive("echo hi\n", {"usr/local/bin/tool": host, "etc/x.conf": "a=1\n"})
    entries = {e.name: e for e in cpio.read_archive(blob)}
    assert entries["test.sh"].data == b"echo hi\n"
    assert entries["test.sh"].mode & 0o777 == 0o755
    assert stat.S_ISDIR(entries["usr/local/bin"].mode)
    assert entries["usr/local/bin/tool"].mode & 0o777 == 0o750
    assert entries["etc/x.conf"].mode & 0o777 == 0o644
    names = list(entries)
    assert names.index("usr/local") < names.index("usr/local/bin/tool")


def test_init_prints_markers_and_powers_off() -> None:
    assert INIT_SCRIPT.startswith("#!/bin/sh\n")
    assert "LIBSHARE-TEST-BEGIN" in INIT_SCRIPT
    assert 'LIBSHARE-TEST-END rc=$rc' in INIT_SCRIPT
    assert "poweroff -f" in INIT_SCRIPT


def test_parse_console() -> None:
    text = ("[ 0.1] noise\r\nLIBSHARE-BOOTED 2.31\r\nLIBSHARE-TEST-BEGIN\r\n"
            "line one\r\nline two\r\nLIBSHARE-TEST-END rc=3\r\n[ 2.5] reboot: Power down\r\n")
    output, rc, boot = parse_console(text)
    assert output == "line one\nline two\n"
    assert rc == 3
    assert boot == pytest.approx(2.31)
    assert parse_console("LIBSHARE-TEST-BEGIN\npartial\n") == ("partial\n", None, None)


def test_reader_stops_where_a_compressed_archive_starts() -> None:
    """The walk over an initrd: archives, zero padding, then what is no archive (a
    compressed one) at :attr:`ArchiveReader.end`; file contents skipped on request."""
    import io

    first = cpio.write_archive(_sample())
    blob = first + b"\0" * 512 + cpio.write_archive([cpio.file_entry("b", b"y")]) + \
        b"\0" * 8 + b"\x28\xb5\x2f\xfd rest"
    reader = cpio.ArchiveReader(io.BytesIO(blob))
    entries = list(reader.entries(data=False))
    assert [e.name for e in entries] == [e.name for e in _sample()] + ["b"]
    assert next(e for e in entries if e.name == "etc/hello").data == b""
    assert next(e for e in entries if e.name == "bin/sh").data == b"/bin/busybox"
    assert reader.archives == 2 and blob[reader.end:].startswith(b"\x28\xb5\x2f\xfd")
    done = cpio.ArchiveReader(io.BytesIO(first))
    assert len(list(done.entries())) == len(_sample()) and done.end is None


@pytest.mark.parametrize("blob,match", [
    (b"070701" + b"Z" * 104, "bad cpio header"),
    (cpio.write_archive([cpio.file_entry("a", b"x" * 100)])[:150], "truncated"),
])
def test_reader_refuses_malformed_archives(blob: bytes, match: str) -> None:
    import io

    with pytest.raises(cpio.ArchiveError, match=match):
        list(cpio.ArchiveReader(io.BytesIO(blob)).entries())


def test_reader_bounds() -> None:
    import io

    blob = cpio.write_archive([cpio.file_entry(f"f{i}", b"x" * 10) for i in range(5)])
    with pytest.raises(cpio.ArchiveError, match="more than 3"):
        list(cpio.ArchiveReader(io.BytesIO(blob), max_entries=3).entries())
    with pytest.raises(cpio.ArchiveError, match="bounds"):
        list(cpio.ArchiveReader(io.BytesIO(blob), max_data=5).entries())


def test_append_archive_pads_to_four_bytes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"abcde")
    over = cpio.write_archive([cpio.file_entry("x", b"1")])
    digest = cpio.append_archive(base, over, tmp_path / "out", mode=0o600)
    out = (tmp_path / "out").read_bytes()
    assert out == b"abcde\0\0\0" + over
    import hashlib
    assert digest == hashlib.sha256(out).hexdigest()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600
