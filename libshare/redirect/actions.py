"""Redirect: make running guests use the library region's copies of their libraries.

Owns the host side of redirection, done entirely through qemu-guest-agent
(:mod:`libshare.redirect.agent`): which guest-side files libshare installs and where
(:data:`GUEST_FILES`, read from the guest script's own table; the files are shipped in
``libshare/data/guest/``), the checks every
operation makes before touching a guest (:func:`check_domain`: running, region device
attached, agent answering, DAX active in the guest), and the three operations:

- :func:`install` puts the guest-side files into the guest (the ``libshare-redirect``
  script, the boot-time hook of the guest's initramfs tool: an initramfs-tools hook and
  init-bottom script, or a dracut module; the apt and dpkg hooks where those exist, a
  systemd unit) and sets up boot-time mode by the domain's boot path
  (:mod:`libshare.redirect.bootmode`: the guest's initramfs rebuilt with its own tool,
  ``libshare-redirect initramfs``: ``update-initramfs`` or ``dracut``; libshare's own
  initrd for direct kernel boot; or automatic runtime redirect where neither works);
- :func:`redirect` runs ``libshare-redirect apply`` now (runtime mode: binds, then
  ``systemctl daemon-reexec`` and service restarts unless ``restart=False``);
- :func:`unredirect` runs ``libshare-redirect uninstall``: removes exactly the binds it
  recorded, deletes every guest-side file and rebuilds the initramfs (a domain booting
  libshare's initrd boots its own again).

Which of :data:`GUEST_FILES` a guest needs follows from what the script's ``detect``
prints (:func:`needed_files`, by :data:`FILE_OWNERS`): also what ``libshare image
prepare`` installs into a disk image.

The guest script prints ``key=value`` lines (:func:`parse_kv`); a ``refused=`` line
means it changed nothing, which becomes a :class:`~libshare.errors.RefusedError`.

Progress: after the checks, each guest step of the three operations (files written,
libraries hashed, ``update-initramfs``, binds, the agent's restart) is reported to an
optional :class:`~libshare.util.progress.Progress` callback, ticked with its elapsed
seconds while the guest program runs (they take minutes under TCG), and logged at
debug level (``libshare -v``) when it starts and ends (:class:`Steps`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare import domxml
from libshare.config import DEFAULT_STATE_DIR
from libshare.data import guest_bytes
from libshare.errors import LibshareError, RefusedError
from libshare.redirect.agent import AgentError, AgentFactory, ExecResult, GuestAgent
from libshare.util.progress import Progress
from libshare.virt import api

log = logging.getLogger(__name__)

#: the guest script's installed path
SCRIPT = "/usr/sbin/libshare-redirect"
UNIT = "libshare-redirect.service"
AGENT_UNIT = "qemu-guest-agent.service"
#: seconds update-initramfs may take in a guest (TCG guests are slow)
INITRAMFS_TIMEOUT = 900.0
#: seconds ``libshare-redirect apply`` or ``prime`` may take (hashing every file of a whole
#: /usr the first time: minutes under TCG)
APPLY_TIMEOUT = 1800.0


@dataclass(frozen=True)
class GuestFile:
    """One file libshare installs in a guest: ``source``, its name among the guest files
    shipped in ``libshare/data/guest/`` (None for a symbolic link), the guest ``path``,
    its ``mode`` and, for a link, its target ``link``."""

    source: str | None
    path: str
    mode: int = 0o644
    link: str | None = None


def parse_guest_files(script: str) -> tuple[GuestFile, ...]:
    """Return the guest files listed in the ``GUEST_FILES`` table of the guest script
    text ``script`` (the one list of them: the script's ``uninstall`` removes exactly
    these). Raises LibshareError if the table is missing or malformed."""
    try:
        table = script.split('\nGUEST_FILES="', 1)[1].split('"', 1)[0]
    except IndexError:
        raise LibshareError("the guest script has no GUEST_FILES table") from None
    files = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) not in (3, 4) or not fields[1].isdigit():
            raise LibshareError(f"malformed GUEST_FILES line in the guest script: {line!r}")
        source = None if fields[0] == "-" else fields[0]
        if (source is None) != (len(fields) == 4):
            raise LibshareError(f"malformed GUEST_FILES line in the guest script: {line!r}")
        files.append(GuestFile(source, fields[2], int(fields[1], 8),
                               fields[3] if len(fields) == 4 else None))
    return tuple(files)


def guest_file_bytes(name: str) -> bytes:
    """Return the contents of guest-side package file ``name`` (``libshare/data/guest/``)."""
    return guest_bytes(name)


def script_bytes() -> bytes:
    """Return the ``libshare-redirect`` script as shipped in the package."""
    return guest_file_bytes("libshare-redirect")


def parse_state_dir(script: str) -> str:
    """Return the guest script's state folder (its ``STATE``, relative to the guest
    root: verdicts live there, and its ``uninstall`` removes it) as the script text
    ``script`` sets it. Raises LibshareError if the script does not say."""
    m = re.search(r'^\s*STATE=\$\{LIBSHARE_STATE:-\$ROOT(/[^}"]+)\}', script, re.M)
    if not m:
        raise LibshareError("the guest script does not set its state folder (STATE)")
    return m.group(1)


#: every file ``install`` puts in a guest, as the guest script lists them
GUEST_FILES: tuple[GuestFile, ...] = parse_guest_files(script_bytes().decode())
#: the guest script's state folder in the guest, as the script sets it
GUEST_STATE_DIR: str = parse_state_dir(script_bytes().decode())

#: guest folders whose files only a guest with that tool gets (the initramfs tool, or a
#: package manager among ``detect``'s ``package_tools``); every other file goes to all
FILE_OWNERS: tuple[tuple[str, str], ...] = (
    ("/etc/initramfs-tools/", "initramfs-tools"),
    ("/usr/lib/dracut/", "dracut"),
    ("/etc/apt/", "apt"),
    ("/etc/dpkg/", "dpkg"),
)


def needed_files(detected: dict[str, Any]) -> tuple[GuestFile, ...]:
    """Return the :data:`GUEST_FILES` a guest needs, given what its ``libshare-redirect
    detect`` printed (``initramfs_tool``, ``package_tools``): the files of its own
    initramfs tool and package managers, and all others."""
    have = {str(detected.get("initramfs_tool", ""))}
    have.update(str(detected.get("package_tools", "")).split())
    out = []
    for f in GUEST_FILES:
        owner = next((tool for prefix, tool in FILE_OWNERS if f.path.startswith(prefix)), None)
        if owner is None or owner in have:
            out.append(f)
    return tuple(out)


def parse_kv(text: str) -> dict[str, Any]:
    """Return the ``key=value`` lines of the guest script's output as a dict.

    Keys seen more than once (``differs=PATH``, ``deleted=PATH``) give a list of every
    value; others give the last value. Lines without ``=`` are ignored.
    """
    out: dict[str, Any] = {}
    multi = {"differs", "deleted"}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            continue
        if key in multi:
            out.setdefault(key, []).append(value)
        else:
            out[key] = value
    return out


def _int(kv: dict[str, Any], key: str) -> int:
    """Return ``kv[key]`` as an int (0 if absent or not a number)."""
    try:
        return int(kv.get(key, 0))
    except (TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------- checks

@dataclass
class Target:
    """A guest that passed :func:`check_domain`: its name, agent, enrolment and the
    region device the guest sees."""

    name: str
    agent: GuestAgent
    group: str | None
    digest: str | None
    region_device: str | None = None




def check_domain(dom: Any, need_dax: bool = True,
                 agent_factory: AgentFactory = GuestAgent.for_domain) -> Target:
    """Return a :class:`Target` for libvirt domain ``dom`` once it is known safe to act on.

    Raises RefusedError with a one-line reason, before anything in the guest changes, if
    the domain is not running, its running definition has no library region device, its
    guest agent does not answer, or (``need_dax``) the guest cannot mount the region
    with DAX (checked by running the script's ``probe`` from stdin: nothing installed).
    """
    name = dom.name()
    if not api.is_active(dom):
        raise RefusedError(f"{name} is not running")
    try:
        live = domxml.describe(domxml.parse(str(dom.XMLDesc(0))))
    except Exception as exc:  # libvirt or XML errors: one line, nothing done
        raise RefusedError(f"{name}: cannot read its running definition: {exc}") from exc
    if not live["enrolled"] or not live["device_present"]:
        hint = ("enrolled, but the region is attached at its next boot: restart it"
                if live["enrolled"] else "enrol it with 'libshare enable' and restart it")
        raise RefusedError(f"{name} has no library region device ({hint})")
    agent = agent_factory(dom)
    try:
        agent.ping()
    except AgentError as exc:
        raise RefusedError(f"{name}: no responding guest agent ({exc})") from exc
    target = Target(name=name, agent=agent, group=live["group"], digest=live["digest"])
    if need_dax:
        target.region_device = probe(agent, name)
    return target


def probe(agent: GuestAgent, name: str) -> str:
    """Return the guest's region device after checking it mounts with DAX and carries a
    text manifest; RefusedError with the script's reason otherwise. Runs the packaged
    script through ``sh -s`` (nothing is installed; the probe mount is undone)."""
    res = _run(agent, ["/bin/sh", "-s", "--", "probe"], stdin=script_bytes(), timeout=120)
    kv = parse_kv(res.out)
    if "refused" in kv:
        raise RefusedError(f"{name}: {kv['refused']}")
    if not res.ok or kv.get("dax") != "1" or not kv.get("region_device"):
        raise RefusedError(f"{name}: region probe failed (exit {res.rc}): "
                           f"{_tail(res)}")
    return str(kv["region_device"])


def _tail(res: ExecResult) -> str:
    """Return the last line of a program's stderr (or stdout) for messages."""
    lines = (res.err.strip() or res.out.strip()).splitlines()
    return lines[-1] if lines else "no output"


#: for the other modules of redirect (bootmode)
tail = _tail


def _run(agent: GuestAgent, argv: list[str], stdin: bytes | None = None,
         timeout: float = 60.0, on_poll: Callable[[], None] | None = None) -> ExecResult:
    """Return the result of running ``argv`` in the guest (AgentError -> LibshareError);
    ``on_poll()`` is called while it runs."""
    try:
        return agent.exec(argv, stdin=stdin, timeout=timeout, on_poll=on_poll)
    except AgentError as exc:
        raise LibshareError(str(exc)) from exc


class Steps:
    """The guest steps of one operation on the guest ``name``: each is logged (debug)
    when it starts and ends, and reported to ``progress`` (when given) as an open-ended
    phase ticked with the seconds it has run."""

    def __init__(self, name: str, progress: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.progress, self.clock = name, progress, clock

    def run(self, phase: str, agent: GuestAgent, argv: list[str],
            stdin: bytes | None = None, timeout: float = 60.0) -> ExecResult:
        """Run ``argv`` in the guest as step ``phase``; return its ExecResult (errors as
        :func:`_run`)."""
        start = self.clock()
        log.debug("%s: %s: %s", self.name, phase, " ".join(argv)[:200])

        def tick() -> None:
            if self.progress:
                self.progress(phase, int(self.clock() - start), 0)

        tick()
        res = _run(agent, argv, stdin=stdin, timeout=timeout, on_poll=tick)
        log.debug("%s: %s: exit %s after %.1f s", self.name, phase, res.rc,
                  self.clock() - start)
        return res

    def count(self, phase: str, done: int, total: int, unit: str) -> None:
        """Report ``done`` of ``total`` ``unit`` in step ``phase`` (total 0: open-ended,
        ``done`` its seconds so far); the step is logged when it starts (``done`` 0)."""
        if done == 0:
            log.debug("%s: %s%s", self.name, phase, f": {total} {unit}" if total else "")
        if self.progress:
            self.progress(phase, done, total, unit)


def installed(agent: GuestAgent, timeout: float = 30.0) -> bool:
    """Return True if the guest has the libshare-redirect script installed."""
    return _run(agent, ["/bin/sh", "-c", f"test -x {SCRIPT}"], timeout=timeout).ok


def detect(agent: GuestAgent, name: str) -> dict[str, Any]:
    """Return what the packaged script's ``detect`` prints in the guest (run from stdin:
    nothing installed): its ``initramfs_tool`` (initramfs-tools, dracut or none) and
    ``package_tools``. Raises LibshareError if it cannot run."""
    res = _run(agent, ["/bin/sh", "-s", "--", "detect"], stdin=script_bytes(), timeout=60)
    kv = parse_kv(res.out)
    if not res.ok or "initramfs_tool" not in kv:
        raise LibshareError(f"{name}: cannot tell the guest's initramfs tool (exit {res.rc}): "
                            f"{_tail(res)}")
    return kv


# ---------------------------------------------------------------------------- install

@dataclass
class InstallReport:
    """What :func:`install` did in one guest."""

    domain: str
    region_device: str | None
    files: list[str] = field(default_factory=list)
    identical: int = 0                  # guest files identical to the region's (primed)
    differs: list[str] = field(default_factory=list)
    initramfs_tool: str = "none"        # initramfs-tools, dracut or none
    initramfs: str = "not run"          # "updated", "failed: ...", "not rebuilt: ..."
    initramfs_entries: int = 0          # libshare files found in the new initramfs
    boot: dict[str, Any] | None = None  # bootmode.BootReport: boot path, mode, why
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return dict(self.__dict__)


def install(dom: Any, agent_factory: AgentFactory = GuestAgent.for_domain,
            update_initramfs: bool = True,
            progress: Progress | None = None,
            state_dir: Path = DEFAULT_STATE_DIR) -> InstallReport:
    """Install the guest-side files its initramfs tool and package managers need
    (:func:`needed_files`) into running domain ``dom`` and, with ``update_initramfs``,
    set up boot-time mode by its boot path (:func:`libshare.redirect.bootmode.setup`;
    libshare's initrd of a domain with direct kernel boot goes under the enrolment's
    state directory, else ``state_dir``); return an :class:`InstallReport`. Each step
    after the checks is reported to ``progress`` and logged (see :class:`Steps`).

    Refuses (RefusedError, nothing changed) as :func:`check_domain` does. If writing a
    file fails, the files written so far are removed again before the error is raised.
    """
    t0 = time.monotonic()
    target = check_domain(dom, agent_factory=agent_factory)
    agent = target.agent
    steps = Steps(target.name, progress)
    detected = detect(agent, target.name)
    files = needed_files(detected)
    report = InstallReport(domain=target.name, region_device=target.region_device,
                           initramfs_tool=str(detected["initramfs_tool"]))
    dirs = sorted({f.path.rsplit("/", 1)[0] for f in files})
    try:
        steps.count("install files", 0, len(files), "files")
        _run(agent, ["mkdir", "-p", *dirs], timeout=30)
        for f in files:
            if f.source is None:
                assert f.link is not None
                res = _run(agent, ["ln", "-sfn", f.link, f.path], timeout=30)
                if not res.ok:
                    raise LibshareError(f"{target.name}: cannot link {f.path}: {_tail(res)}")
            else:
                agent.write_file(f.path, guest_file_bytes(f.source), mode=f.mode)
            report.files.append(f.path)
            steps.count("install files", len(report.files), len(files), "files")
    except (AgentError, LibshareError) as exc:
        if report.files:
            _run(agent, ["rm", "-f", *report.files], timeout=30)
        raise LibshareError(f"{target.name}: install failed, nothing left behind: {exc}") \
            from exc
    # started now (not only from the next boot) so that its ExecStop detaches the binds
    # of a runtime redirect at shutdown; 'start' never restarts it (that would detach)
    steps.run("start the unit", agent, [
        "/bin/sh", "-c", "command -v systemctl >/dev/null && "
        f"[ -d /run/systemd/system ] && systemctl daemon-reload && "
        f"systemctl start {UNIT} || true"], timeout=120)
    # hash every library now (O_DIRECT) so the boot-time apply only reads its verdicts
    res = steps.run("hash libraries", agent, [SCRIPT, "prime"], timeout=APPLY_TIMEOUT)
    kv = parse_kv(res.out)
    report.identical, report.differs = _int(kv, "identical"), list(kv.get("differs", []))
    if update_initramfs:
        from libshare.redirect import bootmode  # it builds on this module

        report.boot = bootmode.setup(dom, agent, state_dir, report, steps).as_dict()
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def rebuild_initramfs(agent: GuestAgent, tool: str, steps: Steps) -> tuple[bool, int, str]:
    """Rebuild the guest's initramfs of its running kernel with its own ``tool``
    (``libshare-redirect initramfs``: update-initramfs or dracut, the script installed);
    return (updated, libshare files in the new initramfs, why not: the script's refusal
    or its last line of output)."""
    phase = "dracut" if tool == "dracut" else "update-initramfs"
    res = steps.run(phase, agent, [SCRIPT, "initramfs"], timeout=INITRAMFS_TIMEOUT)
    kv = parse_kv(res.out)
    if kv.get("initramfs") == "updated":
        return True, _int(kv, "initramfs_entries"), ""
    return False, 0, str(kv.get("refused") or _tail(res))


# ---------------------------------------------------------------------------- redirect

@dataclass
class RedirectReport:
    """What :func:`redirect` or :func:`unredirect` did in one guest."""

    domain: str
    action: str
    region_device: str | None = None
    bound: int = 0                       # binds made now
    binds_total: int = 0                 # binds in place afterwards
    differs: list[str] = field(default_factory=list)
    hashed: int = 0
    cached: int = 0
    removed: int = 0
    deleted: list[str] = field(default_factory=list)
    initramfs: str | None = None
    grub: str | None = None              # unredirect: update-grub without libshare's drop-in
    restarted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    agent_restarted: bool = False
    boot: str | None = None              # unredirect: the domain's own initrd again
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return dict(self.__dict__)


def _agent_pid(agent: GuestAgent) -> str:
    """Return the guest agent service's main PID as systemd reports it ('' if unknown)."""
    res = agent.exec(["systemctl", "show", "-p", "MainPID", "--value", AGENT_UNIT],
                     timeout=30)
    return res.out.strip() if res.ok else ""


def _restart_agent(agent: GuestAgent, kv: dict[str, Any], name: str,
                   timeout: float = 180.0, steps: Steps | None = None) -> bool:
    """If the guest deferred the restart of its agent (``agent_restart=deferred``: the
    agent runs the script, so it must outlive it), restart it now, asynchronously
    (``systemd-run --no-block``), and wait until a new agent process answers; return
    True if it was restarted. ``steps`` reports the wait."""
    if kv.get("agent_restart") != "deferred":
        return False
    steps = steps or Steps(name)
    start = time.monotonic()
    steps.count("restart the agent", 0, 0, "")
    try:
        before = _agent_pid(agent)
        agent.exec(["systemd-run", "--no-block", "--collect", "--quiet", "systemctl",
                    "restart", AGENT_UNIT], timeout=30)
    except AgentError:
        pass  # the agent may go away while answering: that is the restart
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            pid = _agent_pid(agent)
            if pid and pid != "0" and pid != before:
                log.debug("%s: guest agent restarted (main PID %s, was %s)", name, pid,
                          before)
                return True
            last = f"main PID still {pid}"
        except AgentError as exc:
            last = str(exc)
        steps.count("restart the agent", int(time.monotonic() - start), 0, "")
        time.sleep(1.0)
    raise LibshareError(f"{name}: guest agent did not come back after its restart: {last}")


def redirect(dom: Any, restart: bool = True,
             agent_factory: AgentFactory = GuestAgent.for_domain,
             progress: Progress | None = None) -> RedirectReport:
    """Bind the region's identical copies over the guest's libraries now (runtime mode);
    return a :class:`RedirectReport`. With ``restart``, the guest re-executes systemd and
    restarts the services still mapping old copies, its agent last (waited for). Each
    step after the checks is reported to ``progress`` and logged (:class:`Steps`).

    Refuses as :func:`check_domain` does, and if the guest-side files are not installed.
    """
    t0 = time.monotonic()
    target = check_domain(dom, agent_factory=agent_factory)
    agent = target.agent
    if not installed(agent):
        raise RefusedError(f"{target.name}: libshare-redirect is not installed "
                           f"(run 'libshare guest install {target.name}' first)")
    steps = Steps(target.name, progress)
    argv = [SCRIPT, "apply", "--defer-agent"] + ([] if restart else ["--no-restart"])
    res = steps.run("bind and restart" if restart else "bind", agent, argv,
                    timeout=APPLY_TIMEOUT)
    kv = parse_kv(res.out)
    if "refused" in kv:
        raise RefusedError(f"{target.name}: {kv['refused']}")
    if not res.ok:
        raise LibshareError(f"{target.name}: libshare-redirect apply failed (exit {res.rc}): "
                            f"{_tail(res)}")
    report = RedirectReport(
        domain=target.name, action="redirect", region_device=kv.get("region_device"),
        bound=_int(kv, "bound"), binds_total=_int(kv, "binds_total"),
        differs=list(kv.get("differs", [])), hashed=_int(kv, "hashed"),
        cached=_int(kv, "cached"), restarted=str(kv.get("restarted", "")).split(),
        kept=str(kv.get("kept", "")).split())
    report.agent_restarted = _restart_agent(agent, kv, target.name, steps=steps)
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def unredirect(dom: Any, restart: bool = True,
               agent_factory: AgentFactory = GuestAgent.for_domain,
               progress: Progress | None = None,
               state_dir: Path | None = None) -> RedirectReport:
    """Undo :func:`install` and :func:`redirect` in running domain ``dom``: remove exactly
    the binds recorded in the guest, delete every guest-side file and rebuild the
    initramfs (a reboot then runs the guest as before; a domain booting libshare's
    initrd boots its own again, libshare's files removed); return a
    :class:`RedirectReport`.

    Refuses if the domain is not running or its agent does not answer, and if nothing is
    installed; the region device and DAX are not required (there may be nothing to
    mount any more). Each step after the checks is reported to ``progress`` and logged
    (:class:`Steps`).
    """
    t0 = time.monotonic()
    if not api.is_active(dom):
        raise RefusedError(f"{dom.name()} is not running")
    agent = agent_factory(dom)
    name = dom.name()
    try:
        agent.ping()
    except AgentError as exc:
        raise RefusedError(f"{name}: no responding guest agent ({exc})") from exc
    if not installed(agent):
        raise RefusedError(f"{name}: libshare-redirect is not installed: nothing to undo")
    steps = Steps(name, progress)
    argv = [SCRIPT, "uninstall", "--defer-agent"] + ([] if restart else ["--no-restart"])
    res = steps.run("undo binds, files and initramfs", agent, argv,
                    timeout=INITRAMFS_TIMEOUT)
    kv = parse_kv(res.out)
    if not res.ok:
        raise LibshareError(f"{name}: libshare-redirect uninstall failed (exit {res.rc}): "
                            f"{_tail(res)}")
    report = RedirectReport(
        domain=name, action="unredirect", removed=_int(kv, "removed"),
        deleted=list(kv.get("deleted", [])), initramfs=kv.get("initramfs"),
        grub=kv.get("grub"), restarted=str(kv.get("restarted", "")).split(), kept=str(kv.get("kept", "")).split())
    report.agent_restarted = _restart_agent(agent, kv, name, steps=steps)
    from libshare.redirect import bootmode  # it builds on this module

    report.boot = bootmode.teardown(dom, state_dir)
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def guest_status(dom: Any, agent_factory: AgentFactory = GuestAgent.for_domain,
                 timeout: float = 120.0) -> dict[str, Any]:
    """Return the guest's own view (``libshare-redirect status``): region mounted, DAX,
    binds, boot mode, library mappings from the region / from disk / stale. For
    ``libshare status``. Each program run in the guest may take ``timeout`` seconds.
    Raises LibshareError if the agent does not answer."""
    agent = agent_factory(dom)
    res = _run(agent, ["/bin/sh", "-s", "--", "status"], stdin=script_bytes(),
               timeout=timeout)
    kv = parse_kv(res.out)
    out: dict[str, Any] = {"installed": installed(agent, timeout=min(timeout, 30.0))}
    for key, value in kv.items():
        out[key] = int(value) if isinstance(value, str) and value.isdigit() else value
    return out
