"""Host side of redirect (libshare.redirect.actions and its commands) against fake domains and
a scripted fake guest agent: refusals change nothing, reports parse the guest's output."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from libshare.errors import LibshareError, RefusedError
from libshare.redirect import actions
from libshare.redirect.agent import AgentError, ExecResult
from tests.support.domains import enrolled
from tests.support.fakes import FakeAgent, FakeDomain

BASE = """<domain type='qemu'><name>g1</name><memory unit='MiB'>512</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""


def enrolled_xml() -> str:
    return enrolled(base=BASE, region="/var/lib/libshare/regions/groups/web.img",
                    group="web")


Handler = Callable[[list[str], bytes | None], ExecResult]
GRUB_FACTS = ("boot_image=/vmlinuz\ngrub=1\nrelease=6.1.0-50-amd64\nmodules=1\n"
              "generator=initramfs-tools\n")


def ok(out: str = "", rc: int = 0) -> ExecResult:
    return ExecResult(rc=rc, stdout=out.encode(), stderr=b"")


def guest(probe_out: str = "region_device=/dev/pmem0\ndax=1\nmanifest_lines=40\n",
          installed: bool = True, apply_out: str = "", uninstall_out: str = ""
          ) -> Handler:
    pids: list[str] = []

    def handle(argv: list[str], stdin: bytes | None) -> ExecResult:
        if argv[:4] == ["/bin/sh", "-s", "--", "probe"]:
            assert stdin == actions.script_bytes()
            return ok(probe_out)
        if argv[:4] == ["/bin/sh", "-s", "--", "facts"]:   # a GRUB guest (boot-files)
            return ok(GRUB_FACTS)
        if argv[0] == "/bin/sh" and argv[2].startswith("test -x"):
            return ok(rc=0 if installed else 1)
        if argv[:2] == [actions.SCRIPT, "apply"]:
            return ok(apply_out)
        if argv[:2] == [actions.SCRIPT, "prime"]:
            return ok("identical=412\ndiffers=/usr/lib/x/libacl.so.1\nhashed=413\n")
        if argv[:2] == [actions.SCRIPT, "uninstall"]:
            return ok(uninstall_out)
        if "lsinitramfs" in " ".join(argv):
            return ok("7\n")
        if argv[:2] == ["systemctl", "show"]:
            pids.append(str(100 + len(pids)))       # a new agent PID on every look
            return ok(pids[-1] + "\n")
        return ok()
    return handle


def factory(agent: FakeAgent) -> Callable[[Any], Any]:
    return lambda _dom: agent


def test_parse_kv() -> None:
    kv = actions.parse_kv("bound=2\ndiffers=/a\nlog line\ndiffers=/b c\nx y=1\nrefused=no DAX\n")
    assert kv == {"bound": "2", "differs": ["/a", "/b c"], "refused": "no DAX"}


@pytest.mark.parametrize("case,match", [
    ("shut off", "is not running"),
    ("not enrolled", "has no library region device"),
    ("no agent", "no responding guest agent"),
    ("no dax", "DAX is not active"),
    ("no device in guest", "no region device"),
])
def test_refusals_change_nothing(case: str, match: str) -> None:
    xml = BASE if case == "not enrolled" else enrolled_xml()
    dom = FakeDomain("g1", xml, active=case != "shut off")
    probe = {"no dax": "region_device=/dev/pmem0\ndax=0\nrefused=DAX is not active on "
                       "/dev/pmem0 (sharing would cost memory)\n",
             "no device in guest": "refused=no region device (no /dev/pmem* with "
                                   "filesystem label libshare)\n"}.get(
        case, "region_device=/dev/pmem0\ndax=1\n")
    for op in (actions.install, actions.redirect):
        agent = FakeAgent(guest(probe_out=probe), alive=case != "no agent")
        with pytest.raises(RefusedError, match=match) as info:
            op(dom, agent_factory=factory(agent))
        assert "\n" not in str(info.value)
        assert agent.changes() == []


