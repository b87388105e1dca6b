"""Where a device libshare adds can sit on an i440fx domain's conventional PCI buses.

libvirt 9.0 places a new PCI device on the first free slot and, when no bus has one
left, adds a pci-bridge (src/qemu/qemu_domain_address.c, qemuDomainAssignPCIAddresses);
but the new bridge needs a slot too, and libvirt then puts it on its own bus and
refuses the domain: "PCI controller at index 1 (0x01) has bus='0x01', but index must be
larger than bus". That happens to any domain whose slots are all taken by explicit
addresses (libvirt writes one for every device it defines) as soon as enrolment adds
a PCI device: the virtio-serial controller of the guest-agent channel, a virtio-pmem
or an ivshmem region. In that case the new devices go on free functions of slots that
are already multifunction (virt-manager's USB controllers use functions 0-2 and 7 of
one slot), which changes no other device; with none left, enrolment is refused.

Only the conventional PCI topology of i440fx machines is modelled (pci-root and
pci-bridge controllers with explicit indexes): q35 adds pcie-root-ports on free
functions of pcie-root by itself, and anything else is left to libvirt.
"""

from __future__ import annotations

import re

from libshare.domxml.tree import Element
from libshare.errors import RefusedError

#: highest slot number of a conventional PCI bus (VIR_PCI_ADDRESS_SLOT_LAST)
SLOT_LAST = 31
#: highest function number of a slot
FUNCTION_LAST = 7
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]+)", re.ASCII)


def _number(value: str | None, default: int = 0) -> int | None:
    """Return a libvirt PCI address field (decimal or 0x-hex), ``default`` when absent,
    None when unreadable."""
    if value is None:
        return default
    text = value.strip()
    return int(text, 0) if _NUMBER.fullmatch(text) else None


def is_i440fx(root: Element) -> bool:
    """Return True when the domain's machine is i440fx (``pc``, ``pc-i440fx-*``, or
    none given: libvirt 9.0's x86_64 default)."""
    machine = root.find("os/type")
    name = (machine.get("machine") if machine is not None else None) or "pc"
    return name == "pc" or (name.startswith("pc-") and "q35" not in name)


def _buses(devices: Element) -> dict[int, int] | None:
    """Return bus index -> lowest usable slot for the domain's pci-root and pci-bridge
    controllers, or None when the topology holds anything this module does not model."""
    buses = {0: 1}  # the implicit pci-root: slot 0 is the host bridge
    for ctl in devices.findall("controller[@type='pci']"):
        model = ctl.get("model")
        index = _number(ctl.get("index"), -1)
        if index is None or index < 0:
            return None
        if model == "pci-root" and index == 0:
            continue
        if model != "pci-bridge":
            return None
        buses[index] = 1  # slot 0 of a pci-bridge is reserved for SHPC
    return buses


def _used(devices: Element) -> dict[tuple[int, int], set[int]] | None:
    """Return (bus, slot) -> functions in use by explicit PCI addresses, with libvirt's
    own reservations (PIIX3 at 00:01, the primary video at 00:02 when it has no
    address); None when an address cannot be read or is in another PCI domain."""
    used: dict[tuple[int, int], set[int]] = {(0, 1): set(range(FUNCTION_LAST + 1))}
    first_video = devices.find("video")
    if first_video is not None and first_video.find("address") is None:
        kind = first_video.find("model")
        if kind is None or kind.get("type") not in ("none", "ramfb"):
            used.setdefault((0, 2), set()).add(0)
    for dev in devices:
        if not isinstance(dev.tag, str):
            continue
        addr = dev.find("address")
        if addr is None or addr.get("type") != "pci":
            continue
        fields = [_number(addr.get(k)) for k in ("domain", "bus", "slot", "function")]
        if any(f is None for f in fields):
            return None
        domain, bus, slot, function = (f or 0 for f in fields)
        if domain != 0:
            return None
        funcs = used.setdefault((bus, slot), set())
        funcs.add(function)
        if addr.get("multifunction") == "on":
            funcs.add(-1)  # marks the slot multifunction even if only function 0 is used
    return used


def addresses_for(root: Element, count: int, what: str) -> list[dict[str, str]]:
    """Return explicit PCI addresses for ``count`` new conventional PCI devices of
    domain ``root`` when libvirt could not place them itself, else [] (libvirt assigns
    them). ``what`` names the devices in the refusal.

    Raises RefusedError when every slot is taken and the multifunction slots have too
    few free functions.
    """
    devices = root.find("devices")
    if count <= 0 or devices is None or not is_i440fx(root):
        return []
    buses = _buses(devices)
    used = _used(devices)
    if buses is None or used is None:
        return []
    free_slots = sum(1 for bus, low in buses.items() for slot in range(low, SLOT_LAST + 1)
                     if (bus, slot) not in used)
    if free_slots >= count:
        return []
    out: list[dict[str, str]] = []
    for (bus, slot), funcs in sorted(used.items()):
        if bus not in buses or (bus, slot) == (0, 1):
            continue
        multifunction = -1 in funcs or any(f > 0 for f in funcs)
        if not multifunction or 0 not in funcs:
            continue
        for function in range(1, FUNCTION_LAST + 1):
            if function not in funcs and len(out) < count:
                out.append({"type": "pci", "domain": "0x0000", "bus": f"0x{bus:02x}",
                            "slot": f"0x{slot:02x}", "function": f"0x{function:x}"})
    if len(out) < count:
        raise RefusedError(f"every PCI slot of this domain is taken and libvirt 9.0 cannot "
                           f"add a pci-bridge then; free a slot (or add a pci-bridge) for "
                           f"{what}")
    return out
