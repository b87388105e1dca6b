"""Booting tiny test guests in libvirt and collecting what they print.

Owns what is particular to a tiny guest: its options, its initrd (cached base +
per-test overlay), the begin/ready/end markers its /init prints, and the entry points
(the shared life cycle: :mod:`libshare.demo.lifecycle`). Two entry points:
:func:`run_guest` (boot, run the script, wait for the end marker or the guest to stop,
return a :class:`GuestResult`) and :func:`running_guest` (a context manager yielding a
:class:`RunningGuest` that the caller drives while doing host-side work). Per-guest files
(``initrd.img``, ``console.log``) live in ``<cache>/run/<name>/``, readable by QEMU.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from libshare.demo.domain import Customizer
from libshare.demo.lifecycle import (
    POLL_SECONDS,
    DefinedGuest,
    Guest,
    defined_domain,
    run_dir,
)
from libshare.demo.tiny.domain import DEFAULT_CMDLINE, guest_domain_xml
from libshare.demo.tiny.initramfs import (
    BEGIN_MARKER,
    BOOTED_MARKER,
    END_MARKER,
    READY_MARKER,
    base_initramfs,
    guest_initrd,
    overlay_archive,
)
from libshare.demo.tiny.kernel import DEFAULT_MODULES, KernelPackage, fetch_kernel

#: the markers count only as whole lines (the console is read while the guest writes
#: it: on a busy host "LIBSHARE-READY r" can be all there is of "LIBSHARE-READY read"
#: yet, and "rc=1" of "rc=12")
END_LINE = re.compile(rf"^{END_MARKER} rc=(\d+)[ \t\r]*\n", re.M)
_BEGIN_RE = re.compile(rf"^{BEGIN_MARKER}\s*$", re.M)
READY_LINE = re.compile(rf"^{READY_MARKER}(?: ([^\r\n]*?))?[ \t\r]*\n", re.M)






@dataclass
class GuestOptions:
    """How to build and boot a test guest. ``kernel`` None: the host release's Debian
    kernel from :func:`fetch_kernel`. ``files``: guest path -> bytes/text/host Path.
    ``binaries``: host programs copied in with their shared libraries. ``devices``: extra
    device XML; ``customize``: callbacks editing the ``<domain>`` element in place.
    ``keep_files``: keep ``<cache>/run/<name>/`` (console log) after the guest is gone."""

    memory_mib: int = 256
    vcpus: int = 1
    kernel: KernelPackage | None = None
    modules: Sequence[str] = DEFAULT_MODULES
    files: Mapping[str, bytes | str | Path] = field(default_factory=dict)
    binaries: Sequence[Path | str] = ()
    cmdline: str = DEFAULT_CMDLINE
    cmdline_extra: str = ""
    devices: Sequence[str | etree._Element] = ()
    customize: Sequence[Customizer] = ()
    domain_type: str = "qemu"
    cache: Path | str | None = None
    keep_files: bool = False


@dataclass
class GuestResult:
    """What a finished guest printed: the whole ``console`` text (``\\r`` removed), the
    ``output`` between the begin and end markers, the script's exit code ``rc`` (None if
    the end marker never came), ``timed_out``, ``elapsed`` seconds from start to end,
    ``boot_seconds`` (guest uptime when /init was ready to run the script, if printed);
    ``console_log`` is gone once the guest is cleaned up unless ``keep_files`` was set."""

    name: str
    console: str
    output: str
    rc: int | None
    timed_out: bool
    elapsed: float
    boot_seconds: float | None
    console_log: Path

    @property
    def ok(self) -> bool:
        """Return True if the script ran to the end and exited 0."""
        return self.rc == 0 and not self.timed_out


def parse_console(text: str) -> tuple[str, int | None, float | None]:
    """Return ``(output, rc, boot_seconds)`` from console ``text``: the lines between
    the begin and end markers, the rc on the end marker (None if absent), and the
    uptime on the booted marker (None if absent)."""
    text = text.replace("\r", "")
    begin = _BEGIN_RE.search(text)
    end = END_LINE.search(text, begin.end() if begin else 0)
    start = begin.end() + 1 if begin else 0
    output = text[start:end.start()] if end else text[start:]
    booted = re.search(rf"^{BOOTED_MARKER} ([0-9.]+)", text, re.M)
    return output, (int(end.group(1)) if end else None), (float(booted.group(1)) if booted else None)












def prepare_guest(name: str, script: str | None, options: GuestOptions) -> tuple[str, Path]:
    """Build the guest's initrd and return ``(domain XML, console log path)``; the log
    file is removed so it holds only this boot."""
    kernel = options.kernel or fetch_kernel(cache=options.cache)
    base = base_initramfs(kernel, options.modules, options.cache)
    rdir = run_dir(name, options.cache)
    initrd = guest_initrd(base, overlay_archive(script, options.files, options.binaries),
                          rdir / "initrd.img")
    console = rdir / "console.log"
    console.unlink(missing_ok=True)
    xml = guest_domain_xml(
        name, kernel.vmlinuz, initrd, console,
        memory_mib=options.memory_mib, vcpus=options.vcpus, cmdline=options.cmdline,
        cmdline_extra=options.cmdline_extra, domain_type=options.domain_type,
        devices=options.devices, customize=list(options.customize),
    )
    return xml, console


class RunningGuest(Guest):
    """A started tiny test guest. Read its console with :meth:`console`, wait for text
    with :meth:`wait_for`/:meth:`wait_ready`/:meth:`wait_end`. It is destroyed and
    undefined when the :func:`running_guest` block ends."""

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Wait for the script's ``ready`` marker; return the text after it (may be empty)."""
        return self.wait_for(READY_LINE, timeout).group(1) or ""

    def wait_end(self, timeout: float = 120.0) -> GuestResult:
        """Wait until the end marker shows up or the guest stops (at most ``timeout``
        seconds); return the :class:`GuestResult` (``timed_out`` set if neither came)."""
        deadline = time.monotonic() + timeout
        timed_out = False
        while not END_LINE.search(self.console()) and self.is_active():
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(POLL_SECONDS)
        # the end marker may be printed just before the guest powers off; give the
        # console a moment to flush when the guest stopped without one
        if not timed_out and not END_LINE.search(self.console()):
            time.sleep(POLL_SECONDS)
        return self.result(timed_out=timed_out)

    def result(self, timed_out: bool = False) -> GuestResult:
        """Return a :class:`GuestResult` of the console as it is now."""
        text = self.console()
        output, rc, boot = parse_console(text)
        return GuestResult(self.name, text, output, rc, timed_out,
                           time.monotonic() - self.started, boot, self.console_log)


