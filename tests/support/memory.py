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
