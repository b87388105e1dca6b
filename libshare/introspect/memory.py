"""Guest physical memory readers: one small interface, several backends.

Owns :class:`PhysicalMemory` (``read(phys_addr, length) -> bytes``, ``ram_ranges()``,
``invalidate()``), its bounded page cache, and the backends that need no libvirt:

- :class:`BytesMemory`: a bytes buffer (tests, synthetic page tables);
- :class:`FileMemory`: guest RAM in a file or memfd (``<memoryBacking><source
  type='file'|'memfd'/><access mode='shared'/>``) or a raw dump, mapped with ``mmap``;
- :class:`ProcMemory`: the QEMU process's own address space through
  ``/proc/<pid>/mem`` (root), given where each guest RAM range sits in it
  (:mod:`libshare.introspect.qemu` finds that).

A :class:`RamBlock` maps a guest-physical range to an offset in the backing object (a
host virtual address for ``ProcMemory``, a file offset for ``FileMemory``). Reads
outside RAM raise :class:`MemoryReadError`; reads longer than :data:`MAX_READ` are
refused, so hostile lengths never allocate without bound. The optional LibVMI reader
lives in :mod:`libshare.introspect.vmi`.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from libshare.errors import LibshareError

PAGE_SIZE = 4096
PAGE_MASK = ~(PAGE_SIZE - 1)
MAX_READ = 64 << 20  # largest single read any walker may ask for
DEFAULT_CACHE_PAGES = 16384  # 64 MiB of cached guest pages at most


class MemoryReadError(LibshareError):
    """A guest-physical read fell outside guest RAM or the backing could not be read."""


@dataclass(frozen=True)
class RamBlock:
    """Guest-physical ``[start, start+size)`` backed at ``backing_offset`` (host virtual
    address or file offset, depending on the backend)."""

    start: int
    size: int
    backing_offset: int

    @property
    def end(self) -> int:
        """Return the first guest-physical address after the block."""
        return self.start + self.size


def pc_ram_layout(ram_size: int, machine: str = "pc", base: int = 0) -> list[RamBlock]:
    """Return QEMU's split of ``ram_size`` bytes of RAM on an x86 ``machine`` ("pc" or
    "q35") as RamBlocks whose backing offsets start at ``base`` and follow each other:
    below 4 GiB up to 3 GiB (pc, RAM >= 3.5 GiB) or 2 GiB (q35, RAM >= 2.75 GiB), the
    rest from 4 GiB."""
    if "q35" in machine:
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else ram_size
    else:
        lowmem = 0xC0000000 if ram_size >= 0xE0000000 else ram_size
    blocks = [RamBlock(0, lowmem, base)]
    if ram_size > lowmem:
        blocks.append(RamBlock(1 << 32, ram_size - lowmem, base + lowmem))
    return blocks


class PhysicalMemory:
    """Base class: a guest's physical memory as RamBlocks plus a small page cache.

    Subclasses implement :meth:`_read_backing`. ``read`` serves whole pages from an LRU
    cache of at most ``cache_pages`` pages; :meth:`invalidate` drops it (call it when the
    guest may have run since the last read).
    """

    def __init__(self, blocks: Sequence[RamBlock], cache_pages: int = DEFAULT_CACHE_PAGES) -> None:
        """Serve ``blocks`` (sorted, non-overlapping) with a cache of ``cache_pages``."""
        self.blocks = sorted(blocks, key=lambda b: b.start)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_pages = cache_pages
        self.reads = 0  # backing reads issued (for benchmarks)

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Return guest RAM as sorted ``(start, end)`` guest-physical ranges."""
        return [(b.start, b.end) for b in self.blocks]

    @property
    def ram_size(self) -> int:
        """Return the total guest RAM in bytes."""
        return sum(b.size for b in self.blocks)

    def is_ram(self, addr: int, length: int = 1) -> bool:
        """Return True if ``[addr, addr+length)`` lies inside one RAM block."""
        return self._block(addr, length) is not None

    def _block(self, addr: int, length: int) -> RamBlock | None:
        for b in self.blocks:
            if b.start <= addr and addr + length <= b.end:
                return b
        return None

    def invalidate(self) -> None:
        """Drop every cached page (the guest may have changed them)."""
        self._cache.clear()

    def _read_backing(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def read_uncached(self, addr: int, length: int) -> bytes:
        """Return ``length`` bytes at guest-physical ``addr``, bypassing the cache."""
        if length < 0 or length > MAX_READ:
            raise MemoryReadError(f"refusing a {length}-byte read at {addr:#x}")
        block = self._block(addr, length)
        if block is None:
            raise MemoryReadError(f"guest physical {addr:#x}+{length:#x} is not RAM")
        self.reads += 1
        data = self._read_backing(block.backing_offset + (addr - block.start), length)
        if len(data) != length:
            raise MemoryReadError(f"short read at guest physical {addr:#x}")
        return data

    def _page(self, page: int) -> bytes:
        data = self._cache.get(page)
        if data is not None:
            self._cache.move_to_end(page)
            return data
        data = self.read_uncached(page, PAGE_SIZE)
        self._cache[page] = data
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return data

    def read(self, addr: int, length: int) -> bytes:
        """Return ``length`` bytes at guest-physical ``addr`` (through the page cache);
        raise MemoryReadError outside RAM or above :data:`MAX_READ`."""
        if length < 0 or length > MAX_READ:
            raise MemoryReadError(f"refusing a {length}-byte read at {addr:#x}")
        first = addr & PAGE_MASK
        if addr + length <= first + PAGE_SIZE:
            off = addr - first
            return self._page(first)[off:off + length]
        if length > 16 * PAGE_SIZE:
            return self.read_uncached(addr, length)
        parts = []
        page = first
        while page < addr + length:
            parts.append(self._page(page))
            page += PAGE_SIZE
        off = addr - first
        return b"".join(parts)[off:off + length]

    def chunks(self, chunk_size: int = 16 << 20, overlap: int = 4096) -> Iterator[tuple[int, bytes]]:
        """Yield ``(address, data)`` covering all RAM in pieces of ``chunk_size`` bytes,
        each piece extended by ``overlap`` bytes so a pattern spanning a boundary is seen
        (uncached; for one-time scans)."""
        for b in self.blocks:
            pos = b.start
            while pos < b.end:
                n = min(chunk_size + overlap, b.end - pos)
                yield pos, self.read_uncached(pos, n)
                pos += chunk_size

    def close(self) -> None:
        """Release the backing (file descriptors, mappings)."""


class BytesMemory(PhysicalMemory):
    """Guest memory held in a bytes-like buffer; offset = ``backing_offset``."""

    def __init__(self, data: bytes | bytearray, blocks: Sequence[RamBlock] | None = None) -> None:
        """Serve ``data``; by default one block at guest-physical 0 covering it all."""
        self._data = data
        super().__init__(blocks or [RamBlock(0, len(data), 0)], cache_pages=64)

    def _read_backing(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset:offset + length])


