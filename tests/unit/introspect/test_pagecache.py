"""The page-cache walk (superblocks, inodes, mounts, paths) on synthetic kernel memory,
hostile data included: loops, wild pointers, absurd nrpages and name lengths."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from libshare.introspect.kernel import Kernel, KernelInfo, WalkError
from libshare.introspect.layout import REQUIRED, Layout, layout_from_btf
from libshare.introspect.memory import BytesMemory
from libshare.introspect.pagecache import (
    KEYS,
    PageCacheError,
    for_each_inode,
    super_blocks_head,
    survey_page_cache,
    to_json,
)
from tests.support.memory import IMAGE, POB, KernelObjects

RAM = 8 << 20
MNT_NS_INTERNAL = (1 << 64) - 22

OFFS = {key: 8 * i for i, key in enumerate(REQUIRED)}
OFFS.update({
    "task_struct.tasks": 0x00, "task_struct.comm": 0x20, "task_struct.fs": 0x60,
    "fs_struct.root": 0x00, "path.mnt": 0x00, "path.dentry": 0x08,
    "mount.mnt_parent": 0x00, "mount.mnt_mountpoint": 0x08, "mount.mnt": 0x20,
    "vfsmount.mnt_root": 0x00, "vfsmount.mnt_sb": 0x08,
    "mount.mnt_instance": 0x40, "mount.mnt_ns": 0x50,
    "super_block.s_list": 0x00, "super_block.s_dev": 0x10, "super_block.s_type": 0x18,
    "super_block.s_root": 0x20, "super_block.s_mounts": 0x28, "super_block.s_id": 0x40,
    "super_block.s_inodes": 0x70, "file_system_type.name": 0x00,
    "inode.i_mode": 0x00, "inode.i_sb": 0x08, "inode.i_ino": 0x10, "inode.i_size": 0x18,
    "inode.i_mapping": 0x20, "inode.i_sb_list": 0x28, "inode.i_dentry": 0x38,
    "inode.i_data": 0x40, "address_space.nrpages": 0x10,
    "dentry.d_parent": 0x00, "dentry.d_name.len": 0x0C, "dentry.d_name.name": 0x10,
    "dentry.d_hash.pprev": 0x18, "dentry.d_inode": 0x20, "dentry.d_u.d_alias": 0x28,
    "mm_struct.mmap": 0x10, "vm_area_struct.vm_next": 0x30,
})


class Guest(KernelObjects):
    """Kernel memory with superblocks, mounts, dentries and inodes to plant."""

    def __init__(self, offsets: dict[str, int] | None = None) -> None:
        super().__init__(dict(OFFS if offsets is None else offsets), RAM, first=0x10000)
        # page tables: PGD[511] -> PUD, PUD[510] = 1 GiB leaf at physical 0
        self.pgd, pud = 0x1000, 0x2000
        self.put(POB + self.pgd, 511 * 8, pud | 0x3)
        self.put(POB + pud, 510 * 8, 0x83)
        self.head = IMAGE + 0x8000  # super_blocks, "in the kernel image"
        self.sbs: list[int] = []
        self.inodes: dict[int, list[int]] = {}
        self.linked = False
        self.init = self.obj()
        self.ns = self.obj()  # a mount namespace

    def link(self, head: int, nodes: list[int]) -> None:
        """Make the circular list ``head`` -> ``nodes``."""
        self.ring([head, *nodes])

    def dentry(self, name: bytes, parent: int | None, inode: int = 0,  # type: ignore[override]
               length: int | None = None) -> int:
        d = super().dentry(name, parent, length)
        if inode:
            self.put(d, OFFS["dentry.d_inode"], inode)
            self.put(inode, OFFS["inode.i_dentry"], d + OFFS["dentry.d_u.d_alias"])
        return d

    def superblock(self, fstype: str, s_id: str, dev: int) -> tuple[int, int]:
        """Return (superblock, root dentry) of a new filesystem."""
        sb, ft, name = self.obj(), self.obj(), self.obj(0x40)
        self.put_bytes(name, fstype.encode() + b"\0")
        self.put(ft, OFFS["file_system_type.name"], name)
        self.put(sb, OFFS["super_block.s_type"], ft)
        self.put(sb, OFFS["super_block.s_dev"], dev, 4)
        self.put_bytes(sb + OFFS["super_block.s_id"], s_id.encode() + b"\0")
        root = self.dentry(b"/", None)
        self.put(sb, OFFS["super_block.s_root"], root)
        self.sbs.append(sb)
        self.inodes[sb] = []
        return sb, root

    def mount(self, sb: int, root: int, parent: int | None = None, mountpoint: int = 0,
              ns: int | None = None) -> int:
        """Return a mount of ``sb`` at ``root`` on ``mountpoint`` of mount ``parent``
        (itself if None: a namespace root), in namespace ``ns`` (default: the one)."""
        m = self.obj()
        self.put(m, OFFS["mount.mnt_parent"], parent if parent is not None else m)
        self.put(m, OFFS["mount.mnt_mountpoint"], mountpoint or root)
        self.put(m, OFFS["mount.mnt"] + OFFS["vfsmount.mnt_root"], root)
        self.put(m, OFFS["mount.mnt"] + OFFS["vfsmount.mnt_sb"], sb)
        self.put(m, OFFS["mount.mnt_ns"], self.ns if ns is None else ns)
        mounts = getattr(self, "_mounts", {})
        mounts.setdefault(sb, []).append(m)
        self._mounts = mounts
        return m

    def inode(self, sb: int, ino: int, mode: int, size: int = 0, nrpages: int = 0,
              mapping: int | None = None) -> int:
        i = self.obj()
        self.put(i, OFFS["inode.i_mode"], mode, 2)
        self.put(i, OFFS["inode.i_sb"], sb)
        self.put(i, OFFS["inode.i_ino"], ino)
        self.put(i, OFFS["inode.i_size"], size)
        own = i + OFFS["inode.i_data"]
        self.put(i, OFFS["inode.i_mapping"], own if mapping is None else mapping)
        self.put(own, OFFS["address_space.nrpages"], nrpages)
        self.inodes[sb].append(i)
        return i

    def file(self, sb: int, ino: int, parent: int, name: bytes, size: int,
             nrpages: int) -> tuple[int, int]:
        """Return (inode, dentry) of a regular file ``name`` in directory ``parent``."""
        i = self.inode(sb, ino, stat.S_IFREG | 0o644, size, nrpages)
        return i, self.dentry(name, parent, i)

    def kernel(self, root_mount: int, memory: BytesMemory | None = None) -> Kernel:
        """Return the Kernel, with every list linked (on the first call) and
        init_task's root at ``root_mount``."""
        if not self.linked:
            self.finish(root_mount)
        info = KernelInfo("Linux version 9.9.9-test", self.init, self.init - POB, 0,
                          self.pgd, 4, POB, Layout(self.offs, {}, "test"))
        return Kernel(memory or BytesMemory(self.buf), info)

    def finish(self, root_mount: int) -> None:
        """Link every list and give init_task its root at ``root_mount``."""
        self.linked = True
        self.link(self.head, [sb + OFFS["super_block.s_list"] for sb in self.sbs])
        for sb, inodes in self.inodes.items():
            self.link(sb + OFFS["super_block.s_inodes"],
                      [i + OFFS["inode.i_sb_list"] for i in inodes])
        for sb, mounts in getattr(self, "_mounts", {}).items():
            self.link(sb + OFFS["super_block.s_mounts"],
                      [m + OFFS["mount.mnt_instance"] for m in mounts])
        fs = self.obj()
        self.put(fs, OFFS["fs_struct.root"] + OFFS["path.mnt"], root_mount + OFFS["mount.mnt"])
        self.put(self.init, OFFS["task_struct.fs"], fs)
        self.put(self.init, OFFS["task_struct.tasks"], self.init + OFFS["task_struct.tasks"])
        self.put(self.init, OFFS["task_struct.tasks"] + 8, self.init + OFFS["task_struct.tasks"])


