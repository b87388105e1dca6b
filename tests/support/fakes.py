"""Doubles of the libvirt objects and guest agents the code under test talks to, one of
each: :class:`FakeDomain` (a domain: name, UUID, running or paused, its definition),
:class:`FakeConnection` (lookups, listing, redefinition) and :class:`FakeAgent` (what
``libshare.redirect.agent.GuestAgent`` offers, answering ``exec`` with a handler)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import libvirt

from libshare.redirect.agent import AgentError, ExecResult
from tests.support.domains import UUID, plain


class FakeDomain:
    """A libvirt domain: ``name``, ``uuid``, its definition ``xml`` (persistent and live
    alike), ``active``; ``suspend``/``resume`` are recorded in ``calls`` and ``state``
    says paused after a suspend; ``connect()`` is the :class:`FakeConnection` holding it."""

    def __init__(self, name: str = "g1", xml: str | None = None, active: bool = True,
                 uuid: str = UUID) -> None:
        self._name, self.active, self.uuid = name, active, uuid
        self.xml = plain(name) if xml is None else xml
        self.calls: list[str] = []
        self.conn: FakeConnection | None = None

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self.uuid

    def isActive(self) -> int:
        return int(self.active)

    def isPersistent(self) -> int:
        return 1

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def state(self) -> list[int]:
        paused = self.calls[-1:] == ["suspend"]
        return [libvirt.VIR_DOMAIN_PAUSED if paused else libvirt.VIR_DOMAIN_RUNNING, 0]

    def suspend(self) -> None:
        self.calls.append("suspend")

    def connect(self) -> FakeConnection:
        """Return the connection holding this domain (a new one when none does)."""
        if self.conn is None:
            self.conn = FakeConnection(self)
        return self.conn

    def resume(self) -> None:
        self.calls.append("resume")


class FakeConnection:
    """A libvirt connection holding ``domains``; unknown names (or every name once not
    ``alive``) raise libvirtError like libvirt; ``defineXMLFlags`` redefines (or adds) the
    domain the XML names and records the XML in ``defined``."""

    def __init__(self, *domains: FakeDomain, alive: bool = True) -> None:
        self.domains = {d.name(): d for d in domains}
        for d in domains:
            d.conn = self
        self.alive = alive
        self.closed = False
        self.defined: list[str] = []

    def lookupByName(self, name: str) -> FakeDomain:
        if not self.alive or name not in self.domains:
            raise libvirt.libvirtError(f"Domain not found: {name}")
        return self.domains[name]

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        for dom in self.domains.values():
            if self.alive and dom.UUIDString() == uuid:
                return dom
        raise libvirt.libvirtError(f"Domain not found: {uuid}")

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        return list(self.domains.values())

    def defineXMLFlags(self, xml: str, flags: int = 0) -> FakeDomain:
        m = re.search(r"<name>([^<]*)</name>", xml)
        name = m.group(1) if m else "?"
        self.defined.append(xml)
        dom = self.domains.setdefault(name, FakeDomain(name, xml, active=False))
        dom.xml = xml
        return dom

    def isAlive(self) -> int:
        return int(self.alive)

    def close(self) -> int:
        self.closed = True
        return 0


Handler = Callable[[list[str], bytes | None], ExecResult]


def _no_exec(argv: list[str], stdin: bytes | None) -> ExecResult:
    raise AssertionError(f"unexpected guest command {argv}")


class FakeAgent:
    """A guest agent client of domain ``name``: ``handler(argv, stdin)`` answers
    ``exec`` (``on_poll`` is called once, as while a program runs), ``files`` (guest
    path -> bytes) ``read_file``; a silent agent (``alive`` False) raises AgentError
    like a real one that does not respond. Every call is recorded in ``calls``, exec
    timeouts in ``timeouts``."""

    def __init__(self, handler: Handler = _no_exec, alive: bool = True,
                 name: str = "g1", files: dict[str, bytes] | None = None) -> None:
        self.handler, self.alive, self.name = handler, alive, name
        self.files = dict(files or {})
        self.calls: list[tuple[str, Any]] = []
        self.timeouts: list[float] = []

    def _check(self) -> None:
        if not self.alive:
            raise AgentError(f"guest agent of {self.name} is not responding")

    def ping(self) -> None:
        self.calls.append(("ping", None))
        self._check()

    def wait(self, timeout: float = 90.0, interval: float = 1.0) -> float:
        self.calls.append(("wait", timeout))
        self._check()
        return 0.0

    def exec(self, argv: list[str], stdin: bytes | None = None, timeout: float = 60.0,
             check: bool = False, on_poll: Callable[[], None] | None = None) -> ExecResult:
        self.calls.append(("exec", list(argv)))
        self.timeouts.append(timeout)
        self._check()
        if on_poll is not None:  # the program runs for one poll
            on_poll()
        return self.handler(list(argv), stdin)

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> int:
        self.calls.append(("write", path))
        self._check()
        return len(data)

    def read_file(self, path: str, max_bytes: int = 1 << 26) -> bytes:
        self.calls.append(("read", path))
        self._check()
        if path not in self.files:
            raise AgentError(f"guest agent of {self.name} refused guest-file-open: "
                             f"no such file {path}")
        if len(self.files[path]) > max_bytes:
            raise AgentError(f"{path} is larger than {max_bytes} bytes")
        return self.files[path]

    def changes(self) -> list[tuple[str, Any]]:
        """Return the calls that could change the guest: file writes and every exec but
        the read-only probes (a script fed on stdin, ``sh -s -- ...``, and ``test -x``)."""
        out = []
        for kind, arg in self.calls:
            harmless = kind == "exec" and (
                arg[:3] == ["/bin/sh", "-s", "--"]
                or (arg[0] == "/bin/sh" and arg[2].startswith("test -x")))
            if kind in ("write", "exec") and not harmless:
                out.append((kind, arg))
        return out
