"""The life cycle of a Debian test guest (the image: :mod:`libshare.demo.debian.image`):
define it on a fresh qcow2 overlay of the cached image, start it, wait until its console
says multi-user was reached and its qemu-guest-agent answers, reboot or power-cycle it,
run programs in it through the agent, and ALWAYS destroy and undefine it and remove the
overlay when the block ends.

The image has no D-Bus, hence no logind: reboot with ``systemctl reboot`` run through
the agent (what :meth:`DebianGuest.reboot` does), not the agent's ``guest-shutdown`` nor
ACPI. Tests and the demo power-cycle (:meth:`DebianGuest.restart`) rather than reboot.

API: ``defined_debian_guest(conn, name, options=None)`` (a context manager yielding a
``DefinedDebianGuest``: ``.domain`` can be redefined, e.g. enrolled, before ``.start()``)
and ``running_debian_guest(conn, name, options=None)`` (yielding a booted
``DebianGuest``: ``.agent``, ``.exec(argv, stdin=None, timeout=60, check=False)``,
``.sh(script, timeout=60, check=True)``, ``.console()``, ``.boots()``,
``.wait_booted(timeout, count=1)``, ``.reboot(timeout)``, ``.restart(timeout)``,
``.last_boot``, ``.qemu_pid()``, ``.overlay``, ``.image``, ``.domain``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from libshare.demo.debian.domain import debian_domain_xml
from libshare.demo.debian.image import (
    BOOTED_MARKER,
    DebianImage,
    boot_files,
    create_overlay,
    debian_image,
)
from libshare.demo.domain import Customizer
from libshare.demo.lifecycle import (
    DefinedGuest,
    Guest,
    GuestError,
    GuestTimeout,
    defined_domain,
    run_dir,
)
from libshare.redirect.agent import AgentError, ExecResult, GuestAgent

#: Not anchored to the start of a line: the marker races serial-getty's prompt on ttyS0
#: ("lsguest login: LIBSHARE-DEBIAN-BOOTED ...", seen in CI), and kernel messages may
#: follow it on the same line.
_BOOTED_RE = re.compile(
    rf"{BOOTED_MARKER} boot_id=([0-9a-f-]{{36}}) uptime=([0-9]+\.[0-9]+) "
    r"release=([0-9][0-9A-Za-z.+_-]*[0-9A-Za-z])")






# ------------------------------------------------------------------ host apt














# ------------------------------------------------------------------ image build






















# ------------------------------------------------------------------ domain XML






# ------------------------------------------------------------------ runner


@dataclass
class DebianGuestOptions:
    """How to boot a Debian test guest: ``image`` (None: :func:`debian_image` with
    ``suite``/``extra_packages``), RAM, vCPUs, extra ``devices`` XML, ``customize``
    callbacks, ``domain_type`` (``qemu`` = TCG), ``boot_timeout`` seconds per boot,
    ``cache`` root, ``keep_files`` (keep the run dir's console.log; the overlay always
    goes), ``direct_kernel_boot`` (boot the image's own kernel and initrd, copied out of
    its /boot, with ``<os><kernel>``/``<initrd>`` instead of its GRUB)."""

    image: DebianImage | None = None
    suite: str | None = None
    extra_packages: Sequence[str] = ()
    memory_mib: int = 512
    vcpus: int = 1
    devices: Sequence[str | etree._Element] = ()
    customize: Sequence[Customizer] = field(default_factory=list)
    domain_type: str = "qemu"
    boot_timeout: float = 180.0
    cache: Path | str | None = None
    keep_files: bool = False
    direct_kernel_boot: bool = False


@dataclass(frozen=True)
class Boot:
    """One boot of a guest as its console reported it: ``index`` (1 = first boot of this
    run), ``boot_id``, guest ``uptime`` seconds when multi-user was reached, kernel
    ``release``, and host ``seconds`` from start (or reboot request) to agent answer."""

    index: int
    boot_id: str
    uptime: float
    release: str
    seconds: float


def console_boots(text: str) -> list[tuple[str, float, str]]:
    """Return ``(boot_id, uptime, release)`` of each boot marker in console ``text``."""
    return [(m.group(1), float(m.group(2)), m.group(3))
            for m in _BOOTED_RE.finditer(text.replace("\r", ""))]


class DebianGuest(Guest):
    """A started Debian test guest; destroyed, undefined and its overlay removed when
    the :func:`defined_debian_guest`/:func:`running_debian_guest` block ends. Console,
    liveness and QEMU pid come from :class:`~libshare.demo.lifecycle.Guest`."""

    def __init__(self, defined: DefinedDebianGuest, domain: Any) -> None:
        super().__init__(defined.conn, defined.name, domain, defined.console_log)
        self.overlay = defined.overlay
        self.image = defined.image
        self.boot_timeout = defined.boot_timeout
        self.agent = GuestAgent.for_domain(domain)
        self.last_boot: Boot | None = None

    def boots(self) -> list[tuple[str, float, str]]:
        """Return ``(boot_id, uptime, release)`` of every boot the console reported."""
        return console_boots(self.console())

    def wait_booted(self, timeout: float | None = None, count: int = 1) -> Boot:
        """Wait until the console shows ``count`` boots reaching multi-user and the agent
        answers ``guest-ping``; return that :class:`Boot`. Raises GuestTimeout after
        ``timeout`` seconds (default: the options' boot timeout) and GuestError if the
        guest stops first."""
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while len(self.boots()) < count:
            if not self.is_active():
                raise GuestError(f"guest {self.name} stopped while booting:\n"
                                 + self.console()[-2000:])
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest {self.name} did not reach multi-user within "
                                   f"{timeout:.0f}s:\n" + self.console()[-2000:])
            time.sleep(0.5)
        while True:
            try:
                self.agent.ping()
                break
            except AgentError as exc:
                if not self.is_active():
                    raise GuestError(f"guest {self.name} stopped after booting: {exc}") from exc
                if time.monotonic() > deadline:
                    raise GuestTimeout(f"guest {self.name} booted but its agent did not "
                                       f"answer within {timeout:.0f}s: {exc}") from exc
            time.sleep(0.5)
        boot_id, uptime, release = self.boots()[count - 1]
        self.last_boot = Boot(count, boot_id, uptime, release, time.monotonic() - self.started)
        return self.last_boot

    def exec(self, argv: Sequence[str], stdin: bytes | str | None = None,
             timeout: float = 60.0, check: bool = False) -> ExecResult:
        """Run ``argv`` in the guest through the agent; return its ExecResult."""
        return self.agent.exec(argv, stdin=stdin, timeout=timeout, check=check)

    def sh(self, script: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``script`` with ``/bin/sh -c`` in the guest; return its stdout text
        (AgentError on a non-zero exit when ``check``)."""
        return self.agent.exec(["/bin/sh", "-c", script], timeout=timeout, check=check).out

    def reboot(self, timeout: float | None = None) -> Boot:
        """Reboot the guest with ``systemctl reboot`` run through the agent, and wait for
        the new boot; return it. Raises GuestTimeout if it does not come back in time.

        (The image has no D-Bus, so no logind: the agent's ``guest-shutdown`` (which runs
        ``shutdown -r +0``) and the ACPI power button do nothing in it.)"""
        count = self._systemctl("reboot")
        return self.wait_booted(timeout, count=count)

    def restart(self, timeout: float | None = None, stop_timeout: float = 180.0) -> Boot:
        """Power-cycle the guest: ``systemctl poweroff`` through the agent, wait until
        libvirt sees the domain stopped, start it again, and wait for the new boot;
        return it. Raises GuestTimeout if it does not stop or come back in time.

        Tests and the demo use this rather than :meth:`reboot`: a warm reset keeps
        QEMU's TCG translations of the old kernel's pages, and GRUB's relocator then
        copies a new initramfs/kernel layout over them one self-modifying-code fault per
        byte (seen: 1.2 KB/s, reboots of 5-10 minutes). A new QEMU process has none."""
        count = self._systemctl("poweroff")
        deadline = time.monotonic() + stop_timeout
        while self.is_active():
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest {self.name} did not power off within "
                                   f"{stop_timeout:.0f}s")
            time.sleep(0.5)
        self.power_on()
        return self.wait_booted(timeout, count=count)

    def _systemctl(self, action: str) -> int:
        """Start ``systemctl ACTION`` (reboot, poweroff) in the guest through guest-exec,
        which answers before the command runs (the agent dies with the old system), and
        restart the boot clock; return the boot count the next boot will have."""
        count = len(self.boots()) + 1
        self.started = time.monotonic()
        try:
            self.agent.command("guest-exec", {"path": "/bin/systemctl", "arg": [action]})
        except AgentError as exc:
            verb = {"poweroff": "power off"}.get(action, action)
            raise GuestError(f"cannot {verb} {self.name}: {exc}") from exc
        return count


