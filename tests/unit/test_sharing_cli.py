"""The store/region sub-commands through the real CLI entry point (exit codes, JSON)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from libshare import cli
from libshare.sharing import region
from libshare.sharing.progress import ProgressPrinter

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
    assert doc["added"] == 2 and doc["skipped_counts"] == {"not an ELF file": 1}
    rc, out, _ = run(capsys, state, "store", "import", str(tree))
    assert rc == 0 and "0 new objects" in out
    rc, out, _ = run(capsys, state, "store", "ls", "--json")
    assert {o["soname"] for o in json.loads(out)["objects"]} == {"libz.so.1", "libattr.so.1"}

    rc, out, _ = run(capsys, state, "region", "build", "--group", "web", "--json")
    assert rc == 0
    built = json.loads(out)
    assert {"path", "digest", "size", "files"} <= set(built)
    assert built["files"] == 2 and built["size"] % (2 * 1024 * 1024) == 0
    rc, out, _ = run(capsys, state, "region", "verify", built["path"])
    assert rc == 0 and out.endswith(": ok\n")
    rc, out, _ = run(capsys, state, "region", "ls", "--json")
    listed = json.loads(out)
    assert listed["images"][0]["groups"] == ["web"]
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
    monkeypatch.setattr(region, "libvirt_region_paths", lambda uri: set())
    rc, out, _ = run(capsys, state, "region", "gc", "--dry-run", "--json")
    assert rc == 0 and json.loads(out)["removed"] == [old] and os.path.exists(old)
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
        p("stage", i, 3)
    p("mkfs.erofs", 0, 0)
    p.close()
    assert plain.getvalue() == "build: stage (3 steps)\nbuild: mkfs.erofs\n"
    bar = io.StringIO()
    p = ProgressPrinter("build", bar, delay=0.0, tty=True)
    p("write", 5, 10)
    p("write", 10, 10)
    p.close()
    assert "\r" in bar.getvalue() and "100%" in bar.getvalue() and bar.getvalue().endswith("\n")
    quiet = io.StringIO()
    p = ProgressPrinter("build", quiet, delay=60.0, tty=True)   # quick operations: silent
    p("write", 10, 10)
    p.close()
    assert quiet.getvalue() == ""
