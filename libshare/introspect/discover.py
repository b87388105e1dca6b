"""Finding the guest kernel in its physical memory: BTF, ``init_task``, KASLR, paging
mode and direct map, without symbols (the result, a :class:`~libshare.introspect.kernel.
KernelInfo`, is what :class:`~libshare.introspect.kernel.Kernel` reads through).

Owns :func:`scan_memory` (one pass over guest RAM looking for BTF headers, the
``swapper/0`` comm and the ``Linux version`` banner), :func:`scan_order` (the likely
kernel image first: from a 2 MiB-aligned page that starts with the banner, as x86-64
.rodata does) and :func:`find_kernel` (turns those hits into a validated
:class:`~libshare.introspect.kernel.KernelInfo`, stopping the scan early).

How KASLR is undone, without symbols: ``init_task`` is the task whose ``comm`` is
"swapper/0" (at the layout's offset), whose pid is 0, and whose ``group_leader``,
``real_parent`` and ``parent`` all hold its own kernel-image virtual address; that
address minus its physical address is the image offset (``phys_base``). The direct-map
base (``page_offset_base``, 1 GiB aligned) is the one under which the task list's
neighbours (``init_task.tasks.next``/``prev``, slab objects) link back to
``init_task.tasks``. The paging depth follows from the shape of that pointer (not
canonical for 4 levels means 5). Kernel page tables: the PGD of the first process's mm
(normally init's) or of ``init_task``'s ``active_mm`` (``init_mm`` or, lazily, the last
user mm); any of them maps the kernel half. The choice is confirmed by translating
``init_task``'s own address and its list neighbour back to where they were found.
Re-probed on every survey, so a cached result never uses a freed mm.

Guest memory may be planted by a hostile guest, so discovery is bounded: at most
:data:`MAX_HITS` hits of each pattern are kept (copies of one small BTF blob count
once; ``Linux version`` without a release is no hit), each ``swapper/0`` hit is probed
once per pass (but the first :data:`REPROBE_HITS`), BTF candidates cost at most
:data:`MAX_BTF_TRIES` parses of distinct blobs, :data:`MAX_BTF_PARSE` bytes parsed and
:data:`MAX_BTF_READ` bytes read (:class:`BtfTries`), and the banner is taken from the
head of the kernel image's .rodata (:func:`image_banners`) before any found elsewhere.
"""


from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from libshare.errors import LibshareError
from libshare.introspect.btf import Btf, BtfError, find_btf, parse_header
from libshare.introspect.kernel import MASK64, RELEASE_RE, START_KERNEL_MAP, KernelInfo
from libshare.introspect.layout import Layout, LayoutError, layout_from_btf
from libshare.introspect.memory import PAGE_SIZE, MemoryReadError, PhysicalMemory
from libshare.introspect.paging import is_canonical, translate

SWAPPER_COMM = b"swapper/0\0"


BANNER_PREFIX = b"Linux version "
#: a banner: the prefix and the first character of a release
_BANNER_RE = re.compile(re.escape(BANNER_PREFIX) + rb"[\x21-\x7e]")


class KernelError(LibshareError):
    """The guest kernel could not be understood (no BTF, no init_task, odd paging)."""


#: hits kept per pattern (BTF headers, ``swapper/0``, banners): a real guest has a
#: handful of each; a guest that plants more only makes its own kernel harder to find
MAX_HITS = 1024
#: BTF blobs up to this size are told apart by content while scanning, so copies of
#: one planted blob count once (a kernel's own blob is megabytes: listed by address)
SMALL_BTF = 64 << 10
#: distinct BTF blobs parsed, bytes parsed and bytes read by one kernel discovery (a
#: real kernel's blob: one, ~5 MiB)
MAX_BTF_TRIES = 16
MAX_BTF_PARSE = 32 << 20
MAX_BTF_READ = 256 << 20
#: ``swapper/0`` hits probed again after each chunk while scanning (a running guest can
#: tear the probe of the real init_task; the others are probed once per pass)
REPROBE_HITS = 16


@dataclass
class ScanResult:
    """Guest-physical addresses of interesting patterns found by :func:`scan_memory`
    (at most :data:`MAX_HITS` of each; ``truncated`` if there were more). A small BTF
    blob identical to one already found is not listed again (``btf_digests``)."""

    btf: list[int] = field(default_factory=list)
    swapper: list[int] = field(default_factory=list)
    banners: list[int] = field(default_factory=list)
    truncated: bool = False
    btf_digests: set[str] = field(default_factory=set)