def small_guest() -> tuple[Guest, int, dict[str, int]]:
    """Return a guest with rootfs on /, ext4 (vda) on /mnt, the region (erofs on pmem0)
    on /run/region, a block device's buffer cache, a memfd on an internal tmpfs, and the
    root mount; the dict names interesting objects."""
    g = Guest()
    rootfs, r_root = g.superblock("rootfs", "rootfs", 1)
    top = g.mount(rootfs, r_root)
    etc = g.dentry(b"etc", r_root)
    mnt = g.dentry(b"mnt", r_root)
    run = g.dentry(b"run", r_root)
    region_dir = g.dentry(b"region", run)
    g.file(rootfs, 2, etc, b"hostname", 100, 1)
    g.inode(rootfs, 3, stat.S_IFDIR | 0o755)
    ext4, e_root = g.superblock("ext4", "vda", (254 << 20) | 0)
    g.mount(ext4, e_root, top, mnt)
    data = g.dentry(b"data", e_root)
    big, big_d = g.file(ext4, 12, data, b"big.bin", 2 << 20, 512)
    g.file(ext4, 13, data, b"cold.bin", 5000, 0)  # no pages: not listed
    gone, gone_d = g.file(ext4, 14, data, b"old.log", 8192, 2)
    g.put(gone_d, OFFS["dentry.d_hash.pprev"], 0)  # unlinked, still open
    g.inode(ext4, 15, stat.S_IFREG | 0o600, 4096, 1)  # no dentry
    erofs, f_root = g.superblock("erofs", "pmem0", (259 << 20) | 0)
    g.mount(erofs, f_root, top, region_dir)
    lib = g.dentry(b"lib", f_root)
    g.file(erofs, 40, lib, b"libc.so.6", 1 << 20, 100)
    bdev, b_root = g.superblock("bdev", "bdev", 0)
    g.mount(bdev, b_root, ns=MNT_NS_INTERNAL)
    disk = g.inode(bdev, 99, stat.S_IFBLK | 0o600, 1 << 30, 10)
    devtmpfs, d_root = g.superblock("devtmpfs", "devtmpfs", 5)
    g.mount(devtmpfs, d_root, ns=MNT_NS_INTERNAL)  # the kernel's own mount,
    g.mount(devtmpfs, d_root, ns=g.obj())  # devtmpfsd's, root of its private namespace,
    g.mount(devtmpfs, d_root, top, g.dentry(b"dev", r_root))  # then /dev in init's
    g.file(devtmpfs, 8, d_root, b"note", 10, 1)
    node = g.inode(devtmpfs, 7, stat.S_IFBLK | 0o600, 0, 0,
                   mapping=disk + OFFS["inode.i_data"])  # /dev/vda: the bdev's mapping
    g.dentry(b"vda", d_root, node)
    shm, s_root = g.superblock("tmpfs", "tmpfs", 6)
    g.mount(shm, s_root, ns=MNT_NS_INTERNAL)
    _memfd, memfd_d = g.file(shm, 3, s_root, b"memfd:buf", 65536, 16)
    g.put(memfd_d, OFFS["dentry.d_hash.pprev"], 0)
    return g, top, {"big": big, "big_d": big_d, "data": data, "ext4": ext4, "gone": gone}


