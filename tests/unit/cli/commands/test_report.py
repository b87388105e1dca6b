"""``libshare report`` through the real CLI entry point: the table, ``--json``, the
Prometheus metrics (checked with prometheus_client's text-format parser), the PNG (a
valid PNG naming the domains), a clear failure when matplotlib is missing, and
``--forecast GROUP`` (the guests' page cache given; the walk itself is
tests/unit/introspect/test_pagecache.py)."""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from libshare import cli, report
from libshare.cli.commands import report as report_cmd
from libshare.config import Config
from libshare.errors import LibshareError
from libshare.introspect.pagecache import CachedFile, PageCacheSurvey
from libshare.sharing.store import import_tree
from libshare.virt import api
from tests.support.domains import enrolled
from tests.support.fakes import FakeConnection, FakeDomain
from tests.support.images import make_guest_tree
from tests.support.proc import qemu_maps, write_ksm, write_process

MiB = 1 << 20
ODD = 'web"1\\x'          # a domain name that needs escaping in a label value


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two running enrolled domains of group web on a fake /proc and KSM folder; returns
    the calls made to libvirt (connections opened)."""
    proc, region = tmp_path / "proc", str(tmp_path / "web.img")
    write_process(proc, 201, qemu_maps(256 * MiB, region, {"Rss": 9000, "Pss": 9000},
                                       {"Rss": 3000, "Pss": 1500}))
    write_process(proc, 202, qemu_maps(256 * MiB, region, {"Rss": 8000, "Pss": 8000},
                                       {"Rss": 3000, "Pss": 1500, "Anonymous": 4}))
    write_ksm(tmp_path / "ksm", run=0)
    doms = [FakeDomain("web-a", enrolled("web-a", region=region, group="web")),
            FakeDomain(ODD, enrolled("odd", region=region, group="web"))]
    doms[1]._name = ODD
    pids = {"web-a": 201, ODD: 202}
    opened: list[str] = []

    @contextmanager
    def connect(uri: str) -> Iterator[object]:
        opened.append(uri)
        yield FakeConnection(*doms)

    real = report.gather
    monkeypatch.setattr(api, "connect", connect)
    monkeypatch.setattr(api, "all_domains", lambda conn: doms)
    monkeypatch.setattr(report, "qemu_pid", lambda name: pids.get(name))
    monkeypatch.setattr(report, "gather", lambda conn, cfg, names=None, page_cache=False,
                        **kw: real(conn, cfg, names, page_cache, proc, tmp_path / "ksm", **kw))
    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    return opened


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["--state-dir", str(tmp_path / "state"), "report", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_and_json(fake_host: list[str], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, tmp_path)
    assert rc == 0
    assert "web-a" in out and "1.5 MiB" in out and "KSM: off" in out
    assert "4.0 KiB of region pages copied" in err and ODD in err   # copies are flagged
    rc, out, _ = run(capsys, tmp_path, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["groups"][0]["saved_bytes"] == 3000 * 1024


def parse_png(data: bytes) -> list[tuple[bytes, bytes]]:
    """Return the (type, data) chunks of PNG ``data``, checking signature and CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