def test_install_writes_every_file_and_rebuilds_the_initramfs() -> None:
    agent = FakeAgent(guest())
    rep = actions.install(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    assert rep.region_device == "/dev/pmem0"
    assert rep.files == [f.path for f in actions.GUEST_FILES]
    assert rep.initramfs == "updated" and rep.initramfs_entries == 7
    assert rep.identical == 412 and rep.differs == ["/usr/lib/x/libacl.so.1"]
    writes = [a for k, a in agent.calls if k == "write"]
    assert writes == [f.path for f in actions.GUEST_FILES if f.source]
    execs = [" ".join(a) for k, a in agent.calls if k == "exec"]
    assert any("update-initramfs -u" in e for e in execs)
    assert any(e.startswith("ln -sfn") for e in execs)
    # the probe ran before anything was written
    first_write = next(i for i, (k, _) in enumerate(agent.calls) if k == "write")
    probe_at = next(i for i, (k, a) in enumerate(agent.calls)
                    if k == "exec" and a[:4] == ["/bin/sh", "-s", "--", "probe"])
    assert probe_at < first_write


def test_install_rolls_back_a_partial_write() -> None:
    agent = FakeAgent(guest())
    real_write = agent.write_file
    count = {"n": 0}

    def failing(path: str, data: bytes, mode: int | None = None) -> int:
        count["n"] += 1
        if count["n"] == 3:
            raise AgentError("guest agent of g1 refused guest-file-open: disk full")
        return real_write(path, data, mode)

    agent.write_file = failing  # type: ignore[method-assign]
    with pytest.raises(LibshareError, match="nothing left behind"):
        actions.install(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    rm = [a for k, a in agent.calls if k == "exec" and a[:2] == ["rm", "-f"]]
    assert rm and rm[-1][2:] == [f.path for f in actions.GUEST_FILES[:2]]


def test_redirect_report_and_agent_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions.time, "sleep", lambda s: None)
    out = ("region_device=/dev/pmem0\ndiffers=/usr/lib/x86_64-linux-gnu/libz.so.1\n"
           "bound=29\nalready=0\nhashed=30\ncached=0\nbinds_total=29\n"
           "restarted=cron.service systemd-journald.service\nkept=\n"
           "agent_restart=deferred\n")
    agent = FakeAgent(guest(apply_out=out))
    rep = actions.redirect(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    assert rep.bound == 29 and rep.binds_total == 29 and rep.hashed == 30
    assert rep.differs == ["/usr/lib/x86_64-linux-gnu/libz.so.1"]
    assert rep.restarted == ["cron.service", "systemd-journald.service"]
    assert rep.agent_restarted
    assert ("exec", [actions.SCRIPT, "apply", "--defer-agent"]) in agent.calls
    queued = [a for k, a in agent.calls if k == "exec" and a[0] == "systemd-run"]
    assert queued and queued[0][-2:] == ["restart", "qemu-guest-agent.service"]
    agent = FakeAgent(guest(apply_out="bound=1\n"))
    rep = actions.redirect(FakeDomain("g1", enrolled_xml()), restart=False,
                            agent_factory=factory(agent))
    assert ("exec", [actions.SCRIPT, "apply", "--defer-agent", "--no-restart"]) in agent.calls
    assert not rep.agent_restarted


def test_redirect_needs_install_and_reports_guest_refusal() -> None:
    agent = FakeAgent(guest(installed=False))
    with pytest.raises(RefusedError, match="guest install g1"):
        actions.redirect(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    assert agent.changes() == []
    agent = FakeAgent(guest(apply_out="refused=DAX is not active on /dev/pmem0\n"))
    with pytest.raises(RefusedError, match="DAX"):
        actions.redirect(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))


def test_unredirect() -> None:
    out = ("removed=29\nlazy=3\ndeleted=/usr/sbin/libshare-redirect\ninitramfs=updated\n"
           "grub=updated\nnoforce=0\n")
    agent = FakeAgent(guest(uninstall_out=out))
    rep = actions.unredirect(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    assert rep.removed == 29 and rep.deleted == ["/usr/sbin/libshare-redirect"]
    assert rep.initramfs == "updated" and rep.grub == "updated"
    agent = FakeAgent(guest(installed=False))
    with pytest.raises(RefusedError, match="nothing to undo"):
        actions.unredirect(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    agent = FakeAgent(guest(), alive=False)
    with pytest.raises(RefusedError, match="no responding guest agent"):
        actions.unredirect(FakeDomain("g1", enrolled_xml()), agent_factory=factory(agent))
    assert agent.changes() == []


def test_cli_refusal_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from contextlib import contextmanager

    from libshare import cli
    from libshare.virt import api

    @contextmanager
    def fake_connect(uri: str) -> Any:
        yield object()

    monkeypatch.setattr(api, "connect", fake_connect)
    monkeypatch.setattr(api, "lookup", lambda conn, name: FakeDomain("g1", BASE))
    for argv in (["redirect", "g1", "--json"], ["unredirect", "g1"],
                 ["guest", "install", "g1"]):
        dom_active = argv[0] != "unredirect"
        monkeypatch.setattr(api, "lookup",
                            lambda conn, name, a=dom_active: FakeDomain("g1", BASE, active=a))
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("libshare: "), err


def test_each_guest_step_is_shown_with_elapsed_seconds_and_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """guest install, redirect and unredirect take minutes under TCG: each step after
    the checks shows on stderr (plain lines off a terminal: start, heartbeat, end) and
    is logged at debug level (-v)."""
    import io

    from libshare.cli.progress import ProgressPrinter

    monkeypatch.setattr(actions.time, "sleep", lambda s: None)
    dom = FakeDomain("g1", enrolled_xml())
    runs = [
        (actions.install, {}, ["install files (9 files)", "start the unit ...",
                               "hash libraries ...", "boot path ...",
                               "update-initramfs ...",
                               "list the initramfs ...", "update-grub ..."]),
        (actions.redirect, {"apply_out": "bound=1\nagent_restart=deferred\n"},
         ["bind and restart ...", "restart the agent ..."]),
        (actions.unredirect, {"uninstall_out": "removed=1\n"},
         ["undo binds, files and initramfs ..."]),
    ]
    for op, outs, phases in runs:
        stream = io.StringIO()
        progress = ProgressPrinter("op g1", stream, delay=0.0, tty=False)
        with caplog.at_level("DEBUG", logger="libshare.redirect.actions"):
            op(dom, agent_factory=factory(FakeAgent(guest(**outs))), progress=progress)
        progress.close()
        lines = stream.getvalue().splitlines()
        starts = [line.removeprefix("op g1: ") for line in lines if "done in" not in line]
        if op is actions.install:
            phases[0] = f"install files ({len(actions.GUEST_FILES)} files)"
        assert starts == phases, lines
        assert all(re.fullmatch(r"op g1: .+ done in \d+\.\d s", line)
                   for line in lines if "done in" in line)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "g1: update-initramfs: /bin/sh -c update-initramfs -u 2>&1" in logged
    assert re.search(r"g1: hash libraries: exit 0 after \d+\.\d s", logged)
    assert "g1: guest agent restarted" in logged

