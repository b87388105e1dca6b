"""Enrolment as pure transforms of a libvirt domain XML tree (no I/O).

``enable(root, spec)`` returns a new tree with the library region device and what it
needs (ACPI, a NUMA cell, memory slots, a guest-agent channel, free page reporting),
recording every change in libshare's metadata; ``disable(root)`` undoes exactly those
changes; ``describe(root)`` reports the enrolment. Inputs are never modified.
Guarantees (tested on the virt-manager corpus): enable is idempotent, disable(enable(x))
equals x in C14N, and elements libshare does not own keep their order.
"""

from __future__ import annotations

import codecs
import copy
import re
from dataclasses import dataclass
from typing import Any

from lxml import etree

from libshare.domxml import devices as dev
from libshare.domxml import pci
from libshare.domxml.metadata import (
    NS,
    REDIRECT_MODES,
    Change,
    Enrolment,
    build_record,
    check_group,
    find_record,
    parse_record,
    q,
    set_redirect,
)
from libshare.domxml.tree import (
    Element,
    index_after,
    insert_child,
    make,
    pretty_subtree,
    remove_child,
    scaled_bytes,
    text_before,
    to_bytes,
)
from libshare.errors import RefusedError
from libshare.util.units import GiB, MiB, ascii_int

MAX_REGION = 1024 * GiB
SLOT_MODELS = ("dimm", "nvdimm")
VIRTIO_BALLOONS = ("virtio", "virtio-transitional", "virtio-non-transitional")


@dataclass(frozen=True)
class RegionSpec:
    """What to enrol a domain into: the region file, its size, group and device model,
    and the automatic redirect mode (``redirect``; None keeps an enrolled domain's mode
    and gives a newly enrolled one ``enable``'s ``default_redirect``)."""

    path: str
    size: int
    group: str
    model: str = "nvdimm"
    digest: str | None = None
    state_dir: str | None = None
    redirect: str | None = None


#: byte-order marks of the encodings libvirt never reads (it takes UTF-8 only)
_WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE,
              codecs.BOM_UTF16_BE)
_DECLARED_ENCODING = re.compile(rb"<\?xml\s[^>]*?\bencoding\s*=\s*[\"']([^\"']*)[\"']")
_UTF8_NAMES = ("utf-8", "utf8", "us-ascii", "ascii")


