"""``libshare daemon``: automatic runtime redirect of guests enrolled with
``redirect="runtime"`` (its systemd unit: :mod:`libshare.redirect.unit`).

Owns the serving of the requests the hook leaves at ``started`` in
``STATE/requests/NAME.json`` (the hook never waits for a guest; this long-running
process does), what is recorded about each one in ``STATE/redirects/NAME.json`` and
``STATE/log/daemon.log`` and what ``libshare status`` reports of it (:func:`auto_state`).

Per request (:meth:`Daemon.handle`), in a thread of its own (at most ``jobs`` at once,
so one slow guest does not hold up the others):

- the domain is gone, not running, or no longer enrolled with ``redirect="runtime"``:
  the request is dropped (logged, no outcome written);
- its guest agent does not answer yet: the request is kept and retried at the next
  poll, until ``wait`` seconds (config ``redirect_wait``) after it was made; then it
  fails;
- its agent answers: ``libshare-redirect`` is installed in the guest if missing
  (:func:`libshare.redirect.actions.install`, without rebuilding the initramfs), then
  :func:`libshare.redirect.actions.redirect` runs with service restarts.

A served or failed request leaves its outcome (time, ok or error, the reports) in
``STATE/redirects/NAME.json`` and is removed (unless the hook replaced it meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import libvirt

from libshare import domxml
from libshare.errors import LibshareError
from libshare.hook import state
from libshare.redirect import actions
from libshare.redirect.agent import AgentError, AgentFactory, GuestAgent
from libshare.util import syslog
from libshare.virt import api

DEFAULT_POLL = 5.0
DEFAULT_JOBS = 4

#: what a handled request came to
DROPPED, WAITING, OK, FAILED = "dropped", "waiting", "ok", "failed"
#: the priority of each logged event (anything else: info)
EVENT_LEVELS = {FAILED: logging.ERROR, "error": logging.ERROR}

ConnFactory = Callable[[], Any]


class _ConnectionLost(Exception):
    """The libvirt connection broke while looking a domain up."""


@dataclass
class Handled:
    """What :meth:`Daemon.handle` did with one request: ``action`` is one of
    dropped/waiting/ok/failed; ``message`` says why or what."""

    domain: str
    action: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return dict(self.__dict__)


class Daemon:
    """Serves the automatic redirect requests in ``state_dir``.

    ``connect`` opens a libvirt connection (reopened when it dies); ``wait`` is how long
    after a request its guest agent may stay silent; ``jobs`` bounds the domains handled
    at once; ``agent_factory`` builds a guest agent client for a domain (default
    :meth:`GuestAgent.for_domain`); ``clock`` is
    wall time (requests carry wall-clock times); human log lines go to ``err``.
    """

    def __init__(self, state_dir: Path, connect: ConnFactory, *, wait: float = 900.0,
                 jobs: int = DEFAULT_JOBS,
                 agent_factory: AgentFactory | None = None,
                 clock: Callable[[], float] = time.time, err: TextIO | None = None) -> None:
        self.state_dir = state_dir
        self.connect = connect
        self.wait = wait
        self.jobs = max(1, jobs)
        self.agent_factory: AgentFactory = agent_factory or (
            lambda dom: GuestAgent.for_domain(dom))
        self.clock = clock
        self.err = err
        self.results: list[Handled] = []
        self._conn: Any = None
        self._pool = ThreadPoolExecutor(max_workers=self.jobs,
                                        thread_name_prefix="libshare-redirect")
        self._busy: set[str] = set()
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = False
        # under systemd stderr is the journal (lines carry <N> priorities); run by hand,
        # events go to syslog too, as the hook's do
        self._journal = err is None and syslog.stderr_is_journal()
        self._syslog = None if err is not None or self._journal else syslog.syslog_handler()

    # ------------------------------------------------------------ logging

    def log(self, domain: str, event: str, message: str, level: int | None = None,
            **fields: Any) -> None:
        """Append a JSON line to ``STATE/log/daemon.log`` and a human line to ``err``
        (and to syslog, identifier ``libshare``), at ``level`` (default from
        EVENT_LEVELS: failures are errors)."""
        level = level if level is not None else EVENT_LEVELS.get(event, logging.INFO)
        state.append_log(state.daemon_log_path(self.state_dir),
                         {"domain": domain, "event": event, "message": message, **fields})
        line = syslog.safe_text(f"libshare daemon: {domain}: {message}")
        with self._lock:
            prefix = syslog.journal_prefix(level) if self._journal else ""
            print(prefix + line, file=self.err or sys.stderr, flush=True)
            if self._syslog is not None:
                self._syslog.handle(logging.LogRecord(
                    "libshare.daemon", level, __file__, 0, line, None, None))

    # ------------------------------------------------------------ libvirt

    def _connection(self) -> Any:
        """Return an open libvirt connection, reopening a dead one."""
        if self._conn is not None:
            try:
                alive = bool(self._conn.isAlive())
            except libvirt.libvirtError:
                alive = False
            if alive:
                return self._conn
            self._close()
        self._conn = self.connect()
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    @staticmethod
    def _lookup(conn: Any, name: str, uuid: str | None) -> Any | None:
        """Return the domain the request is about (same name and, when recorded, same
        UUID), None if it is gone; raise _ConnectionLost when libvirt cannot say."""
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            try:
                alive = bool(conn.isAlive())
            except libvirt.libvirtError:
                alive = False
            if not alive:
                raise _ConnectionLost from None
            return None
        if uuid and dom.UUIDString() != uuid:
            return None
        return dom

    # ------------------------------------------------------------ one request

    def handle(self, req: dict[str, Any], conn: Any) -> Handled:
        """Act on request ``req`` with libvirt connection ``conn``; return what was done.
        Never raises: unexpected errors become a recorded failure."""
        try:
            return self._handle(req, conn)
        except Exception as exc:  # a bug or an unforeseen libvirt error: record it
            return self._finish(req, {"ok": False, "error": f"unexpected error: {exc}"})

    def _handle(self, req: dict[str, Any], conn: Any) -> Handled:
        name = str(req["domain"])
        try:
            dom = self._lookup(conn, name, req.get("uuid"))
        except _ConnectionLost:
            return Handled(name, WAITING, "libvirt connection lost; retrying")
        if dom is None:
            return self._drop(req, "the domain is gone")
        if not api.is_active(dom):
            return self._drop(req, "the domain is not running")
        try:
            mode = domxml.describe(domxml.parse(api.inactive_xml(dom)))["redirect"]
        except LibshareError:
            mode = req.get("mode", "runtime")
        if mode != "runtime":
            return self._drop(req, f"automatic redirect is now {mode or 'off'} "
                              "for this domain")
        agent = self.agent_factory(dom)
        try:
            agent.ping()
        except AgentError as exc:
            return self._not_answering(req, exc)
        return self._serve(req, dom, agent)

    def _not_answering(self, req: dict[str, Any], exc: AgentError) -> Handled:
        """Keep a request whose guest agent is silent, or fail it once ``wait`` is up."""
        name = str(req["domain"])
        waited = self.clock() - float(req.get("requested_at") or 0)
        if waited >= self.wait:
            return self._finish(req, {"ok": False, "error": (
                f"guest agent did not answer within {self.wait:.0f} s of the start: {exc}")})
        with self._lock:
            first = name not in self._waiting
            self._waiting.add(name)
        if first:
            self.log(name, "waiting", f"waiting for the guest agent (up to "
                     f"{self.wait - waited:.0f} s more)")
        return Handled(name, WAITING, f"guest agent not answering yet: {exc}")

    def _serve(self, req: dict[str, Any], dom: Any, agent: GuestAgent) -> Handled:
        """Install libshare-redirect if needed and redirect the guest; record the result."""
        name = str(req["domain"])
        self.log(name, "serving", "guest agent answers; redirecting")
        t0 = time.monotonic()
        result: dict[str, Any] = {"installed_now": False, "install": None, "report": None}

        def factory(_dom: Any) -> GuestAgent:
            return agent  # the agent that answered serves the whole request

        try:
            if not actions.installed(agent):
                rep = actions.install(dom, agent_factory=factory, update_initramfs=False)
                result.update(installed_now=True, install=rep.as_dict())
            report = actions.redirect(dom, restart=True, agent_factory=factory)
            result.update(ok=True, error=None, report=report.as_dict())
        except LibshareError as exc:
            result.update(ok=False, error=str(exc))
        result["seconds"] = round(time.monotonic() - t0, 1)
        return self._finish(req, result)

    def _drop(self, req: dict[str, Any], why: str) -> Handled:
        name = str(req["domain"])
        state.remove_request(self.state_dir, name, req.get("requested_at"))
        with self._lock:
            self._waiting.discard(name)
        self.log(name, "dropped", f"request dropped: {why}")
        return Handled(name, DROPPED, why)

    def _finish(self, req: dict[str, Any], result: dict[str, Any]) -> Handled:
        """Write the outcome file, remove the request; return the Handled result."""
        name = str(req["domain"])
        outcome = {"domain": name, "uuid": req.get("uuid"), "time": round(self.clock(), 3),
                   "requested_at": req.get("requested_at"), "installed_now": False,
                   "install": None, "report": None, **result}
        outcome["status"] = OK if outcome.get("ok") else FAILED
        state.write_outcome(self.state_dir, outcome)
        state.remove_request(self.state_dir, name, req.get("requested_at"))
        with self._lock:
            self._waiting.discard(name)
        if outcome["ok"]:
            rep = outcome.get("report") or {}
            msg = (f"redirected: {rep.get('bound', 0)} libraries bound now, "
                   f"{rep.get('binds_total', 0)} in place"
                   + (", libshare-redirect installed first" if outcome["installed_now"]
                      else "") + f" ({outcome.get('seconds', 0)} s)")
        else:
            msg = f"redirect failed: {outcome['error']}"
        self.log(name, outcome["status"], msg, ok=outcome["ok"])
        return Handled(name, outcome["status"], msg)

    # ------------------------------------------------------------ passes

    def _pending(self) -> list[dict[str, Any]]:
        """Return the readable pending requests; unreadable request files are removed
        (logged)."""
        def remove(path: Path) -> None:
            try:
                path.unlink()
            except OSError:
                return
            self.log(path.stem, "dropped", f"unreadable request {path} removed",
                     level=logging.WARNING)

        return state.read_requests(self.state_dir, on_unreadable=remove)

    def run_pass(self) -> list[Future[Handled]]:
        """Start handling every pending request not already in hand; return their
        futures. Raises LibshareError when libvirt cannot be reached."""
        requests = [r for r in self._pending() if r["domain"] not in self._busy]
        if not requests:
            return []
        conn = self._connection()
        futures = []
        for req in requests:
            name = req["domain"]
            with self._lock:
                if name in self._busy:
                    continue
                self._busy.add(name)
            futures.append(self._pool.submit(self._handle_in_thread, req, conn))
        return futures

    def _handle_in_thread(self, req: dict[str, Any], conn: Any) -> Handled:
        """Return :meth:`handle`'s result after marking the domain no longer in hand."""
        try:
            done = self.handle(req, conn)
        finally:
            with self._lock:
                self._busy.discard(req["domain"])
        with self._lock:
            self.results.append(done)
        return done

    def idle(self) -> bool:
        """Return True when no request is pending nor in hand."""
        with self._lock:
            busy = bool(self._busy)
        return not busy and not state.read_requests(self.state_dir)

    def stop(self) -> None:
        """Ask :meth:`serve` to return after the domains in hand (safe from a signal
        handler: it only sets a flag)."""
        self._stopping = True

    def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, returning early (within 0.2 s) once stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    @property
    def failures(self) -> list[Handled]:
        """Return the requests that failed so far."""
        with self._lock:
            return [r for r in self.results if r.action == FAILED]

    def serve(self, once: bool = False, until_idle: bool = False,
              poll: float = DEFAULT_POLL) -> int:
        """Serve requests: one pass (``once``), until none is pending (``until_idle``),
        or until :meth:`stop`; wait for the domains in hand; return 1 if a request
        failed, else 0. Raises LibshareError when libvirt cannot be reached in the
        ``once``/``until_idle`` modes (forever: logged and retried)."""
        try:
            while not self._stopping:
                try:
                    futures = self.run_pass()
                except LibshareError as exc:
                    if once or until_idle:
                        raise
                    self.log("-", "error", f"{exc}; retrying in {poll:.0f} s")
                    futures = []
                if once:
                    wait_futures(futures)
                    break
                if until_idle and self.idle():
                    break
                self._sleep(poll)
        finally:
            with self._lock:
                busy = sorted(self._busy)
            if busy:
                self.log("-", "stopping", f"waiting for {len(busy)} redirect(s) in hand: "
                         f"{', '.join(busy)}")
            self._pool.shutdown(wait=True)
            self._close()
        return 1 if self.failures else 0


# ---------------------------------------------------------------------------- status

def auto_state(state_dir: Path, name: str) -> dict[str, Any] | None:
    """Return the automatic redirect state of domain ``name`` for ``libshare status``:
    ``{"state": "pending", "time": requested_at, "last": outcome-or-None}`` while a
    request waits, else ``{"state": "ok"|"failed", "time", "error", "bound",
    "binds_total"}`` from the last outcome; None when there has never been one."""
    req = state.read_request(state_dir, name)
    outcome = state.read_outcome(state_dir, name)
    last = None
    if outcome is not None:
        report = outcome.get("report") or {}
        last = {"state": OK if outcome.get("ok") else FAILED, "time": outcome.get("time"),
                "error": outcome.get("error"), "bound": report.get("bound"),
                "binds_total": report.get("binds_total")}
    if req is not None:
        return {"state": "pending", "time": req.get("requested_at"), "last": last}
    return last
