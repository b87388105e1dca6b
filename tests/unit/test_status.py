"""``libshare status`` and redirect: the configured mode, the daemon's last outcome and
the guest's own view from its agent (or why it is unavailable), in JSON and tables."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from libshare import cli, status
from libshare.config import Config
from libshare.hook import state
from libshare.redirect import actions
from libshare.redirect.agent import AgentError, ExecResult, GuestAgent
from libshare.virt import api
from tests.support.domains import enrolled, plain
from tests.support.fakes import FakeAgent, FakeDomain

STATUS_OUT = ("region_mounted=1\ndax=1\nregion_device=/dev/pmem0\nbinds=412\n"
              "mode=runtime\nboot_mode=0\nboot_hook=1\n"
              "maps_region=950\nmaps_disk=12\nmaps_stale=0\n")


def domain(name: str, state_dir: Path | None, active: bool = True,
           mode: str = "runtime") -> FakeDomain:
    """Return fake domain ``name``, enrolled with redirect ``mode`` and ``state_dir``
    (its image missing), or not enrolled when ``state_dir`` is None."""
    xml = plain(name) if state_dir is None else enrolled(
        name, region=str(state_dir / "missing.img"), state_dir=str(state_dir), redirect=mode)
    return FakeDomain(name, xml, active)


def guest(alive: bool = True, installed: bool = True) -> FakeAgent:
    """Return the agent of a guest whose libshare-redirect answers ``status`` with
    STATUS_OUT (``installed``: the script is there)."""
    def handler(argv: list[str], stdin: bytes | None) -> ExecResult:
        if argv[:4] == ["/bin/sh", "-s", "--", "status"]:
            return ExecResult(0, STATUS_OUT.encode(), b"")
        if argv[0] == "/bin/sh" and argv[2].startswith("test -x"):
            return ExecResult(0 if installed else 1, b"", b"")
        raise AssertionError(f"unexpected {argv}")
    return FakeAgent(handler, alive=alive, name="g")


def test_guest_view_fields() -> None:
    agent = guest()
    view = status.guest_view(object(), agent_factory=lambda _d: agent, timeout=7.0)
    assert view == {"available": True, "installed": True, "mode": "runtime",
                    "boot_mode": False, "boot_hook": True, "region_mounted": True,
                    "dax": True, "region_device": "/dev/pmem0",
                    "files_redirected": 412, "maps_region": 950, "maps_disk": 12,
                    "maps_stale": 0, "boot_ran": None, "boot_via": None,
                    "boot_release": None, "boot_modules": None, "boot_refused": None,
                    "boot_rc": None, "installed_after_boot": None}
    assert max(agent.timeouts) <= 7.0


@pytest.mark.parametrize("exc", [AgentError("guest agent of g is not responding"),
                                 RuntimeError("libvirt went away")])
def test_guest_view_unavailable_never_raises(exc: Exception) -> None:
    def factory(_dom: Any) -> Any:
        raise exc
    view = status.guest_view(object(), agent_factory=factory)
    assert view["available"] is False and str(exc) in view["error"]
    silent = status.guest_view(object(), agent_factory=lambda _d: guest(False))
    assert silent == {"available": False, "error": "guest agent of g is not responding"}


def test_domain_status_redirect_fields(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(status, "guest_view",
                        lambda dom, timeout=0.0: asked.append(dom.name()) or {"available": True})
    cfg = Config(state_dir=tmp_path / "elsewhere")
    state.write_outcome(tmp_path, {"domain": "a", "ok": True, "time": 9.0, "error": None,
                                   "report": {"bound": 3, "binds_total": 5}})
    info = status.domain_status(domain("a", tmp_path), cfg, {}, agent=True)
    assert info["redirect"] == "runtime"
    assert info["auto_redirect"] == {"state": "ok", "time": 9.0, "error": None, "bound": 3,
                                     "binds_total": 5}
    assert info["guest"] == {"available": True} and asked == ["a"]
    # not asked: with agent=False, when shut off, when not enrolled
    assert status.domain_status(domain("a", tmp_path), cfg, {})["guest"] is None
    off = status.domain_status(domain("a", tmp_path, active=False), cfg, {}, agent=True)
    assert off["guest"] is None and off["auto_redirect"]["state"] == "ok"
    bare = status.domain_status(domain("p", None), cfg, {}, agent=True)
    assert bare["guest"] is None and bare["redirect"] is None
    assert bare["auto_redirect"] is None and asked == ["a"]


@pytest.fixture
def fake_libvirt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeAgent]:
    doms = [domain("a", tmp_path), domain("b", tmp_path, mode="off"),
            domain("c", tmp_path), domain("p", None, active=False)]
    agents = {"a": guest(), "b": guest(alive=False), "c": guest()}

    @contextmanager
    def connect(uri: str) -> Iterator[object]:
        yield object()

    monkeypatch.setattr(api, "connect", connect)
    monkeypatch.setattr(api, "all_domains", lambda conn: doms)
    monkeypatch.setattr(GuestAgent, "for_domain",
                        lambda dom, timeout=10: agents[dom.name()])
    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    state.write_request(tmp_path, {"domain": "c", "requested_at": 100.0})
    state.write_outcome(tmp_path, {"domain": "a", "ok": False, "time": 50.0,
                                   "error": "guest agent did not answer within 900 s"})
    return agents


def test_status_json(tmp_path: Path, fake_libvirt: dict[str, FakeAgent],
                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--state-dir", str(tmp_path), "status", "--no-introspect",
                     "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["domains"]}
    assert rows["a"]["redirect"] == "runtime" and rows["b"]["redirect"] == "off"
    assert rows["a"]["auto_redirect"]["state"] == "failed"
    assert rows["c"]["auto_redirect"]["state"] == "pending"
    assert rows["a"]["guest"]["files_redirected"] == 412
    assert rows["b"]["guest"] == {"available": False,
                                  "error": "guest agent of g is not responding"}
    assert rows["p"]["guest"] is None and rows["p"]["redirect"] is None


def test_status_table_and_no_agent(tmp_path: Path, fake_libvirt: dict[str, FakeAgent],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--state-dir", str(tmp_path), "status", "--no-introspect"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "REDIRECT" in lines[0]
    head = next(i for i, line in enumerate(lines) if line.startswith("DOMAIN  REDIRECT"))
    table = {line.split()[0]: line.split() for line in lines[head + 1:] if line.strip()}
    assert table["a"][1:3] == ["runtime", "failed"]
    # INSTALLED, BINDS MADE, MOUNTED, DAX, FILES REDIRECTED, MAPS REGION, MAPS DISK
    assert table["a"][-7:] == ["yes", "runtime", "yes", "yes", "412", "950", "12"]
    # BOOT, THIS BOOT: from the disk, and unknown (the agent does not answer)
    assert table["a"][5:7] == ["disk", "yes"]
    assert table["b"][1:6] == ["off", "-", "disk", "?", "unavailable"]
    assert table["c"][2] == "pending"
    assert "p" not in table
    assert "a: automatic redirect failed: guest agent did not answer" in err
    assert "b: guest view unavailable: guest agent of g is not responding" in err
    for agent in fake_libvirt.values():
        agent.timeouts.clear()
    assert cli.main(["--state-dir", str(tmp_path), "status", "--no-introspect",
                     "--no-agent", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["domains"]
    assert all(r["guest"] is None for r in rows)
    assert all(not a.timeouts for a in fake_libvirt.values())


def test_guest_status_passes_its_timeout() -> None:
    agent = guest()
    actions.guest_status(object(), agent_factory=lambda _d: agent, timeout=3.0)
    assert agent.timeouts == [3.0, 3.0]


# ------------------------------------------------------------------ this boot's binds

GUEST_OK = {"available": True, "installed": True, "mode": "none", "files_redirected": 0,
            "region_device": "/dev/pmem0", "dax": True, "boot_ran": False,
            "installed_after_boot": False}
DKB = {"direct_kernel": True, "libshare_initrd": None}
DKB_OURS = {"direct_kernel": True, "libshare_initrd": "/var/lib/libshare/boot/U/initrd.img"}


def _info(guest: dict[str, Any] | None = None, live: dict[str, Any] | None = None,
          nxt: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": "web1", "running": True, "enrolled": True, "live_device_present": True,
            "guest": {**GUEST_OK, **(guest or {})}, "live_boot": live or {},
            "boot": nxt or live or {}, "redirect": "off", "auto_redirect": None, **extra}


@pytest.mark.parametrize("info,binds,how,why", [
    (_info({"files_redirected": 412, "mode": "boot", "boot_ran": True}), True, "boot", None),
    (_info({"files_redirected": 412, "mode": "runtime", "boot_ran": True,
            "boot_refused": "no region device"}), True, "runtime",
     "boot-time apply refused: no region device"),
    (_info(live=DKB), False, None, "direct kernel boot: the guest's initramfs is not booted"
     " (run 'libshare guest install web1')"),
    (_info({"installed_after_boot": True}, live=DKB, nxt=DKB_OURS), False, None, "direct kernel boot: the guest's initramfs"
     " is not booted; libshare's initrd is booted from the next start: power-cycle"),
    (_info({"installed_after_boot": True}), False, None,
     "installed after this boot: power-cycle"),
    (_info({"boot_ran": True, "boot_refused": "DAX is not active on /dev/pmem0"}), False,
     None, "no DAX: DAX is not active on /dev/pmem0"),
    (_info({"region_device": None}), False, None, "region device missing in the guest "
     "(no /dev/pmem* with the region's label)"),
    (_info({"boot_ran": True, "boot_refused": "no region device", "boot_via": "host",
            "boot_modules": False, "boot_release": "6.1.0-51-amd64"}, live=DKB_OURS),
     False, None, "region device missing at boot (libshare's initrd has no modules for "
     "kernel 6.1.0-51-amd64: kernel updated on the host? run 'libshare guest install' "
     "again)"),
    (_info({"boot_ran": True, "boot_rc": 124}), False, None,
     "boot-time apply failed (exit 124)"),
    (_info({"installed": False}), False, None,
     "libshare-redirect is not installed in the guest ('libshare guest install web1')"),
    (_info(), False, None, "the initramfs this boot ran has no libshare hook (run "
     "'libshare guest install web1' and power-cycle)"),
    (_info(live_device_present=False), False, None, "the region device is attached at the "
     "next start (enrolled while running): power-cycle"),
    (_info(redirect="runtime", auto_redirect={"state": "failed", "error": "no agent"}),
     False, None, "the initramfs this boot ran has no libshare hook (run 'libshare guest "
     "install web1' and power-cycle); automatic runtime redirect failed: no agent"),
    ({**_info(), "guest": {"available": False, "error": "agent silent"}}, None, None,
     "guest agent: agent silent"),
])
def test_this_boot_says_whether_why_and_how(info: dict[str, Any], binds: bool | None,
                                            how: str | None, why: str | None) -> None:
    assert status.this_boot(info) == {"binds": binds, "how": how, "why": why}


def test_this_boot_only_for_running_enrolled_domains() -> None:
    assert status.this_boot(_info(running=False)) is None
    assert status.this_boot(_info(enrolled=False)) is None


def test_copies_are_counted_from_anonymous_pages(
        tmp_path: Path, fake_libvirt: dict[str, FakeAgent],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # a freshly built image's dirty page cache shows as Private_Dirty in its one
    # mapper: 30,780 kB of it and not one copy; copies are the Anonymous pages
    region = {"Rss": 30780, "Pss": 30780, "Shared_Clean": 0, "Private_Dirty": 30780,
              "Anonymous": 8, "mappings": 1}
    row = {"name": "a", "enrolled": True, "group": "g", "model": "nvdimm", "size": None,
           "digest": None, "region_ok": None, "redirect": None, "running": True,
           "memory": {"qemu_pid": 1, "guest_ram": {"Rss": 100},
                      "region_path": str(tmp_path / "none.img"), "region": region}}
    monkeypatch.setattr(status, "domain_status", lambda *a, **k: dict(row))
    host = status.host_memory([row, row])
    assert host["region_copied_kb"] == 16 and host["region_private_dirty_kb"] == 61560
    assert cli.main(["--state-dir", str(tmp_path), "status", "--no-agent"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if "GUEST RAM RSS" in line)
    assert head.split()[-2:] == ["COPIED", "kB"] and "PRIVATE COPIES" not in lines
    cells = lines[lines.index(head) + 1].split()
    assert cells[-2:] == ["30780", "8"]          # PRIVATE_DIRTY kB, COPIED kB