class FileMemory(PhysicalMemory):
    """Guest RAM in a file (memory-backend-file, memfd via /proc/PID/fd/N, or a raw
    dump), mapped read-only with mmap."""

    def __init__(self, path: str | os.PathLike[str], blocks: Sequence[RamBlock] | None = None) -> None:
        """Map ``path``; ``blocks`` say which file offset backs which guest-physical
        range (default: offset = guest-physical address, the whole file)."""
        try:
            self._fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise MemoryReadError(f"cannot map guest memory file {path}: {exc}") from exc
        blocks = list(blocks) if blocks else [RamBlock(0, size, 0)]
        for b in blocks:
            if b.backing_offset + b.size > size:
                raise MemoryReadError(f"{path} is smaller than the guest RAM it should hold")
        super().__init__(blocks)

    def _read_backing(self, offset: int, length: int) -> bytes:
        return self._map[offset:offset + length]

    def close(self) -> None:
        """Unmap and close the file."""
        self._map.close()
        os.close(self._fd)


class ProcMemory(PhysicalMemory):
    """The QEMU process's guest-RAM mappings read through ``/proc/<pid>/mem``; each
    block's ``backing_offset`` is the host virtual address of its first byte."""

    def __init__(self, pid: int, blocks: Sequence[RamBlock]) -> None:
        """Open ``/proc/<pid>/mem`` (needs root, or ptrace rights on QEMU)."""
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as exc:
            raise MemoryReadError(f"cannot open /proc/{pid}/mem: {exc}") from exc
        self.pid = pid
        super().__init__(blocks)

    def _read_backing(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise MemoryReadError(f"reading QEMU {self.pid} at {offset:#x}: {exc}") from exc

    def close(self) -> None:
        """Close ``/proc/<pid>/mem``."""
        os.close(self._fd)
