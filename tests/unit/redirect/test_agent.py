"""Unit tests of the guest-agent client (libshare.redirect.agent) against a fake agent: the JSON
it sends, base64 in both directions, exec polling and time out, chunked file transfer,
and that every failure is an AgentError with one line naming the guest."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from libshare.errors import LibshareError
from libshare.redirect.agent import (
    CHUNK,
    AgentBusy,
    AgentError,
    AgentTimeout,
    ExecResult,
    GuestAgent,
)


class GuestSideAgent:
    """The qemu-guest-agent inside a guest, as the JSON protocol reaches it (what the
    client under test talks to; not a double of the client): records commands, keeps
    files and processes."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.timeouts: list[int] = []
        self.files: dict[str, bytes] = {}
        self.handles: dict[int, list[Any]] = {}
        self.procs: dict[int, dict[str, Any]] = {}
        self.polls_until_exit = 2
        self.next = 1000
        self.reply_override: str | None = None

    def __call__(self, text: str, timeout: int) -> str:
        msg = json.loads(text)
        self.sent.append(msg)
        self.timeouts.append(timeout)
        if self.reply_override is not None:
            return self.reply_override
        fn = getattr(self, "do_" + msg["execute"].replace("-", "_"), None)
        if fn is None:
            return json.dumps({"error": {"class": "CommandNotFound",
                                         "desc": f"The command {msg['execute']} has not been found"}})
        try:
            return json.dumps({"return": fn(**msg.get("arguments", {}))})
        except KeyError as exc:
            return json.dumps({"error": {"class": "GenericError",
                                         "desc": f"Failed to open file '{exc.args[0]}': No such file\nor directory"}})

    def do_guest_ping(self) -> dict[str, Any]:
        return {}

    def do_guest_exec(self, path: str, arg: list[str] | None = None,
                      **kw: Any) -> dict[str, Any]:
        self.next += 1
        stdin = base64.b64decode(kw.get("input-data", ""))
        argv = [path, *(arg or [])]
        if argv[:2] == ["sh", "-c"] and argv[2] == "cat":
            out, err, rc = stdin, b"", 0
        elif argv[0] == "false":
            out, err, rc = b"", b"it failed\nbadly\n", 3
        elif argv[0] == "sleep":
            out, err, rc = b"", b"", None
        elif argv[0] == "kill":
            self.procs[int(argv[2])]["killed"] = True
            out, err, rc = b"", b"", 0
        else:
            out, err, rc = b"\xff\x00bin" + " ".join(argv).encode(), b"", 0
        self.procs[self.next] = {"out": out, "err": err, "rc": rc, "polls": 0, "killed": False}
        return {"pid": self.next}

    def do_guest_exec_status(self, pid: int) -> dict[str, Any]:
        p = self.procs[pid]
        p["polls"] += 1
        if p["killed"]:
            return {"exited": True, "signal": 9}
        if p["rc"] is None or p["polls"] < self.polls_until_exit:
            return {"exited": False}
        st: dict[str, Any] = {"exited": True, "exitcode": p["rc"]}
        if p["out"]:
            st["out-data"] = base64.b64encode(p["out"]).decode()
        if p["err"]:
            st["err-data"] = base64.b64encode(p["err"]).decode()
        return st

    def do_guest_file_open(self, path: str, mode: str) -> int:
        if mode.startswith("r") and path not in self.files:
            raise KeyError(path)
        if mode.startswith("w"):
            self.files[path] = b""
        self.next += 1
        self.handles[self.next] = [path, 0]
        return self.next

    def do_guest_file_write(self, handle: int, **kw: Any) -> dict[str, Any]:
        data = base64.b64decode(kw["buf-b64"])
        path = self.handles[handle][0]
        self.files[path] += data
        return {"count": len(data), "eof": False}

    def do_guest_file_read(self, handle: int, count: int) -> dict[str, Any]:
        path, pos = self.handles[handle]
        data = self.files[path][pos:pos + count]
        self.handles[handle][1] = pos + len(data)
        return {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                "eof": pos + len(data) >= len(self.files[path])}

    def do_guest_file_close(self, handle: int) -> dict[str, Any]:
        del self.handles[handle]
        return {}


