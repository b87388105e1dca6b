"""The guest kernel as the walkers read it: :class:`KernelInfo` (what discovery found
about one booted kernel, cacheable per boot: init_task, KASLR offset, paging depth,
direct map, BTF layout) and :class:`Kernel` (reads kernel virtual memory through the
guest's own page tables, with a direct-map fast path). Discovery itself is
:mod:`libshare.introspect.discover`.

A :class:`Kernel` issues at most :data:`READS_PER_PAGE` reads per page of guest RAM,
shared by every walk over it (one survey, retries included), then raises
:class:`WalkError`: walks that multiply over hostile data (every process naming the
same thread list, the same VMAs) end, whatever their own caps.
"""

from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass
from typing import Any

from libshare.errors import LibshareError
from libshare.introspect.layout import Layout
from libshare.introspect.memory import PAGE_SIZE, MemoryReadError, PhysicalMemory
from libshare.introspect.paging import is_canonical, translate

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
MASK64 = (1 << 64) - 1
RELEASE_RE = re.compile(r"Linux version (\S+)")
#: Kernel reads per 4 KiB page of guest RAM that the walks of one survey may issue (a
#: real survey issues well under one: 811 on a 48-task busybox guest of 256 MiB)
READS_PER_PAGE = 16
READS_MIN = 1 << 16




class WalkError(LibshareError):
    """Kernel data met during a walk is inconsistent (torn or hostile memory)."""




@dataclass
class KernelInfo:
    """What a survey needs to know about one booted kernel (cacheable per boot)."""

    banner: str
    init_task: int          # virtual address of init_task (kernel image)
    init_task_phys: int     # where it was found
    image_delta: int        # physical = image virtual + image_delta (mod 2**64)
    pgd: int                # physical address of swapper_pg_dir
    levels: int             # 4 or 5
    page_offset_base: int   # virtual address of physical 0 in the direct map
    layout: Layout
    btf_phys: int | None = None
    banner_phys: int | None = None

    @property
    def release(self) -> str:
        """Return the kernel release from the banner ("6.1.0-18-amd64"), or ""."""
        m = RELEASE_RE.match(self.banner)
        return m.group(1) if m else ""

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able dict (see :meth:`from_json`)."""
        d = asdict(self)
        d["layout"] = self.layout.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelInfo:
        """Return the KernelInfo saved by :meth:`to_json`."""
        raw = dict(d["layout"])
        offsets = {k: int(v) for k, v in raw.items() if not k.startswith("sizeof(")}
        sizes = {k[7:-1]: int(v) for k, v in raw.items() if k.startswith("sizeof(")}
        rest = {k: v for k, v in d.items() if k != "layout"}
        return cls(layout=Layout(offsets, sizes, "cache"), **rest)


































class Kernel:
    """Reads kernel virtual memory of one guest through its page tables."""

    def __init__(self, mem: PhysicalMemory, info: KernelInfo) -> None:
        """Read ``mem`` as the kernel described by ``info``."""
        self.mem = mem
        self.info = info
        self.layout = info.layout
        self.levels = info.levels
        self._pob = info.page_offset_base
        self._ram_end = max(end for _, end in mem.ram_ranges())
        self._xlate: dict[int, int | None] = {}
        #: reads left to all walks over this Kernel (never reset: retries spend it too)
        self.reads_left = max(READS_MIN, READS_PER_PAGE * (mem.ram_size // PAGE_SIZE))

    def invalidate(self) -> None:
        """Forget cached memory and translations (the guest ran)."""
        self.mem.invalidate()
        self._xlate.clear()

    def is_direct(self, va: int) -> bool:
        """Return True if ``va`` lies in the direct map of guest RAM."""
        return self._pob <= va < self._pob + self._ram_end

    def to_phys(self, va: int) -> int:
        """Return the guest-physical address of kernel virtual ``va``; raise WalkError
        if it is not mapped or not canonical."""
        if self.is_direct(va):
            return va - self._pob
        page = va & ~(PAGE_SIZE - 1)
        if page not in self._xlate:
            if not is_canonical(va, self.levels):
                raise WalkError(f"kernel pointer {va:#x} is not canonical")
            if len(self._xlate) > 1 << 16:
                self._xlate.clear()
            self._xlate[page] = translate(self.mem, self.info.pgd, page, self.levels)
        phys = self._xlate[page]
        if phys is None:
            raise WalkError(f"kernel address {va:#x} is not mapped")
        return phys | (va & (PAGE_SIZE - 1))

    def valid(self, va: int) -> bool:
        """Return True if ``va`` is a readable kernel address."""
        try:
            return self.mem.is_ram(self.to_phys(va))
        except WalkError:
            return False

    def read(self, va: int, length: int) -> bytes:
        """Return ``length`` bytes of kernel memory at ``va``; raise WalkError if any
        page is unmapped or outside guest RAM, or once :attr:`reads_left` is spent."""
        self.reads_left -= 1
        if self.reads_left < 0:
            raise WalkError(f"more than {READS_PER_PAGE} kernel reads per page of guest "
                            "RAM: walk abandoned (hostile or looping kernel data)")
        try:
            if self.is_direct(va) and self.is_direct(va + length - 1):
                return self.mem.read(va - self._pob, length)
            parts = []
            pos, end = va, va + length
            while pos < end:
                n = min(end, (pos | (PAGE_SIZE - 1)) + 1) - pos
                parts.append(self.mem.read(self.to_phys(pos), n))
                pos += n
            return b"".join(parts)
        except MemoryReadError as exc:
            raise WalkError(f"reading kernel {va:#x}: {exc}") from exc

    def u64(self, va: int) -> int:
        """Return the little-endian unsigned 64-bit value at ``va``."""
        return int.from_bytes(self.read(va, 8), "little")

    def u32(self, va: int) -> int:
        """Return the little-endian unsigned 32-bit value at ``va``."""
        return int.from_bytes(self.read(va, 4), "little")

    def s32(self, va: int) -> int:
        """Return the little-endian signed 32-bit value at ``va``."""
        return int(struct.unpack("<i", self.read(va, 4))[0])

    def field(self, base: int, key: str, size: int = 8) -> int:
        """Return the unsigned ``size``-byte member ``key`` ("struct.member") of the
        object at ``base``."""
        return int.from_bytes(self.read(base + self.layout.off(key), size), "little")

    def cstring(self, va: int, maxlen: int) -> bytes:
        """Return the NUL-terminated string at ``va`` (at most ``maxlen`` bytes)."""
        raw = self.read(va, maxlen)
        nul = raw.find(b"\0")
        return raw if nul < 0 else raw[:nul]