def parse(data: bytes | str) -> Element:
    """Return the root element of domain XML ``data``; raise RefusedError (one line)
    if it is not a well-formed libvirt domain document in UTF-8 without a DTD.

    Refused rather than half-handled: UTF-16/32 and other declared encodings (libvirt
    reads UTF-8 only, and a path read in another encoding is not the file libvirt
    opens); any ``<!DOCTYPE>``: libvirt 9.0 expands an internal subset's entities
    (measured: ``<source file='&p;'/>`` opened the entity's path) while libshare keeps
    entity references unexpanded, so a path could mean one file to libshare and another
    to libvirt; and libvirt ignores ATTLIST defaults (measured: a defaulted
    ``type`` is "missing domain type attribute"), so a defaulted ``state-dir`` would
    exist for libshare only. Comments and processing instructions around the root
    element are kept: ``serialize`` writes them back.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.startswith(_WIDE_BOMS) or b"\0" in raw:
        raise RefusedError("domain XML is not UTF-8 (UTF-16 or UTF-32); libvirt reads UTF-8 "
                           "only: convert it, e.g. with iconv -t UTF-8")
    declared = _DECLARED_ENCODING.match(raw.removeprefix(codecs.BOM_UTF8))
    if declared and declared.group(1).decode("ascii", "replace").lower() not in _UTF8_NAMES:
        raise RefusedError(f"domain XML declares encoding "
                           f"{declared.group(1).decode('ascii', 'replace')!r}; libvirt reads "
                           "UTF-8 only: convert it, e.g. with iconv -t UTF-8")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RefusedError(f"domain XML is not valid UTF-8 (byte {exc.start})") from exc
    parser = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True,
                             load_dtd=False, dtd_validation=False, attribute_defaults=False,
                             huge_tree=False)
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as exc:
        # libxml2's messages can hold newlines; the reason stays one line
        raise RefusedError(f"not well-formed XML: {' '.join(str(exc).split())}") from exc
    info = root.getroottree().docinfo
    if getattr(info, "doctype", "") or info.internalDTD is not None \
            or info.externalDTD is not None \
            or next(root.iter(etree.Entity), None) is not None:
        raise RefusedError("domain XML has a <!DOCTYPE> (entity or attribute declarations "
                           "that libshare and libvirt read differently); remove it")
    if root.tag != "domain":
        raise RefusedError(f"not a libvirt domain document (root element <{root.tag}>)")
    return root


def serialize(root: Element) -> str:
    """Return the document of ``root`` as XML text ending in a newline: the comments and
    processing instructions before and after the root element, one per line, then the
    root element (no XML declaration)."""
    def text(node: Element) -> str:
        return etree.tostring(node, encoding="unicode", with_tail=False)

    before = [text(n) for n in reversed(list(root.itersiblings(preceding=True)))]
    after = [text(n) for n in root.itersiblings()]
    return "\n".join([*before, text(root), *after]) + "\n"


def copy_document(root: Element) -> Element:
    """Return a deep copy of ``root`` with its document: the copy keeps the comments
    and processing instructions around the root element, in order (``copy.deepcopy``
    of the element drops them; lxml 4.9's deepcopy of the tree reverses those after it)."""
    new = copy.deepcopy(root)
    for node in reversed(list(root.itersiblings(preceding=True))):  # farthest first
        new.addprevious(copy.copy(node))
    for node in reversed(list(root.itersiblings())):
        new.addnext(copy.copy(node))
    return new


def _insert(parent: Element, elem: Element, index: int | None = None) -> Element:
    """Insert ``elem`` like ``insert_child`` and indent its subtree to match; return it."""
    insert_child(parent, elem, index)
    pretty_subtree(elem, text_before(elem) or "\n")
    return elem


def _check_host(root: Element, spec: RegionSpec) -> None:
    """Raise RefusedError when the domain cannot host ``spec``'s region."""
    name = root.findtext("name") or "domain"
    dtype = root.get("type")
    if dtype not in ("qemu", "kvm"):
        raise RefusedError(f"{name}: domain type {dtype!r} cannot host a library region "
                           "(only qemu and kvm)")
    ostype = root.find("os/type")
    if ostype is None or (ostype.text or "").strip() != "hvm":
        raise RefusedError(f"{name}: only hvm guests can host a library region")
    arch = ostype.get("arch")
    if arch not in (None, "x86_64"):
        raise RefusedError(f"{name}: architecture {arch} is not supported (x86_64 only)")
    machine = ostype.get("machine") or ""
    if spec.model != "ivshmem" and (machine.startswith("microvm") or machine == "isapc"):
        raise RefusedError(f"{name}: machine type {machine} has no ACPI memory devices; "
                           "use --model ivshmem")
    if spec.model not in dev.MODELS:
        raise RefusedError(f"unknown region model {spec.model!r} "
                           f"(one of {', '.join(dev.MODELS)})")
    if spec.size <= 0 or spec.size % (2 * MiB):
        raise RefusedError(f"{name}: region size {spec.size} is not a positive multiple "
                           "of 2 MiB")
    if spec.size > MAX_REGION:
        raise RefusedError(f"{name}: region size {spec.size} exceeds 1 TiB")
    check_group(spec.group)
    if root.find("memory") is None and _numa_kib(root) is None:
        raise RefusedError(f"{name}: domain has neither <memory> nor NUMA cells with "
                           "memory (libvirt needs one of them)")
    reason = _preallocation(root, spec.model)
    if reason:
        raise RefusedError(f"{name}: {reason}")
    devices = root.find("devices")
    if devices is not None:
        for d in devices:
            if not isinstance(d.tag, str):
                continue
            path = dev.region_path_of(d)
            target = spec.path if spec.model != "ivshmem" else \
                f"/dev/shm/{dev.shmem_name(spec.group)}"
            if path is not None and path == target:
                raise RefusedError(f"{name}: a <{d.tag}> device not added by libshare "
                                   f"already uses {target}")


def _preallocation(root: Element, model: str) -> str | None:
    """Return why libvirt 9.0 would make each guest hold a full copy of a ``model``
    region in this domain, or None when it would not.

    The paths by which libvirt 9.0 (src/qemu/qemu_command.c) fills the region's memory
    backend at start, for a region libshare defines (``<source><path>`` and, for
    nvdimm, ``<pmem/>``; the memory device list is never hugepage- or memfd-backed):
    ``qemuBuildMemoryGetPagesize`` sets ``prealloc`` for every backend when
    ``<memoryBacking><allocation mode='immediate'/>``, for an nvdimm without
    ``<pmem/>``, and for hugepage-backed devices without a path; ``-mem-prealloc``
    (every backend) is only written for domains without NUMA cells, which enrolment
    always gives them; ``<memoryBacking><locked/>`` becomes ``-overcommit mem-lock=on``,
    QEMU's mlockall(), which faults in every page of the private (copy-on-write) nvdimm
    mapping for writing: a private copy each. ivshmem's backend is built apart
    (qemuBuildShmemBackendMemProps: never preallocated) and shared, as virtio-pmem's
    is, so locking them copies nothing.
    """
    backing = root.find("memoryBacking")
    if backing is None or model == "ivshmem":
        return None
    alloc = backing.find("allocation")
    if alloc is not None and alloc.get("mode") == "immediate":
        return ("<memoryBacking><allocation mode='immediate'/> makes libvirt preallocate "
                "every memory backend, the region's too (every page written: a private copy "
                "per guest); remove it or use --model ivshmem")
    if model == "nvdimm" and backing.find("locked") is not None:
        return ("<memoryBacking><locked/> makes QEMU lock all its memory, which copies "
                "every page of the copy-on-write region into each guest; remove it or use "
                "--model ivshmem")
    return None


def _numa_kib(root: Element) -> int | None:
    """Return the guest RAM in KiB that the domain's NUMA cells hold (libvirt 9.0 takes
    the domain's memory from them, not from ``<memory>``), None without cells."""
    cells = root.findall("cpu/numa/cell")
    if not cells:
        return None
    return sum(to_bytes(c.get("memory"), c.get("unit"), "KiB", "NUMA cell memory") // 1024
               for c in cells)


def _ram_kib(root: Element) -> int:
    """Return the domain's initial memory in KiB (RAM outside memory devices) as
    libvirt 9.0 computes it: the NUMA cells' sum, else ``<memory>`` minus the memory
    devices (``virDomainDefPostParseMemory``)."""
    cells = _numa_kib(root)
    if cells is not None:
        return cells
    memory = root.find("memory")
    assert memory is not None  # _check_host: <memory> or cells
    return scaled_bytes(memory) // 1024 - _memory_devices_kib(root.find("devices"))


def _memory_devices_kib(devices: Element | None) -> int:
    """Return the summed size in KiB of the domain's memory devices."""
    if devices is None:
        return 0
    total = 0
    for d in devices.findall("memory"):
        size = d.find("target/size")
        if size is not None:
            total += scaled_bytes(size) // 1024
    return total


def _vcpus(root: Element) -> int:
    """Return the maximum vCPU count of the domain (1 when unspecified)."""
    count = ascii_int(root.findtext("vcpu"))
    return count if count else 1


def _ensure_metadata(root: Element, changes: list[Change]) -> Element:
    meta = root.find("metadata")
    if meta is None:
        meta = _insert(root, make("metadata"),
                       index_after(root, ("name", "uuid", "genid", "title", "description")))
        changes.append(Change("added", "metadata"))
    return meta


def _ensure_acpi(root: Element, changes: list[Change]) -> None:
    features = root.find("features")
    if features is None:
        _insert(root, make("features", children=[make("acpi")]),
                index_after(root, ("name", "uuid", "genid", "title", "description", "metadata",
                                   "maxMemory", "memory", "currentMemory", "blkiotune",
                                   "memtune", "memoryBacking", "vcpu", "vcpus", "iothreads",
                                   "iothreadids", "cputune", "numatune", "resource",
                                   "sysinfo", "bootloader", "bootloader_args", "os",
                                   "idmap")))
        changes.append(Change("added", "features"))
    elif features.find("acpi") is None:
        _insert(features, make("acpi"), 0)
        changes.append(Change("added", "acpi"))


def _ensure_numa(root: Element, changes: list[Change]) -> int:
    """Make sure the domain has a NUMA cell; return the node id for the region device."""
    cells = root.findall("cpu/numa/cell")
    if cells:
        return ascii_int(cells[0].get("id", "0")) or 0
    cell_kib = _ram_kib(root)
    if cell_kib <= 0:
        raise RefusedError("domain memory is smaller than its memory devices")
    n = _vcpus(root)
    cpus = "0" if n == 1 else f"0-{n - 1}"
    numa = make("numa", children=[make("cell", {"id": "0", "cpus": cpus,
                                                "memory": str(cell_kib), "unit": "KiB"})])
    cpu = root.find("cpu")
    if cpu is None:
        cpu = _insert(root, make("cpu"), index_after(root, (
            "name", "uuid", "genid", "title", "description", "metadata", "maxMemory",
            "memory", "currentMemory", "blkiotune", "memtune", "memoryBacking", "vcpu",
            "vcpus", "iothreads", "iothreadids", "cputune", "numatune", "resource", "sysinfo",
            "bootloader", "bootloader_args", "os", "idmap", "features")))
        changes.append(Change("added", "cpu"))
    _insert(cpu, numa)
    changes.append(Change("added", "numa"))
    return 0


def _ensure_max_memory(root: Element, size: int, changes: list[Change]) -> None:
    devices = root.find("devices")
    memory = root.find("memory")
    used_slots = 0 if devices is None else sum(
        1 for d in devices.findall("memory") if d.get("model") in SLOT_MODELS)
    need_slots = used_slots + 1
    # libvirt's total once enrolled: RAM (cells, else <memory> less devices) + devices
    need_kib = _ram_kib(root) + _memory_devices_kib(devices) + size // 1024
    need_kib = -(-need_kib // (1024 * 1024)) * 1024 * 1024  # whole GiB
    mm = root.find("maxMemory")
    if mm is None:
        where = list(root).index(memory) if memory is not None else index_after(
            root, ("name", "uuid", "genid", "title", "description", "metadata"))
        _insert(root, make("maxMemory", {"slots": str(need_slots), "unit": "KiB"},
                           str(need_kib)), where)
        changes.append(Change("added", "maxMemory"))
        return
    cur_kib = scaled_bytes(mm) // 1024
    cur_slots = ascii_int(mm.get("slots", "0")) or 0
    if cur_kib >= need_kib and cur_slots >= need_slots:
        return
    saved = copy.deepcopy(mm)
    saved.tail = None
    mm.set("slots", str(max(cur_slots, need_slots)))
    mm.set("unit", "KiB")
    mm.text = str(max(cur_kib, need_kib))
    changes.append(Change("changed", "maxMemory", saved=saved))


def enable(root: Element, spec: RegionSpec, default_redirect: str = "off") -> Element:
    """Return a copy of domain ``root`` enrolled into ``spec``'s region.

    Already enrolled with the same spec: an unchanged copy, but for the redirect mode,
    which is updated in place when ``spec.redirect`` differs. Enrolled differently: the
    old enrolment is undone first (its redirect mode kept unless ``spec.redirect`` is
    set). Raises RefusedError (input untouched) when the domain cannot host the region.
    """
    rec = find_record(root)
    # read leniently: a record with a bad group is replaced, not kept
    old = None if rec is None else parse_record(rec, strict=False)
    mode = spec.redirect or (old.redirect if old is not None else default_redirect)
    if mode not in REDIRECT_MODES:
        raise RefusedError(f"unknown redirect mode {mode!r} "
                           f"(one of {', '.join(REDIRECT_MODES)})")
    # libshare's initrd (direct kernel boot) outlives a re-enrolment while still in use
    kept_initrd = _initrd_in_use(root, old)
    if old is not None:
        same = (old.group, old.model, old.region, old.size, old.digest, old.state_dir) == \
            (spec.group, spec.model, spec.path, spec.size, spec.digest, spec.state_dir)
        if same and dev.find_region_device(root.find("devices"), old.model, old.region,
                                           old.group) is not None:
            dom = copy_document(root)
            if mode != old.redirect:
                new_rec = find_record(dom)
                assert new_rec is not None
                set_redirect(new_rec, mode)
            return dom
        root = disable(root)
    _check_host(root, spec)
    dom = copy_document(root)
    changes: list[Change] = []
    meta = _ensure_metadata(dom, changes)
    node = None
    if spec.model in ("nvdimm", "virtio-pmem"):
        _ensure_acpi(dom, changes)
        node = _ensure_numa(dom, changes)
        _ensure_max_memory(dom, spec.size, changes)
    devices = dom.find("devices")
    if devices is None:
        devices = _insert(dom, make("devices"))
        changes.append(Change("added", "devices"))
    region = dev.region_device(spec.model, spec.path, spec.size, spec.group,
                               node if spec.model == "nvdimm" else None)
    add_channel = dev.find_agent_channel(devices) is None
    add_serial = add_channel and devices.find("controller[@type='virtio-serial']") is None
    # PCI devices enrolment adds; explicit addresses only where libvirt cannot place them
    new_pci = ([f"the {spec.model} region device"] if spec.model != "nvdimm" else []) + \
        (["the virtio-serial controller of the guest-agent channel"] if add_serial else [])
    try:
        addresses = pci.addresses_for(root, len(new_pci), " and ".join(new_pci))
    except RefusedError as exc:
        raise RefusedError(f"{root.findtext('name') or 'domain'}: {exc}") from None
    if addresses and spec.model != "nvdimm":
        region.append(make("address", addresses.pop(0)))
    _insert(devices, region)
    changes.append(Change("added", "region-device"))
    if add_channel:
        if add_serial and addresses:
            _insert(devices, make("controller", {"type": "virtio-serial", "index": "0"},
                                  children=[make("address", addresses.pop(0))]),
                    index_after(devices, ("emulator", "disk", "controller")))
            changes.append(Change("added", "virtio-serial-controller"))
        elif add_serial:
            changes.append(Change("implicit", "virtio-serial-controller"))
        _insert(devices, dev.agent_channel(), index_after(devices, (
            "emulator", "disk", "controller", "lease", "filesystem", "interface", "smartcard",
            "serial", "parallel", "console", "channel")))
        changes.append(Change("added", "agent-channel"))
    balloon = devices.find("memballoon")
    if balloon is not None and balloon.get("model") in VIRTIO_BALLOONS \
            and balloon.get("freePageReporting") != "on":
        changes.append(Change("changed", "freePageReporting",
                              previous=balloon.get("freePageReporting")))
        balloon.set("freePageReporting", "on")
    if kept_initrd is not None:
        initrd = dom.find("os/initrd")
        assert initrd is not None  # disable restored the original there
        initrd.text = kept_initrd.current
        changes.append(Change("changed", "initrd", previous=kept_initrd.previous,
                              current=kept_initrd.current))
    _ensure_no_bounce_buffers(dom, changes)
    memory = dom.find("memory")
    current = dom.find("currentMemory")
    enr = Enrolment(group=spec.group, model=spec.model, region=spec.path, size=spec.size,
                    digest=spec.digest, state_dir=spec.state_dir,
                    memory_kib=None if memory is None else scaled_bytes(memory) // 1024,
                    current_memory_kib=None if current is None
                    else scaled_bytes(current) // 1024,
                    redirect=mode, changes=changes)
    _insert(meta, build_record(enr))
    for what, elem in (("metadata", meta), ("cpu", dom.find("cpu")),
                       ("devices", devices)):
        if elem is not None and any(c.kind == "added" and c.what == what for c in changes):
            pretty_subtree(elem, text_before(elem) or "\n")
    return dom


def _restore_size(elem: Element | None, recorded: int | None, region_kib: int) -> None:
    """Undo libvirt's recomputation of ``<memory>``/``<currentMemory>`` (which adds the
    region device's size) so the value is what it was before enrolment."""
    if elem is None or recorded is None:
        return
    if scaled_bytes(elem) // 1024 == recorded + region_kib:
        elem.text = str(recorded)
        elem.set("unit", "KiB")


def _remove_if_empty(elem: Element | None, allowed: tuple[str, ...] = ()) -> None:
    """Remove ``elem`` if it has no attributes, no text and no children but ``allowed``
    empty ones (the children libshare created it with)."""
    if elem is None or elem.attrib or (elem.text or "").strip():
        return
    for child in elem:
        if child.tag not in allowed or len(child) or child.attrib:
            return
    remove_child(elem)


def disable(root: Element) -> Element:
    """Return a copy of domain ``root`` with libshare's enrolment undone exactly.

    A domain that is not enrolled comes back unchanged.
    """
    dom = copy_document(root)
    rec = find_record(dom)
    if rec is None:
        return dom
    enr = parse_record(rec, strict=False)  # an enrolment with a bad group can be undone
    devices = dom.find("devices")
    for ch in reversed(enr.changes):
        key = (ch.kind, ch.what)
        if key == ("added", "region-device"):
            found = dev.find_region_device(devices, enr.model, enr.region, enr.group)
            if found is not None:
                remove_child(found)
        elif key == ("added", "agent-channel"):
            found = dev.find_agent_channel(devices)
            if found is not None:
                remove_child(found)
        elif key in (("implicit", "virtio-serial-controller"),
                     ("added", "virtio-serial-controller")):
            if devices is not None and dev.virtio_serial_users(devices) == 0:
                for ctl in devices.findall("controller[@type='virtio-serial']"):
                    remove_child(ctl)
        elif key == ("changed", "freePageReporting"):
            balloon = None if devices is None else devices.find("memballoon")
            if balloon is not None:
                if ch.previous is None:
                    if "freePageReporting" in balloon.attrib:
                        del balloon.attrib["freePageReporting"]
                else:
                    balloon.set("freePageReporting", ch.previous)
        elif key == ("changed", "initrd"):
            _restore_initrd(dom, ch)
        elif key == ("changed", "cmdline"):
            _restore_cmdline(dom, ch)
        elif key == ("added", "devices"):
            _remove_if_empty(devices)
        elif key == ("added", "maxMemory"):
            found = dom.find("maxMemory")
            if found is not None:
                remove_child(found)
        elif key == ("changed", "maxMemory"):
            found = dom.find("maxMemory")
            if found is not None and ch.saved is not None:
                found.attrib.clear()
                found.attrib.update(dict(ch.saved.attrib))
                found.text = ch.saved.text
        elif key == ("added", "numa"):
            found = dom.find("cpu/numa")
            if found is not None:
                remove_child(found)
        elif key == ("added", "cpu"):
            _remove_if_empty(dom.find("cpu"))
        elif key == ("added", "acpi"):
            found = dom.find("features/acpi")
            if found is not None:
                remove_child(found)
        elif key == ("added", "features"):
            _remove_if_empty(dom.find("features"), ("acpi",))
    if enr.model in ("nvdimm", "virtio-pmem"):
        _restore_size(dom.find("memory"), enr.memory_kib, enr.size // 1024)
        _restore_size(dom.find("currentMemory"), enr.current_memory_kib, enr.size // 1024)
    meta = rec.getparent()
    remove_child(rec)
    if enr.has("added", "metadata") and meta is not None and len(meta) == 0:
        remove_child(meta)
    return dom


#: the guest kernel option that keeps it from reserving bounce buffers (see
#: :func:`_ensure_no_bounce_buffers`)
NO_BOUNCE_BUFFERS = "swiotlb=noforce"
#: guest RAM up to which QEMU's x86 machines put all of it below 4 GiB (q35 splits RAM
#: at 2 GiB from 2.75 GiB on, pc at 3 GiB from 3.5 GiB on: the lower bound holds for both)
ALL_LOW_RAM_KIB = 0xB000_0000 // 1024 - 1


def _ensure_no_bounce_buffers(dom: Element, changes: list[Change]) -> None:
    """Add ``swiotlb=noforce`` to the kernel command line of a direct-kernel-boot domain
    whose RAM all lies below 4 GiB, recording the change.

    ``<maxMemory>`` makes QEMU describe a hotplug memory range above 4 GiB (ACPI SRAT);
    the guest kernel then sees memory it cannot reach with 32-bit DMA and reserves 64 MiB
    of bounce buffers out of its RAM (measured in a Debian 12 guest of 256 MiB: MemTotal
    210,752 kB without, 144,448 kB with maxMemory; 210,748 kB with swiotlb=noforce).
    With all RAM below 4 GiB only the library region lies above, and guests never DMA
    into it. Domains booted by their own boot loader get it from ``libshare guest
    install`` (a GRUB drop-in)."""
    kernel = dom.find("os/kernel")
    if kernel is None or not (kernel.text or "").strip() or _ram_kib(dom) > ALL_LOW_RAM_KIB:
        return
    cmdline = dom.find("os/cmdline")
    previous = None if cmdline is None else (cmdline.text or "")
    if previous is not None and NO_BOUNCE_BUFFERS in previous.split():
        return
    current = f"{previous} {NO_BOUNCE_BUFFERS}".strip() if previous else NO_BOUNCE_BUFFERS
    if cmdline is None:
        cmdline = make("cmdline")
        cmdline.text = current
        os_el = dom.find("os")
        assert os_el is not None  # a kernel was found in it
        _insert(os_el, cmdline, index_after(os_el, ("type", "loader", "nvram", "kernel",
                                                    "initrd")))
    else:
        cmdline.text = current
    changes.append(Change("changed", "cmdline", previous=previous, current=current))


def _restore_cmdline(dom: Element, ch: Change) -> None:
    """Put back the kernel command line recorded in ``ch`` (remove the element libshare
    added) if ``dom``'s is still the one libshare set; a command line changed by someone
    else since is theirs: left alone."""
    cmdline = dom.find("os/cmdline")
    if cmdline is None or ch.current is None or (cmdline.text or "") != ch.current:
        return
    if ch.previous is None:
        remove_child(cmdline)
    else:
        cmdline.text = ch.previous


def _initrd_in_use(root: Element, enr: Enrolment | None) -> Change | None:
    """Return the recorded switch to libshare's initrd when ``root`` still boots it (its
    ``<os><initrd>`` is what libshare set), else None."""
    ch = None if enr is None else enr.change("changed", "initrd")
    if ch is None or ch.current is None:
        return None
    return ch if (root.findtext("os/initrd") or "").strip() == ch.current else None


def _restore_initrd(dom: Element, ch: Change) -> None:
    """Put back the initrd recorded in ``ch`` if ``dom`` still boots libshare's (an
    initrd set by someone else since is theirs: left alone)."""
    initrd = dom.find("os/initrd")
    if initrd is not None and ch.previous is not None and ch.current is not None \
            and (initrd.text or "").strip() == ch.current:
        initrd.text = ch.previous


def _initrd_change_element(rec: Element) -> Element | None:
    """Return the ``<libshare:changed what="initrd">`` child of record ``rec``, or None."""
    return next((c for c in rec if isinstance(c.tag, str) and c.tag == f"{{{NS}}}changed"
                 and c.get("what") == "initrd"), None)


def switch_initrd(root: Element, path: str) -> Element:
    """Return a copy of enrolled domain ``root`` (direct kernel boot) booting the initrd
    ``path`` (libshare's, built from the domain's own) instead of its own, the change
    recorded in the enrolment so that :func:`disable` or :func:`restore_initrd` undo it.
    Switching again keeps the first original. Raises RefusedError (one line) when the
    domain is not enrolled or has no ``<os><kernel>`` and ``<initrd>``."""
    dom = copy_document(root)
    name = dom.findtext("name") or "domain"
    rec = find_record(dom)
    if rec is None:
        raise RefusedError(f"{name}: not enrolled")
    initrd, kernel = dom.find("os/initrd"), dom.find("os/kernel")
    if kernel is None or initrd is None or not (initrd.text or "").strip():
        raise RefusedError(f"{name}: no direct kernel boot with an initrd "
                           "(<os><kernel> and <initrd>)")
    own = (initrd.text or "").strip()
    elem = _initrd_change_element(rec)
    if elem is None:
        elem = make(q("changed"), {"what": "initrd"})
        _insert(rec, elem)
        elem.set("previous", own)
    elif own != elem.get("current"):  # someone set another initrd since: theirs now
        elem.set("previous", own)
    elem.set("current", path)
    initrd.text = path
    return dom


def restore_initrd(root: Element) -> Element:
    """Return a copy of ``root`` booting its own initrd again, the record of
    :func:`switch_initrd` dropped (an unchanged copy when there is none)."""
    dom = copy_document(root)
    rec = find_record(dom)
    elem = None if rec is None else _initrd_change_element(rec)
    if rec is not None and elem is not None:
        _restore_initrd(dom, Change("changed", "initrd", elem.get("previous"),
                                    current=elem.get("current")))
        remove_child(elem)
    return dom


def boot_of(root: Element) -> dict[str, Any]:
    """Return how domain ``root`` boots, as a JSON-ready dict: ``direct_kernel`` (it has
    ``<os><kernel>``), ``kernel``, ``initrd`` (paths or None), ``libshare_initrd`` (the
    initrd libshare set, when the domain still boots it) and ``original_initrd`` (the
    domain's own initrd then)."""
    enr = find_record(root)
    ch = None if enr is None else _initrd_in_use(root, parse_record(enr, strict=False))
    kernel = (root.findtext("os/kernel") or "").strip() or None
    return {"direct_kernel": kernel is not None, "kernel": kernel,
            "initrd": (root.findtext("os/initrd") or "").strip() or None,
            "libshare_initrd": None if ch is None else ch.current,
            "original_initrd": None if ch is None else ch.previous}


def is_enrolled(root: Element) -> bool:
    """Return True when ``root`` carries a libshare enrolment record (valid or not:
    ``disable`` undoes either)."""
    return find_record(root) is not None


def enrolment(root: Element) -> Enrolment | None:
    """Return the parsed enrolment record of ``root``, or None if it is not enrolled;
    raise RefusedError when the record names an invalid group."""
    rec = find_record(root)
    return None if rec is None else parse_record(rec)


def describe(root: Element) -> dict[str, Any]:
    """Return libshare's view of a domain as a JSON-ready dict.

    Keys: enrolled, name, group, model, region, size, digest, state_dir, redirect (the
    automatic redirect mode, None when not enrolled), device_present, agent_channel,
    free_page_reporting, boot (:func:`boot_of`).
    """
    enr = enrolment(root)
    devices = root.find("devices")
    balloon = None if devices is None else devices.find("memballoon")
    info: dict[str, Any] = {
        "name": root.findtext("name"),
        "enrolled": enr is not None,
        "group": None, "model": None, "region": None, "size": None, "digest": None,
        "state_dir": None, "redirect": None, "device_present": False,
        "agent_channel": dev.find_agent_channel(devices) is not None,
        "free_page_reporting": balloon is not None and balloon.get("freePageReporting") == "on",
        "boot": boot_of(root),
    }
    if enr is not None:
        info.update(group=enr.group, model=enr.model, region=enr.region, size=enr.size,
                    digest=enr.digest, state_dir=enr.state_dir, redirect=enr.redirect,
                    device_present=dev.find_region_device(
                        devices, enr.model, enr.region, enr.group) is not None)
    return info
