"""x86-64 page-table walker on synthetic page tables built in a bytes buffer."""

from __future__ import annotations

import pytest

from libshare.introspect.memory import BytesMemory, MemoryReadError, RamBlock
from libshare.introspect.paging import (
    P_PRESENT,
    P_PROTNONE,
    P_PSE,
    P_USER,
    WalkStats,
    canonical,
    is_canonical,
    iter_mappings,
    kernel_pgd,
    translate,
)
from tests.support.memory import Tables

PAGE = 4096
RW = P_PRESENT | 2 | P_USER




@pytest.mark.parametrize("levels", [4, 5])
def test_4k_pages_both_depths(levels: int) -> None:
    t = Tables()
    pgd = t.alloc()
    va = 0x7F12_3456_7000 if levels == 4 else 0x00FF_1234_5678_9000
    t.map(pgd, va, 0x5000, levels)
    t.map(pgd, va + PAGE, 0x9000, levels)
    mem = t.mem()
    assert translate(mem, pgd, va + 0x123, levels) == 0x5123
    assert translate(mem, pgd, va + PAGE + 8, levels) == 0x9008
    assert translate(mem, pgd, va + 2 * PAGE, levels) is None
    got = list(iter_mappings(mem, pgd, va - 16 * PAGE, va + 16 * PAGE, levels))
    assert got == [(va, 0x5000, PAGE), (va + PAGE, 0x9000, PAGE)]


def test_kernel_half_addresses_and_5_level_canonical() -> None:
    t = Tables()
    pgd = t.alloc()
    kva = 0xFFFF_8880_0000_1000
    t.map(pgd, kva, 0x3000, 4, flags=P_PRESENT | 2)
    mem = t.mem()
    assert translate(mem, pgd, kva, 4) == 0x3000
    assert list(iter_mappings(mem, pgd, kva, kva + PAGE, 4, user=False)) == [(kva, 0x3000, PAGE)]
    assert is_canonical(kva, 4) and not is_canonical(0xFF11_0000_0000_0000, 4)
    assert is_canonical(0xFF11_0000_0000_0000, 5)
    assert canonical(0x0000_8000_0000_0000, 4) == 0xFFFF_8000_0000_0000


def test_huge_pages() -> None:
    t = Tables()
    pgd = t.alloc()
    t.map(pgd, 0x4000_0000, 0x4000_0000, size=1 << 30)  # 1 GiB at 1 GiB
    t.map(pgd, 0x8000_0000 + (2 << 20), 0x20_0000 * 3, size=2 << 20)  # 2 MiB
    mem = BytesMemory(t.buf, [RamBlock(0, 1 << 32, 0)])  # leaves must be RAM: say 4 GiB
    assert translate(mem, pgd, 0x4000_0000 + 0x12345678) == 0x4000_0000 + 0x12345678
    assert translate(mem, pgd, 0x8000_0000 + (2 << 20) + 0x1234) == 0x60_0000 + 0x1234
    assert translate(mem, pgd, 0x8000_0000) is None
    got = list(iter_mappings(mem, pgd, 0, 1 << 32))
    assert got == [(0x4000_0000, 0x4000_0000, 1 << 30),
                   (0x8000_0000 + (2 << 20), 0x60_0000, 2 << 20)]
    # A range inside the 2 MiB page still yields that page once.
    assert len(list(iter_mappings(mem, pgd, 0x8020_1000, 0x8020_3000))) == 1


def test_non_present_and_protnone() -> None:
    t = Tables()
    pgd = t.alloc()
    t.map(pgd, 0x40_0000, 0x5000)
    t.map(pgd, 0x40_1000, 0x6000, flags=P_USER | P_PROTNONE)  # PROT_NONE, resident
    t.map(pgd, 0x40_2000, 0x7000, flags=0x7000 >> 3 & ~1)  # swap-entry-like, not present
    mem = t.mem()
    assert translate(mem, pgd, 0x40_1000) is None  # hardware: not present
    assert translate(mem, pgd, 0x40_1000, user=True) == 0x6000  # Linux: pte_present
    user = list(iter_mappings(mem, pgd, 0x40_0000, 0x40_3000))
    assert [v for v, _, _ in user] == [0x40_0000, 0x40_1000]
    hw = list(iter_mappings(mem, pgd, 0x40_0000, 0x40_3000, user=False))
    assert [v for v, _, _ in hw] == [0x40_0000]


def test_pti_pair_and_pcid() -> None:
    assert kernel_pgd(0x1234_5000 | 0x1000 | 0x5) == 0x1234_4000  # user half + PCID 5
    assert kernel_pgd(0x1234_4000 | (1 << 63)) == 0x1234_4000  # NOFLUSH bit


def test_hostile_tables_end_cleanly() -> None:
    t = Tables()
    pgd = t.alloc()
    t.map(pgd, 0x1000, 0x5000)
    t.set(pgd, 1, (1 << 40) | RW)  # next-level table outside RAM
    t.set(pgd, 2, pgd | RW)  # a table pointing at itself (loop through the levels)
    mem = t.mem()
    stats = WalkStats()
    got = list(iter_mappings(mem, pgd, 0, 3 << 39, stats=stats))
    assert (0x1000, 0x5000, PAGE) in got
    assert stats.bad_entries >= 1 and stats.revisits >= 1 and stats.partial
    assert translate(mem, pgd, 1 << 39) is None
    capped = WalkStats()
    list(iter_mappings(mem, pgd, 0, 3 << 39, stats=capped, max_tables=1))
    assert capped.truncated and capped.tables == 1  # the walk ends, partial


