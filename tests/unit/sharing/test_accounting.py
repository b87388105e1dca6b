"""Host memory accounting read from /proc of a real helper process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from libshare.sharing import accounting

MiB = 1 << 20

CHILD = r"""
import mmap, sys
path, ram = sys.argv[1], int(sys.argv[2])
f = open(path, "rb")
region = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
for off in range(0, 2 * 1024 * 1024, 4096):   # touch the first 2 MiB
    region[off]
anon = mmap.mmap(-1, ram, flags=mmap.MAP_PRIVATE)  # anonymous private, like QEMU RAM
anon.madvise(mmap.MADV_DONTDUMP)  # as QEMU does for guest RAM; keeps the VMA unmerged
for off in range(0, ram // 2, 4096):           # dirty half of the "guest RAM"
    anon[off] = 1
print("ready", flush=True)
sys.stdin.read()
"""


def test_region_and_ram_mappings(tmp_path: Path) -> None:
    image = tmp_path / "region.img"
    with open(image, "wb") as fh:
        fh.write(os.urandom(4 * MiB))
        fh.flush()
        os.fsync(fh.fileno())  # dirty page-cache pages would count as Private_Dirty
    ram = 24 * MiB
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(image), str(ram)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        reg = accounting.region_usage(child.pid, image)
        assert reg["mappings"] == 1
        assert 2048 <= reg["Rss"] <= 2048 + 64
        assert reg["Private_Dirty"] == 0
        ram_use = accounting.guest_ram_usage(child.pid, [ram])
        assert ram_use["mappings"] == 1
        assert 12 * 1024 <= ram_use["Rss"] <= 12 * 1024 + 64
        assert ram_use["Private_Dirty"] >= 12 * 1024
        assert accounting.guest_ram_usage(child.pid, [ram + 4096])["mappings"] == 0
    finally:
        child.kill()
        child.wait()


def test_page_cache_bytes_counts_resident_pages(tmp_path: Path) -> None:
    image = tmp_path / "f.img"
    image.write_bytes(b"\1" * (3 * MiB + 100))
    with open(image, "rb") as fh:
        fh.read()
    resident = accounting.page_cache_bytes(image)
    assert 3 * MiB < resident <= 3 * MiB + 4096
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert accounting.page_cache_bytes(empty) == 0


WRITER = r"""
import mmap, sys
path, written = sys.argv[1], int(sys.argv[2])
f = open(path, "rb")
region = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
for off in range(0, len(region), 4096):      # read every page
    region[off]
for off in range(0, written, 4096):          # write some: copy-on-write copies
    region[off] = 1
print("ready", flush=True)
sys.stdin.read()
"""


def test_copies_are_anonymous_pages_not_private_dirty(tmp_path: Path) -> None:
    # a just-written image (no fsync: its page cache is still dirty), as right after
    # 'region build' or a copy: its only mapper sees it as Private_Dirty, yet it holds
    # no copy; the pages it wrote are its copies, and smaps counts them as Anonymous
    image = tmp_path / "fresh.img"
    image.write_bytes(os.urandom(4 * MiB))
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(image), str(MiB)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        reg = accounting.region_usage(child.pid, image)
    finally:
        child.kill()
        child.wait()
    assert reg["Anonymous"] == 1024 and accounting.copied_kb(reg) == 1024
    # Private_Dirty counts the copies and the dirty page cache: it is not a copy count
    assert reg["Private_Dirty"] > accounting.copied_kb(reg), reg


def test_one_smaps_read_selects_ram_region_and_hugetlb(tmp_path: Path) -> None:
    from tests.support.proc import Map, qemu_maps, write_process

    ram = 512 * MiB
    maps = qemu_maps(ram, "/r/img", {"Rss": 1000, "Pss": 800},
                     {"Rss": 400, "Pss": 100, "Anonymous": 8, "Shared_Clean": 392})
    maps.append(Map(0x7FE000000000, ram, "rw-s", "/dev/shm/libshare-web", {"Rss": 9}))
    write_process(tmp_path, 5, maps)
    got = accounting.smaps(5, tmp_path)
    ram_maps = accounting.guest_ram_mappings(got, [ram])
    assert [m.start for m in ram_maps] == [0x7F8000000000]   # not the /dev/shm one
    total = accounting.summed(ram_maps)
    assert total["Rss"] == 1000 and total["resident"] == 1000 and total["mappings"] == 1
    reg = accounting.summed(accounting.region_mappings(got, "/r/img"))
    assert (reg["Rss"], reg["Pss"], reg["Anonymous"]) == (400, 100, 8)
    # guest RAM on hugetlbfs: Rss leaves the huge pages out, resident counts them
    huge = qemu_maps(ram, None, {"Private_Hugetlb": 6144},
                     ram_path="/dev/hugepages/libvirt/qemu/1-g/pc.ram", ram_page_kb=2048)
    write_process(tmp_path, 6, huge)
    hram = accounting.summed(accounting.guest_ram_mappings(accounting.smaps(6, tmp_path), [ram]))
    assert hram["mappings"] == 1 and hram["Rss"] == 0 and hram["resident"] == 6144
