"""Hostile guest memory: planted BTF blobs, page tables, lists and patterns that a guest
can write into its own RAM. Each construction must end with the module's error or a
result marked partial, quickly: never a hang, an exponential blow-up, a RecursionError
or an unbounded allocation. The time bounds are generous (the unpatched code took
seconds to hours on each)."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from libshare.introspect import discover
from libshare.introspect.btf import (
    KIND_ARRAY,
    KIND_STRUCT,
    KIND_TYPEDEF,
    REQUIRED_STRUCTS,
    Btf,
    BtfError,
    parse_header,
)
from libshare.introspect.discover import (
    KernelError,
    find_kernel,
    load_layout,
    pick_banner,
    scan_memory,
)
from libshare.introspect.helpers.fs import d_path
from libshare.introspect.helpers.mm import for_each_vma
from libshare.introspect.helpers.tasks import for_each_task
from libshare.introspect.kernel import Kernel, KernelInfo, WalkError
from libshare.introspect.layout import REQUIRED, Layout, LayoutError, layout_from_btf
from libshare.introspect.memory import BytesMemory
from libshare.introspect.paging import WalkStats, iter_mappings
from libshare.introspect.survey import walk_with_retries
from tests.support.btf import Blob, self_referencing_blob
from tests.support.memory import POB, RW
from tests.unit.introspect.helpers.test_walk import OFFS, Fake

VMLINUX = Path("/sys/kernel/btf/vmlinux")


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail unless the block finishes within ``seconds`` of wall-clock time."""
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    assert took < seconds, f"took {took:.1f} s (bound {seconds} s)"


# --- BTF blobs -------------------------------------------------------------------------

def test_btf_anonymous_self_reference_is_refused_at_once() -> None:
    blob = self_referencing_blob(6)
    btf = Btf(blob)
    with within(2):
        with pytest.raises(BtfError, match="contains itself"):
            btf.member("task_struct", "comm")
        assert not btf.has_member("mm_struct", "mm_mt")
        with pytest.raises(BtfError, match="neither mm_mt nor mmap"):
            btf.validate_kernel()
        with pytest.raises(LayoutError, match="lacks"):
            layout_from_btf(Btf(self_referencing_blob(4)))  # was 17 s
        mem = BytesMemory(bytes(4096) + blob + bytes(8192))
        with pytest.raises(KernelError, match="no usable kernel BTF"):
            find_kernel(mem)  # k=6: over 30 s


def test_btf_anonymous_diamond_is_searched_once_per_type() -> None:
    """No loop, but each level holds ``k`` anonymous members of the next level's type:
    a search that does not remember types it has searched costs k**depth."""
    b = Blob()
    b.int_()
    below = b.struct("", [("leaf", 1, 0)], 4)
    for _level in range(6):
        below = b.struct("", [("", below, 0)] * 8, 4)
    b.struct("task_struct", [("", below, 0)] * 8, 4)
    btf = Btf(b.bytes())
    with within(2):
        assert btf.offsetof("task_struct", "leaf") == 0
        assert not btf.has_member("task_struct", "nothing")  # was 8**8 member visits


def test_btf_member_lookups_are_budgeted() -> None:
    """A struct whose 40 anonymous members are distinct structs of 5000 members each:
    one lookup examines at most MAX_LOOKUP members, then says so; a hit early in a wide
    struct is still found."""
    b = Blob()
    b.int_()
    wide = b.struct("", [(f"m{i}", 1, 0) for i in range(4000)], 4)
    b.struct("task_struct", [("", wide, 0)], 4)
    for i in range(40):  # 40 distinct wide structs, all anonymous members of file
        b.struct("", [(f"m{i}", 1, 0)] * 5000, 4)
    b.struct("file", [("", wide + 1 + i, 0) for i in range(40)], 4)
    btf = Btf(b.bytes())
    with within(2):
        assert btf.offsetof("task_struct", "m3999") == 0
        with pytest.raises(BtfError, match="examined more than"):
            btf.member("file", "absent")