def test_memory_bounds_and_cache() -> None:
    data = bytearray(3 * PAGE)
    mem = BytesMemory(data, [RamBlock(0, 2 * PAGE, 0), RamBlock(1 << 32, PAGE, 2 * PAGE)])
    data[2 * PAGE] = 7
    assert mem.read(1 << 32, 1) == b"\x07"
    data[2 * PAGE] = 8
    assert mem.read(1 << 32, 1) == b"\x07"  # cached
    mem.invalidate()
    assert mem.read(1 << 32, 1) == b"\x08"
    assert mem.read(PAGE - 2, 4) == bytes(4)  # across a page boundary
    with pytest.raises(MemoryReadError):
        mem.read(2 * PAGE, 1)  # the hole
    with pytest.raises(MemoryReadError):
        mem.read(0, 1 << 40)  # absurd length refused
    assert mem.ram_ranges() == [(0, 2 * PAGE), (1 << 32, (1 << 32) + PAGE)]


def test_huge_leaves_outside_ram_are_not_yielded() -> None:
    """512 x 1 GiB leaves far outside a ~1.3 MiB guest: nothing is yielded (a caller
    expanding them into 4 KiB frames would allocate 134 million), each is counted."""
    t = Tables()
    pgd, pud = t.alloc(), t.alloc()
    t.set(pgd, 0, pud | RW)
    for i in range(512):
        t.set(pud, i, ((i + 1) << 40) | RW | P_PSE)
    t.map(pgd, 1 << 39, 0, size=2 << 20)  # a 2 MiB leaf running past the end of RAM
    t.map(pgd, (1 << 39) + (2 << 20), 0x5000)  # and one good 4 KiB page
    mem = t.mem()
    stats = WalkStats()
    got = list(iter_mappings(mem, pgd, 0, 1 << 40, stats=stats))
    assert got == [((1 << 39) + (2 << 20), 0x5000, PAGE)]
    assert stats.bad_entries == 513 and stats.device_leaves == 0
    dev = WalkStats()
    assert len(list(iter_mappings(mem, pgd, 0, 1 << 40, stats=dev, device_ok=True))) == 1
    assert dev.bad_entries == 0 and dev.device_leaves == 513


def test_resident_frames_capped_at_ram_size() -> None:
    """A VMA whose PTEs all name the same RAM frame cannot make resident_frames yield
    more frames than guest RAM holds."""
    from types import SimpleNamespace
    from typing import Any, cast

    from libshare.introspect.helpers.mm import resident_frames

    t = Tables()
    pgd = t.alloc()
    va = 0x40_0000_0000
    for i in range(2048):
        t.map(pgd, va + i * PAGE, 0x5000)
    mem = t.mem()
    k = cast(Any, SimpleNamespace(mem=mem, levels=4))
    stats = WalkStats()
    frames = list(resident_frames(k, pgd, va, va + 2048 * PAGE, stats))
    assert len(frames) <= mem.ram_size // PAGE < 2048
    assert stats.bad_entries == 1
    assert len(list(resident_frames(k, pgd, va, va + 8 * PAGE))) == 8


def test_scan_order_tries_the_kernel_image_first() -> None:
    """The kernel scan reads first from 2 MiB-aligned pages that open with the banner
    (x86-64 .rodata), up to IMAGE_SPAN, then all of RAM: nothing a full scan would see
    is skipped, and a banner elsewhere is still found by the full pass."""
    from libshare.introspect.discover import (
        BANNER_PREFIX,
        IMAGE_CHUNK,
        rodata_candidates,
        scan_memory,
        scan_order,
    )

    size = 8 << 20
    data = bytearray(size)
    banner = BANNER_PREFIX + b"9.9.9"
    data[(4 << 20) + 0x1A0:(4 << 20) + 0x1A0 + 19] = banner  # .rodata at 4 MiB
    data[(2 << 20) + 8192:(2 << 20) + 8192 + 19] = banner  # not in a page head
    mem = BytesMemory(data)
    assert rodata_candidates(mem) == [4 << 20]
    pieces = [(addr, len(chunk)) for addr, chunk in scan_order(mem, chunk_size=1 << 20)]
    assert pieces[0] == (4 << 20, IMAGE_CHUNK)  # the image first (to the end of RAM)
    rest = [addr for addr, _ in pieces[1:]]
    assert rest == list(range(0, size, 1 << 20))  # then everything
    assert scan_memory(mem).banners == [(2 << 20) + 8192, (4 << 20) + 0x1A0]


def test_scan_order_is_bounded_when_every_page_claims_the_banner() -> None:
    """A guest that opens every 2 MiB page with the banner costs at most
    MAX_IMAGE_CANDIDATES non-overlapping IMAGE_SPAN reads before the full pass."""
    from libshare.introspect.discover import (
        BANNER_PREFIX,
        IMAGE_CHUNK,
        IMAGE_SPAN,
        MAX_IMAGE_CANDIDATES,
        scan_order,
    )

    size = 512 << 20
    data = bytearray(size)
    for addr in range(2 << 20, size, 2 << 20):  # every page but the first
        data[addr:addr + len(BANNER_PREFIX) + 1] = BANNER_PREFIX + b"6"
    mem = BytesMemory(data)
    first = []
    for addr, chunk in scan_order(mem):
        if addr == 0:  # the full pass begins
            break
        first.append((addr, chunk))
    starts = [addr for addr, _ in first]
    assert starts == sorted(set(starts))  # no piece read twice
    overlap = IMAGE_SPAN // IMAGE_CHUNK * 4096  # each piece reads a page beyond its end
    assert sum(len(chunk) for _, chunk in first) <= MAX_IMAGE_CANDIDATES * (IMAGE_SPAN + overlap)
