"""Libvirt domain XML for small direct-kernel-boot test guests.

Owns the shape of a test guest: ``<domain type='qemu'>`` (TCG; ``type='kvm'`` on
request), direct kernel boot (``<kernel>``, ``<initrd>``, ``<cmdline>``), a serial
console written to a file, no disks, no network, ACPI on, ``destroy`` on poweroff,
reboot and crash. Callers add devices as XML strings/elements or edit the tree through
a callback (e.g. to add an nvdimm ``<memory>`` device and a NUMA cell).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lxml import etree

#: Kernel command line used by default; the console must stay on ttyS0.
DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off tsc=unstable "
    "no_timer_check random.trust_cpu=on i8042.noaux i8042.nomux i8042.nopnp "
    "rdinit=/init"
)

Customizer = Callable[[etree._Element], object]


def _sub(parent: etree._Element, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    el = etree.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def domain_skeleton(name: str, console_log: Path | str, *, memory_mib: int, vcpus: int,
                    domain_type: str, on_reboot: str, balloon: str,
                    console_append: bool = False
                    ) -> tuple[etree._Element, etree._Element, etree._Element]:
    """Return ``(domain, os, devices)`` elements of a test guest common to every kind:
    x86_64 ``pc`` hvm with ACPI, RAM and vCPUs, serial console to ``console_log``
    (appended to across QEMU starts with ``console_append``), a ``<memballoon
    model=balloon>``, poweroff/crash destroy and ``on_reboot``; callers add their boot
    method to ``os`` and their devices."""
    dom = etree.Element("domain", type=domain_type)
    _sub(dom, "name", name)
    _sub(dom, "memory", str(memory_mib * 1024), unit="KiB")
    _sub(dom, "currentMemory", str(memory_mib * 1024), unit="KiB")
    _sub(dom, "vcpu", str(vcpus), placement="static")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    feats = _sub(dom, "features")
    _sub(feats, "acpi")
    if domain_type != "qemu":
        _sub(dom, "cpu", mode="host-passthrough", check="none")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", on_reboot)
    _sub(dom, "on_crash", "destroy")
    devs = _sub(dom, "devices")
    source = {"path": str(console_log), **({"append": "on"} if console_append else {})}
    serial = _sub(devs, "serial", type="file")
    _sub(serial, "source", **source)
    _sub(serial, "target", port="0")
    console = _sub(devs, "console", type="file")
    _sub(console, "source", **source)
    _sub(console, "target", type="serial", port="0")
    _sub(devs, "memballoon", model=balloon)
    return dom, os_el, devs


def finish_domain(dom: etree._Element, devs: etree._Element,
                  devices: Sequence[str | etree._Element],
                  customize: Customizer | Sequence[Customizer] | None) -> etree._Element:
    """Append the caller's ``devices`` to ``devs`` (a ``<memballoon>`` among them
    replaces the default one), run the ``customize`` callbacks on ``dom``; return it."""
    for dev in devices:
        el = etree.fromstring(dev) if isinstance(dev, str) else dev
        if el.tag == "memballoon":
            for old in devs.findall("memballoon"):
                devs.remove(old)
        devs.append(el)
    if customize is not None:
        for fn in customize if isinstance(customize, Sequence) else [customize]:
            fn(dom)
    return dom


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
    _sub(os_el, "kernel", str(kernel))
    _sub(os_el, "initrd", str(initrd))
    _sub(os_el, "cmdline", f"{cmdline} {cmdline_extra}".strip())
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


def add_numa_nvdimm_support(dom: etree._Element, slots: int = 2,
                            max_memory_mib: int | None = None) -> etree._Element:
    """Add what an nvdimm ``<memory>`` device needs to ``dom``: ``<maxMemory slots>``
    and one NUMA cell (id 0) holding all of the guest's RAM. Returns ``dom``."""
    mem_kib = int(dom.findtext("memory") or "0")
    vcpus = int(dom.findtext("vcpu") or "1")
    max_kib = (max_memory_mib * 1024) if max_memory_mib else mem_kib + 16 * 1024 * 1024
    if dom.find("maxMemory") is None:
        mm = etree.Element("maxMemory", slots=str(slots), unit="KiB")
        mm.text = str(max_kib)
        dom.find("memory").addprevious(mm)  # type: ignore[union-attr]
    cpu = dom.find("cpu")
    if cpu is None:
        cpu = _sub(dom, "cpu")
    numa = cpu.find("numa")
    if numa is None:
        numa = _sub(cpu, "numa")
        _sub(numa, "cell", id="0", cpus=f"0-{vcpus - 1}", memory=str(mem_kib), unit="KiB")
    return dom


def nvdimm_device_xml(path: Path | str, size_kib: int, *, access: str = "private",
                      readonly: bool = True, node: int = 0) -> str:
    """Return a ``<memory model='nvdimm'>`` device backed by host file ``path`` (label-less,
    ``<pmem/>`` so no preallocation, read-only to the guest by default)."""
    mem = etree.Element("memory", model="nvdimm", access=access)
    src = _sub(mem, "source")
    _sub(src, "path", str(path))
    _sub(src, "pmem")
    tgt = _sub(mem, "target")
    _sub(tgt, "size", str(size_kib), unit="KiB")
    _sub(tgt, "node", str(node))
    if readonly:
        _sub(tgt, "readonly")
    return etree.tostring(mem, encoding="unicode")
