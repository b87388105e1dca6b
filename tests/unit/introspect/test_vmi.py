"""Cross-check of the page-table walker against LibVMI's on synthetic tables (skipped
without the optional ``libvmi`` package)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from libshare.introspect.paging import translate
from tests.support.memory import Tables

libvmi = pytest.importorskip("libvmi")


def test_walkers_agree(tmp_path: Path) -> None:
    from libshare.introspect.vmi import VmiMemory, vmi_read_va

    rng = random.Random(7)
    t = Tables()
    pgd = t.alloc()
    mapped = []
    for i in range(16):  # 4 KiB data pages below 1 MiB, each tagged with its number
        page = rng.randrange(1, 255) * 4096
        va = rng.randrange(1, 1 << 30) & ~0xFFF
        t.map(pgd, va, page)
        mapped.append(va)
        t.buf[page:page + 4] = i.to_bytes(4, "little")
    t.map(pgd, 0x7F00_0020_0000, 0, size=2 << 20)  # a 2 MiB page over phys 0
    raw = tmp_path / "ram.raw"
    raw.write_bytes(t.buf)
    ours = t.mem()
    theirs = VmiMemory(raw)
    try:
        probes = [rng.randrange(1, 1 << 30) & ~0xFFF for _ in range(200)]
        probes += [*mapped, 0x7F00_0020_0000 + 0x5000]
        for va in probes:
            phys = translate(ours, pgd, va)
            got = vmi_read_va(theirs, pgd, va, 16)
            assert got == (None if phys is None else ours.read(phys, 16)), hex(va)
    finally:
        theirs.close()
