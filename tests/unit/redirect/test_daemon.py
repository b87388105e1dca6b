"""Automatic runtime redirect: the hook's requests, ``libshare daemon`` serving them
against fake domains and agents (drop, wait, serve, give up, in parallel), outcome
files, ``auto_state``, and the systemd unit written into a temporary directory."""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from libshare.errors import LibshareError, RefusedError
from libshare.hook import handler, state
from libshare.redirect import actions, daemon, unit
from libshare.util.digest import sha256_file
from libshare.virt import api
from tests.support.domains import UUID, enrolled, plain
from tests.support.fakes import FakeAgent, FakeConnection, FakeDomain

MiB = 1 << 20


# ---------------------------------------------------------------------------- hook

@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    state_dir = tmp_path / "state"
    image = tmp_path / "region.img"
    image.write_bytes(b"\x01" * (2 * MiB))
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "libshare.toml"))
    (tmp_path / "libshare.toml").write_text(f'state_dir = "{state_dir}"\n')
    return {"state": state_dir, "image": image}


def hook_xml(image: Path, state_dir: Path, mode: str) -> bytes:
    return enrolled("h", region=str(image), size=image.stat().st_size,
                    digest=sha256_file(image), state_dir=str(state_dir), redirect=mode).encode()


def test_started_leaves_a_request_and_stopped_removes_it(env: dict[str, Path]) -> None:
    xml = hook_xml(env["image"], env["state"], "runtime")
    before = time.time()
    assert handler.run(["h", "started", "begin", "-"], xml) == 0
    req = state.read_request(env["state"], "h")
    assert req is not None and req["domain"] == "h" and req["uuid"] == UUID
    assert req["mode"] == "runtime" and "pid" in req and req["requested_at"] >= before - 1
    assert state.read_hook_log(env["state"])[-1]["result"] == "recorded; redirect requested"
    assert handler.run(["h", "stopped", "end", "-"], xml) == 0
    assert state.read_request(env["state"], "h") is None
    assert state.read_hook_log(env["state"])[-1]["result"] == "removed; request dropped"
    assert handler.run(["h", "started", "begin", "-"], xml) == 0
    assert handler.run(["h", "release", "end", "-"], xml) == 0
    assert state.read_requests(env["state"]) == []


def test_no_request_for_reconnect_or_mode_off(env: dict[str, Path]) -> None:
    runtime = hook_xml(env["image"], env["state"], "runtime")
    assert handler.run(["h", "reconnect", "begin", "-"], runtime) == 0
    off = hook_xml(env["image"], env["state"], "off")
    assert handler.run(["h", "started", "begin", "-"], off) == 0
    assert state.read_requests(env["state"]) == []
    assert state.read_hook_log(env["state"])[-1]["result"] == "recorded"


def test_started_never_fails_when_the_request_cannot_be_written(
        env: dict[str, Path]) -> None:
    xml = hook_xml(env["image"], env["state"], "runtime")
    env["state"].mkdir(exist_ok=True)
    (env["state"] / "requests").write_text("not a dir")
    assert handler.run(["h", "started", "begin", "-"], xml) == 0
    entry = state.read_hook_log(env["state"])[-1]
    assert entry["status"] == 0 and entry["result"].startswith("failed:")
    assert "not a folder" in entry["result"]
    # a failed running record does not prevent the request
    (env["state"] / "requests").unlink()
    shutil.rmtree(env["state"] / "running")
    (env["state"] / "running").write_text("not a dir")
    assert handler.run(["h", "started", "begin", "-"], xml) == 0
    assert state.read_request(env["state"], "h") is not None


# ---------------------------------------------------------------------------- fakes

def enrolled_domain(name: str, active: bool = True, mode: str = "runtime",
                    uuid: str = UUID) -> FakeDomain:
    """Return a fake domain ``name`` enrolled with automatic redirect ``mode``."""
    return FakeDomain(name, enrolled(name, base=plain(name, uuid=uuid), redirect=mode),
                      active, uuid)


