"""Walking the kernel's circular doubly linked lists (``struct list_head``) in guest
memory, bounded: every walk of tasks, threads, superblocks, mounts and inodes goes
through :func:`list_for_each`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from libshare.introspect.kernel import Kernel, WalkError

#: ``links(node) -> (next, prev)``: the two pointers of the list_head at ``node``
Links = Callable[[int], tuple[int, int]]


def list_for_each(k: Kernel, head: int, limit: int, links: Links | None = None,
                  what: str = "") -> Iterator[int]:
    """Yield the addresses of the ``list_head`` nodes of the circular list at ``head``
    (``head`` itself excluded). ``links`` reads a node's next and prev pointers (default:
    the two words at the node; a caller that reads the whole enclosing object anyway can
    hand them over). Raise WalkError, naming ``what`` (default: the head's address), on
    a broken back link, a loop that does not return to ``head``, or more than ``limit``
    nodes."""
    read = links or (lambda node: (k.u64(node), k.u64(node + 8)))
    name = what or f"list at {head:#x}"
    seen: set[int] = set()
    prev, node = head, k.u64(head)
    while node != head:
        if node in seen:
            raise WalkError(f"{name} loops at {node:#x}")
        if len(seen) >= limit:
            raise WalkError(f"{name} longer than {limit}")
        nxt, back = read(node)
        if back != prev:
            raise WalkError(f"{name}: node {node:#x} does not link back")
        seen.add(node)
        yield node
        prev, node = node, nxt