@dataclass
class BtfTries:
    """What one kernel discovery spent on BTF candidates (bounded by
    :data:`MAX_BTF_TRIES`, :data:`MAX_BTF_PARSE`, :data:`MAX_BTF_READ`), the digests of
    blobs already rejected and why candidates failed."""

    parsed: int = 0
    parsed_bytes: int = 0
    read_bytes: int = 0
    rejected: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)


def _scan_chunk(res: ScanResult, seen: set[int], base: int, data: bytes) -> None:
    """Add the BTF headers, ``swapper/0`` strings and banners in ``data`` (at guest
    physical ``base``) to ``res``; ``seen`` drops hits already found (chunk overlap),
    copies of a small BTF blob already listed are skipped, and so is ``Linux version``
    without a release after it. Hits of a pattern beyond
    :data:`MAX_HITS` are dropped (``res.truncated``)."""
    for addr, hdr in find_btf([(base, data)]):
        if addr not in seen:
            pos = addr - base
            if hdr.total_len <= SMALL_BTF and pos + hdr.total_len <= len(data):
                digest = btf_digest(data[pos:pos + hdr.total_len])
                if digest in res.btf_digests:
                    continue
                res.btf_digests.add(digest)
            if len(res.btf) >= MAX_HITS:
                res.truncated = True
                break
            seen.add(addr)
            res.btf.append(addr)
    for pattern, out in ((SWAPPER_COMM, res.swapper), (BANNER_PREFIX, res.banners)):
        pos = data.find(pattern)
        while pos >= 0:
            after = data[pos + len(pattern):pos + len(pattern) + 1]
            if pattern is BANNER_PREFIX and after and not 0x20 < after[0] < 0x7F:
                pass  # no release follows: not a banner (and no hit to keep)
            elif base + pos not in seen:
                if len(out) >= MAX_HITS:
                    res.truncated = True
                    break
                seen.add(base + pos)
                out.append(base + pos)
            pos = data.find(pattern, pos + 1)


#: x86-64 links .rodata at a 2 MiB boundary of the kernel image (``X86_ALIGN_RODATA_BEGIN``)
#: and the image is loaded 2 MiB-aligned, so ``linux_banner``, early in .rodata, sits
#: near the start of a 2 MiB-aligned guest page
HPAGE = 2 << 20


#: how much of each 2 MiB-aligned page is searched for the banner
BANNER_HEAD = PAGE_SIZE


#: how far from such a page the kernel's BTF, ``init_task`` and banner are looked for
#: first (.rodata, .BTF and .data of a distribution kernel span ~10-20 MiB)
IMAGE_SPAN = 64 << 20


IMAGE_CHUNK = 4 << 20


#: at most this many candidate spans are read before the full scan (a guest can put
#: "Linux version" at the head of every 2 MiB page; one real kernel needs one)
MAX_IMAGE_CANDIDATES = 4


def rodata_candidates(mem: PhysicalMemory) -> list[int]:
    """Return the 2 MiB-aligned guest-physical addresses whose first
    :data:`BANNER_HEAD` bytes hold ``Linux version`` and a release (where the kernel
    image's .rodata may start), reading only those heads."""
    out = []
    for lo, hi in mem.ram_ranges():
        addr = (lo + HPAGE - 1) & ~(HPAGE - 1)
        while addr + BANNER_HEAD <= hi:
            try:
                if _BANNER_RE.search(mem.read_uncached(addr, BANNER_HEAD)):
                    out.append(addr)
            except MemoryReadError:
                pass
            addr += HPAGE
    return out


def scan_order(mem: PhysicalMemory, chunk_size: int = 16 << 20
               ) -> Iterator[tuple[int, bytes]]:
    """Yield ``(address, data)`` pieces of guest RAM to scan for the kernel, likeliest
    first: :data:`IMAGE_SPAN` bytes from each :func:`rodata_candidates` address not
    inside an earlier span (at most :data:`MAX_IMAGE_CANDIDATES` spans, in
    :data:`IMAGE_CHUNK` pieces), then all of RAM (:meth:`PhysicalMemory.chunks`), so a
    caller that stops once it has found what it needs rarely reads more than the kernel
    image, and never misses what a full scan finds."""
    covered = -1  # the end of the spans read so far: they never overlap
    spans = 0
    for start in rodata_candidates(mem):
        if start < covered:
            continue
        if spans == MAX_IMAGE_CANDIDATES:
            break
        spans += 1
        end = next((min(hi, start + IMAGE_SPAN) for lo, hi in mem.ram_ranges()
                    if lo <= start < hi), start)
        covered = end
        pos = start
        while pos < end:
            n = min(IMAGE_CHUNK + PAGE_SIZE, end - pos)
            try:
                yield pos, mem.read_uncached(pos, n)
            except MemoryReadError:
                break
            pos += IMAGE_CHUNK
    yield from mem.chunks(chunk_size)