class Guests:
    """Scripted actions.installed/install/redirect, per domain name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, installed: bool = True) -> None:
        self.agents: dict[str, FakeAgent] = {}
        self.installed: dict[str, bool] = {}
        self.default_installed = installed
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: dict[str, Exception] = {}
        self.gate: dict[str, threading.Event] = {}
        monkeypatch.setattr(actions, "installed", self._installed)
        monkeypatch.setattr(actions, "install", self._install)
        monkeypatch.setattr(actions, "redirect", self._redirect)

    def agent(self, dom: Any) -> FakeAgent:
        return self.agents.setdefault(dom.name(), FakeAgent())

    def _name(self, agent: Any) -> str:
        return next(n for n, a in self.agents.items() if a is agent)

    def _installed(self, agent: Any, timeout: float = 30.0) -> bool:
        return self.installed.get(self._name(agent), self.default_installed)

    def _install(self, dom: Any, agent_factory: Any = None,
                 update_initramfs: bool = True) -> actions.InstallReport:
        self.calls.append((dom.name(), "install", update_initramfs))
        assert agent_factory(dom) is self.agents[dom.name()]
        self.installed[dom.name()] = True
        return actions.InstallReport(domain=dom.name(), region_device="/dev/pmem0",
                                      files=["/usr/sbin/libshare-redirect"])

    def _redirect(self, dom: Any, restart: bool = True,
                  agent_factory: Any = None) -> actions.RedirectReport:
        self.calls.append((dom.name(), "redirect", restart))
        if dom.name() in self.gate:
            assert self.gate[dom.name()].wait(10)
        if dom.name() in self.fail:
            raise self.fail[dom.name()]
        return actions.RedirectReport(domain=dom.name(), action="redirect", bound=40,
                                       binds_total=40, restarted=["cron.service"])


def request(state_dir: Path, name: str, at: float | None = None) -> dict[str, Any]:
    req = {"domain": name, "uuid": UUID, "pid": 123, "mode": "runtime",
           "requested_at": time.time() if at is None else at}
    state.write_request(state_dir, req)
    return req


def make(tmp_path: Path, conn: FakeConnection, guests: Guests, **kw: Any) -> daemon.Daemon:
    return daemon.Daemon(tmp_path, lambda: conn, agent_factory=guests.agent,
                         err=io.StringIO(), **kw)


# ---------------------------------------------------------------------------- daemon

def test_serves_a_request_installing_first(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch, installed=False)
    d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests)
    request(tmp_path, "a")
    assert d.serve(once=True) == 0
    assert guests.calls == [("a", "install", False), ("a", "redirect", True)]
    assert state.read_requests(tmp_path) == []
    out = state.read_outcome(tmp_path, "a")
    assert out is not None and out["ok"] is True and out["status"] == "ok"
    assert out["installed_now"] is True and out["report"]["bound"] == 40
    assert out["install"]["files"] == ["/usr/sbin/libshare-redirect"]
    assert out["error"] is None and out["time"] > 0 and out["uuid"] == UUID
    assert [r.action for r in d.results] == ["ok"]
    log = state.read_log(state.daemon_log_path(tmp_path))
    assert [e["event"] for e in log] == ["serving", "ok"]
    assert "a: redirected: 40 libraries bound now" in d.err.getvalue()  # type: ignore[union-attr]


def test_installed_guest_is_only_redirected(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch, installed=True)
    d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests)
    request(tmp_path, "a")
    assert d.serve(once=True) == 0
    assert guests.calls == [("a", "redirect", True)]
    assert state.read_outcome(tmp_path, "a")["installed_now"] is False  # type: ignore[index]


@pytest.mark.parametrize("case,why", [
    ("gone", "the domain is gone"),
    ("other-uuid", "the domain is gone"),
    ("stopped", "the domain is not running"),
    ("mode-off", "automatic redirect is now off"),
])
def test_drops_requests_it_cannot_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        case: str, why: str) -> None:
    guests = Guests(monkeypatch)
    doms = {"gone": [], "other-uuid": [enrolled_domain("a", uuid="other")],
            "stopped": [enrolled_domain("a", active=False)], "mode-off": [enrolled_domain("a", mode="off")]}
    d = make(tmp_path, FakeConnection(*doms[case]), guests)
    request(tmp_path, "a")
    assert d.serve(once=True) == 0
    assert state.read_requests(tmp_path) == [] and state.read_outcome(tmp_path, "a") is None
    assert guests.calls == [] and d.results[0].action == "dropped"
    assert why in d.results[0].message
    assert state.read_log(state.daemon_log_path(tmp_path))[-1]["event"] == "dropped"


def test_keeps_a_request_while_the_agent_is_silent_then_gives_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    guests.agents["a"] = FakeAgent(alive=False)
    now = [1000.0]
    d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests, wait=900.0, clock=lambda: now[0])
    request(tmp_path, "a", at=1000.0)
    for t in (1000.0, 1300.0, 1899.0):   # a new daemon each time: "waiting" logged
        now[0] = t
        assert d.serve(once=True) == 0
        assert d.results[-1].action == "waiting"
        d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests, wait=900.0,
                 clock=lambda: now[0])
        assert state.read_request(tmp_path, "a") is not None
    assert sum(c[0] == "ping" for c in guests.agents["a"].calls) == 3
    now[0] = 1900.0
    assert d.serve(once=True) == 1
    assert state.read_request(tmp_path, "a") is None
    out = state.read_outcome(tmp_path, "a")
    assert out is not None and out["ok"] is False and out["status"] == "failed"
    assert "did not answer within 900 s" in out["error"]
    assert guests.calls == []
    events = [e["event"] for e in state.read_log(state.daemon_log_path(tmp_path))]
    assert events.count("waiting") == 3 and events[-1] == "failed"


def test_waiting_is_logged_once_per_daemon(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    guests.agents["a"] = FakeAgent(alive=False)
    d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests)
    request(tmp_path, "a")
    d.run_pass()[0].result()
    d.run_pass()[0].result()
    assert [e["event"] for e in state.read_log(state.daemon_log_path(tmp_path))] == \
        ["waiting"]
    guests.agents["a"].alive = True
    assert d.serve(once=True) == 0
    assert state.read_outcome(tmp_path, "a")["ok"] is True  # type: ignore[index]


@pytest.mark.parametrize("exc", [RefusedError("a: no library region device"),
                                 LibshareError("a: libshare-redirect apply failed"),
                                 RuntimeError("boom")])
def test_a_failed_redirect_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       exc: Exception) -> None:
    guests = Guests(monkeypatch)
    guests.fail["a"] = exc
    d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests)
    request(tmp_path, "a")
    assert d.serve(once=True) == 1
    out = state.read_outcome(tmp_path, "a")
    assert out is not None and out["ok"] is False and str(exc) in out["error"]
    assert state.read_requests(tmp_path) == []
    assert [f.domain for f in d.failures] == ["a"]


def test_a_newer_request_written_meanwhile_is_kept(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    guests.gate["a"] = threading.Event()
    d = make(tmp_path, FakeConnection(enrolled_domain("a")), guests)
    request(tmp_path, "a", at=1.0)
    fut = d.run_pass()[0]
    while not guests.calls:
        time.sleep(0.01)
    assert d.run_pass() == []          # in hand: not started twice
    request(tmp_path, "a", at=2.0)     # the guest restarted: the hook wrote a new one
    guests.gate["a"].set()
    assert fut.result().action == "ok"
    assert state.read_request(tmp_path, "a")["requested_at"] == 2.0  # type: ignore[index]


def test_one_slow_guest_does_not_hold_up_others(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    guests.gate["slow"] = threading.Event()
    d = make(tmp_path, FakeConnection(enrolled_domain("slow"), enrolled_domain("fast")), guests, jobs=2)
    request(tmp_path, "slow")
    request(tmp_path, "fast")
    futures = d.run_pass()
    deadline = time.monotonic() + 10
    while state.read_outcome(tmp_path, "fast") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.read_outcome(tmp_path, "fast")["ok"] is True  # type: ignore[index]
    assert state.read_outcome(tmp_path, "slow") is None
    guests.gate["slow"].set()
    for f in futures:
        f.result(timeout=10)
    assert state.read_outcome(tmp_path, "slow")["ok"] is True  # type: ignore[index]


def test_until_idle_serves_late_answers_and_exits(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    guests.agents["late"] = FakeAgent(alive=False)
    d = make(tmp_path, FakeConnection(enrolled_domain("late"), enrolled_domain("a")), guests)
    request(tmp_path, "late")
    request(tmp_path, "a")
    threading.Timer(0.3, lambda: setattr(guests.agents["late"], "alive", True)).start()
    assert d.serve(until_idle=True, poll=0.05) == 0
    assert sorted(r.domain for r in d.results if r.action == "ok") == ["a", "late"]
    assert state.read_requests(tmp_path) == []


def test_unreadable_request_is_removed(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    d = make(tmp_path, FakeConnection(), guests)
    state.requests_dir(tmp_path).mkdir(parents=True)
    (state.requests_dir(tmp_path) / "x.json").write_text("{not json")
    assert d.serve(until_idle=True, poll=0.01) == 0
    assert not (state.requests_dir(tmp_path) / "x.json").exists()


def test_lost_connection_keeps_the_request_and_reconnects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)
    conns = [FakeConnection(enrolled_domain("a"), alive=False), FakeConnection(enrolled_domain("a"))]
    opened: list[FakeConnection] = []

    def connect() -> FakeConnection:
        opened.append(conns[len(opened)])
        return opened[-1]

    d = daemon.Daemon(tmp_path, connect, agent_factory=guests.agent, err=io.StringIO())
    request(tmp_path, "a")
    assert d.run_pass()[0].result().action == "waiting"
    assert state.read_request(tmp_path, "a") is not None
    assert d.serve(once=True) == 0
    assert len(opened) == 2 and opened[0].closed


def test_libvirt_unreachable_is_one_error(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    guests = Guests(monkeypatch)

    def connect() -> Any:
        raise LibshareError("cannot connect to libvirt at test:///x: no")

    request(tmp_path, "a")
    d = daemon.Daemon(tmp_path, connect, agent_factory=guests.agent, err=io.StringIO())
    with pytest.raises(LibshareError, match="cannot connect"):
        d.serve(once=True)
    # forever: logged and retried until stopped
    d = daemon.Daemon(tmp_path, connect, agent_factory=guests.agent, err=io.StringIO())
    threading.Timer(0.2, d.stop).start()
    assert d.serve(poll=0.05) == 0
    assert "retrying" in d.err.getvalue()  # type: ignore[union-attr]


def test_sigterm_stops_the_cli_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from libshare import cli

    guests = Guests(monkeypatch)
    conn = FakeConnection(enrolled_domain("a"))
    monkeypatch.setattr(api, "opener", lambda uri: lambda: conn)
    monkeypatch.setattr(daemon.GuestAgent, "for_domain", guests.agent)
    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    request(tmp_path, "a")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    before = signal.getsignal(signal.SIGTERM)
    try:
        status = cli.main(["--state-dir", str(tmp_path), "daemon", "--poll", "0.05",
                           "--json"])
    finally:
        timer.cancel()
    assert status == 0 and signal.getsignal(signal.SIGTERM) == before
    assert '"domain": "a"' in capsys.readouterr().out
    assert state.read_outcome(tmp_path, "a")["ok"] is True  # type: ignore[index]


def test_cli_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from libshare import cli

    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    for argv in (["daemon", "--poll", "0"], ["daemon", "--jobs", "0"],
                 ["daemon", "--once", "--until-idle"]):
        assert cli.main(["--state-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("libshare")


# ---------------------------------------------------------------------------- status

def test_auto_state(tmp_path: Path) -> None:
    assert daemon.auto_state(tmp_path, "a") is None
    state.write_outcome(tmp_path, {"domain": "a", "ok": False, "time": 5.0,
                                   "error": "no agent", "report": None})
    assert daemon.auto_state(tmp_path, "a") == {
        "state": "failed", "time": 5.0, "error": "no agent", "bound": None,
        "binds_total": None}
    request(tmp_path, "a", at=7.0)
    auto = daemon.auto_state(tmp_path, "a")
    assert auto is not None and auto["state"] == "pending" and auto["time"] == 7.0
    assert auto["last"]["state"] == "failed"


# ---------------------------------------------------------------------------- unit

def test_unit_install_update_uninstall(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def runner(argv: list[str]) -> int:
        ran.append(argv)
        return 0

    res = unit.install_unit(tmp_path, python="/opt/py/bin/python3",
                              extra_args=["--config", "/etc/x y.toml"], runner=runner,
                              systemd=True, state_dir=tmp_path / "s")
    text = (tmp_path / unit.UNIT_NAME).read_text()
    assert res.action == "installed" and res.systemd == "daemon-reload done"
    assert ('ExecStart=/opt/py/bin/python3 -m libshare --config "/etc/x y.toml" daemon\n'
            in text)
    assert "After=libvirtd.service" in text and "Restart=on-failure" in text
    assert "WantedBy=multi-user.target" in text and "@" not in text.split("ExecStart")[1][:3]
    assert ran == [["systemctl", "daemon-reload"]]
    assert (tmp_path / "s").is_dir()  # ReadWritePaths needs it
    assert unit.install_unit(tmp_path, python="/opt/py/bin/python3",
                               extra_args=["--config", "/etc/x y.toml"], runner=runner,
                               systemd=True, state_dir=tmp_path / "s").action == "unchanged"
    res = unit.install_unit(tmp_path, runner=runner, systemd=False, state_dir=tmp_path / "s")
    assert res.action == "updated" and "not running" in res.systemd
    assert f"ExecStart={os.path.abspath(__import__('sys').executable)} -m libshare daemon" \
        in (tmp_path / unit.UNIT_NAME).read_text()
    ran.clear()
    res = unit.uninstall_unit(tmp_path, runner=runner, systemd=True)
    assert res.action == "removed" and not (tmp_path / unit.UNIT_NAME).exists()
    assert ran == [["systemctl", "disable", "--now", unit.UNIT_NAME],
                   ["systemctl", "daemon-reload"]]
    assert unit.uninstall_unit(tmp_path, runner=runner, systemd=True).action == "absent"


def test_unit_not_ours_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / unit.UNIT_NAME).write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(LibshareError, match="not written by libshare"):
        unit.install_unit(tmp_path, systemd=False, state_dir=tmp_path / "s")
    with pytest.raises(LibshareError, match="not written by libshare"):
        unit.uninstall_unit(tmp_path, systemd=False)
    assert (tmp_path / unit.UNIT_NAME).read_text().startswith("[Service]")


def test_unit_cli_with_unit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from libshare import cli

    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    monkeypatch.setattr(unit, "systemd_running", lambda: False)
    units = tmp_path / "units"
    assert cli.main(["--state-dir", str(tmp_path / "s"), "daemon", "install",
                     "--unit-dir", str(units)]) == 0
    out = capsys.readouterr().out
    assert "installed; systemd is not running here" in out
    assert f"--state-dir {tmp_path / 's'} daemon" in (units / unit.UNIT_NAME).read_text()
    assert cli.main(["daemon", "uninstall", "--unit-dir", str(units), "--json"]) == 0
    assert '"action": "removed"' in capsys.readouterr().out


def test_unit_template_is_package_data() -> None:
    from libshare.data import host_text

    assert "{{ exec_start }}" in host_text(unit.UNIT_NAME)


def test_unit_renders_with_jinja2() -> None:
    text = unit.render_unit("/opt/py bin/python3", ["--state-dir", '/s "q"'],
                            state_dir='/s "q"')
    assert 'ExecStart="/opt/py bin/python3" -m libshare --state-dir "/s \\"q\\"" daemon\n' \
        in text
    assert 'ReadWritePaths="/s \\"q\\""\n' in text
    assert "SyslogIdentifier=libshare\n" in text and "ProtectHome=yes\n" in text
    # no HTML escaping, nothing left over
    text = unit.render_unit("/usr/bin/python3", ["--config", "/a&b<c>.toml"])
    assert '"/a&b<c>.toml"' in text and "{{" not in text
    # an interpreter in a home directory (a venv over pyenv in /root) stays readable
    assert "ProtectHome=read-only\n" in unit.render_unit("/root/.venv/bin/python3")


def exposure(text: str, tmp_path: Path) -> float:
    """Return what ``systemd-analyze security --offline=true`` rates unit ``text``."""
    import re
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    path = tmp_path / unit.UNIT_NAME
    path.write_text(text)
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    if found is None:
        pytest.skip(f"systemd-analyze cannot rate a unit here: {res.stderr.strip()[:200]}")
    return float(found.group(1))


@pytest.mark.parametrize("python", ["/opt/libshare/venv/bin/python3", "/root/.venv/bin/python3"])
def test_unit_exposure_is_low(tmp_path: Path, python: str) -> None:
    """The rendered unit is hardened: 9.6 UNSAFE before, at most EXPOSURE_GOAL now."""
    text = unit.render_unit(python, ["--state-dir", "/var/lib/libshare"])
    assert exposure(text, tmp_path) <= unit.EXPOSURE_GOAL


def test_unit_template_refuses_an_unknown_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import jinja2

    monkeypatch.setattr(unit, "unit_template", lambda: "ExecStart={{ exec_strat }}\n")
    with pytest.raises(jinja2.UndefinedError):
        unit.render_unit()


def test_daemon_lines_carry_journal_priorities(tmp_path: Path) -> None:
    """Under its unit (SyslogIdentifier=libshare) the daemon's stderr is the journal:
    each line then starts with its syslog priority, so a failure is an error there."""
    import json
    import subprocess
    import sys

    (tmp_path / "requests").mkdir()
    (tmp_path / "requests" / "bad.json").write_text("garbage")
    (tmp_path / "requests" / "gone.json").write_text(json.dumps(
        {"domain": "gone", "requested_at": time.time()}))
    errfile = tmp_path / "stderr"
    with open(errfile, "wb") as fh:
        st = os.fstat(fh.fileno())
        res = subprocess.run([sys.executable, "-m", "libshare", "--state-dir", str(tmp_path),
                              "-c", "test:///default", "daemon", "--once"], stderr=fh,
                             stdout=subprocess.DEVNULL, timeout=60,
                             env={**os.environ, "LIBSHARE_CONFIG": "",
                                  "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    lines = errfile.read_text().splitlines()
    assert res.returncode == 0, lines
    assert any(x.startswith("<4>libshare daemon: bad: unreadable request") for x in lines), lines
    assert any(x.startswith("<6>libshare daemon: gone: request dropped") for x in lines), lines
    # not the journal: plain lines
    d = daemon.Daemon(tmp_path, lambda: None, err=io.StringIO())
    d.log("x", daemon.FAILED, "redirect failed: boom")
    assert d.err.getvalue() == "libshare daemon: x: redirect failed: boom\n"  # type: ignore[union-attr]
