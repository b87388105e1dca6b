"""The guest RAM a live domain definition gives, as QEMU lays it out: one block per
NUMA cell, else ``<memory>`` less the memory devices (whose sizes libvirt counts in
``<memory>``)."""

from __future__ import annotations

from libshare.domxml.tree import Element, scaled_bytes, to_bytes


def guest_ram_sizes(root: Element) -> list[int]:
    """Return the guest RAM block sizes in bytes of the domain ``root``: one per NUMA
    cell, else one, ``<memory>`` less the memory devices."""
    cells = root.findall("cpu/numa/cell")
    if cells:
        return [to_bytes(c.get("memory"), c.get("unit"), what="NUMA cell memory")
                for c in cells]
    memory = root.find("memory")
    total = scaled_bytes(memory) if memory is not None else 0
    for dev in root.findall("devices/memory/target/size"):
        total -= scaled_bytes(dev)
    return [total]