def scan_memory(mem: PhysicalMemory, chunk_size: int = 16 << 20) -> ScanResult:
    """Return every BTF header, ``swapper/0`` string and banner start in guest RAM
    (one uncached pass over all of it)."""
    res = ScanResult()
    seen: set[int] = set()
    for base, data in mem.chunks(chunk_size):
        _scan_chunk(res, seen, base, data)
    return res


class LayoutStore(Protocol):
    """Layouts already derived from BTF blobs, keyed by :func:`btf_digest` (a dict, or
    a store that also keeps them on disk)."""

    def get(self, digest: str, /) -> Layout | None:
        """Return the layout of the blob with ``digest``, or None."""

    def __setitem__(self, digest: str, layout: Layout, /) -> None:
        """Remember ``layout`` for the blob with ``digest``."""


def btf_digest(blob: bytes) -> str:
    """Return the identity of a BTF blob (BLAKE2b-128 of its bytes, hex)."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def load_layout(mem: PhysicalMemory, candidates: Iterable[int],
                layouts: LayoutStore | None = None,
                tries: BtfTries | None = None) -> tuple[int, Layout]:
    """Return ``(address, Layout)`` for the first candidate address holding a complete,
    valid kernel BTF blob - or one whose exact bytes ``layouts`` has seen before (then
    neither parsed nor validated again; new ones are added); raise KernelError if none
    does. ``tries`` carries the budget across calls (see :class:`BtfTries`): a blob
    already rejected is not parsed again, and candidates beyond the budget are skipped."""
    tries = tries if tries is not None else BtfTries()
    reasons = tries.reasons
    for addr in candidates:
        try:
            hdr = parse_header(mem.read(addr, 24))
            if hdr is None:
                continue
            if tries.read_bytes + hdr.total_len > MAX_BTF_READ:
                reasons.append(f"{addr:#x}: not read ({MAX_BTF_READ >> 20} MiB of BTF "
                               "candidates read already)")
                continue
            tries.read_bytes += hdr.total_len
            blob = mem.read_uncached(addr, hdr.total_len)
            digest = btf_digest(blob)
            if digest in tries.rejected:
                continue
            known = layouts.get(digest) if layouts is not None else None
            if known is not None:
                return addr, known
            if tries.parsed >= MAX_BTF_TRIES or \
                    tries.parsed_bytes + len(blob) > MAX_BTF_PARSE:
                reasons.append(f"{addr:#x}: not parsed ({tries.parsed} BTF candidates, "
                               f"{tries.parsed_bytes} bytes parsed already)")
                continue
            tries.parsed += 1
            tries.parsed_bytes += len(blob)
            tries.rejected.add(digest)  # until it proves valid
            btf = Btf(blob)
            btf.validate_kernel()
            layout = layout_from_btf(btf, f"BTF at guest physical {addr:#x}")
            tries.rejected.discard(digest)
            if layouts is not None:
                layouts[digest] = layout
            return addr, layout
        except (BtfError, MemoryReadError, LayoutError) as exc:
            reasons.append(f"{addr:#x}: {exc}")
    detail = f" ({'; '.join(reasons[:3])})" if reasons else ""
    raise KernelError(f"no usable kernel BTF found in guest memory{detail}")


def _u64(mem: PhysicalMemory, addr: int) -> int:
    return int.from_bytes(mem.read(addr, 8), "little")


def _u32(mem: PhysicalMemory, addr: int) -> int:
    return int.from_bytes(mem.read(addr, 4), "little")


def _direct_map_base(mem: PhysicalMemory, node: int, head: int) -> int | None:
    """Return the direct-map base under which list node ``node`` (a direct-map pointer
    taken from the list whose head is at kernel address ``head``) links back to
    ``head``, trying every 1 GiB-aligned base that puts ``node`` inside guest RAM."""
    ram_end = max(end for _, end in mem.ram_ranges())
    top = node & ~((1 << 30) - 1)
    for k in range(ram_end // (1 << 30) + 1):
        pob = top - k * (1 << 30)
        phys = node - pob
        if mem.is_ram(phys, 16) and _u64(mem, phys + 8) == head:
            return pob
    return None


def probe_init_task(mem: PhysicalMemory, layout: Layout, phys: int) -> KernelInfo | None:
    """Return the KernelInfo implied by ``init_task`` at guest-physical ``phys`` if every
    check passes, else None (the banner is left empty)."""
    off = layout.off
    try:
        if mem.read(phys + off("task_struct.comm"), len(SWAPPER_COMM)) != SWAPPER_COMM:
            return None
        if _u32(mem, phys + off("task_struct.pid")) or _u32(mem, phys + off("task_struct.tgid")):
            return None
        if _u64(mem, phys + off("task_struct.mm")) != 0:
            return None
        va = _u64(mem, phys + off("task_struct.group_leader"))
        if va < START_KERNEL_MAP or (va - phys) & (PAGE_SIZE - 1):
            return None
        if _u64(mem, phys + off("task_struct.real_parent")) != va:
            return None
        if layout.has("task_struct.parent") and _u64(mem, phys + off("task_struct.parent")) != va:
            return None
        delta = (phys - va) & MASK64
        head = va + off("task_struct.tasks")
        nxt = _u64(mem, phys + off("task_struct.tasks"))
        prv = _u64(mem, phys + off("task_struct.tasks") + 8)
        levels = 4 if is_canonical(nxt, 4) else 5
        pob = _direct_map_base(mem, nxt, head)
        if pob is None or not mem.is_ram(prv - pob, 8) or _u64(mem, prv - pob) != head:
            return None
        ram_end = max(end for _, end in mem.ram_ranges())

        def to_phys(ptr: int) -> int:
            if pob <= ptr < pob + ram_end:
                return ptr - pob
            if ptr >= START_KERNEL_MAP:
                return (ptr + delta) & MASK64
            raise MemoryReadError(f"{ptr:#x} is neither direct-mapped nor kernel image")

        # Kernel page tables: the PGD of a long-lived user mm (the first process in the
        # task list, normally init) or of the idle task's active_mm (init_mm or, lazily,
        # the last user mm); any of them maps the whole kernel half.
        first_mm = _u64(mem, to_phys(nxt - off("task_struct.tasks")) + off("task_struct.mm"))
        active_mm = _u64(mem, phys + off("task_struct.active_mm"))
        pgd = None
        for mm in (first_mm, active_mm):
            try:
                cand = to_phys(_u64(mem, to_phys(mm) + off("mm_struct.pgd")))
            except MemoryReadError:
                continue
            if cand & (PAGE_SIZE - 1) or not mem.is_ram(cand, PAGE_SIZE):
                continue
            if translate(mem, cand, va, levels) == phys and \
                    translate(mem, cand, nxt, levels) == nxt - pob:
                pgd = cand
                break
        if pgd is None:
            return None
        return KernelInfo("", va, phys, delta - (1 << 64) if delta >> 63 else delta,
                          pgd, levels, pob, layout)
    except (MemoryReadError, KeyError):
        return None


def pick_banner(mem: PhysicalMemory, addrs: Iterable[int]) -> tuple[str, int | None]:
    """Return ``(banner, address)``: the kernel banner ("Linux version ...") read at the
    best of ``addrs``, the first that is one complete line ending in a NUL (the kernel's
    ``linux_banner``), else the first plausible one; ``("", None)`` if none."""
    fallback: tuple[str, int | None] = ("", None)
    for addr in addrs:
        try:
            raw = mem.read(addr, 400)
        except MemoryReadError:
            continue
        nul = raw.find(b"\0")
        text = raw[:nul if nul >= 0 else len(raw)]
        if not RELEASE_RE.match(text.decode("latin-1")):
            continue
        line = text.decode("utf-8", "replace")
        if text.endswith(b"\n") and b"\n" not in text[:-1]:
            return line.rstrip("\n"), addr
        if fallback[1] is None:
            fallback = (line.split("\n", 1)[0], addr)
    return fallback


def image_banners(mem: PhysicalMemory, init_task_phys: int) -> list[int]:
    """Return where ``Linux version`` opens one of the :data:`HPAGE`-aligned pages
    below ``init_task`` (in .data) within :data:`IMAGE_SPAN`, nearest first: where the
    kernel image's .rodata, and so ``linux_banner``, begins. Banners found elsewhere
    come from the guest's own pages (a planted one must not stand for the kernel's)."""
    out = []
    top = init_task_phys & ~(HPAGE - 1)
    for addr in range(top, max(-1, init_task_phys - IMAGE_SPAN), -HPAGE):
        try:
            m = _BANNER_RE.search(mem.read_uncached(addr, BANNER_HEAD))
        except MemoryReadError:
            continue
        if m:
            out.append(addr + m.start())
    return out


def _complete_banner(mem: PhysicalMemory, banners: list[int]) -> tuple[str, int | None, bool]:
    """Return ``pick_banner``'s answer and whether it is the kernel's own one-line,
    NUL-terminated ``linux_banner``."""
    text, addr = pick_banner(mem, banners)
    if addr is None:
        return text, addr, False
    raw = mem.read(addr, min(len(text.encode()) + 2, 400))
    return text, addr, raw.endswith(b"\n\0")


def _conclude(mem: PhysicalMemory, layout: Layout, scan: ScanResult, attempts: int,
              btf_phys: int | None, hits: Sequence[int] | None = None) -> KernelInfo | None:
    """Return the KernelInfo from the ``swapper/0`` hits of ``scan`` (or only ``hits``),
    or None."""
    comm_off = layout.off("task_struct.comm")
    for attempt in range(attempts):  # a running guest may tear a probe: retry
        if attempt:
            mem.invalidate()
        for hit in scan.swapper if hits is None else hits:
            info = probe_init_task(mem, layout, hit - comm_off)
            if info is not None:
                info.banner, info.banner_phys, _ = _complete_banner(
                    mem, image_banners(mem, info.init_task_phys) + scan.banners)
                info.btf_phys = btf_phys
                return info
    return None


def find_kernel(mem: PhysicalMemory, layout: Layout | None = None,
                scan: ScanResult | None = None, attempts: int = 5,
                layouts: LayoutStore | None = None) -> KernelInfo:
    """Return the validated KernelInfo of the kernel running in ``mem``. Uses the BTF
    found in guest RAM unless ``layout`` is given. Without ``scan``, guest RAM is
    scanned chunk by chunk, the likely kernel image first (:func:`scan_order`), and the
    scan stops as soon as the BTF, ``init_task`` and the banner are found (all live in
    the kernel image). ``init_task`` is probed up to
    ``attempts`` times (a running guest can tear a probe). Raise KernelError with the
    reason if the kernel cannot be understood. ``layouts`` spares parsing a BTF blob
    already seen (same kernel build, another boot or guest)."""
    btf_phys: int | None = None
    tried: set[int] = set()
    budget = BtfTries()

    def try_btf(res: ScanResult) -> Layout | None:
        nonlocal btf_phys
        fresh = [a for a in res.btf if a not in tried]
        tried.update(fresh)
        if not fresh:
            return None
        try:
            btf_phys, found = load_layout(mem, fresh, layouts, budget)
        except KernelError:
            return None
        return found

    if scan is None:
        res = ScanResult()
        seen: set[int] = set()
        found: KernelInfo | None = None
        image: list[int] = []  # banners at the head of the kernel image's .rodata
        probed = 0  # swapper/0 hits probed so far (only the first few are probed again)
        for base, data in scan_order(mem):
            _scan_chunk(res, seen, base, data)
            if layout is None:
                layout = try_btf(res)
            if layout is not None and found is None and res.swapper:
                hits = res.swapper[:min(probed, REPROBE_HITS)] + res.swapper[probed:]
                found = _conclude(mem, layout, res, 1, btf_phys, hits)
                probed = len(res.swapper)
                if found is not None:
                    image = image_banners(mem, found.init_task_phys)
            if found is not None:
                found.banner, found.banner_phys, complete = _complete_banner(
                    mem, image + res.banners)
                if complete:
                    return found
        if found is not None:
            return found
        scan = res
    elif layout is None:
        layout = try_btf(scan)
    if layout is None:
        if not scan.btf:
            raise KernelError("no BTF in guest memory (kernel without CONFIG_DEBUG_INFO_BTF? "
                              "give an ISF or offsets file)")
        detail = f" ({'; '.join(budget.reasons[:3])})" if budget.reasons else ""
        raise KernelError(f"no usable kernel BTF found in guest memory{detail}")
    info = _conclude(mem, layout, scan, attempts, btf_phys)
    if info is not None:
        return info
    if not scan.swapper:
        raise KernelError("no 'swapper/0' task in guest memory (not a booted Linux kernel?)")
    more = f" (hits beyond {MAX_HITS} of a pattern ignored)" if scan.truncated else ""
    raise KernelError(f"found 'swapper/0' but no consistent init_task (layout mismatch?){more}")

