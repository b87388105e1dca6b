"""Walkers (tasks, VMA list, d_path, build-id, survey) on synthetic kernel memory,
including hostile data: loops, pointers outside RAM, absurd lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare.introspect.helpers.fs import d_path, file_path
from libshare.introspect.helpers.mm import for_each_vma, parse_build_id, perms
from libshare.introspect.helpers.tasks import for_each_task, for_each_thread, task_info
from libshare.introspect.kernel import Kernel, KernelInfo, WalkError
from libshare.introspect.layout import REQUIRED, Layout
from libshare.introspect.memory import BytesMemory
from libshare.introspect.survey import walk_kernel
from tests.support.memory import POB, KernelObjects

RAM = 1 << 20

# A compact, made-up layout (offsets within 0x200-byte objects).
OFFS = {key: 8 * i for i, key in enumerate(REQUIRED)}
OFFS.update({"task_struct.tasks": 0x00, "task_struct.pid": 0x10, "task_struct.tgid": 0x14,
             "task_struct.comm": 0x20, "task_struct.mm": 0x30, "task_struct.active_mm": 0x38,
             "task_struct.group_leader": 0x40, "task_struct.real_parent": 0x48,
             "task_struct.signal": 0x50, "task_struct.thread_group": 0x58,
             "mm_struct.pgd": 0x00, "mm_struct.map_count": 0x08, "mm_struct.mmap": 0x10,
             "vm_area_struct.vm_start": 0x00, "vm_area_struct.vm_end": 0x08,
             "vm_area_struct.vm_mm": 0x10, "vm_area_struct.vm_flags": 0x18,
             "vm_area_struct.vm_pgoff": 0x20, "vm_area_struct.vm_file": 0x28,
             "vm_area_struct.vm_next": 0x30,
             "file.f_path": 0x10, "path.mnt": 0x00, "path.dentry": 0x08,
             "dentry.d_parent": 0x00, "dentry.d_name.len": 0x0C, "dentry.d_name.name": 0x10,
             "dentry.d_hash.pprev": 0x18,
             "mount.mnt": 0x20, "mount.mnt_parent": 0x00, "mount.mnt_mountpoint": 0x08,
             "vfsmount.mnt_root": 0x00})


class Fake(KernelObjects):
    """A fake kernel's memory with tasks to plant (see :class:`KernelObjects`)."""

    def __init__(self) -> None:
        super().__init__(OFFS, RAM)

    def kernel(self, init_task: int) -> Kernel:
        layout = Layout(OFFS, {}, "test")
        info = KernelInfo("Linux version 9.9.9-test", init_task, init_task - POB, 0, 0, 4,
                          POB, layout)
        return Kernel(BytesMemory(self.buf), info)

    def task(self, pid: int, comm: str, mm: int = 0) -> int:
        t = self.obj()
        self.put(t, OFFS["task_struct.pid"], pid, 4)
        self.put(t, OFFS["task_struct.tgid"], pid, 4)
        self.put_bytes(t + OFFS["task_struct.comm"], comm.encode() + b"\0")
        self.put(t, OFFS["task_struct.mm"], mm)
        self.put(t, OFFS["task_struct.group_leader"], t)
        tg = t + OFFS["task_struct.thread_group"]
        self.put(tg, 0, tg)
        self.put(tg, 8, tg)
        return t

    def link(self, tasks: list[int]) -> None:
        """Make ``tasks`` the task list, in order."""
        self.ring([t + OFFS["task_struct.tasks"] for t in tasks])


def test_task_list_and_threads() -> None:
    f = Fake()
    init = f.task(0, "swapper/0")
    a, b = f.task(1, "init"), f.task(7, "sleep")
    f.link([init, a, b])
    k = f.kernel(init)
    got = [task_info(k, t) for t in for_each_task(k)]
    assert [(t.pid, t.comm, t.name) for t in got] == [(1, "init", "init"),
                                                      (7, "sleep", "sleep")]
    assert list(for_each_thread(k, a)) == [a]


def test_task_list_loop_and_wild_pointer() -> None:
    f = Fake()
    init = f.task(0, "swapper/0")
    a, b = f.task(1, "init"), f.task(2, "kthreadd")
    f.link([init, a, b])
    f.put(b + OFFS["task_struct.tasks"], 0, a + OFFS["task_struct.tasks"])  # b -> a again
    with pytest.raises(WalkError):
        list(for_each_task(f.kernel(init)))
    f.link([init, a, b])
    f.put(b + OFFS["task_struct.tasks"], 0, POB + (1 << 36))  # outside RAM
    with pytest.raises(WalkError):
        list(for_each_task(f.kernel(init)))