def test_btf_sizeof_of_a_self_referencing_array_is_a_btf_error() -> None:
    b = Blob()
    b.int_()
    arr = b.count + 1
    b.add(struct.pack("<III", 0, KIND_ARRAY << 24, 0) + struct.pack("<III", arr, 1, 4))
    td = b.count + 1  # a typedef of itself
    b.add(struct.pack("<III", b.name("loop_t"), KIND_TYPEDEF << 24, td))
    huge = b.add(struct.pack("<III", 0, KIND_ARRAY << 24, 0)
                 + struct.pack("<III", 1, 1, 0xFFFF_FFFF))
    b.add(struct.pack("<III", 0, KIND_ARRAY << 24, 0) + struct.pack("<III", huge, 1, 0xFFFF))
    btf = Btf(b.bytes())
    with within(2):
        with pytest.raises(BtfError, match="nested deeper"):
            btf.sizeof(arr)  # was RecursionError
        with pytest.raises(BtfError, match="chain longer"):
            btf.sizeof(td)
        with pytest.raises(BtfError, match="too large"):
            btf.sizeof(huge + 1)
        assert btf.sizeof(1) == 4


def test_btf_unterminated_names_cost_no_scan_of_the_string_section() -> None:
    """20,000 struct names pointing into 8 MiB without a NUL until its end: each name
    read stops after btf.MAX_NAME bytes (was: 8 MiB scanned and decoded per name)."""
    b = Blob()
    for i in range(20000):
        b.add(struct.pack("<III", 1 + i, KIND_STRUCT << 24, 4))
    b.strings = b"\0" + b"a" * (8 << 20) + b"\0"
    btf = Btf(b.bytes())
    with within(2), pytest.raises(BtfError, match="longer than"):
        btf.has_struct("task_struct")
    # the kernel's own limits: at most 16 MiB of strings, starting and ending with NUL
    big = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 12, 12, (16 << 20) + 2)
    assert parse_header(big) is None
    b.strings = b"x\0"
    with pytest.raises(BtfError, match="NUL"):
        Btf(b.bytes())


def _host_btf() -> bytes:
    try:
        return VMLINUX.read_bytes()
    except OSError:
        pytest.skip("no readable /sys/kernel/btf/vmlinux")


def test_planted_blobs_before_the_real_one() -> None:
    """Copies of an exponential blob, and a blob that validates but lacks the layout,
    both planted before the kernel's own BTF: the real one is still used, quickly (was:
    0.4 s per copy, and the incomplete blob's LayoutError ended discovery)."""
    real = _host_btf()
    b = Blob()
    b.int_()
    for s in REQUIRED_STRUCTS:
        b.struct(s, [("mm_mt", 1, 0)] if s == "mm_struct" else [])
    incomplete = b.bytes()
    Btf(incomplete).validate_kernel()
    fake = self_referencing_blob(3)
    pieces = [fake + bytes(64)] * 50 + [incomplete + bytes(64), real]
    mem = BytesMemory(b"".join(pieces))
    starts = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    with within(5):
        addr, layout = load_layout(mem, starts)
    assert addr == starts[-1] and layout.offsets == layout_from_btf(Btf(real)).offsets
    # More copies than MAX_HITS, found by the scan itself: listed once, so the kernel's
    # blob after them is still found and used (here: then no init_task, as expected).
    copies = 3 * discover.MAX_HITS
    mem = BytesMemory((fake + bytes(64)) * copies + real + bytes(4096))
    with within(10), pytest.raises(KernelError, match="no 'swapper/0' task"):
        find_kernel(mem)  # was about 0.4 s per copy
    assert scan_memory(mem).btf == [0, copies * (len(fake) + 64)]


