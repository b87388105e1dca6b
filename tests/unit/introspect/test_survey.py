"""Survey aggregation and JSON shape (no guest needed)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from libshare.cli.app import build_parser
from libshare.introspect.cache import CACHE_MAX_AGE, prune_cache
from libshare.introspect.survey import DomainSurvey, Library, summarize, to_json
from libshare.virt import api


def _dom(name: str, libs: list[Library]) -> DomainSurvey:
    return DomainSurvey(name, kernel="6.1.0-56-amd64", tasks=3, task_list=[(1, "init", "init")],
                        libraries=libs)


def test_summarize_counts_copies_and_savings_largest_first() -> None:
    a = _dom("a", [Library("/lib/libc.so.6", "aa", 300, 280),
                   Library("/lib/libz.so.1", "zz", 20, 18),
                   Library("/opt/x.so", None, 5, 5)])
    b = _dom("b", [Library("/usr/lib/libc.so.6", "aa", 250, 240),  # same build-id
                   Library("/opt/x.so", None, 7, 7)])
    libs = summarize([a, b])
    assert [g["build_id"] for g in libs] == ["aa", None, "zz"]
    libc = libs[0]
    assert libc["copies"] == 2 and libc["domains"] == ["a", "b"]
    assert libc["resident_pages"] == 550
    assert libc["saved_bytes"] == 240 * 4096  # all shareable copies but the largest
    assert libs[1]["saved_bytes"] == 5 * 4096  # unknown build-id: grouped by path
    assert libs[2]["saved_bytes"] == 0  # one copy saves nothing


def test_json_shape() -> None:
    doc = to_json([_dom("a", [Library("/lib/libc.so.6", "aa", 300, 280)])])
    d = doc["domains"][0]
    assert {"name", "kernel", "tasks", "libraries"} <= set(d)
    assert d["tasks"] == 3 and d["task_list"] == [{"pid": 1, "comm": "init", "name": "init"}]
    assert d["libraries"][0]["path"] == "/lib/libc.so.6"
    assert {"path", "build_id", "resident_pages"} <= set(d["libraries"][0])
    assert doc["total_saved_bytes"] == 0


def test_cli_registers_survey() -> None:
    args = build_parser().parse_args(["survey", "dom1", "dom2", "--json", "--pause",
                                      "-c", "qemu:///session"])
    assert args.domains == ["dom1", "dom2"] and args.json and args.pause
    assert args.connect == "qemu:///session" and args.backend == "proc"


def test_prune_cache(tmp_path: Path) -> None:
    old, fresh, other = tmp_path / "old.json", tmp_path / "fresh.json", tmp_path / "x.txt"
    for f in (old, fresh, other):
        f.write_text("{}")
    past = time.time() - CACHE_MAX_AGE - 60
    os.utime(old, (past, past))
    prune_cache(tmp_path)
    assert not old.exists() and fresh.exists() and other.exists()


def test_survey_domain_marks_a_watchdog_resume_partial(monkeypatch: Any) -> None:
    """When --pause's watchdog resumed the guest before the walk ended, the result is
    not an exact snapshot: partial, with an error saying why."""
    import contextlib
    from collections.abc import Iterator

    from libshare.introspect import qemu, session
    from libshare.introspect import survey as sv
    from libshare.introspect.memory import BytesMemory

    class Dom:
        def name(self) -> str:
            return "g"

        def UUIDString(self) -> str:
            return "u"

    expire = [True]

    @contextlib.contextmanager
    def fake_paused(dom: Any, timeout: float) -> Iterator[qemu.PauseState]:
        state = qemu.PauseState(timeout)
        yield state
        state.expired = expire[0]

    monkeypatch.setattr(api, "running_domain", lambda conn, name: Dom())
    monkeypatch.setattr(qemu, "open_memory", lambda dom, backend: BytesMemory(bytes(4096)))
    monkeypatch.setattr(qemu, "qemu_pid", lambda dom: 1)
    monkeypatch.setattr(qemu, "paused", fake_paused)
    monkeypatch.setattr(session, "understand", lambda *a: (None, False))
    monkeypatch.setattr(session, "Kernel", lambda mem, info: None)
    monkeypatch.setattr(sv, "walk_with_retries", lambda k, name, retries: DomainSurvey(name))
    out = sv.survey_domain(None, "g", pause=True, pause_timeout=7)
    assert out.partial and "resumed after 7 s" in out.errors[0]
    expire[0] = False
    out = sv.survey_domain(None, "g", pause=True, pause_timeout=7)
    assert not out.partial and not out.errors


def test_cli_table_shows_each_domains_libraries(monkeypatch: Any, capsys: Any) -> None:
    """Without --json the output still shows, per domain, every library's build-id and
    resident pages; a partial survey is marked and exits 1."""
    from libshare.cli.commands import survey as cmd
    from libshare.config import Config
    from libshare.introspect import survey as sv

    doms = {"a": _dom("a", [Library("/lib/libc.so.6", "aabbccddeeff00112233", 300, 280, 4, 2),
                            Library("/opt/x.so", None, 5, 5, 1, 1)]),
            "b": _dom("b", [Library("/lib/libc.so.6", "aabbccddeeff00112233", 250, 240)])}
    doms["b"].partial = True
    doms["b"].errors = ["3 page-table entries point outside RAM"]
    monkeypatch.setattr(api, "open_connection", lambda uri: None)
    monkeypatch.setattr(sv, "survey_domain", lambda conn, name, **kw: doms[name])
    args = build_parser().parse_args(["survey", "a", "b"])
    rc = cmd.run(args, Config())
    out, err = capsys.readouterr()
    lines = out.splitlines()
    a_at = next(i for i, line in enumerate(lines) if line.startswith("a ("))
    b_at = next(i for i, line in enumerate(lines) if line.startswith("b ("))
    assert "partial" in lines[b_at] and "partial" not in lines[a_at]
    a_rows = [line.split() for line in lines[a_at:b_at]]
    assert ["/lib/libc.so.6", "aabbccddeeff0011", "300", "280", "4", "2"] in a_rows
    assert ["/opt/x.so", "-", "5", "5", "1", "1"] in a_rows
    assert any(line.split()[:3] == ["/lib/libc.so.6", "aabbccddeeff0011", "250"]
               for line in lines[b_at:])
    assert "b: 3 page-table entries point outside RAM" in err
    assert rc == 1
