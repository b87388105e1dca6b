"""``libshare store rm``: removing objects, refusing those a group's current image holds
unless told, images left intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libshare import cli
from libshare.config import Config
from libshare.sharing.region import build, verify
from libshare.sharing.store import load_index, object_path
from tests.support.images import make_cfg, needs_mkfs

pytestmark = needs_mkfs


def run(capsys: pytest.CaptureFixture[str], cfg: Config, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["--state-dir", str(cfg.state_dir), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_store_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_cfg(tmp_path)
    shas = sorted(load_index(cfg.store_dir).entries)
    image = build.build_region(cfg, "web", shas[1:])   # shas[0] is in no image
    # unknown, ambiguous or malformed names: nothing removed, one line
    for item, why in (("ab" * 32, "no object"), ("123", "not a SHA-256"),
                      ("zz" * 32, "not a SHA-256")):
        rc, _, err = run(capsys, cfg, "store", "rm", shas[0], item)
        assert rc == 1 and why in err and err.count("\n") == 1, err
    assert sorted(load_index(cfg.store_dir).entries) == shas
    # an object the current image of 'web' holds is refused
    rc, out, err = run(capsys, cfg, "store", "rm", shas[1][:12], "--json")
    assert rc == 1 and json.loads(out)["held"] == {shas[1]: ["web"]}
    assert "current image of group web" in err and err.count("\n") == 1
    assert sorted(load_index(cfg.store_dir).entries) == shas
    # one in no current image goes, by prefix; --force takes a held one
    rc, out, _ = run(capsys, cfg, "store", "rm", shas[0][:8])
    assert rc == 0 and out.startswith(f"removed {shas[0]}\n")
    assert not object_path(cfg.store_dir, shas[0]).exists()
    rc, out, _ = run(capsys, cfg, "store", "rm", shas[1], "--force", "--json")
    assert rc == 0 and json.loads(out)["removed"] == [shas[1]]
    assert sorted(load_index(cfg.store_dir).entries) == shas[2:]
    stored = {p.name for p in (cfg.store_dir / "objects").rglob("*") if p.is_file()}
    assert stored == set(shas[2:])
    # the image keeps its own copies; the next build leaves the removed one out
    assert verify.verify(image.path) is None
    assert build.build_region(cfg, "web").files == len(shas) - 2
