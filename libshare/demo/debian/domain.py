"""The domain XML of a Debian test guest: its qcow2 disk through its own boot loader (or
direct kernel boot of host files), serial console to a file, a qemu-guest-agent channel,
a virtio balloon, no network."""


from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lxml import etree

from libshare.demo.domain import Customizer, domain_skeleton, finish_domain, sub


def debian_domain_tree(
    name: str,
    disk: Path | str,
    console_log: Path | str,
    *,
    memory_mib: int = 512,
    vcpus: int = 1,
    domain_type: str = "qemu",
    devices: Sequence[str | etree._Element] = (),
    customize: Customizer | Sequence[Customizer] | None = None,
    kernel: tuple[Path | str, Path | str, str] | None = None,
) -> etree._Element:
    """Return the ``<domain>`` element of a Debian test guest ``name`` booting from the
    qcow2 ``disk`` (virtio) through its own boot loader, or, with ``kernel`` (kernel,
    initrd, command line), those host files directly (``<os><kernel>``, ``<initrd>``,
    ``<cmdline>``); serial console to ``console_log``, a qemu-guest-agent channel, a
    virtio balloon, no network; poweroff/crash destroy, reboot restarts. ``devices`` are
    appended (a ``<memballoon>`` among them replaces the default one); ``customize``
    callbacks then edit the root element in place."""
    # console_append: a power cycle (DebianGuest.restart) starts a new QEMU on the same
    # console file, and the boot count relies on the earlier boots' lines
    dom, os_el, devs = domain_skeleton(name, console_log, memory_mib=memory_mib, vcpus=vcpus,
                                       domain_type=domain_type, on_reboot="restart",
                                       balloon="virtio", console_append=True)
    if kernel is None:
        sub(os_el, "boot", dev="hd")
    else:
        sub(os_el, "kernel", str(kernel[0]))
        sub(os_el, "initrd", str(kernel[1]))
        sub(os_el, "cmdline", kernel[2])
    disk_el = etree.Element("disk", type="file", device="disk")
    sub(disk_el, "driver", name="qemu", type="qcow2")
    sub(disk_el, "source", file=str(disk))
    sub(disk_el, "target", dev="vda", bus="virtio")
    devs.insert(0, disk_el)
    channel = sub(devs, "channel", type="unix")
    sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    finish_domain(dom, devs, devices, customize)
    return dom


def debian_domain_xml(name: str, disk: Path | str, console_log: Path | str,
                      **kwargs: Any) -> str:
    """Return :func:`debian_domain_tree` (same arguments) serialised as a string."""
    tree = debian_domain_tree(name, disk, console_log, **kwargs)
    return etree.tostring(tree, pretty_print=True, encoding="unicode")
