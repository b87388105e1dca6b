"""``libshare report``'s figures from a hand-written /proc (smaps, ksm_stat) and KSM
sysfs folder, with fake libvirt domains; page-cache surveys as the walk returns them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libshare import report
from libshare.config import Config
from libshare.introspect.pagecache import CachedFile, PageCacheSurvey
from tests.support.domains import enrolled, plain
from tests.support.fakes import FakeConnection, FakeDomain
from tests.support.proc import qemu_maps, write_ksm, write_process

MiB = 1 << 20
RAM = 256 * MiB   # the NUMA cell of an enrolled tests.support.domains.plain guest
KB = 1024


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Three running domains (two of group web, one not enrolled) and one shut off, with
    their QEMUs' smaps under a fake /proc; KSM on."""
    proc, region = tmp_path / "proc", str(tmp_path / "web.img")
    # a: 4000 kB of region mapped, Pss 1500 (shared with b); b: 2000 kB, Pss 500; 8 kB copied
    write_process(proc, 101, qemu_maps(RAM, region, {"Rss": 90000, "Pss": 80000},
                                       {"Rss": 4000, "Pss": 1500, "Shared_Clean": 4000}),
                  ksm_stat="ksm_merging_pages 2500\nksm_process_profit 10000000\n")
    write_process(proc, 102, qemu_maps(RAM, region, {"Rss": 70000, "Pss": 70000},
                                       {"Rss": 2000, "Pss": 500, "Anonymous": 8}))
    write_process(proc, 103, qemu_maps(512 * MiB, None, {"Rss": 50000, "Pss": 40000}))
    write_ksm(tmp_path / "ksm", run=1, pages_shared=10, pages_sharing=4000)
    doms = [FakeDomain("a", enrolled("a", region=region, group="web")),
            FakeDomain("b", enrolled("b", region=region, group="web")),
            FakeDomain("c", plain("c", memory_mib=512)),
            FakeDomain("off", enrolled("off", region=region, group="web"), active=False)]
    pids = {"a": 101, "b": 102, "c": 103}
    monkeypatch.setattr(report, "qemu_pid", lambda name: pids.get(name))
    return {"conn": FakeConnection(*doms), "proc": proc, "ksm": tmp_path / "ksm",
            "region": region, "cfg": Config(state_dir=tmp_path / "state")}


