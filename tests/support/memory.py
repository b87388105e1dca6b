"""Guest memory built by hand for introspection tests: :class:`Tables`, a guest RAM
buffer with a page allocator and helpers that fill x86-64 page tables."""


from __future__ import annotations

import struct

from libshare.introspect.memory import BytesMemory
from libshare.introspect.paging import (
    P_PRESENT,
    P_PSE,
    P_USER,
)

PAGE = 4096
RW = P_PRESENT | 2 | P_USER


class Tables:
    """A guest RAM buffer with a page allocator and helpers to fill page tables."""

    def __init__(self, pages: int = 64) -> None:
        self.buf = bytearray(pages * PAGE)
        self.next = 1 << 20  # tables from 1 MiB; data pages below
        self.buf.extend(bytearray((1 << 20) + 64 * PAGE - len(self.buf)))

    def alloc(self) -> int:
        addr = self.next
        self.next += PAGE
        return addr

    def set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.buf, table + index * 8, value)

    def get(self, table: int, index: int) -> int:
        return int(struct.unpack_from("<Q", self.buf, table + index * 8)[0])

    def map(self, top: int, va: int, pa: int, levels: int = 4, size: int = PAGE,
            flags: int = RW) -> None:
        table = top
        shift = 39 + 9 * (levels - 4)
        while True:
            index = (va >> shift) & 511
            if (1 << shift) == size:
                leaf = pa | flags | (P_PSE if size > PAGE else 0)
                self.set(table, index, leaf)
                return
            entry = self.get(table, index)
            if not entry:
                entry = self.alloc() | RW
                self.set(table, index, entry)
            table = entry & ~0xFFF & ((1 << 52) - 1)
            shift -= 9

    def mem(self) -> BytesMemory:
        return BytesMemory(self.buf)


#: where the direct map of guest RAM starts in the fake kernels (x86-64's default)
POB = 0xFFFF_8880_0000_0000
#: the kernel image's virtual base (mapped onto guest-physical 0 where a test maps it)
IMAGE = 0xFFFF_FFFF_8000_0000


class KernelObjects:
    """Guest RAM of ``ram`` bytes holding hand-built kernel objects: a bump allocator of
    objects in the direct map (from ``first``), writers of integers and bytes (at direct
    map or kernel image addresses), circular lists and dentries laid out at the member
    offsets ``offs``."""

    def __init__(self, offs: dict[str, int], ram: int, first: int = 0x1000) -> None:
        self.offs = offs
        self.buf = bytearray(ram)
        self.next = first

    def obj(self, size: int = 0x200) -> int:
        """Return the direct-map address of a new zeroed object of ``size`` bytes."""
        va = POB + self.next
        self.next += size
        return va

    def put(self, va: int, off: int, value: int, size: int = 8) -> None:
        """Write the little-endian ``value`` of ``size`` bytes at ``va + off``."""
        pa = va - POB if va < IMAGE else va - IMAGE
        self.buf[pa + off: pa + off + size] = value.to_bytes(size, "little")

    def put_bytes(self, va: int, data: bytes) -> None:
        """Write ``data`` at direct-map address ``va``."""
        self.buf[va - POB: va - POB + len(data)] = data

    def ring(self, nodes: list[int]) -> None:
        """Link the ``list_head`` nodes ``nodes`` into one circular list, in order."""
        for i, n in enumerate(nodes):
            self.put(n, 0, nodes[(i + 1) % len(nodes)])
            self.put(n, 8, nodes[i - 1])

    def dentry(self, name: bytes, parent: int | None, length: int | None = None) -> int:
        """Return a new hashed dentry called ``name`` under ``parent`` (itself when None:
        a root); ``length`` overrides the name length written."""
        d = self.obj()
        s = self.obj(0x100)
        self.put_bytes(s, name)
        self.put(d, self.offs["dentry.d_parent"], parent if parent is not None else d)
        self.put(d, self.offs["dentry.d_name.len"], len(name) if length is None else length, 4)
        self.put(d, self.offs["dentry.d_name.name"], s)
        self.put(d, self.offs["dentry.d_hash.pprev"], 0x1234)  # hashed (not deleted)
        return d
