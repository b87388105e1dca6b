"""``libshare survey --page-cache [--forecast GROUP]`` through the real CLI entry point,
the guests' page cache given (the walk itself is tests/unit/introspect/test_pagecache.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from libshare import cli
from libshare.introspect import pagecache
from libshare.introspect.pagecache import CachedFile, FilesystemCache, PageCacheSurvey
from libshare.sharing.store import import_tree
from libshare.virt import api
from tests.support.images import make_guest_tree


def _survey(name: str, root: Path) -> PageCacheSurvey:
    def cached(path: str, n: int, region: bool = False) -> CachedFile:
        return CachedFile("254:1" if not region else "259:0", "erofs" if region else "ext4",
                          1, path, os.path.getsize(root / path.lstrip("/")), n, region)
    files = [cached("/usr/bin/prog", 8192), cached("/usr/share/doc/pkg/copyright", 4096),
             cached("/usr/lib/x86_64-linux-gnu/libz.so.1", 0, region=True)]
    fs = [FilesystemCache("254:1", "ext4", "vda1", "/", False, 900, 2, 12288),
          FilesystemCache("259:0", "erofs", "pmem0", "/run/libshare/region", True, 40, 1, 0)]
    return PageCacheSurvey(name, "6.1.0-test", files, fs, inodes=940)


@pytest.fixture
def guests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = make_guest_tree(tmp_path)
    monkeypatch.setattr(api, "open_connection", lambda uri: object())
    monkeypatch.setattr(api, "running_group_domains", lambda conn, group: ["g1", "g2"])
    monkeypatch.setattr(pagecache, "survey_domain_page_cache",
                        lambda conn, name, **kw: _survey(name, root))
    return root


def run(capsys: pytest.CaptureFixture[str], state: Path, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["--state-dir", str(state), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_page_cache_tables_and_json(guests: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, tmp_path / "state", "survey", "--page-cache", "g1")
    assert rc == 0
    assert "/usr/bin/prog" in out and "FSTYPE" in out and "/run/libshare/region" in out
    rc, out, _ = run(capsys, tmp_path / "state", "survey", "--page-cache", "g1", "--json")
    doc: dict[str, Any] = json.loads(out)
    g = doc["domains"][0]
    assert g["cached_bytes"] == 12288 and g["files"][2]["served_by_region"] is True
    assert "forecast" not in doc


def test_forecast_per_policy(guests: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    import_tree(state / "store", [guests])
    rc, out, _ = run(capsys, state, "survey", "--page-cache", "--forecast", "web", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert [d["name"] for d in doc["domains"]] == ["g1", "g2"]      # the group's guests
    assert doc["forecast"]["partial"] is False and doc["forecast"]["failed"] == []
    pol = {p["policy"]: p for p in doc["forecast"]["policies"]}
    assert pol["libraries"]["stop_caching"] == 0
    assert pol["elf"]["stop_caching"] == 2 * 8192 and pol["elf"]["host_saves"] == 8192
    assert pol["usr"]["stop_caching"] == 2 * 12288 and pol["usr"]["host_holds"] == 12288
    rc, out, _ = run(capsys, state, "survey", "--page-cache", "--forecast", "web")
    assert rc == 0 and "HOST-SAVES" in out and "forecast for group web" in out


def test_forecast_needs_page_cache(guests: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, tmp_path / "state", "survey", "--forecast", "web")
    assert rc == 2 and "--page-cache" in err and err.count("\n") == 1
    rc, _, err = run(capsys, tmp_path / "state", "survey", "--page-cache", "--forecast", "b@d")
    assert rc == 2 and err.count("\n") == 1