def test_files_paths_and_totals() -> None:
    g, top, _ = small_guest()
    out = survey_page_cache(g.kernel(top), "t")
    assert not out.partial, out.errors
    got = [(f.path, f.fstype, f.dev, f.ino, f.size, f.cached_bytes, f.served_by_region,
            f.mounted) for f in out.files]
    assert got == [
        ("/mnt/data/big.bin", "ext4", "254:0", 12, 2 << 20, 2 << 20, False, True),
        ("/run/region/lib/libc.so.6", "erofs", "259:0", 40, 1 << 20, 409600, True, True),
        ("/memfd:buf (deleted)", "tmpfs", "0:6", 3, 65536, 65536, False, False),
        ("/mnt/data/old.log (deleted)", "ext4", "254:0", 14, 8192, 8192, False, True),
        ("/dev/note", "devtmpfs", "0:5", 8, 10, 4096, False, True),
        ("/etc/hostname", "rootfs", "0:1", 2, 100, 4096, False, True),
        (None, "ext4", "254:0", 15, 4096, 4096, False, False),  # no dentry: last
    ]
    assert out.cached_bytes() == (2 << 20) + 65536 + 8192 + 3 * 4096
    assert out.region_bytes() == 409600
    assert out.other_cached_bytes() == 10 * 4096  # the disk's buffer cache, counted once
    by_type = {fs.fstype: fs for fs in out.filesystems}
    assert [fs.fstype for fs in out.filesystems] == ["rootfs", "ext4", "erofs", "bdev",
                                                      "devtmpfs", "tmpfs"]
    assert by_type["rootfs"].mount_point == "/" and by_type["ext4"].mount_point == "/mnt"
    assert by_type["erofs"].mount_point == "/run/region" and by_type["erofs"].served_by_region
    assert by_type["devtmpfs"].mount_point == "/dev"
    assert by_type["bdev"].mount_point is None and by_type["tmpfs"].mount_point is None
    assert by_type["ext4"].inodes == 4 and by_type["ext4"].files == 3
    assert by_type["bdev"].other_cached_bytes == 40960
    assert by_type["devtmpfs"].other_cached_bytes == 0
    assert out.inodes == 2 + 4 + 1 + 1 + 2 + 1
    doc = to_json(out)
    assert doc["cached_bytes"] == out.cached_bytes() and doc["region_bytes"] == 409600
    assert doc["files"][0] == {"dev": "254:0", "fstype": "ext4", "ino": 12,
                               "path": "/mnt/data/big.bin", "mounted": True,
                               "size": 2 << 20, "cached_bytes": 2 << 20,
                               "served_by_region": False}
    assert doc["partial"] is False and doc["errors"] == []