def test_many_distinct_planted_blobs_cost_a_bounded_number_of_parses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of distinct self-referencing blobs: at most MAX_BTF_TRIES are parsed,
    the rest skipped with the reason."""
    blobs = []
    for i in range(400):
        blob = bytearray(self_referencing_blob(2 + i % 5))
        struct.pack_into("<I", blob, 24 + 8, 4 + i)  # the int's size: another blob
        blobs.append(bytes(blob))
    mem = BytesMemory(b"".join(bl + bytes(40) for bl in blobs))
    starts = [sum(len(bl) + 40 for bl in blobs[:i]) for i in range(len(blobs))]
    parsed: list[int] = []

    def counting(data: bytes) -> Btf:
        parsed.append(1)
        return Btf(data)

    monkeypatch.setattr(discover, "Btf", counting)
    with within(2), pytest.raises(KernelError, match="no usable kernel BTF"):
        load_layout(mem, starts)
    assert len(parsed) < len(blobs)
    assert len(parsed) == discover.MAX_BTF_TRIES


def test_swapper_flood_is_probed_once_and_capped() -> None:
    """'swapper/0' every 256 bytes of 64 MiB (262,144 candidate init_tasks): was every
    candidate probed after every chunk and five times more at the end (17 s)."""
    buf = bytearray(64 << 20)
    for a in range(0, len(buf) - 16, 256):
        buf[a:a + 10] = b"swapper/0\0"
    offs = {k: 16 + 8 * i for i, k in enumerate(REQUIRED)}
    offs.update({"task_struct.comm": 0, "mm_struct.mm_mt": 0})
    mem = BytesMemory(buf)
    with within(3):
        with pytest.raises(KernelError, match="hits beyond"):
            find_kernel(mem, Layout(offs, {}, "test"))
        assert len(scan_memory(mem).swapper) == discover.MAX_HITS  # bounded allocation


def test_planted_banners_neither_crowd_out_nor_stand_for_the_kernels() -> None:
    """Every page opens with 'Linux version' (no release: not a banner hit at all), and
    complete fake banners open 2 MiB pages below the kernel's: the banner chosen for an
    init_task is the one at the head of the nearest .rodata page below it."""
    buf = bytearray(128 << 20)
    for a in range(0, len(buf), 4096):
        buf[a:a + 15] = b"Linux version \0"
    fake = b"Linux version 6.6.6-planted (x@y) #1\n\0"
    real = b"Linux version 9.9.9-real (a@b) #1 SMP\n\0"
    buf[4 << 20:(4 << 20) + len(fake)] = fake  # far below
    buf[60 << 20:(60 << 20) + len(fake)] = fake  # within 64 MiB of init_task
    rodata = 100 << 20
    buf[rodata:rodata + len(real)] = real
    init_task = rodata + (9 << 20) + 0x1C0  # in .data, 9 MiB after .rodata starts
    mem = BytesMemory(buf)
    with within(2):
        scan = scan_memory(mem)
        assert scan.banners == [4 << 20, 60 << 20, rodata] and not scan.truncated
        assert discover.rodata_candidates(mem) == scan.banners  # no span for junk heads
        heads = discover.image_banners(mem, init_task)
    assert rodata in heads and (4 << 20) not in heads  # nearest first, 64 MiB at most
    assert heads == sorted(heads, reverse=True) and init_task - heads[-1] < 64 << 20
    assert pick_banner(mem, heads + scan.banners) == (real[:-2].decode(), rodata)


# --- page tables -----------------------------------------------------------------------

def test_pml4_pointing_at_itself() -> None:
    """Every PML4 entry names the PML4 (was: 32 M leaves from 63,374 tables in 20 s,
    about 330 s before its cap)."""
    buf = bytearray(256 << 20)
    pgd = 0x10000
    struct.pack_into("<512Q", buf, pgd, *([pgd | RW] * 512))
    stats = WalkStats()
    with within(2):
        got = list(iter_mappings(BytesMemory(buf), pgd, 0, 1 << 47, stats=stats))
    assert got == [] and stats.revisits == 256 and stats.partial and stats.tables == 1


def _table_mesh(pages: int) -> BytesMemory:
    """Return RAM whose every page is a full table of entries naming other pages."""
    buf = bytearray(pages * 4096)
    for f in range(pages):
        struct.pack_into("<512Q", buf, f * 4096,
                         *[(((f * 512 + j) % pages) << 12) | RW for j in range(512)])
    return BytesMemory(buf)


def test_tables_meshing_all_of_ram_stop_at_the_budget() -> None:
    """All 4096 pages of a 16 MiB guest are page tables naming each other: no loop in
    any one path, but billions of paths. The walks sharing one WalkStats stop at the
    budget, partial; a second walk with the same stats costs nothing more."""
    mem = _table_mesh(4096)
    stats = WalkStats()
    with within(3):
        first = sum(1 for _ in iter_mappings(mem, 0x1000, 0, 1 << 47, stats=stats))
        second = sum(1 for _ in iter_mappings(mem, 0x2000, 0, 1 << 47, stats=stats))
    assert stats.truncated and stats.partial and stats.budget is not None
    assert first < 1 << 17 and second <= 1


# --- kernel lists ----------------------------------------------------------------------

def _shared_thread_list(f: Fake, n: int) -> int:
    """Return init_task of a task list of ``n`` processes all claiming the thread group
    of the first one, whose thread list holds all ``n``: n*n thread steps."""
    init = f.task(0, "swapper/0")
    tasks = [f.task(i + 1, f"t{i}") for i in range(n)]
    f.link([init, *tasks])
    nodes = [t + OFFS["task_struct.thread_group"] for t in tasks]
    for i, node in enumerate(nodes):
        f.put(node, 0, nodes[(i + 1) % n])
        f.put(node, 8, nodes[i - 1])
    for t in tasks:
        f.put(t, OFFS["task_struct.group_leader"], tasks[0])
    return init


def test_thread_lists_shared_by_every_process() -> None:
    f = Fake()
    init = _shared_thread_list(f, 1000)
    k = f.kernel(init)
    # was about 1 M list steps, ~2 M reads
    with within(5), pytest.raises(WalkError, match="reads per page"):
        walk_with_retries(k, "t")
    assert k.reads_left < 0


def test_task_list_longer_than_ram_can_hold() -> None:
    """A well-linked task list of more nodes than guest RAM holds task_structs."""
    f = Fake()
    init = f.task(0, "swapper/0")
    layout = Layout(OFFS, {"task_struct": 0x4000}, "test")  # 64 of them fill 1 MiB
    nodes = [init] + [f.obj(0x80) for _ in range(200)]
    f.link(nodes)
    info = KernelInfo("Linux version 9.9.9-test", init, init - POB, 0, 0, 4, POB, layout)
    k = Kernel(BytesMemory(f.buf), info)
    with within(2), pytest.raises(WalkError, match="longer than 64"):
        list(for_each_task(k))


def test_dentry_and_mount_loops() -> None:
    f = Fake()
    root = f.dentry(b"/", None)
    top = f.obj()
    f.put(top, OFFS["mount.mnt_parent"], top)
    f.put(top, OFFS["mount.mnt"], root)
    k = f.kernel(f.task(0, "swapper/0"))
    a = f.dentry(b"a", None)
    b = f.dentry(b"b", a)
    f.put(a, OFFS["dentry.d_parent"], b)
    with within(2), pytest.raises(WalkError, match="dentry chain loops"):
        d_path(k, top + OFFS["mount.mnt"], b)
    m1, m2 = f.obj(), f.obj()  # two mounts, each the other's parent
    for m, other in ((m1, m2), (m2, m1)):
        f.put(m, OFFS["mount.mnt_parent"], other)
        f.put(m, OFFS["mount.mnt"], root)
        f.put(m, OFFS["mount.mnt_mountpoint"], root)
    k.invalidate()
    with within(2), pytest.raises(WalkError, match="mount chain loops"):
        d_path(k, m1 + OFFS["mount.mnt"], root)


def test_maple_vmas_of_another_mm() -> None:
    """Two mms whose maple trees hold the same VMAs: the second walk refuses them."""
    f = Fake()
    offs = dict(OFFS, **{"mm_struct.mm_mt": 0x40, "maple_tree.ma_root": 0x08})
    del offs["mm_struct.mmap"]
    init = f.task(0, "swapper/0")
    mm_a, mm_b = f.obj(), f.obj()
    vma = f.obj()
    for key, val in (("vm_start", 0x1000), ("vm_end", 0x2000), ("vm_mm", mm_a)):
        f.put(vma, OFFS[f"vm_area_struct.{key}"], val)
    f.next = (f.next + 0xFF) & ~0xFF
    leaf = f.obj(0x100)  # maple_leaf_64: pivots at 8, slots at 128
    for i, (pivot, slot) in enumerate(((0xFFF, 0), (0x1FFF, vma), (0, 0))):
        f.put(leaf, 8 + 8 * i, pivot)
        f.put(leaf, 128 + 8 * i, slot)
    f.put(leaf, 248, 2, 1)  # metadata end: three slots used
    for mm in (mm_a, mm_b):
        f.put(mm, 0x40 + 0x08, leaf | (1 << 3) | 4 | 2)
    info = KernelInfo("Linux version 9.9.9-test", init, init - POB, 0, 0, 4, POB,
                      Layout(offs, {}, "test"))
    k = Kernel(BytesMemory(f.buf), info)
    assert [(v.start, v.end) for v in for_each_vma(k, mm_a)] == [(0x1000, 0x2000)]
    with pytest.raises(WalkError, match="another mm"):
        list(for_each_vma(k, mm_b))


def test_kernel_read_budget_ends_any_walk() -> None:
    """Whatever the walk, a Kernel stops reading after READS_PER_PAGE per page of RAM
    (the bound on walks that multiply: every process naming the same big structures)."""
    f = Fake()
    k = f.kernel(f.task(0, "swapper/0"))
    with within(2), pytest.raises(WalkError, match="reads per page"):
        for _ in range(1 << 21):  # the fake guest's 1 MiB allows 65,536
            k.u64(POB + 0x1000)