def test_png_and_prometheus(fake_host: list[str], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from prometheus_client.parser import text_string_to_metric_families

    png, prom = tmp_path / "out" / "r.png", tmp_path / "out" / "libshare.prom"
    rc, _, _ = run(capsys, tmp_path, "--png", str(png), "--prometheus", str(prom))
    assert rc == 0
    chunks = parse_png(png.read_bytes())
    text = b"".join(body for kind, body in chunks if kind in (b"tEXt", b"iTXt"))
    assert b"web-a" in text and ODD.encode() in text
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width >= 600 and height >= 300
    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    saved = families["libshare_region_saved_bytes"]
    assert saved.type == "gauge"
    assert [(s.labels, s.value) for s in saved.samples] == [({"group": "web"}, 3000 * 1024)]
    copied = {s.labels["domain"]: s.value for s in families["libshare_region_copied_bytes"].samples}
    assert copied == {"web-a": 0, ODD: 4096}          # the odd name survives escaping
    assert families["libshare_ksm_running"].samples[0].value == 0
    assert "libshare_forecast_saved_bytes" not in families   # no --forecast, no family
    assert not list(prom.parent.glob(".libshare.prom.*"))   # no temporary left


def test_figure_names_every_domain(fake_host: list[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rep = report.gather(object(), Config(state_dir=tmp_path / "s"))
    fig = report_cmd.report_figure(rep)
    texts = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}
    assert {"web-a", ODD} <= texts


def test_png_without_matplotlib_fails_before_anything(fake_host: list[str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    prom = tmp_path / "m.prom"
    rc, out, err = run(capsys, tmp_path, "--png", str(tmp_path / "r.png"), "--prometheus",
                       str(prom))
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "matplotlib" in err and "libshare[bench]" in err
    assert fake_host == [] and not prom.exists() and not (tmp_path / "r.png").exists()


# ------------------------------------------------------------------ --forecast

@pytest.fixture
def cached(fake_host: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> dict[str, Any]:
    """The store holds a guest tree; each guest of ``fake_host`` caches two of its files
    (/usr/bin/prog, 8 KiB, and a /usr/share document, 4 KiB) and one file its region
    serves. Returns the settings: ``partial`` (names whose survey is partial), ``fail``
    (names whose survey fails) and ``walked`` (the names surveyed)."""
    root = make_guest_tree(tmp_path)
    import_tree(tmp_path / "state" / "store", [root])
    opts: dict[str, Any] = {"partial": set(), "fail": set(), "walked": []}

    def survey(conn: object, name: str, cfg: Config) -> PageCacheSurvey:
        opts["walked"].append(name)
        if name in opts["fail"]:
            raise LibshareError(f"{name}: cannot understand the guest kernel: no BTF")

        def f(path: str, n: int, region: bool = False) -> CachedFile:
            return CachedFile("254:1", "erofs" if region else "ext4", 1, path,
                              os.path.getsize(root / path.lstrip("/")), n, region)
        out = PageCacheSurvey(name, "6.1.0-test", [
            f("/usr/bin/prog", 8192), f("/usr/share/doc/pkg/copyright", 4096),
            f("/usr/lib/x86_64-linux-gnu/libz.so.1", 65536, region=True)])
        if name in opts["partial"]:
            out.error("inode list loops")
        return out

    monkeypatch.setattr(report, "_survey_page_cache", survey)
    return opts


def test_forecast_per_policy_in_json_text_and_metrics(
        cached: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    prom = tmp_path / "libshare.prom"
    rc, out, err = run(capsys, tmp_path, "--forecast", "web", "--json", "--prometheus",
                       str(prom))
    assert rc == 0, err
    fc = json.loads(out)["forecast"]
    assert cached["walked"] == ["web-a", ODD]          # the group's running guests
    assert fc["group"] == "web" and fc["partial"] is False and fc["failed"] == []
    pol = {p["policy"]: p for p in fc["policies"]}
    assert pol["libraries"]["stop_caching"] == 0
    assert pol["elf"]["stop_caching"] == 2 * 8192 and pol["elf"]["host_saves"] == 8192
    assert pol["usr"]["stop_caching"] == 2 * 12288 and pol["usr"]["host_holds"] == 12288
    assert [g["name"] for g in pol["usr"]["guests"]] == ["web-a", ODD]
    saved = {s.labels["policy"]: s.value for s in
             {f.name: f for f in text_string_to_metric_families(prom.read_text())}
             ["libshare_forecast_saved_bytes"].samples if s.labels["group"] == "web"}
    assert saved["elf"] == 8192 and saved["usr"] == 12288 and saved["libraries"] == 0
    rc, out, _ = run(capsys, tmp_path, "--forecast", "web")
    assert rc == 0
    assert "forecast for group web (KiB" in out and "HOST-SAVES" in out
    usr = next(line for line in out.splitlines() if line.startswith("usr "))
    assert usr.split()[2:4] == ["12/12", "12/12"]      # per guest: stops caching / caches
    rc, out, _ = run(capsys, tmp_path, "--json")
    assert rc == 0 and json.loads(out)["forecast"] is None and len(cached["walked"]) == 4


def test_forecast_of_named_domains(cached: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, tmp_path, "web-a", "--forecast", "web", "--json")
    assert rc == 0 and cached["walked"] == ["web-a"]
    pol = {p["policy"]: p for p in json.loads(out)["forecast"]["policies"]}
    assert pol["elf"]["stop_caching"] == 8192 and pol["elf"]["host_saves"] == 0


def test_a_partial_or_failed_survey_makes_the_forecast_partial(
        cached: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cached["partial"].add(ODD)
    rc, out, err = run(capsys, tmp_path, "--forecast", "web", "--json")
    fc = json.loads(out)["forecast"]
    assert rc == 1 and fc["partial"] is True and fc["failed"] == []
    assert fc["errors"] == [f"{ODD}: inode list loops"]
    assert f"libshare: forecast: {ODD}: inode list loops\n" in err
    cached["partial"].clear()
    cached["fail"].add(ODD)
    rc, out, err = run(capsys, tmp_path, "--forecast", "web")
    assert rc == 1 and "forecast for group web (partial)" in out
    assert f"libshare: forecast: {ODD}: {ODD}: cannot understand" in err
    usr = next(line for line in out.splitlines() if line.startswith("usr "))
    assert usr.split()[2:3] == ["12/12"]              # the guest that was read


def test_forecast_bad_group_no_guests_and_tree_alone(
        cached: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in (["--forecast", "b@d"], ["--forecast", ""], ["--tree", "x"]):
        rc, out, err = run(capsys, tmp_path, *argv)
        assert rc == 2 and out == "" and err.count("\n") == 1, (argv, err)
    assert cached["walked"] == []
    rc, out, err = run(capsys, tmp_path, "--forecast", "db")      # no guest of group db
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert "no running domains enrolled in group db" in err and cached["walked"] == []


def test_prometheus_text_skips_unknown_values() -> None:
    text = report_cmd.prometheus_text({
        "domains": [], "groups": [], "time": 1.0, "cost": {"cpu_seconds": 0.01},
        "host": {"domains": 0, "region_saved_bytes": 0, "region_copied_bytes": 0,
                 "ksm": {"available": False, "running": False, "counters": {},
                         "saved_bytes": 0, "ksmd_cpu_seconds": None}},
        "forecast": {"group": "web", "partial": False, "failed": [], "policies": [
            {"policy": "elf", "error": None, "host_saves": 8192},
            {"policy": "usr", "error": "no tree in the store", "host_saves": 0}]}})
    assert "ksm_running" not in text and "ksmd_cpu_seconds" not in text
    assert "# TYPE libshare_forecast_saved_bytes gauge\n" in text
    assert 'libshare_forecast_saved_bytes{group="web",policy="elf"} 8192\n' in text
    assert 'policy="usr"' not in text                  # a policy without figures
    assert "libshare_host_region_saved_bytes 0\n" in text