def test_head_is_the_node_outside_the_direct_map() -> None:
    g, top, _ = small_guest()
    k = g.kernel(top)
    assert super_blocks_head(k) == g.head


def test_bind_mounted_file_other_namespace_and_newer_mount_chain() -> None:
    """A file bind-mounted alone (libshare's per-file binds) gets its bind's path; a
    filesystem mounted only in another namespace (a service's private /tmp) its path
    there; on a kernel whose superblock mounts are a mnt_next_for_sb chain."""
    offs = {k: v for k, v in OFFS.items() if k != "mount.mnt_instance"}
    offs["mount.mnt_next_for_sb"] = 0x58
    g = Guest(offs)
    rootfs, r_root = g.superblock("rootfs", "rootfs", 1)
    top = g.mount(rootfs, r_root)
    usr = g.dentry(b"usr", r_root)
    target = g.dentry(b"libc.so.6", usr)
    erofs, f_root = g.superblock("erofs", "pmem0", 259 << 20)
    _inode, libc = g.file(erofs, 40, f_root, b"libc.so.6", 4096, 1)
    bind = g.mount(erofs, libc, top, target)  # the region's file alone, over /usr/libc.so.6
    private = g.obj()  # a service's namespace: a copy of the root, its own /tmp
    ns_root = g.mount(rootfs, r_root, ns=private)
    tmpfs, t_root = g.superblock("tmpfs", "tmpfs", 9)
    tmp = g.mount(tmpfs, t_root, ns_root, g.dentry(b"tmp", r_root), ns=private)
    g.file(tmpfs, 2, t_root, b"socket.lock", 10, 1)
    k = g.kernel(top)
    for sb, chain in ((rootfs, [top, ns_root]), (erofs, [bind]), (tmpfs, [tmp])):
        g.put(sb, OFFS["super_block.s_mounts"], chain[0])  # chains, not lists
        for m, nxt in zip(chain, [*chain[1:], 0], strict=True):
            g.put(m, 0x58, nxt)
    k.invalidate()
    out = survey_page_cache(k)
    assert not out.partial, out.errors
    assert [(f.path, f.served_by_region, f.mounted) for f in out.files] == [
        ("/tmp/socket.lock", False, True), ("/usr/libc.so.6", True, True)]
    assert [fs.mount_point for fs in out.filesystems] == ["/", None, "/tmp"]


