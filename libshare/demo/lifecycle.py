"""The life cycle every guest of the kit shares, tiny or Debian: define, start, follow
the serial console file, and ALWAYS destroy and undefine the domain afterwards, on
success, failure, timeout or interrupt.

Owns the per-guest run directory (``<cache>/run/<name>/``, readable by QEMU), the
:class:`Guest` base (console, liveness, QEMU pid, waiting for console text), the
:class:`DefinedGuest` base (a defined domain that may be redefined before it starts) and
:func:`defined_domain`, the context manager both kits define their domains with.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from libshare.demo.cache import cache_subdir
from libshare.errors import LibshareError
from libshare.virt import process

POLL_SECONDS = 0.2


_HANDLER_SET = False


class GuestError(LibshareError):
    """A test guest could not be defined or started, or did not do what was awaited."""


class GuestTimeout(GuestError):
    """A test guest did not print what was awaited within the time allowed."""


def _libvirt() -> Any:
    import libvirt  # imported late: unit tests and non-libvirt hosts don't need it

    global _HANDLER_SET
    if not _HANDLER_SET:  # errors are raised as exceptions; don't also print them
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _HANDLER_SET = True
    return libvirt


def cleanup_domain(conn: Any, name: str) -> bool:
    """Destroy (if running) and undefine domain ``name``; return True if it existed."""
    libvirt = _libvirt()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM", 0)
                          | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", 0))
    return True


def cleanup_domains(conn: Any, prefix: str) -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix``; return their names."""
    names = [d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)]
    for n in names:
        cleanup_domain(conn, n)
    return names


def qemu_log_tail(name: str, lines: int = 15) -> str:
    """Return the last ``lines`` lines of libvirt's QEMU log for domain ``name`` ('' if none)."""
    try:
        text = Path(f"/var/log/libvirt/qemu/{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_dir(name: str, cache: Path | str | None = None) -> Path:
    """Return ``<cache>/run/<name>/`` (created, mode 0755), the guest's file directory."""
    d = cache_subdir("run", cache) / name
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    return d


def remove_run_dir(name: str, cache: Path | str | None = None) -> None:
    """Remove ``<cache>/run/<name>/`` and everything in it (returns nothing)."""
    shutil.rmtree(cache_subdir("run", cache) / name, ignore_errors=True)


class Guest:
    """A started guest of the kit: its serial console (:meth:`console`, :meth:`wait_for`),
    liveness and QEMU pid. The kits' context managers destroy and undefine it."""

    def __init__(self, conn: Any, name: str, domain: Any, console_log: Path) -> None:
        self.conn = conn
        self.name = name
        self.domain = domain
        self.console_log = console_log
        self.started = time.monotonic()

    def console(self) -> str:
        """Return the console text printed so far (``\\r`` removed; empty if none yet)."""
        try:
            return self.console_log.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def is_active(self) -> bool:
        """Return True while the guest's QEMU is running."""
        try:
            return bool(self.domain.isActive())
        except _libvirt().libvirtError:
            return False

    def qemu_pid(self) -> int | None:
        """Return the PID of the guest's QEMU process (from libvirt's pid file), or None."""
        return process.qemu_pid(self.name)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Return the first match of ``pattern`` (multiline regex) in the console,
        polling until ``timeout`` seconds; raises GuestTimeout on timeout and GuestError
        if the guest stops before the pattern shows up."""
        rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console())
            if m:
                return m
            if not self.is_active():
                m = rx.search(self.console())
                if m:
                    return m
                raise GuestError(f"guest {self.name} stopped before printing {rx.pattern!r}:\n"
                                 + self.console()[-2000:])
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest {self.name}: no {rx.pattern!r} within {timeout:.0f}s:\n"
                                   + self.console()[-2000:])
            time.sleep(POLL_SECONDS)

    def power_on(self) -> None:
        """Start the (stopped) domain again; raise GuestError with QEMU's log tail if
        libvirt cannot."""
        libvirt = _libvirt()
        try:
            self.domain.create()
        except libvirt.libvirtError as exc:
            raise GuestError(f"cannot start {self.name}: {exc}\n"
                             f"{qemu_log_tail(self.name)}") from exc


class DefinedGuest:
    """A defined, not yet started guest (callers may change the persistent definition
    through the libvirt API, e.g. enrol it, before :meth:`start`)."""

    def __init__(self, conn: Any, name: str, domain: Any, console_log: Path) -> None:
        self.conn = conn
        self.name = name
        self.domain = domain
        self.console_log = console_log

    def create(self) -> Any:
        """Start the domain as it is defined now (its console log emptied first); return
        the libvirt domain. Raises GuestError (with QEMU's log tail) if libvirt cannot."""
        libvirt = _libvirt()
        self.console_log.unlink(missing_ok=True)
        try:
            dom = self.conn.lookupByName(self.name)
            dom.create()
        except libvirt.libvirtError as exc:
            raise GuestError(f"cannot start test guest {self.name}: {exc}\n"
                             f"{qemu_log_tail(self.name)}") from exc
        return dom


@contextlib.contextmanager
def defined_domain(conn: Any, name: str, xml: Callable[[], str],
                   cleanup: Callable[[], None]) -> Iterator[Any]:
    """Define domain ``name`` from the XML that ``xml()`` returns (any old domain of that
    name is removed first) and yield the libvirt domain; on leaving the block the domain
    is destroyed and undefined and ``cleanup()`` runs, always (also when ``xml()`` or the
    definition fails). Raises GuestError if libvirt refuses the definition."""
    libvirt = _libvirt()
    cleanup_domain(conn, name)
    try:
        text = xml()
        try:
            dom = conn.defineXML(text)
        except libvirt.libvirtError as exc:
            raise GuestError(f"cannot define test guest {name}: {exc}") from exc
        yield dom
    finally:
        cleanup_domain(conn, name)
        cleanup()