class DefinedTinyGuest(DefinedGuest):
    """A defined, not yet started tiny test guest."""

    def start(self) -> RunningGuest:
        """Start the domain as it is defined now; return the :class:`RunningGuest`.
        Raises GuestError (with QEMU's log tail) if libvirt cannot start it."""
        return RunningGuest(self.conn, self.name, self.create(), self.console_log)


@contextlib.contextmanager
def defined_guest(conn: Any, name: str, script: str | None,
                  options: GuestOptions | None = None) -> Iterator[DefinedTinyGuest]:
    """Define (but do not start) test guest ``name`` running ``script`` and yield a
    :class:`DefinedTinyGuest`; on leaving the block the domain is destroyed (if started)
    and undefined, always, and its run directory removed unless ``options.keep_files``
    (then only the initrd copy goes and ``console.log`` stays)."""
    options = options or GuestOptions()
    rdir = run_dir(name, options.cache)
    console = rdir / "console.log"

    def cleanup() -> None:
        if options.keep_files:
            (rdir / "initrd.img").unlink(missing_ok=True)
        else:
            shutil.rmtree(rdir, ignore_errors=True)

    with defined_domain(conn, name, lambda: prepare_guest(name, script, options)[0],
                        cleanup) as dom:
        yield DefinedTinyGuest(conn, name, dom, console)


@contextlib.contextmanager
def running_guest(conn: Any, name: str, script: str | None,
                  options: GuestOptions | None = None) -> Iterator[RunningGuest]:
    """Define and start test guest ``name`` running ``script`` as /test.sh and yield a
    :class:`RunningGuest`; on leaving the block the domain is destroyed and undefined
    (always) and its run directory removed unless ``options.keep_files`` (then only the
    initrd copy goes and ``console.log`` stays)."""
    with defined_guest(conn, name, script, options) as defined:
        yield defined.start()


def run_guest(conn: Any, name: str, script: str, options: GuestOptions | None = None,
              *, timeout: float = 120.0) -> GuestResult:
    """Boot test guest ``name``, run ``script`` in it, wait (at most ``timeout`` seconds)
    for the end marker or the guest to stop; return the :class:`GuestResult`. The domain
    is always destroyed and undefined before returning or raising."""
    with running_guest(conn, name, script, options) as guest:
        return guest.wait_end(timeout)