def gather(host: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return report.gather(host["conn"], host["cfg"], proc=host["proc"], ksm_dir=host["ksm"], **kw)


def test_domains_groups_and_host(host: dict[str, Any]) -> None:
    rep = gather(host)
    rows = {r["name"]: r for r in rep["domains"]}
    assert sorted(rows) == ["a", "b", "c"]            # the shut-off domain is left out
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a["region"]["mapped_bytes"] == 4000 * KB and a["region"]["pss_bytes"] == 1500 * KB
    assert a["region"]["saved_bytes"] == 2500 * KB and a["region"]["copied_bytes"] == 0
    assert b["region"]["saved_bytes"] == 1500 * KB and b["region"]["copied_bytes"] == 8 * KB
    # guest RAM is the RAM-sized mapping, never the translation buffer (300 MiB resident)
    assert a["guest_ram"]["resident_bytes"] == 90000 * KB
    assert a["guest_ram"]["ksm_saved_bytes"] == 10000 * KB
    assert a["guest_ram"]["ksm_merging_pages"] == 2500
    assert c["region"] is None and c["group"] is None and not c["enrolled"]
    assert c["guest_ram"]["resident_bytes"] == 50000 * KB
    [web] = rep["groups"]
    assert web["group"] == "web" and web["domains"] == ["a", "b"]
    assert web["saved_bytes"] == (6000 - 2000) * KB          # sum of Rss - sum of Pss
    assert web["copied_bytes"] == 8 * KB and web["servable_bytes"] is None
    h = rep["host"]
    assert h["domains"] == 3 and h["enrolled"] == 2
    assert h["region_saved_bytes"] == 4000 * KB and h["region_copied_bytes"] == 8 * KB
    assert h["ksm_saved_bytes"] == 4000 * report.ksm.PAGE and h["ksm"]["running"]
    assert h["guests_ksm_saved_bytes"] == 20000 * KB
    assert h["private_servable_bytes"] is None
    assert rep["cost"]["cpu_seconds"] >= 0 and rep["skipped"] == []


def test_named_domains_and_shut_off_ones(host: dict[str, Any]) -> None:
    rep = gather(host, names=["b", "off"])
    assert [r["name"] for r in rep["domains"]] == ["b"] and rep["skipped"] == ["off"]
    assert rep["groups"][0]["saved_bytes"] == 1500 * KB


def cached(path: str | None, size: int, nbytes: int, region: bool = False,
           mounted: bool = True) -> CachedFile:
    return CachedFile("254:1", "erofs" if region else "ext4", 1, path, size, nbytes, region,
                      mounted)


def test_servable_counts_private_copies_of_region_files() -> None:
    files = {"/usr/lib/x86_64-linux-gnu/libc.so.6": 2000000, "/usr/lib/libz.so.1": 120000}
    got = report.servable([
        cached("/usr/lib/x86_64-linux-gnu/libc.so.6", 2000000, 1500000),   # servable
        cached("/usr/lib/x86_64-linux-gnu/libc.so.6", 2000000, 800000, region=True),
        cached("/usr/lib/libz.so.1", 99, 4096),                 # same path, other size
        cached("/usr/lib/libz.so.1 (deleted)", 120000, 8192),   # an old copy
        cached("/usr/lib/libz.so.1", 120000, 4096, mounted=False),
        cached(None, 10, 4096), cached("/var/log/syslog", 5000, 4096)], files)
    assert got == {"private_bytes": 1500000 + 4096 * 4 + 8192, "servable_bytes": 1500000,
                   "served_bytes": 800000}


def test_page_cache_survey_is_opt_in(host: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    walked: list[str] = []

    def survey(conn: Any, name: str, cfg: Config) -> PageCacheSurvey:
        walked.append(name)
        if name == "b":
            raise report.LibshareError("b: cannot understand the guest kernel: no BTF")
        return PageCacheSurvey(name, files=[cached("/usr/lib/libz.so.1", 120000, 65536)],
                               cpu_seconds=0.02)

    monkeypatch.setattr(report, "_survey_page_cache", survey)
    monkeypatch.setattr(report, "region_guest_files",
                        lambda path: {"/usr/lib/libz.so.1": 120000})
    assert gather(host)["domains"][0]["page_cache"] is None and walked == []
    rep = gather(host, page_cache=True)
    assert walked == ["a", "b"]                      # enrolled domains only
    rows = {r["name"]: r for r in rep["domains"]}
    assert rows["a"]["page_cache"]["servable_bytes"] == 65536
    assert "no BTF" in rows["b"]["page_cache"]["error"]
    assert rep["groups"][0]["servable_bytes"] == 65536
    assert rep["host"]["private_servable_bytes"] == 65536


def test_region_guest_files_of_an_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "junk.img").write_bytes(b"\0" * 8192)
    assert report.region_guest_files(str(tmp_path / "junk.img")) == {}
    assert report.region_guest_files(str(tmp_path / "missing.img")) == {}


def test_hugepage_guests_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, region = tmp_path / "proc", str(tmp_path / "web.img")
    write_process(proc, 301, qemu_maps(RAM, region, {"Private_Hugetlb": 200 * 1024},
                                       {"Rss": 100, "Pss": 50},
                                       ram_path="/dev/hugepages/libvirt/qemu/1-h/ram-node0",
                                       ram_page_kb=2048))
    write_ksm(tmp_path / "ksm")
    monkeypatch.setattr(report, "qemu_pid", lambda name: 301)
    monkeypatch.setattr(report, "_survey_page_cache", lambda *a: pytest.fail("read"))
    conn = FakeConnection(FakeDomain("h", enrolled("h", region=region, group="web")))
    rep = report.gather(conn, Config(state_dir=tmp_path / "s"), page_cache=True, proc=proc,
                        ksm_dir=tmp_path / "ksm", forecast="web")
    assert rep["forecast"]["partial"] and rep["forecast"]["failed"] == [
        f"h: {report.HUGEPAGES}"]                     # nor read for the forecast
    [row] = rep["domains"]
    assert row["guest_ram"]["hugetlb_bytes"] == 200 * MiB
    assert row["guest_ram"]["resident_bytes"] == 200 * MiB
    assert "hugepages" in row["page_cache"]["error"]


def test_forecast_reads_the_group_or_the_named_guests(host: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    walked: list[str] = []

    def survey(conn: Any, name: str, cfg: Config) -> PageCacheSurvey:
        walked.append(name)
        return PageCacheSurvey(name, files=[cached("/usr/lib/libz.so.1", 120000, 65536)])

    monkeypatch.setattr(report, "_survey_page_cache", survey)
    fc = gather(host, forecast="web")["forecast"]
    assert walked == ["a", "b"]                     # running and enrolled in web
    assert fc["group"] == "web" and not fc["partial"] and fc["failed"] == []
    assert [g["name"] for g in fc["policies"][0]["guests"]] == ["a", "b"]
    walked.clear()
    fc = gather(host, names=["c", "off"], forecast="web")["forecast"]
    assert walked == ["c"]                          # not enrolled yet: read all the same
    assert fc["partial"] and fc["failed"] == ["off: not running"]
    assert gather(host)["forecast"] is None and walked == ["c"]
    with pytest.raises(report.LibshareError, match="no running domains enrolled in group db"):
        gather(host, forecast="db")
    walked.clear()                          # --page-cache and --forecast: one walk each
    rep = gather(host, page_cache=True, forecast="web")
    assert walked == ["a", "b"], walked     # not a, b, a, b
    assert [g["name"] for g in rep["forecast"]["policies"][0]["guests"]] == ["a", "b"]
