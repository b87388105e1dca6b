"""Domain XML pieces every guest of the kit shares: the skeleton (``<domain
type='qemu'>``, TCG; ``type='kvm'`` on request; a serial console written to a file, ACPI,
no network), finishing it with extra devices and customising callbacks, and the NVDIMM
library-region device with the NUMA cell and memory slots it needs."""


from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lxml import etree

Customizer = Callable[[etree._Element], object]


def sub(parent: etree._Element, tag: str, text: str | None = None,
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
    sub(dom, "name", name)
    sub(dom, "memory", str(memory_mib * 1024), unit="KiB")
    sub(dom, "currentMemory", str(memory_mib * 1024), unit="KiB")
    sub(dom, "vcpu", str(vcpus), placement="static")
    os_el = sub(dom, "os")
    sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    feats = sub(dom, "features")
    sub(feats, "acpi")
    if domain_type != "qemu":
        sub(dom, "cpu", mode="host-passthrough", check="none")
    sub(dom, "clock", offset="utc")
    sub(dom, "on_poweroff", "destroy")
    sub(dom, "on_reboot", on_reboot)
    sub(dom, "on_crash", "destroy")
    devs = sub(dom, "devices")
    source = {"path": str(console_log), **({"append": "on"} if console_append else {})}
    serial = sub(devs, "serial", type="file")
    sub(serial, "source", **source)
    sub(serial, "target", port="0")
    console = sub(devs, "console", type="file")
    sub(console, "source", **source)
    sub(console, "target", type="serial", port="0")
    sub(devs, "memballoon", model=balloon)
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
        cpu = sub(dom, "cpu")
    numa = cpu.find("numa")
    if numa is None:
        numa = sub(cpu, "numa")
        sub(numa, "cell", id="0", cpus=f"0-{vcpus - 1}", memory=str(mem_kib), unit="KiB")
    return dom


def nvdimm_device_xml(path: Path | str, size_kib: int, *, access: str = "private",
                      readonly: bool = True, node: int = 0) -> str:
    """Return a ``<memory model='nvdimm'>`` device backed by host file ``path`` (label-less,
    ``<pmem/>`` so no preallocation, read-only to the guest by default)."""
    mem = etree.Element("memory", model="nvdimm", access=access)
    src = sub(mem, "source")
    sub(src, "path", str(path))
    sub(src, "pmem")
    tgt = sub(mem, "target")
    sub(tgt, "size", str(size_kib), unit="KiB")
    sub(tgt, "node", str(node))
    if readonly:
        sub(tgt, "readonly")
    return etree.tostring(mem, encoding="unicode")