def test_layout_without_the_members_is_refused() -> None:
    offs = {k: v for k, v in OFFS.items() if k not in ("inode.i_sb_list", "super_block.s_inodes")}
    g = Guest(offs)
    rootfs, root = g.superblock("rootfs", "rootfs", 1)
    k = g.kernel(g.mount(rootfs, root))
    with pytest.raises(PageCacheError, match=r"super_block\.s_inodes, inode\.i_sb_list"):
        survey_page_cache(k)


def test_inode_list_loop_ends_partial_keeping_what_was_read() -> None:
    g, top, objs = small_guest()
    k = g.kernel(top)
    ext4 = objs["ext4"]
    nodes = [i + OFFS["inode.i_sb_list"] for i in g.inodes[ext4]]
    g.put(nodes[2], 0, nodes[1])  # the third inode links forward to the second again
    g.put(nodes[1], 8, nodes[2])
    k.invalidate()
    out = survey_page_cache(k, retries=1)
    assert out.partial
    assert any("ext4 254:0: inodes:" in e for e in out.errors), out.errors
    ext4_fs = next(fs for fs in out.filesystems if fs.fstype == "ext4")
    assert ext4_fs.partial
    paths = {f.path for f in out.files}
    assert "/mnt/data/big.bin" in paths and "/etc/hostname" in paths
    assert "/run/region/lib/libc.so.6" in paths  # later filesystems still walked


def test_wild_pointers_and_absurd_values() -> None:
    g, top, objs = small_guest()
    k = g.kernel(top)
    # absurd nrpages: far more pages than the guest has
    g.put(objs["big"] + OFFS["inode.i_data"], OFFS["address_space.nrpages"], 1 << 40)
    # a name length far beyond NAME_MAX in the directory of the other files
    g.put(objs["data"], OFFS["dentry.d_name.len"], 1 << 30, 4)
    # the unlinked file's next inode pointer goes outside guest RAM
    g.put(objs["gone"] + OFFS["inode.i_sb_list"], 0, POB + (1 << 40))
    k.invalidate()
    out = survey_page_cache(k, retries=0)
    assert out.partial
    text = "\n".join(out.errors)
    assert "nrpages 1099511627776 exceeds guest RAM" in text
    assert "name length" in text
    assert "ext4 254:0: inodes:" in text
    ext4 = [f for f in out.files if f.fstype == "ext4"]
    assert [(f.ino, f.path) for f in ext4] == [(14, None)]  # big.bin skipped, then broken
    assert "/etc/hostname" in {f.path for f in out.files}


def test_dentry_loop_and_deep_paths() -> None:
    g = Guest()
    rootfs, root = g.superblock("rootfs", "rootfs", 1)
    top = g.mount(rootfs, root)
    a = g.dentry(b"a", root)
    b = g.dentry(b"b", a)
    g.put(a, OFFS["dentry.d_parent"], b)  # a <-> b never reach the root
    g.file(rootfs, 2, b, b"looped", 10, 1)
    deep = root
    for i in range(300):
        deep = g.dentry(b"d%d" % i, deep)
    g.file(rootfs, 3, deep, b"deep", 10, 1)
    g.file(rootfs, 4, root, b"fine", 10, 1)
    out = survey_page_cache(g.kernel(top))
    assert out.partial
    assert [(f.ino, f.path) for f in sorted(out.files, key=lambda f: f.ino)] == [
        (2, None), (3, None), (4, "/fine")]
    assert sum("deeper than 256" in e for e in out.errors) == 2, out.errors