class DefinedDebianGuest(DefinedGuest):
    """A defined, not yet started Debian test guest (callers may redefine ``domain``
    through libvirt, e.g. enrol it, before :meth:`start`)."""

    def __init__(self, conn: Any, name: str, domain: Any, console_log: Path, overlay: Path,
                 image: DebianImage, boot_timeout: float) -> None:
        super().__init__(conn, name, domain, console_log)
        self.overlay = overlay
        self.image = image
        self.boot_timeout = boot_timeout

    def start(self, wait: bool = True) -> DebianGuest:
        """Start the domain as now defined; return the :class:`DebianGuest`, booted
        (multi-user reached, agent answering) unless ``wait`` is False."""
        guest = DebianGuest(self, self.create())
        if wait:
            guest.wait_booted()
        return guest


@contextlib.contextmanager
def defined_debian_guest(conn: Any, name: str, options: DebianGuestOptions | None = None
                         ) -> Iterator[DefinedDebianGuest]:
    """Define (not start) Debian test guest ``name`` on a fresh overlay of the cached
    image and yield a :class:`DefinedDebianGuest`; on leaving the block the domain is
    destroyed and undefined and the overlay removed, always (the run directory too,
    unless ``options.keep_files``)."""
    options = options or DebianGuestOptions()
    image = options.image or debian_image(options.suite, options.extra_packages,
                                          cache=options.cache)
    rdir = run_dir(name, options.cache)
    console = rdir / "console.log"
    overlay = rdir / "disk.qcow2"
    kernel = None
    if options.direct_kernel_boot:
        files = boot_files(image)
        kernel = (files.kernel, files.initrd, files.cmdline)

    def xml() -> str:
        console.unlink(missing_ok=True)
        create_overlay(image, overlay)
        return debian_domain_xml(name, overlay, console, memory_mib=options.memory_mib,
                                 vcpus=options.vcpus, domain_type=options.domain_type,
                                 devices=options.devices, customize=list(options.customize),
                                 kernel=kernel)

    def cleanup() -> None:
        overlay.unlink(missing_ok=True)
        if not options.keep_files:
            shutil.rmtree(rdir, ignore_errors=True)

    with defined_domain(conn, name, xml, cleanup) as dom:
        yield DefinedDebianGuest(conn, name, dom, console, overlay, image,
                                 options.boot_timeout)


@contextlib.contextmanager
def running_debian_guest(conn: Any, name: str, options: DebianGuestOptions | None = None,
                         *, wait: bool = True) -> Iterator[DebianGuest]:
    """Define, start and (unless ``wait`` is False) wait for Debian test guest ``name``
    to boot; yield the :class:`DebianGuest`. Always cleaned up as in
    :func:`defined_debian_guest`."""
    with defined_debian_guest(conn, name, options) as defined:
        yield defined.start(wait=wait)