def test_d_path_across_a_mount() -> None:
    f = Fake()
    root = f.dentry(b"/", None)
    usr = f.dentry(b"usr", root)
    top = f.obj()  # rootfs mount, its own parent
    f.put(top, OFFS["mount.mnt_parent"], top)
    f.put(top, OFFS["mount.mnt"], root)
    sub_root = f.dentry(b"/", None)
    lib = f.dentry(b"lib", sub_root)
    so = f.dentry(b"libc.so.6", lib)
    sub = f.obj()  # a filesystem mounted on /usr
    f.put(sub, OFFS["mount.mnt_parent"], top)
    f.put(sub, OFFS["mount.mnt_mountpoint"], usr)
    f.put(sub, OFFS["mount.mnt"], sub_root)
    k = f.kernel(f.task(0, "swapper/0"))
    assert d_path(k, sub + OFFS["mount.mnt"], so) == "/usr/lib/libc.so.6"
    f.put(so, OFFS["dentry.d_hash.pprev"], 0)
    k.invalidate()  # the guest changed memory: drop the page cache
    assert d_path(k, sub + OFFS["mount.mnt"], so) == "/usr/lib/libc.so.6 (deleted)"
    # struct file -> f_path
    file = f.obj()
    f.put(file, OFFS["file.f_path"] + OFFS["path.mnt"], top + OFFS["mount.mnt"])
    f.put(file, OFFS["file.f_path"] + OFFS["path.dentry"], usr)
    k.invalidate()
    assert file_path(k, file) == "/usr"


def test_d_path_hostile() -> None:
    f = Fake()
    root = f.dentry(b"/", None)
    top = f.obj()
    f.put(top, OFFS["mount.mnt_parent"], top)
    f.put(top, OFFS["mount.mnt"], root)
    k = f.kernel(f.task(0, "swapper/0"))
    long = f.dentry(b"x", root, length=1 << 30)  # absurd name length
    with pytest.raises(WalkError, match="name length"):
        d_path(k, top + OFFS["mount.mnt"], long)
    a = f.dentry(b"a", None)
    b = f.dentry(b"b", a)
    f.put(a, OFFS["dentry.d_parent"], b)  # a <-> b, never reaching the root
    with pytest.raises(WalkError):
        d_path(k, top + OFFS["mount.mnt"], b)


def _vma(f: Fake, mm: int, start: int, end: int, flags: int = 0x5) -> int:
    v = f.obj()
    for key, val in (("vm_start", start), ("vm_end", end), ("vm_mm", mm), ("vm_flags", flags)):
        f.put(v, OFFS[f"vm_area_struct.{key}"], val)
    return v


def test_vma_list_walk_and_loop() -> None:
    f = Fake()
    mm = f.obj()
    v1, v2 = _vma(f, mm, 0x1000, 0x3000), _vma(f, mm, 0x5000, 0x6000, flags=0x3)
    f.put(mm, OFFS["mm_struct.mmap"], v1)
    f.put(v1, OFFS["vm_area_struct.vm_next"], v2)
    k = f.kernel(f.task(0, "swapper/0"))
    got = list(for_each_vma(k, mm))
    assert [(v.start, v.end, perms(v.flags)) for v in got] == [(0x1000, 0x3000, "r-xp"),
                                                              (0x5000, 0x6000, "rw-p")]
    f.put(v2, OFFS["vm_area_struct.vm_next"], v1)  # loop back
    k.invalidate()
    with pytest.raises(WalkError, match="order"):
        list(for_each_vma(k, mm))
    other = f.obj()
    f.put(v2, OFFS["vm_area_struct.vm_next"], _vma(f, other, 0x7000, 0x8000))
    k.invalidate()
    with pytest.raises(WalkError, match="another mm"):
        list(for_each_vma(k, mm))


