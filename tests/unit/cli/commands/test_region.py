"""The store/region sub-commands through the real CLI entry point (exit codes, JSON)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from libshare import cli
from libshare.cli.progress import ProgressPrinter
from libshare.config import Config
from libshare.sharing.formats import erofs_write
from libshare.sharing.region import build
from libshare.sharing.store import import_tree
from libshare.virt import api
from tests.support.fs import within

LIBDIR = Path("/lib/x86_64-linux-gnu")
pytestmark = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="no mkfs.erofs")


def run(capsys: pytest.CaptureFixture[str], state: Path, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["--state-dir", str(state), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root/usr/lib"
    root.mkdir(parents=True)
    for name in ("libz.so.1", "libattr.so.1"):
        if not (LIBDIR / name).exists():
            pytest.skip(f"{name} missing")
        shutil.copyfile(LIBDIR / name, root / name)
    (root / "README").write_text("not a library\n")
    return tmp_path / "root"


def test_store_and_region_commands(tmp_path: Path, tree: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    rc, out, _ = run(capsys, state, "store", "import", str(tree), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["added"] == 3 and doc["plain"] == 1 and doc["skipped_counts"] == {}
    rc, out, _ = run(capsys, state, "store", "import", str(tree))
    assert rc == 0 and "0 new objects" in out
    rc, out, _ = run(capsys, state, "store", "ls", "--json")
    assert {o["soname"] for o in json.loads(out)["objects"]} == {"libz.so.1", "libattr.so.1", None}

    rc, out, _ = run(capsys, state, "region", "build", "--group", "web", "--json")
    assert rc == 0
    built = json.loads(out)
    assert {"path", "digest", "size", "files"} <= set(built)
    assert built["files"] == 2 and built["size"] % (2 * 1024 * 1024) == 0
    assert built["writer"] == erofs_write.WRITER
    rc, out, _ = run(capsys, state, "region", "verify", built["path"])
    assert rc == 0 and out.endswith(": ok\n")
    rc, out, _ = run(capsys, state, "region", "ls", "--json")
    listed = json.loads(out)
    assert listed["images"][0]["groups"] == ["web"]
    assert listed["images"][0]["writer"] == built["writer"]
    assert listed["groups"] == {"web": built["path"]}

    rc, _, err = run(capsys, state, "region", "build", "--group", "web", "--size", "2M")
    assert rc == 1 and "too small" in err and err.count("\n") == 1

    bad = tmp_path / "bad.img"
    shutil.copyfile(built["path"], bad)
    with open(bad, "r+b") as fh:
        fh.seek(4096 + 64)      # npfns, without fixing the checksum
        low = fh.read(1)[0]
        fh.seek(4096 + 64)
        fh.write(bytes([low ^ 0x01]))
    rc, _, err = run(capsys, state, "region", "verify", str(bad))
    assert rc == 1 and "checksum" in err and err.count("\n") == 1
    rc, out, _ = run(capsys, state, "region", "verify", str(bad), "--json")
    assert rc == 1 and json.loads(out)["ok"] is False

    old = built["path"]
    rc, out, _ = run(capsys, state, "region", "build", "--group", "web", "--size", "8M",
                     "--json")
    assert json.loads(out)["path"] != old
    monkeypatch.setattr(api, "connect", lambda uri: contextlib.nullcontext(None))
    monkeypatch.setattr(api, "referenced_region_paths", lambda conn: set())
    rc, out, _ = run(capsys, state, "region", "gc", "--dry-run", "--json")
    assert rc == 0 and json.loads(out)["removed"] == [old] and os.path.exists(old)
    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 1000)
        rc, _, err = run(capsys, state, "region", "gc")
        assert rc == 1 and "root" in err and err.count("\n") == 1 and os.path.exists(old)
    rc, out, _ = run(capsys, state, "region", "gc")
    assert rc == 0 and not os.path.exists(old)


def test_region_build_empty_store_fails(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, tmp_path / "s", "region", "build")
    assert rc == 1 and "store is empty" in err


def test_progress_plain_lines_and_bar() -> None:
    plain = io.StringIO()
    p = ProgressPrinter("build", plain, delay=0.0, tty=False)
    for i in range(1, 4):
        p("stage", i, 3, "files")
    p("mkfs.erofs", 0, 0)
    p("mkfs.erofs", 1, 0)
    p("write", 150994944, 150994944, "bytes")
    p.close()
    lines = plain.getvalue().splitlines()
    assert lines[:2] == ["build: stage (3 files)", "build: mkfs.erofs ..."]
    assert re.fullmatch(r"build: mkfs\.erofs done in \d+\.\d s", lines[2])
    assert lines[3:] == ["build: write (144.0 MiB)"]
    bar = io.StringIO()
    p = ProgressPrinter("build", bar, delay=0.0, tty=True)
    p("write", 5 * 2**20, 10 * 2**20, "bytes")
    p("write", 10 * 2**20, 10 * 2**20, "bytes")
    p.close()
    out = bar.getvalue()
    assert "\r" in out and "100%" in out and "10.0 MiB of 10.0 MiB" in out
    assert out.endswith("\n") and "steps" not in out
    quiet = io.StringIO()
    p = ProgressPrinter("build", quiet, delay=60.0, tty=True)   # quick operations: silent
    p("write", 10, 10)
    p("mkfs.erofs", 0, 0)
    p.close()
    assert quiet.getvalue() == ""


def test_progress_of_a_build(tmp_path: Path) -> None:
    """A build reports its stage and write phases (plain lines on a pipe, a bar on a
    terminal) and records what wrote the filesystem."""
    root = tmp_path / "tree/usr/lib"
    root.mkdir(parents=True)
    shutil.copyfile(LIBDIR / "libz.so.1", root / "libz.so.1")
    cfg = Config(state_dir=tmp_path / "state")
    import_tree(cfg.store_dir, [tmp_path / "tree"])
    for tty in (True, False):
        stream = io.StringIO()
        p = ProgressPrinter("build", stream, delay=0.0, tty=tty)
        try:
            res = build.build_region(cfg, "web" if tty else "db", progress=p)
        finally:
            p.close()
        out = stream.getvalue()
        assert res.writer == erofs_write.WRITER
        if tty:
            assert "\r" in out and "100%" in out, out
        else:
            assert out.startswith("build: stage (1 files)\n"), out
            assert re.search(r"^build: write \(\d+\.\d MiB\)$", out, re.MULTILINE), out


def test_usage_errors_and_missing_files(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value in an option's converter is a usage error (2, one line, no
    traceback); a missing or unreadable file is a failure (1, one line, named once)."""
    state = tmp_path / "state"
    rc, _, err = run(capsys, state, "region", "build", "--size", "lots")
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("libshare region build: argument --size: invalid size 'lots'")
    rc, _, err = run(capsys, state, "region", "build", "--select", "/nonexistent")
    assert rc == 1 and err == ("libshare: cannot read selection file /nonexistent: No such "
                               "file or directory\n")
    rc, _, err = run(capsys, state, "region", "verify", "/nonexistent")
    assert rc == 1 and err == "libshare: /nonexistent: No such file or directory\n"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with within(10):
        rc, _, err = run(capsys, state, "region", "verify", str(fifo))
        assert rc == 1 and err == f"libshare: {fifo}: is a FIFO, not a regular file\n"
        rc, _, err = run(capsys, state, "region", "build", "--select", str(fifo))
        assert rc == 1 and "is a FIFO" in err and err.count("\n") == 1
