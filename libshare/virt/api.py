"""The only door to the libvirt API: connecting, finding domains, reading and writing
definitions, the regions domains refer to, and QEMU monitor commands.

Every libvirt error is turned into a LibshareError with libvirt's own message, so the
command line prints one line and exits 1. (The hook never comes here: it must not call
the libvirt API.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import libvirt

from libshare import domxml
from libshare.domxml.devices import disk_files, region_paths
from libshare.errors import LibshareError

# Persistent definition, with secrets (passwords) so that redefining loses nothing.
INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def _quiet_handler(_ctx: object, _err: object) -> None:
    """Swallow libvirt's default printing of errors to stderr (we report them ourselves)."""


libvirt.registerErrorHandler(_quiet_handler, None)


def open_connection(uri: str) -> libvirt.virConnect:
    """Return a new libvirt connection to ``uri``; raise LibshareError with libvirt's
    reason when it cannot be opened."""
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibshareError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") \
            from exc


def opener(uri: str) -> Callable[[], libvirt.virConnect]:
    """Return a function that opens a new connection to ``uri`` each time it is called
    (for long-running services that reconnect when libvirtd restarts)."""
    return lambda: open_connection(uri)


@contextmanager
def connect(uri: str) -> Iterator[libvirt.virConnect]:
    """Yield an open libvirt connection to ``uri``, closed afterwards."""
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with suppress(libvirt.libvirtError):
            conn.close()


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """Return the domain called ``name`` (or with that UUID); raise if there is none
    (libvirt names are UTF-8: a name that is not, from a command line, is none)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise LibshareError(f"domain {name!r} not found (not a UTF-8 name)") from None
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        pass
    try:
        return conn.lookupByUUIDString(name)
    except libvirt.libvirtError:
        raise LibshareError(f"domain {name!r} not found") from None


def running_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """Return the running domain called ``name`` (or with that UUID); raise if there is
    none or it is not running."""
    dom = lookup(conn, name)
    if not dom.isActive():
        raise LibshareError(f"domain {dom.name()} is not running")
    return dom


def monitor_command(dom: libvirt.virDomain, command: str) -> str:
    """Return the output of HMP ``command`` on ``dom``'s QEMU monitor (through libvirt;
    libvirt marks the domain tainted "custom-monitor")."""
    try:
        import libvirt_qemu

        out: str = libvirt_qemu.qemuMonitorCommand(
            dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return out
    except (ImportError, libvirt.libvirtError) as exc:
        raise LibshareError(f"HMP {command!r} on {dom.name()} failed: {exc}") from exc


def inactive_xml(dom: libvirt.virDomain) -> str:
    """Return the persistent definition of ``dom`` (with secrets)."""
    try:
        return str(dom.XMLDesc(INACTIVE_XML))
    except libvirt.libvirtError as exc:
        raise LibshareError(f"{dom.name()}: cannot read definition: "
                            f"{exc.get_error_message()}") from exc


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    """Define (or redefine) a domain from ``xml`` with libvirt's schema validation;
    return it."""
    try:
        return conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    except libvirt.libvirtError as exc:
        raise LibshareError(f"libvirt refused the definition: {exc.get_error_message()}") \
            from exc


def is_active(dom: libvirt.virDomain) -> bool:
    """Return True when the domain is running (or paused)."""
    return bool(dom.isActive())


def all_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """Return every domain, defined or running, sorted by name."""
    try:
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise LibshareError(f"cannot list domains: {exc.get_error_message()}") from exc
    return sorted(doms, key=lambda d: d.name())


def referenced_region_paths(conn: libvirt.virConnect) -> set[str]:
    """Return every region path that any domain at ``conn``, defined or running, refers
    to (its persistent and its live definition); raise LibshareError if libvirt cannot
    list them: ``region gc`` must not guess."""
    out: set[str] = set()
    for dom in all_domains(conn):
        try:
            out |= region_paths(domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
            if dom.isActive():
                out |= region_paths(domxml.parse(dom.XMLDesc(0)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined while we looked
            raise LibshareError(f"libvirt: {exc.get_error_message()}") from exc
    return out


def domain_disk_files(conn: libvirt.virConnect) -> dict[str, tuple[bool, set[str]]]:
    """Return, per domain at ``conn`` (defined or running), whether it runs and the
    files its disks name in its persistent and live definitions (live backing chains
    included); raise LibshareError if libvirt cannot list them: whoever changes a disk
    image must not guess."""
    out: dict[str, tuple[bool, set[str]]] = {}
    for dom in all_domains(conn):
        try:
            files = disk_files(domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
            running = bool(dom.isActive())
            if running:
                files |= disk_files(domxml.parse(dom.XMLDesc(0)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined while we looked
            raise LibshareError(f"libvirt: {exc.get_error_message()}") from exc
        out[dom.name()] = (running, files)
    return out


def running_group_domains(conn: libvirt.virConnect, group: str) -> list[str]:
    """Return the names of the running domains enrolled in trust group ``group`` (their
    live definition says so), sorted."""
    out = []
    for dom in all_domains(conn):
        try:
            if not dom.isActive():
                continue
            info = domxml.describe(domxml.parse(dom.XMLDesc(0)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue
            raise LibshareError(f"libvirt: {exc.get_error_message()}") from exc
        if info["enrolled"] and info["group"] == group:
            out.append(dom.name())
    return out