def test_survey_walk_marks_partial() -> None:
    f = Fake()
    init = f.task(0, "swapper/0")
    mm = f.obj()
    f.put(mm, OFFS["mm_struct.pgd"], POB + (1 << 36))  # page tables outside RAM
    f.put(mm, OFFS["mm_struct.map_count"], 0, 4)
    a = f.task(1, "init", mm)
    f.link([init, a])
    k = f.kernel(init)
    with pytest.raises(WalkError):
        walk_kernel(k, "t")
    out = walk_kernel(k, "t", tolerant=True)
    assert out.partial and out.tasks == 1 and "pid 1" in out.errors[0]


def test_build_id_from_first_page() -> None:
    from elftools.elf.elffile import ELFFile

    path = Path("/bin/true")
    want = None
    with open(path, "rb") as fh:
        for seg in ELFFile(fh).iter_segments():
            if seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():  # type: ignore[attr-defined]
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        want = note["n_desc"]
    page = path.read_bytes()[:4096]
    assert want and parse_build_id(page) == want
    assert parse_build_id(b"\x7fELF" + b"\xff" * 4092) is None  # garbage header
    assert parse_build_id(page[:100]) is None


def _page(f: Fake) -> int:
    """Return the guest-physical address of a fresh, zeroed, 4 KiB-aligned page."""
    f.next = (f.next + 0xFFF) & ~0xFFF
    pa = f.next
    f.next += 0x1000
    return pa


def _library_guest(fs_dev: str, leaves: list[int]) -> Kernel:
    """Return a kernel with one process mapping /libx.so (r-xp, 2 GiB from 1 GiB) on a
    filesystem on ``fs_dev``, its page tables holding ``leaves`` (1 GiB leaf entries)."""
    f = Fake()
    offs = dict(OFFS, **{"file.f_inode": 0x30, "inode.i_sb": 0x00, "super_block.s_type": 0x00,
                         "super_block.s_id": 0x10, "file_system_type.name": 0x00})
    init = f.task(0, "swapper/0")
    root = f.dentry(b"/", None)
    top = f.obj()
    f.put(top, OFFS["mount.mnt_parent"], top)
    f.put(top, OFFS["mount.mnt"], root)
    file, inode, sb, fstype, name = f.obj(), f.obj(), f.obj(), f.obj(), f.obj()
    f.put(file, OFFS["file.f_path"] + OFFS["path.mnt"], top + OFFS["mount.mnt"])
    f.put(file, OFFS["file.f_path"] + OFFS["path.dentry"], f.dentry(b"libx.so", root))
    f.put(file, 0x30, inode)
    f.put(inode, 0, sb)
    f.put(sb, 0, fstype)
    f.put_bytes(sb + 0x10, fs_dev.encode() + b"\0")
    f.put(fstype, 0, name)
    f.put_bytes(name, b"ext4\0")
    mm = f.obj()
    vma = _vma(f, mm, 1 << 30, 3 << 30)
    f.put(vma, OFFS["vm_area_struct.vm_file"], file)
    f.put(mm, OFFS["mm_struct.mmap"], vma)
    f.put(mm, OFFS["mm_struct.map_count"], 1, 4)
    pgd, pud = _page(f), _page(f)
    f.put(mm, OFFS["mm_struct.pgd"], POB + pgd)
    f.put(POB + pgd, 0, pud | 0x7)
    for i, leaf in enumerate(leaves):
        f.put(POB + pud, 8 * (1 + i), leaf)
    f.link([init, f.task(1, "init", mm)])
    info = KernelInfo("Linux version 9.9.9-test", init, init - POB, 0, 0, 4, POB,
                      Layout(offs, {}, "test"))
    return Kernel(BytesMemory(f.buf), info)


def test_survey_hostile_huge_leaves_outside_ram() -> None:
    """1 GiB leaves of a library mapping pointing outside guest RAM are neither counted
    as resident (nor expanded into 4 KiB frames) and the survey is marked partial."""
    leaves = [((i + 1) << 40) | 0x87 for i in range(2)]  # present, user, PS
    out = walk_kernel(_library_guest("sda1", leaves), "t")
    assert [lib.path for lib in out.libraries] == ["/libx.so"]
    assert out.libraries[0].resident_pages == 0
    assert out.partial and "2 page-table entries point outside RAM" in out.errors
    # a DAX mapping of a pmem filesystem points outside RAM by design: not partial
    dax = walk_kernel(_library_guest("pmem0", leaves), "t")
    assert dax.libraries[0].resident_pages == 0 and not dax.partial and not dax.errors
