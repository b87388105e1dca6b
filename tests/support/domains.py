"""Domain XML documents the unit tests enrol: a small x86-64 domain by name, and the
same enrolled into a region with libshare's own transform."""

from __future__ import annotations

from libshare import domxml

MiB = 1 << 20
UUID = "0d4c2cf5-1b5e-4b53-9d7f-1f9b3c7b9a11"


def plain(name: str = "g1", domain_type: str = "qemu", uuid: str = UUID,
          memory_mib: int = 256, machine: str | None = None) -> str:
    """Return a minimal x86-64 hvm domain ``name`` without devices (the shape a fresh
    ``virsh define`` of a small guest has, less its disks)."""
    mach = f" machine='{machine}'" if machine else ""
    return (f"<domain type='{domain_type}'><name>{name}</name><uuid>{uuid}</uuid>\n"
            f"<memory unit='MiB'>{memory_mib}</memory>"
            f"<os><type arch='x86_64'{mach}>hvm</type></os><devices/></domain>")


def region_spec(region: str = "/r/a.img", size: int = 8 * MiB, group: str = "g",
                digest: str | None = "ab" * 32, state_dir: str | None = "/var/lib/libshare",
                model: str = "nvdimm", redirect: str | None = None) -> domxml.RegionSpec:
    """Return a region spec as enrolment would build it (defaults: an 8 MiB nvdimm
    region of group ``g`` with a recorded digest)."""
    return domxml.RegionSpec(region, size, group, model=model, digest=digest,
                             state_dir=state_dir, redirect=redirect)


def enrolled(name: str = "g1", base: str | None = None, **spec: object) -> str:
    """Return domain ``name`` (or the document ``base``) enrolled with
    :func:`region_spec` (``spec`` overrides its defaults)."""
    root = domxml.parse(base if base is not None else plain(name))
    return domxml.serialize(domxml.enable(root, region_spec(**spec)))  # type: ignore[arg-type]


def composed(name: str = "r", extra: str = "", memory: str = "<memory unit='MiB'>512</memory>",
             devices: str = "", machine: str = "pc") -> str:
    """Return a pretty-printed x86-64 TCG domain ``name`` with ``memory`` (an element, or
    '' for none), ``extra`` elements after ``<os>``, and ``devices`` after the emulator."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  {memory}
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
  </os>
  {extra}
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
  </devices>
</domain>
"""


def full_pc_devices(bridges: int = 1, usb_set: bool = False,
                    free: tuple[int, int] | None = None, video: bool = True) -> str:
    """Return the ``<devices>`` content of a pc domain whose conventional PCI slots are
    all taken by explicit addresses: pci-root, ``bridges`` pci-bridges chained in slot
    0x1f, virt-manager's USB controller set in slot 0x1e when ``usb_set``, a cirrus
    video in slot 2 when ``video``, and virtio-scsi controllers in every other slot
    (libvirt handles them faster than NICs) but ``free``, a (bus, slot) left empty."""
    parts = ["<controller type='pci' index='0' model='pci-root'/>"]
    for i in range(1, bridges + 1):
        parts.append(f"<controller type='pci' index='{i}' model='pci-bridge'><model "
                     f"name='pci-bridge'/><target chassisNr='{i}'/><address type='pci' "
                     f"domain='0x0000' bus='0x{i - 1:02x}' slot='0x1f' function='0x0'/>"
                     "</controller>")
    taken = {(b, 0x1f) for b in range(bridges)}
    if usb_set:
        for func, model in ((7, "ich9-ehci1"), (0, "ich9-uhci1"), (1, "ich9-uhci2"),
                            (2, "ich9-uhci3")):
            multi = " multifunction='on'" if func == 0 else ""
            parts.append(f"<controller type='usb' index='0' model='{model}'><address "
                         f"type='pci' domain='0x0000' bus='0x00' slot='0x1e' "
                         f"function='0x{func}'{multi}/></controller>")
        taken.add((0, 0x1e))
    if video:
        parts.append("<video><model type='cirrus'/><address type='pci' domain='0x0000' "
                     "bus='0x00' slot='0x02' function='0x0'/></video>")
        taken.add((0, 2))
    index = 0
    for bus in range(bridges + 1):
        for slot in range(1 if bus else 3, 32):
            if (bus, slot) in taken or (bus, slot) == free:
                continue
            parts.append(f"<controller type='scsi' index='{index}' model='virtio-scsi'>"
                         f"<address type='pci' domain='0x0000' bus='0x{bus:02x}' "
                         f"slot='0x{slot:02x}' function='0x0'/></controller>")
            index += 1
    parts.append("<memballoon model='none'/>")
    return "\n    ".join(parts)


def direct_kernel(name: str = "g1", kernel: str = "/srv/boot/vmlinuz",
                  initrd: str | None = "/srv/boot/initrd.img", uuid: str = UUID) -> str:
    """Return a small x86-64 TCG domain ``name`` booting host files directly:
    ``<os><kernel>`` and (unless ``initrd`` is None) ``<initrd>``, and a kernel command
    line; pretty-printed as libvirt writes it."""
    initrd_el = f"\n    <initrd>{initrd}</initrd>" if initrd is not None else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>524288</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>{initrd_el}
    <cmdline>root=/dev/vda ro console=ttyS0</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""
