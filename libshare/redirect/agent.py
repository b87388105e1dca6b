"""A qemu-guest-agent client over libvirt: run programs in a guest and move files in
and out of it, with nothing installed in the guest but ``qemu-guest-agent``.

Owns the agent protocol as libshare uses it: JSON commands sent through
``libvirt_qemu.qemuAgentCommand`` (or any :data:`Transport`, e.g. a fake one in unit
tests), ``guest-exec`` with captured output polled through ``guest-exec-status`` (base64
decoded, bounded in time), ``guest-file-open/write/read/close`` in chunks, and the
translation of every failure (libvirt error, agent error reply, malformed reply, time
out) into one :class:`AgentError` whose text is one line naming the guest.

API (all methods of :class:`GuestAgent`; build one with :meth:`GuestAgent.for_domain`):

- ``ping() -> None``; ``wait(timeout) -> float`` (seconds until the agent answered)
- ``exec(argv, stdin=None, timeout=60.0, check=False, on_poll=None) -> ExecResult(rc,
  stdout, stderr)`` (``on_poll()`` is called at each status poll: progress ticks)
- ``write_file(path, data, mode=None) -> int`` (bytes written);
  ``read_file(path, max_bytes=...) -> bytes``
- ``shutdown(mode='powerdown'|'reboot'|'halt') -> None``
- ``command(name, arguments=None, timeout=None) -> Any`` (the reply's ``return`` value)

Every program run and file moved is logged at debug level (``libshare -v``): what ran,
its exit status, how long it took and how much it printed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libshare.errors import LibshareError

log = logging.getLogger(__name__)

#: ``transport(command_json, timeout_seconds) -> reply_json``; raises AgentError.
Transport = Callable[[str, int], str]

#: Default seconds one agent command may take (not a guest-exec'd program: see exec()).
COMMAND_TIMEOUT = 10
#: Raw bytes per guest-file-write / guest-file-read request. qemu-guest-agent 7.2 fails
#: to parse a 256 KiB write ("JSON parse error"); 64 KiB wrote 1 MiB in 0.3 s under TCG.
CHUNK = 48 * 1024
#: read_file() refuses files larger than this unless told otherwise.
MAX_READ = 64 * 1024 * 1024
_POLL_FIRST = 0.02
_POLL_MAX = 0.5


class AgentError(LibshareError):
    """The guest agent could not be reached, refused a command, or gave a bad reply."""


class AgentTimeout(AgentError):
    """A program started through the agent did not finish in the time allowed."""


class AgentBusy(AgentError):
    """The agent did not answer one command in time, or its channel is not connected
    now (libvirt's VIR_ERR_AGENT_UNRESPONSIVE): it may answer the next one."""


@dataclass(frozen=True)
class ExecResult:
    """What a program run with :meth:`GuestAgent.exec` left: exit code ``rc`` (None when
    killed by a signal), ``signal`` (None unless killed), captured ``stdout``/``stderr``
    bytes, and ``truncated`` (the agent cut the output at its own limit)."""

    rc: int | None
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """Return True if the program exited with status 0."""
        return self.rc == 0

    @property
    def out(self) -> str:
        """Return stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        """Return stderr decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")


def _one_line(text: str, limit: int = 300) -> str:
    """Return ``text`` squeezed onto one line and cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def libvirt_transport(domain: Any) -> Transport:
    """Return a :data:`Transport` sending agent commands to libvirt ``domain`` through
    ``libvirt_qemu.qemuAgentCommand``; libvirt errors become AgentError with a one-line
    reason (an unconnected agent says so and suggests installing/starting it)."""
    import libvirt
    import libvirt_qemu

    name = domain.name()

    def send(cmd: str, timeout: int) -> str:
        try:
            reply = libvirt_qemu.qemuAgentCommand(domain, cmd, int(timeout), 0)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            msg = _one_line(exc.get_error_message() or str(exc))
            if code in (getattr(libvirt, "VIR_ERR_AGENT_UNRESPONSIVE", 86),
                        getattr(libvirt, "VIR_ERR_AGENT_UNSYNCED", 97)):
                raise AgentBusy(f"guest agent of {name} is not responding (is "
                                f"qemu-guest-agent installed and running?): {msg}") from exc
            if code == getattr(libvirt, "VIR_ERR_OPERATION_INVALID", 55):
                raise AgentError(f"guest agent of {name} cannot be used: {msg}") from exc
            raise AgentError(f"guest agent of {name}: {msg}") from exc
        if reply is None:
            raise AgentError(f"guest agent of {name} gave no reply")
        return str(reply)

    return send


class GuestAgent:
    """A client of one guest's qemu-guest-agent (see the module docstring for the API).

    ``transport`` carries JSON commands (see :data:`Transport`); ``name`` is the guest's
    name used in error messages; ``timeout`` is the default seconds per agent command."""

    def __init__(self, transport: Transport, name: str, *, timeout: int = COMMAND_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.transport = transport
        self.name = name
        self.timeout = timeout
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def for_domain(cls, domain: Any, *, timeout: int = COMMAND_TIMEOUT) -> GuestAgent:
        """Return a GuestAgent talking to libvirt ``domain`` (a ``virDomain``)."""
        return cls(libvirt_transport(domain), domain.name(), timeout=timeout)

    # ------------------------------------------------------------ protocol

    def command(self, execute: str, arguments: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Send agent command ``execute`` with ``arguments``; return its ``return`` value.
        Raises AgentError on transport failure, an ``error`` reply or a malformed reply."""
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = dict(arguments)
        secs = max(1, round(self.timeout if timeout is None else timeout))
        text = self.transport(json.dumps(msg), secs)
        try:
            reply = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise AgentError(f"guest agent of {self.name} sent a malformed reply to "
                             f"{execute}: {_one_line(str(text), 120)}") from exc
        if not isinstance(reply, dict):
            raise AgentError(f"guest agent of {self.name} sent a malformed reply to "
                             f"{execute}: {_one_line(str(text), 120)}")
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc") if isinstance(err, dict) else err
            raise AgentError(f"guest agent of {self.name} refused {execute}: "
                             f"{_one_line(str(desc))}")
        if "return" not in reply:
            raise AgentError(f"guest agent of {self.name} sent no result for {execute}: "
                             f"{_one_line(str(text), 120)}")
        return reply["return"]

    def _b64(self, value: Any, what: str) -> bytes:
        """Return base64 ``value`` decoded (empty for None); AgentError if it is not base64."""
        if value is None:
            return b""
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AgentError(f"guest agent of {self.name} sent invalid base64 in {what}") from exc

    # ------------------------------------------------------------ liveness

    def ping(self) -> None:
        """Return None if the agent answers ``guest-ping``; raise AgentError otherwise."""
        self.command("guest-ping", timeout=min(self.timeout, 5))

    def wait(self, timeout: float = 90.0, interval: float = 1.0) -> float:
        """Poll ``guest-ping`` until the agent answers; return the seconds waited.
        Raises AgentError (the last failure's reason) after ``timeout`` seconds."""
        start = self._clock()
        while True:
            try:
                self.ping()
                return self._clock() - start
            except AgentError as exc:
                if self._clock() - start >= timeout:
                    raise AgentError(f"guest agent of {self.name} did not answer within "
                                     f"{timeout:.0f}s: {exc}") from exc
            self._sleep(interval)

    # ------------------------------------------------------------ programs

    def exec(self, argv: Sequence[str], stdin: bytes | str | None = None,
             timeout: float = 60.0, check: bool = False,
             env: Sequence[str] | None = None,
             on_poll: Callable[[], None] | None = None) -> ExecResult:
        """Run ``argv`` (``argv[0]`` an absolute path or a name found in the guest's
        PATH) in the guest with captured output, feeding ``stdin`` if given, and return
        its :class:`ExecResult` once it exits. ``env`` (``NAME=value`` strings) replaces
        the environment. Waits at most ``timeout`` seconds: then the program is killed
        (``kill -KILL`` through the agent, best effort) and AgentTimeout is raised.
        With ``check``, a non-zero exit raises AgentError with the end of its stderr.
        ``on_poll()`` is called while the program runs (each status poll)."""
        if not argv:
            raise AgentError(f"guest agent of {self.name}: nothing to execute")
        what = _one_line(" ".join(map(str, argv)), 120)
        log.debug("%s: exec %s%s (at most %.0f s)", self.name, what,
                  f" with {len(stdin)} bytes on stdin" if stdin is not None else "", timeout)
        start = self._clock()
        args: dict[str, Any] = {"path": str(argv[0]), "arg": [str(a) for a in argv[1:]],
                                "capture-output": True}
        if stdin is not None:
            raw = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
            args["input-data"] = base64.b64encode(raw).decode("ascii")
        if env is not None:
            args["env"] = list(env)
        started = self.command("guest-exec", args)
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise AgentError(f"guest agent of {self.name} started {argv[0]} without a pid")
        deadline = self._clock() + timeout
        delay = _POLL_FIRST
        while True:
            try:
                status = self.command("guest-exec-status", {"pid": pid})
            except AgentBusy:
                # a status query is safe to repeat: on a busy host one can take longer
                # than the command's timeout (libvirt then gives up on that reply only)
                if self._clock() >= deadline:
                    raise
                log.debug("%s: %s: status of pid %d not answered in time; asking again",
                          self.name, what, pid)
                self._sleep(_POLL_MAX)
                continue
            if not isinstance(status, dict):
                raise AgentError(f"guest agent of {self.name} sent a malformed status of "
                                 f"pid {pid}")
            if status.get("exited"):
                result = self._exec_result(argv, status, check)
                log.debug("%s: %s: exit %s after %.1f s (%d bytes out, %d err)", self.name,
                          what, result.rc if result.signal is None else
                          f"by signal {result.signal}", self._clock() - start,
                          len(result.stdout), len(result.stderr))
                return result
            if self._clock() >= deadline:
                self._kill(pid)
                log.debug("%s: %s: killed after %.0f s", self.name, what, timeout)
                raise AgentTimeout(f"{_one_line(' '.join(argv), 80)} in {self.name} did not "
                                   f"finish within {timeout:.0f}s (killed pid {pid})")
            if on_poll is not None:
                on_poll()
            self._sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    def _exec_result(self, argv: Sequence[str], status: Mapping[str, Any],
                     check: bool) -> ExecResult:
        """Return the ExecResult of an exited ``guest-exec-status`` reply (see exec())."""
        signal = status.get("signal")
        rc = status.get("exitcode")
        result = ExecResult(
            rc=int(rc) if isinstance(rc, int) and signal is None else None,
            stdout=self._b64(status.get("out-data"), "out-data"),
            stderr=self._b64(status.get("err-data"), "err-data"),
            signal=int(signal) if isinstance(signal, int) else None,
            truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
        )
        if check and not result.ok:
            how = f"signal {result.signal}" if result.signal is not None else f"status {result.rc}"
            tail = _one_line(result.err.strip()[-200:] or result.out.strip()[-200:])
            raise AgentError(f"{_one_line(' '.join(argv), 80)} failed in {self.name} with "
                             f"{how}" + (f": {tail}" if tail else ""))
        return result

    def _kill(self, pid: int) -> None:
        """Best effort: SIGKILL guest process ``pid`` (which this client started) and
        collect its status so the agent forgets it; errors are ignored."""
        with contextlib.suppress(AgentError):
            self.command("guest-exec", {"path": "kill", "arg": ["-KILL", str(pid)]})
            self._sleep(0.2)
            self.command("guest-exec-status", {"pid": pid})

    # ------------------------------------------------------------ files

    def write_file(self, path: str, data: bytes | str, mode: int | None = None) -> int:
        """Write ``data`` to guest file ``path`` (created or truncated) in chunks, then
        ``chmod`` it to ``mode`` if given; return the number of bytes written."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        log.debug("%s: write %s (%d bytes%s)", self.name, path, len(raw),
                  "" if mode is None else f", mode {mode:o}")
        handle = self.command("guest-file-open", {"path": path, "mode": "wb"})
        if not isinstance(handle, int):
            raise AgentError(f"guest agent of {self.name} opened {path} without a handle")
        written = 0
        try:
            for off in range(0, len(raw), CHUNK):
                chunk = raw[off:off + CHUNK]
                reply = self.command("guest-file-write", {
                    "handle": handle, "buf-b64": base64.b64encode(chunk).decode("ascii")})
                count = reply.get("count") if isinstance(reply, dict) else None
                if count != len(chunk):
                    raise AgentError(f"guest agent of {self.name} wrote {count} of "
                                     f"{len(chunk)} bytes to {path}")
                written += count
        finally:
            with contextlib.suppress(AgentError):
                self.command("guest-file-close", {"handle": handle})
        if mode is not None:
            self.exec(["chmod", f"{mode:o}", path], timeout=30, check=True)
        return written

    def read_file(self, path: str, max_bytes: int = MAX_READ) -> bytes:
        """Return the contents of guest file ``path``; AgentError if it cannot be read
        or is larger than ``max_bytes``."""
        log.debug("%s: read %s", self.name, path)
        handle = self.command("guest-file-open", {"path": path, "mode": "rb"})
        if not isinstance(handle, int):
            raise AgentError(f"guest agent of {self.name} opened {path} without a handle")
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                reply = self.command("guest-file-read", {"handle": handle, "count": CHUNK})
                if not isinstance(reply, dict):
                    raise AgentError(f"guest agent of {self.name} sent a malformed read of {path}")
                chunk = self._b64(reply.get("buf-b64"), f"read of {path}")
                if len(chunk) != reply.get("count", len(chunk)):
                    raise AgentError(f"guest agent of {self.name} sent {len(chunk)} bytes of "
                                     f"{path} but counted {reply.get('count')}")
                size += len(chunk)
                if size > max_bytes:
                    raise AgentError(f"{path} in {self.name} is larger than {max_bytes} bytes")
                parts.append(chunk)
                if reply.get("eof") or not chunk:
                    break
        finally:
            with contextlib.suppress(AgentError):
                self.command("guest-file-close", {"handle": handle})
        return b"".join(parts)

    # ------------------------------------------------------------ power

    def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to ``powerdown``, ``reboot`` or ``halt``; return None at once.
        The agent sends no reply to ``guest-shutdown`` on success, so a missing reply
        (libvirt reports a time out or a closed channel) is not an error."""
        if mode not in ("powerdown", "reboot", "halt"):
            raise AgentError(f"unknown shutdown mode {mode!r}")
        try:
            self.command("guest-shutdown", {"mode": mode}, timeout=5)
        except AgentError as exc:
            if "refused" in str(exc):
                raise


#: builds the agent client of a domain (tests pass fakes)
AgentFactory = Callable[[Any], GuestAgent]
