"""Maple tree walker on synthetic trees laid out like Linux 6.1's nodes."""

from __future__ import annotations

import struct

import pytest

from libshare.introspect.helpers.maple import (
    MAPLE_ARANGE_64,
    MAPLE_LEAF_64,
    MAPLE_RANGE_64,
    ULONG_MAX,
    MapleError,
    iter_entries,
)

BASE = 0xFFFF_8880_0100_0000


class Nodes:
    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.next = BASE

    def node(self, ntype: int, pivots: list[int], slots: list[int], end: int | None = None
             ) -> int:
        addr = self.next
        self.next += 256
        buf = bytearray(256)
        if ntype == MAPLE_ARANGE_64:
            struct.pack_into(f"<{len(pivots)}Q", buf, 8, *pivots)
            struct.pack_into(f"<{len(slots)}Q", buf, 80, *slots)
            buf[240] = len(slots) - 1 if end is None else end
        else:
            struct.pack_into(f"<{len(pivots)}Q", buf, 8, *pivots)
            struct.pack_into(f"<{len(slots)}Q", buf, 128, *slots)
            if len(pivots) < 15:
                buf[248] = len(slots) - 1 if end is None else end
        self.mem[addr] = buf
        return addr | (ntype << 3) | 4  # an enode; ma_root adds the tag 2

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem[addr][:n])


def vma_tree(n: Nodes) -> tuple[int, list[tuple[int, int, int]]]:
    """root (arange_64) -> [mid (range_64) -> [leaf1a, leaf1b], leaf2]."""
    a, b, c, d = 0xAAAA000, 0xBBBB000, 0xCCCC000, 0xDDDD000
    # leaf1a covers [0, 0x401FFF]: gap, vma A, gap (last pivot == node max).
    leaf1a = n.node(MAPLE_LEAF_64, [0x3FFFFF, 0x400FFF, 0x401FFF], [0, a, 0])
    # leaf1b covers [0x402000, 0x4FFFFF]: vma B then a gap up to the implied max.
    leaf1b = n.node(MAPLE_LEAF_64, [0x402FFF, 0], [b, 0], end=1)
    mid = n.node(MAPLE_RANGE_64, [0x401FFF, 0x4FFFFF], [leaf1a, leaf1b, 0], end=1)
    # leaf2 covers [0x500000, ULONG_MAX]: vma C, gap, vma D, gap.
    leaf2 = n.node(MAPLE_LEAF_64, [0x500FFF, 0x7FFF0000FFFF, 0x7FFF00010FFF],
                   [c, 0, d, 0])
    root = n.node(MAPLE_ARANGE_64, [0x4FFFFF], [mid, leaf2], end=1) | 2
    want = [(0x400000, 0x400FFF, a), (0x402000, 0x402FFF, b),
            (0x500000, 0x500FFF, c), (0x7FFF00010000, 0x7FFF00010FFF, d)]
    return root, want


def test_walk_in_order() -> None:
    n = Nodes()
    root, want = vma_tree(n)
    assert list(iter_entries(n.read, root)) == want


def test_full_leaf_uses_implied_max() -> None:
    n = Nodes()
    pivots = [(i + 1) * 0x1000 - 1 for i in range(15)]
    slots = [0x1000 + i for i in range(16)]
    leaf = n.node(MAPLE_LEAF_64, pivots, slots)
    got = list(iter_entries(n.read, leaf | 2))
    assert len(got) == 16 and got[-1] == (15 * 0x1000, ULONG_MAX, 0x100F)


def test_empty_and_single_entry_roots() -> None:
    assert list(iter_entries(lambda a, n: b"", 0)) == []
    assert list(iter_entries(lambda a, n: b"", 0xFFFF_8880_0000_1000)) == [
        (0, 0, 0xFFFF_8880_0000_1000)]


def test_loop_is_detected() -> None:
    n = Nodes()
    addr = n.next
    enode = addr | (MAPLE_RANGE_64 << 3) | 4
    n.node(MAPLE_RANGE_64, [0x1000], [enode, 0])  # its first child is itself
    with pytest.raises(MapleError, match=r"twice|deeper"):
        list(iter_entries(n.read, enode | 2))


def test_garbage_is_rejected() -> None:
    n = Nodes()
    bad_order = n.node(MAPLE_LEAF_64, [0x5000, 0x1000], [1, 2, 3])
    with pytest.raises(MapleError, match="order"):
        list(iter_entries(n.read, bad_order | 2))
    bad_type = n.node(MAPLE_LEAF_64, [0x5000], [1, 2]) & ~(0xF << 3) | (9 << 3)
    with pytest.raises(MapleError, match="type"):
        list(iter_entries(n.read, bad_type | 2))
    not_node = n.node(MAPLE_RANGE_64, [0x5000], [0xFFFF_8880_0000_1000, 0])
    with pytest.raises(MapleError, match="not a node"):
        list(iter_entries(n.read, not_node | 2))
    outside = n.node(MAPLE_RANGE_64, [0x5000], [0x1234_5600 | (1 << 3) | 4, 0])
    with pytest.raises(MapleError, match="outside"):
        list(iter_entries(n.read, outside | 2, valid=lambda a: a >= BASE))
    # A wide tree is cut off at max_nodes.
    root, _ = vma_tree(n)
    with pytest.raises(MapleError, match="more than"):
        list(iter_entries(n.read, root, max_nodes=2))