def test_superblock_list_hostile() -> None:
    """A superblock ring that never reaches a head outside the direct map, or that
    breaks after it, ends partial; the superblocks before a break are walked."""
    g, top, _ = small_guest()
    k = g.kernel(top)
    first, second = g.sbs[0], g.sbs[1]
    g.put(second, OFFS["super_block.s_list"], first)  # rootfs -> ext4 -> rootfs: no head
    k.invalidate()
    out = survey_page_cache(k)
    assert out.partial and out.files == [] and "superblock list" in out.errors[0]
    g, top, _ = small_guest()
    k = g.kernel(top)
    g.put(g.sbs[2], OFFS["super_block.s_list"] + 8, g.head)  # erofs does not link back
    k.invalidate()
    out = survey_page_cache(k)
    assert out.partial and "does not link back" in out.errors[0]
    assert [fs.fstype for fs in out.filesystems] == ["rootfs", "ext4"]
    g, top, _ = small_guest()
    k = g.kernel(top)
    g.put(g.sbs[-1], OFFS["super_block.s_list"], g.sbs[-2] + OFFS["super_block.s_list"])  # loop
    k.invalidate()
    out = survey_page_cache(k)
    assert out.partial


def test_inode_budget_and_list_helper_bounds() -> None:
    g, top, objs = small_guest()
    k = g.kernel(top)
    out = survey_page_cache(k, max_inodes=3)
    assert out.partial and out.inodes == 3
    assert any("stopped after 3 inodes" in e for e in out.errors)
    assert len(list(for_each_inode(k, objs["ext4"]))) == 4
    with pytest.raises(WalkError, match="inode list longer than 2"):
        list(for_each_inode(k, objs["ext4"], limit=2))
    # an inode claiming another superblock
    g.put(objs["big"], OFFS["inode.i_sb"], g.sbs[0])
    k.invalidate()
    with pytest.raises(WalkError, match="belongs to"):
        list(for_each_inode(k, objs["ext4"]))


class HealingMemory(BytesMemory):
    """Guest memory whose torn inode list is whole again once the walker drops its
    cache (the guest ran on), as a running guest's can be."""

    def __init__(self, buf: bytearray, fix: tuple[int, bytes]) -> None:
        super().__init__(buf)
        self.buf = buf
        self.fix = fix
        self.invalidations = 0

    def invalidate(self) -> None:
        self.invalidations += 1
        pa, data = self.fix
        self.buf[pa:pa + len(data)] = data
        super().invalidate()


def test_torn_inode_list_is_read_again() -> None:
    g, top, objs = small_guest()
    g.kernel(top)  # link everything
    node = objs["gone"] + OFFS["inode.i_sb_list"]
    pa = node - POB
    good = bytes(g.buf[pa:pa + 8])
    g.put(node, 0, POB + (1 << 40))  # torn: a freed inode's pointer
    mem = HealingMemory(g.buf, (pa, good))
    out = survey_page_cache(g.kernel(top, mem))
    assert not out.partial, out.errors
    assert mem.invalidations == 1
    assert len([f for f in out.files if f.fstype == "ext4"]) == 3


VMLINUX = Path("/sys/kernel/btf/vmlinux")


def test_host_btf_has_the_members() -> None:
    """The host kernel's BTF gives every member the walk needs (and one of the two ways
    to a superblock's mounts)."""
    from libshare.introspect.btf import Btf

    try:
        blob = VMLINUX.read_bytes()
    except OSError:
        pytest.skip("no readable /sys/kernel/btf/vmlinux")
    layout = layout_from_btf(Btf(blob))
    assert [key for key in KEYS if not layout.has(key)] == []
    assert layout.has("mount.mnt_instance") or layout.has("mount.mnt_next_for_sb")
    assert layout.has("super_block.s_mounts") and layout.has("mount.mnt_ns")


def test_more_cached_than_guest_ram_is_partial() -> None:
    """Files each plausible but together larger than guest RAM: the sum is not trusted."""
    g = Guest()
    rootfs, root = g.superblock("rootfs", "rootfs", 1)
    top = g.mount(rootfs, root)
    for i in range(3):
        g.file(rootfs, 10 + i, root, b"f%d" % i, RAM, RAM // 4096)
    out = survey_page_cache(g.kernel(top))
    assert len(out.files) == 3 and out.partial
    assert out.errors == [f"{3 * RAM} bytes counted in a guest of {RAM} bytes of RAM"]
