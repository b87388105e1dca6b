"""A read-only walker of the Linux maple tree (lib/maple_tree.c, Linux >= 6.1), the
index of a process's VMAs (``mm_struct.mm_mt``).

Owns the node format of 64-bit kernels: an encoded node pointer ("enode") carries the
node type in bits 3..6 (``(enode >> 3) & 0xF``: 0 dense, 1 leaf_64, 2 range_64,
3 arange_64) and the 256-byte-aligned node address in the rest (``enode & ~0xFF``);
``maple_range_64`` nodes hold 15 pivots and 16 slots, ``maple_arange_64`` nodes 9 pivots,
10 slots and 10 gaps; the number of used slots comes from the pivots or, in a node that
is not full, from ``maple_metadata.end``. ``ma_root`` holding a plain pointer means a single entry at index 0.

:func:`iter_entries` yields ``(first, last, entry)`` for the non-NULL leaf entries in
index order. Every node is checked (type, address within bounds, pivots increasing
inside the parent's range); the walk visits at most ``max_nodes`` nodes and depth 16,
so torn or hostile memory ends it with :class:`MapleError`, never a hang.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from libshare.errors import LibshareError

MAPLE_NODE_MASK = 0xFF
MAPLE_DENSE, MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = 0, 1, 2, 3
NODE_SIZE = 256
MAX_DEPTH = 16
ULONG_MAX = (1 << 64) - 1


class MapleError(LibshareError):
    """The tree is inconsistent (bad node type, pivots out of order, loops, too big)."""


@dataclass(frozen=True)
class NodeLayout:
    """Byte offsets inside a node for one node type; defaults are Linux 6.1's."""

    pivots: int
    slots: int
    pivot_off: int
    slot_off: int
    meta_off: int


RANGE_64 = NodeLayout(pivots=15, slots=16, pivot_off=8, slot_off=128, meta_off=248)
ARANGE_64 = NodeLayout(pivots=9, slots=10, pivot_off=8, slot_off=80, meta_off=240)


def is_node(entry: int) -> bool:
    """Return True if ``ma_root`` value ``entry`` points at a node (``xa_is_node``:
    tagged ``(entry & 3) == 2``) rather than holding a single entry."""
    return entry & 3 == 2 and entry > 4096


def is_enode(entry: int) -> bool:
    """Return True if internal-node slot ``entry`` is a plausible encoded child:
    ``node | type << 3 | MAPLE_ENODE_NULL (4)``, type leaf_64, range_64 or arange_64."""
    return entry > 4096 and entry & 0x83 in (0, 2) and node_type(entry) in (
        MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64)


def node_type(enode: int) -> int:
    """Return the maple_type encoded in ``enode``."""
    return (enode >> 3) & 0xF


def node_addr(enode: int) -> int:
    """Return the address of the node ``enode`` points at."""
    return enode & ~MAPLE_NODE_MASK


def _layout(ntype: int, range64: NodeLayout, arange64: NodeLayout) -> NodeLayout:
    if ntype in (MAPLE_LEAF_64, MAPLE_RANGE_64):
        return range64
    if ntype == MAPLE_ARANGE_64:
        return arange64
    raise MapleError(f"unsupported maple node type {ntype}")


def node_slots(data: bytes, ntype: int, lo: int, hi: int, range64: NodeLayout = RANGE_64,
               arange64: NodeLayout = ARANGE_64) -> list[tuple[int, int, int]]:
    """Return ``(first, last, slot)`` for the used slots of a node (raw 256 bytes
    ``data`` of type ``ntype``) covering ``[lo, hi]``; raise MapleError if malformed."""
    lay = _layout(ntype, range64, arange64)
    pivots = struct.unpack_from(f"<{lay.pivots}Q", data, lay.pivot_off)
    slots = struct.unpack_from(f"<{lay.slots}Q", data, lay.slot_off)
    if ntype == MAPLE_ARANGE_64 or pivots[-1] == 0:  # not full: metadata holds the end
        end = data[lay.meta_off]
    elif pivots[-1] == hi:
        end = lay.pivots - 1
    else:
        end = lay.slots - 1
    if end >= lay.slots:
        raise MapleError(f"maple node end {end} beyond {lay.slots} slots")
    out = []
    first = lo
    for i in range(end + 1):
        last = pivots[i] if i < lay.pivots else hi
        if i == end and i > 0 and last == 0:
            last = hi  # an unused final pivot: the node's maximum is implied
        if last < first or last > hi:
            raise MapleError(f"maple pivots out of order ({last:#x} after {first:#x})")
        out.append((first, last, slots[i]))
        if last == hi:
            break
        first = last + 1
    return out


def iter_entries(read: Callable[[int, int], bytes], root: int,
                 range64: NodeLayout = RANGE_64, arange64: NodeLayout = ARANGE_64,
                 max_nodes: int = 1 << 16,
                 valid: Callable[[int], bool] | None = None) -> Iterator[tuple[int, int, int]]:
    """Yield ``(first, last, entry)`` for every non-NULL entry of the tree whose
    ``ma_root`` is ``root``, in index order. ``read(addr, n)`` returns kernel memory;
    ``valid(addr)`` (optional) rejects node addresses outside kernel RAM. Raises
    MapleError on an inconsistent tree or after ``max_nodes`` nodes."""
    if root == 0:
        return
    if not is_node(root):
        yield 0, 0, root
        return
    seen = 0
    stack: list[tuple[int, int, int, int]] = [(root, 0, ULONG_MAX, 0)]
    visited: set[int] = set()
    while stack:
        enode, lo, hi, depth = stack.pop()
        addr = node_addr(enode)
        if depth > MAX_DEPTH:
            raise MapleError("maple tree deeper than 16 levels")
        if addr in visited:
            raise MapleError(f"maple node {addr:#x} reached twice (loop)")
        visited.add(addr)
        seen += 1
        if seen > max_nodes:
            raise MapleError(f"maple tree has more than {max_nodes} nodes")
        if valid is not None and not valid(addr):
            raise MapleError(f"maple node pointer {addr:#x} outside guest RAM")
        ntype = node_type(enode)
        data = read(addr, NODE_SIZE)
        entries = node_slots(data, ntype, lo, hi, range64, arange64)
        if ntype == MAPLE_LEAF_64:
            for first, last, entry in entries:
                if entry:
                    yield first, last, entry
        else:
            children = []
            for first, last, entry in entries:
                if not entry:
                    continue
                if not is_enode(entry):
                    raise MapleError(f"maple internal slot {entry:#x} is not a node")
                children.append((entry, first, last, depth + 1))
            stack.extend(reversed(children))
