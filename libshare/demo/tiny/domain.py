"""Libvirt domain XML for small direct-kernel-boot test guests.

Owns the shape of a test guest: ``<domain type='qemu'>`` (TCG; ``type='kvm'`` on
request), direct kernel boot (``<kernel>``, ``<initrd>``, ``<cmdline>``), a serial
console written to a file, no disks, no network, ACPI on, ``destroy`` on poweroff,
reboot and crash. Callers add devices as XML strings/elements or edit the tree through
a callback (e.g. to add an nvdimm ``<memory>`` device and a NUMA cell).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lxml import etree

from libshare.demo.domain import Customizer, domain_skeleton, finish_domain, sub

#: Kernel command line used by default; the console must stay on ttyS0.
DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off tsc=unstable "
    "no_timer_check random.trust_cpu=on i8042.noaux i8042.nomux i8042.nopnp "
    "rdinit=/init"
)









def guest_domain_tree(
    name: str,
    kernel: Path | str,
    initrd: Path | str,
    console_log: Path | str,
    *,
    memory_mib: int = 256,
    vcpus: int = 1,
    cmdline: str = DEFAULT_CMDLINE,
    cmdline_extra: str = "",
    domain_type: str = "qemu",
    devices: Sequence[str | etree._Element] = (),
    customize: Customizer | Sequence[Customizer] | None = None,
) -> etree._Element:
    """Return the ``<domain>`` element of a test guest called ``name`` that boots
    ``kernel`` with ``initrd`` and writes its serial console to ``console_log``.

    ``devices`` (XML strings or elements) are appended to ``<devices>`` (a
    ``<memballoon>`` among them replaces the default ``model='none'`` one); each
    ``customize`` callback then gets the root element to change in place.
    """
    dom, os_el, devs = domain_skeleton(name, console_log, memory_mib=memory_mib, vcpus=vcpus,
                                       domain_type=domain_type, on_reboot="destroy",
                                       balloon="none")
    sub(os_el, "kernel", str(kernel))
    sub(os_el, "initrd", str(initrd))
    sub(os_el, "cmdline", f"{cmdline} {cmdline_extra}".strip())
    return finish_domain(dom, devs, devices, customize)


def guest_domain_xml(
    name: str,
    kernel: Path | str,
    initrd: Path | str,
    console_log: Path | str,
    **kwargs: Any,
) -> str:
    """Return :func:`guest_domain_tree` (same arguments) serialised as a string."""
    tree = guest_domain_tree(name, kernel, initrd, console_log, **kwargs)
    return etree.tostring(tree, pretty_print=True, encoding="unicode")




