"""The forecast of what each policy would serve of what guests cache now."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from libshare.sharing.forecast import forecast, forecast_json
from libshare.sharing.store import import_tree
from tests.support.images import make_guest_tree


def _file(root: Path, path: str, cached: int, region: bool = False,
          size: int | None = None) -> SimpleNamespace:
    real = os.path.getsize(root / path.lstrip("/")) if size is None else size
    return SimpleNamespace(path=path, size=real, cached_bytes=cached,
                           served_by_region=region, mounted=True)


def test_each_policy_serves_what_it_holds_and_the_host_keeps_one_copy(tmp_path: Path) -> None:
    root = make_guest_tree(tmp_path)
    sdir = tmp_path / "store"
    import_tree(sdir, [root])
    lib = "/usr/lib/x86_64-linux-gnu/libz.so.1"
    a = SimpleNamespace(name="a", files=[
        _file(root, lib, 40960), _file(root, "/usr/bin/prog", 8192),
        _file(root, "/usr/share/doc/pkg/copyright", 4096), _file(root, "/etc/copyright", 4096),
        _file(root, "/usr/lib/x86_64-linux-gnu/libacl.so.1", 4096, region=True),
        SimpleNamespace(path="/var/log/x", size=10, cached_bytes=4096,
                        served_by_region=False, mounted=True)])
    b = SimpleNamespace(name="b", files=[
        _file(root, lib, 20480),
        _file(root, "/usr/bin/prog", 8192, size=1),       # another size: its own copy
        _file(root, "/usr/share/doc/pkg/copyright", 4096)])
    rows = {r.policy: r for r in forecast([a, b], sdir)}
    assert set(rows) == {"libraries", "elf", "usr", "observed"}
    libs, elf, usr = rows["libraries"], rows["elf"], rows["usr"]
    ga, gb = libs.guests
    # what each guest caches in its own RAM (the region's DAX file not counted)
    assert ga.cached == 40960 + 8192 + 4096 * 3 and gb.cached == 20480 + 8192 + 4096
    assert (ga.stop_caching, gb.stop_caching) == (40960, 20480)
    assert libs.host_holds == 40960 and libs.host_saves == 20480   # one copy, the largest
    assert [g.stop_caching for g in elf.guests] == [40960 + 8192, 20480]
    assert [g.stop_caching for g in usr.guests] == [40960 + 8192 + 4096, 20480 + 4096]
    assert usr.host_holds == 40960 + 8192 + 4096
    assert usr.region_bytes > elf.region_bytes > libs.region_bytes > 0
    # /etc/copyright: the same bytes, but no policy serves /etc
    assert rows["observed"].guests[0].stop_caching == 40960 + 8192 + 4096
    assert all(r.error is None for r in rows.values())
    assert rows["usr"].as_dict()["stop_caching"] == 40960 + 8192 + 4096 + 20480 + 4096


def test_a_policy_the_store_cannot_plan_says_why(tmp_path: Path) -> None:
    rows = {r.policy: r for r in forecast([], tmp_path / "empty")}
    assert rows["usr"].error is None and rows["usr"].region_bytes == 0
    rows = forecast([], tmp_path / "empty", trees=["abcdef"])
    assert all("no tree" in (r.error or "") for r in rows)


def test_json_is_partial_when_a_survey_is_partial_or_failed(tmp_path: Path) -> None:
    root = make_guest_tree(tmp_path)
    sdir = tmp_path / "store"
    import_tree(sdir, [root])
    whole = SimpleNamespace(name="a", partial=False, errors=[],
                            files=[_file(root, "/usr/bin/prog", 8192)])
    cut = SimpleNamespace(name="b", partial=True, errors=["inode list loops"], files=[])
    rows = forecast([whole], sdir, which=["elf"])
    doc = forecast_json("web", rows, [whole], [])
    assert doc["group"] == "web" and doc["partial"] is False and doc["failed"] == []
    assert [p["policy"] for p in doc["policies"]] == ["elf"]
    assert doc["policies"][0]["stop_caching"] == 8192
    doc = forecast_json("web", rows, [whole, cut], [])
    assert doc["partial"] is True and doc["errors"] == ["b: inode list loops"]
    assert forecast_json("web", rows, [whole], ["c: no BTF"])["partial"] is True