class Clock:
    """A fake monotonic clock that sleep() advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, secs: float) -> None:
        self.now += secs


@pytest.fixture
def fake() -> GuestSideAgent:
    return GuestSideAgent()


@pytest.fixture
def agent(fake: GuestSideAgent) -> GuestAgent:
    clock = Clock()
    return GuestAgent(fake, "web1", clock=clock, sleep=clock.sleep)


def test_ping_sends_guest_ping(agent: GuestAgent, fake: GuestSideAgent) -> None:
    assert agent.ping() is None
    assert fake.sent == [{"execute": "guest-ping"}]
    assert fake.timeouts == [5]


def test_exec_sends_argv_and_decodes_binary_output(agent: GuestAgent, fake: GuestSideAgent) -> None:
    res = agent.exec(["/usr/bin/uname", "-r"])
    assert res == ExecResult(rc=0, stdout=b"\xff\x00bin/usr/bin/uname -r", stderr=b"")
    first = fake.sent[0]
    assert first == {"execute": "guest-exec", "arguments": {
        "path": "/usr/bin/uname", "arg": ["-r"], "capture-output": True}}
    statuses = [m for m in fake.sent if m["execute"] == "guest-exec-status"]
    assert len(statuses) == fake.polls_until_exit
    assert all(m["arguments"] == {"pid": 1001} for m in statuses)
    assert res.ok and res.out.endswith("uname -r")


def test_exec_stdin_is_base64(agent: GuestAgent, fake: GuestSideAgent) -> None:
    data = bytes(range(256)) * 3
    res = agent.exec(["sh", "-c", "cat"], stdin=data)
    assert fake.sent[0]["arguments"]["input-data"] == base64.b64encode(data).decode()
    assert res.stdout == data
    assert agent.exec(["sh", "-c", "cat"], stdin="text é").stdout == "text é".encode()


def test_exec_nonzero_and_check(agent: GuestAgent) -> None:
    res = agent.exec(["false"])
    assert res.rc == 3 and not res.ok and res.err == "it failed\nbadly\n"
    with pytest.raises(AgentError) as exc:
        agent.exec(["false", "x"], check=True)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "false x failed in web1 with status 3" in msg and "it failed badly" in msg


def test_exec_timeout_kills_and_raises(fake: GuestSideAgent) -> None:
    clock = Clock()
    agent = GuestAgent(fake, "web1", clock=clock, sleep=clock.sleep)
    with pytest.raises(AgentTimeout) as exc:
        agent.exec(["sleep", "100"], timeout=3)
    assert "did not finish within 3s" in str(exc.value) and "web1" in str(exc.value)
    kills = [m for m in fake.sent if m["execute"] == "guest-exec"
             and m["arguments"]["path"] == "kill"]
    assert kills and kills[0]["arguments"]["arg"] == ["-KILL", "1001"]
    assert fake.procs[1001]["killed"]
    assert 3 <= clock.now < 5  # bounded: polls stop soon after the deadline


def test_exec_asks_again_for_a_status_not_answered_in_time(fake: GuestSideAgent) -> None:
    clock = Clock()
    busy = {"left": 2}

    def transport(text: str, timeout: int) -> str:
        if json.loads(text)["execute"] == "guest-exec-status" and busy["left"]:
            busy["left"] -= 1
            fake.sent.append(json.loads(text))
            clock.sleep(timeout)           # libvirt waited that long, then gave up
            raise AgentBusy("guest agent of web1 is not responding: Guest agent not "
                            "available for now")
        return fake(text, timeout)

    agent = GuestAgent(transport, "web1", clock=clock, sleep=clock.sleep)
    res = agent.exec(["echo", "hi"], timeout=60)
    assert res.rc == 0 and busy["left"] == 0
    assert [m["execute"] for m in fake.sent].count("guest-exec-status") == 2 + 2


def test_exec_busy_agent_past_the_deadline_raises(fake: GuestSideAgent) -> None:
    clock = Clock()

    def transport(text: str, timeout: int) -> str:
        if json.loads(text)["execute"] == "guest-exec-status":
            clock.sleep(timeout)
            raise AgentBusy("guest agent of web1 is not responding")
        return fake(text, timeout)

    agent = GuestAgent(transport, "web1", clock=clock, sleep=clock.sleep)
    with pytest.raises(AgentBusy):
        agent.exec(["echo", "hi"], timeout=30)
    assert 30 <= clock.now < 60        # bounded by the exec's own timeout


def test_exec_signal_gives_no_rc(agent: GuestAgent, fake: GuestSideAgent) -> None:
    fake.procs[7] = {"killed": True, "polls": 0}
    res = agent._exec_result(["x"], fake.do_guest_exec_status(7), False)
    assert res.rc is None and res.signal == 9 and not res.ok


def test_empty_argv_refused(agent: GuestAgent, fake: GuestSideAgent) -> None:
    with pytest.raises(AgentError):
        agent.exec([])
    assert fake.sent == []


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 17])
def test_write_then_read_round_trip_in_chunks(agent: GuestAgent, fake: GuestSideAgent,
                                              size: int) -> None:
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    assert agent.write_file("/etc/x", data) == size
    writes = [m for m in fake.sent if m["execute"] == "guest-file-write"]
    assert len(writes) == (size + CHUNK - 1) // CHUNK
    assert all(len(base64.b64decode(m["arguments"]["buf-b64"])) <= CHUNK for m in writes)
    assert fake.files["/etc/x"] == data
    assert fake.handles == {}  # closed
    assert agent.read_file("/etc/x") == data
    assert fake.handles == {}


def test_write_file_mode_runs_chmod(agent: GuestAgent, fake: GuestSideAgent) -> None:
    agent.write_file("/usr/bin/tool", "#!/bin/sh\n", mode=0o755)
    execs = [m["arguments"] for m in fake.sent if m["execute"] == "guest-exec"]
    assert execs == [{"path": "chmod", "arg": ["755", "/usr/bin/tool"], "capture-output": True}]
    assert fake.files["/usr/bin/tool"] == b"#!/bin/sh\n"


def test_short_write_is_an_error_and_closes(agent: GuestAgent, fake: GuestSideAgent) -> None:
    fake.do_guest_file_write = lambda handle, **kw: {"count": 1, "eof": False}  # type: ignore[method-assign]
    with pytest.raises(AgentError, match="wrote 1 of 5 bytes to /x"):
        agent.write_file("/x", b"hello")
    assert fake.handles == {}


def test_read_missing_file_is_one_line(agent: GuestAgent) -> None:
    with pytest.raises(AgentError) as exc:
        agent.read_file("/nope")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("guest agent of web1 refused guest-file-open:")
    assert "No such file or directory" in msg


def test_read_file_size_limit(agent: GuestAgent, fake: GuestSideAgent) -> None:
    fake.files["/big"] = b"x" * (CHUNK + 1)
    with pytest.raises(AgentError, match="larger than 1000 bytes"):
        agent.read_file("/big", max_bytes=1000)
    assert fake.handles == {}


def test_bad_base64_in_read(agent: GuestAgent, fake: GuestSideAgent) -> None:
    fake.files["/f"] = b"abc"
    fake.do_guest_file_read = lambda handle, count: {  # type: ignore[method-assign]
        "count": 3, "buf-b64": "%%%", "eof": True}
    with pytest.raises(AgentError, match="invalid base64"):
        agent.read_file("/f")


def test_bad_base64_in_exec_output(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="invalid base64 in out-data"):
        agent._exec_result(["x"], {"exited": True, "exitcode": 0, "out-data": "not b64!"}, False)


@pytest.mark.parametrize("reply", ["not json", "[1, 2]", '{"id": 1}'])
def test_malformed_replies(agent: GuestAgent, fake: GuestSideAgent, reply: str) -> None:
    fake.reply_override = reply
    with pytest.raises(AgentError) as exc:
        agent.ping()
    assert "web1" in str(exc.value) and "\n" not in str(exc.value)


def test_error_reply_unknown_command(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="refused guest-frobnicate: The command"):
        agent.command("guest-frobnicate")


def test_agent_error_is_a_libshare_error() -> None:
    assert issubclass(AgentError, LibshareError)
    assert issubclass(AgentTimeout, AgentError)


def test_transport_failure_propagates_and_wait_gives_up(fake: GuestSideAgent) -> None:
    clock = Clock()

    def dead(_text: str, _timeout: int) -> str:
        raise AgentError("guest agent of web1 is not responding (is qemu-guest-agent "
                         "installed and running?)")

    agent = GuestAgent(dead, "web1", clock=clock, sleep=clock.sleep)
    with pytest.raises(AgentError, match="not responding"):
        agent.ping()
    with pytest.raises(AgentError, match="did not answer within 10s"):
        agent.wait(10)
    assert 10 <= clock.now <= 12


def test_wait_returns_when_agent_comes_up(fake: GuestSideAgent) -> None:
    clock = Clock()
    calls = {"n": 0}

    def flaky(text: str, timeout: int) -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise AgentError("guest agent of web1 is not responding")
        return fake(text, timeout)

    agent = GuestAgent(flaky, "web1", clock=clock, sleep=clock.sleep)
    assert agent.wait(60) == pytest.approx(3.0)


def test_shutdown_tolerates_missing_reply(fake: GuestSideAgent) -> None:
    def silent(text: str, timeout: int) -> str:
        raise AgentError("guest agent of web1 is not responding")

    GuestAgent(silent, "web1").shutdown("reboot")  # no reply is success
    with pytest.raises(AgentError):
        GuestAgent(fake, "web1").shutdown("sideways")


def test_exec_ticks_while_it_runs_and_logs_at_debug(
        agent: GuestAgent, fake: GuestSideAgent, caplog: pytest.LogCaptureFixture) -> None:
    fake.polls_until_exit = 4
    ticks: list[int] = []
    with caplog.at_level("DEBUG", logger="libshare.redirect.agent"):
        agent.exec(["update-initramfs", "-u"], on_poll=lambda: ticks.append(1))
        agent.write_file("/etc/x", b"12345", mode=None)
    assert len(ticks) == 3                      # every poll before the exit
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "web1: exec update-initramfs -u (at most 60 s)" in text
    assert "web1: update-initramfs -u: exit 0 after" in text
    assert "web1: write /etc/x (5 bytes)" in text
