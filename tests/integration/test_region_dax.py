"""Region images in real TCG guests: fsdax, DAX mounts, one host copy for two guests.

The region is built by the product path (``store import`` -> ``region build``), the
domain is enrolled with ``libshare.domxml.enable`` (nvdimm, access='private', <pmem/>,
read-only) so the installed qemu hook checks it at prepare. Ground truth is what the
guest prints on its serial console and, for sharing, the host's /proc/PID/smaps and
/proc/PID/pagemap of each QEMU process.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libshare import domxml
from libshare.config import Config
from libshare.demo.lifecycle import GuestError
from libshare.demo.tiny.kernel import KernelPackage
from libshare.demo.tiny.runner import GuestOptions, run_guest, running_guest
from libshare.sharing.formats.erofs import Erofs
from libshare.sharing.region import build, layout, manifest, verify
from libshare.sharing.store import import_tree
from libshare.util.digest import sha256_file
from tests.support.images import corrupt_copy
from tests.support.paths import TEST_ROOT

pytestmark = pytest.mark.integration

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
MIN_BIG = 16 * 1024 * 1024
PAGE = 4096
GROUP = "lstest"
LIBSHARE = [sys.executable, "-m", "libshare"]  # the libshare of this interpreter


@dataclass
class Region:
    """A built region image and where things are inside it."""

    cfg: Config
    path: Path                # images/<digest>.img
    digest: str
    size: int
    libc: dict[str, Any]      # manifest entry of libc.so.6
    big: dict[str, Any]       # manifest entry of a library of >= 16 MiB
    big_blk: int              # first filesystem block of the big library


def _big_library() -> Path:
    """Return the smallest real x86-64 library of at least 16 MiB on this host."""
    cands = [p for p in LIBDIR.glob("*.so*")
             if p.is_file() and not p.is_symlink() and p.stat().st_size >= MIN_BIG]
    if not cands:
        pytest.skip(f"no library of >= 16 MiB under {LIBDIR}")
    return min(cands, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def built_region() -> Iterator[Region]:
    """Yield a region holding the host's libc and a >= 16 MiB library, built for a test
    group under TEST_ROOT (readable by QEMU); removed afterwards."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    TEST_ROOT.chmod(0o755)
    base = TEST_ROOT / f"sharing-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        lib = base / "tree" / "usr/lib/x86_64-linux-gnu"
        lib.mkdir(parents=True)
        shutil.copyfile(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"), lib / "libc.so.6")
        big = _big_library()
        shutil.copyfile(big, lib / big.name)
        cfg = Config(state_dir=base / "state")
        import_tree(cfg.store_dir, [base / "tree"])
        res = build.build_region(cfg, GROUP)
        for d in (base, cfg.state_dir, cfg.regions_dir, cfg.regions_dir / "images",
                  cfg.regions_dir / "groups"):
            d.chmod(0o755)
        assert verify.verify(res.path) is None
        with open(res.path, "rb") as fh:
            fs = Erofs(fh, offset=layout.DATAOFF)
            files = manifest.read_manifest(fs)["files"]
            libc = next(f for f in files if f["soname"] == "libc.so.6")
            bigf = next(f for f in files if f["size"] >= MIN_BIG)
            blk = fs.lookup(bigf["path"]).raw_blkaddr
        yield Region(cfg, Path(res.path), res.digest, res.size, libc, bigf, blk)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def enrolled(reg: Region, path: Path | None = None,
             size: int | None = None) -> Callable[[Any], None]:
    """Return a guest-kit customizer enrolling the domain into ``reg`` with
    libshare.domxml.enable (the region device plus ACPI, NUMA cell, maxMemory)."""
    spec = domxml.RegionSpec(path=str(path or reg.cfg.group_region_link(GROUP)),
                             size=size or reg.size, group=GROUP, digest=reg.digest,
                             state_dir=str(reg.cfg.state_dir))

    def apply(dom: Any) -> None:
        new = domxml.enable(dom, spec)
        for child in list(dom):
            dom.remove(child)
        dom.extend(list(new))

    return apply


def options(kernel: KernelPackage, reg: Region, **kw: Any) -> GuestOptions:
    """Return guest options with the region enrolled and /usr/bin/cat (dynamic) inside."""
    return GuestOptions(kernel=kernel, binaries=["/usr/bin/cat"],
                        customize=[enrolled(reg, kw.pop("path", None), kw.pop("size", None))],
                        **kw)


def kv(output: str) -> dict[str, str]:
    """Return the ``key=value`` lines of a guest's output as a dict (last one wins)."""
    return dict(line.split("=", 1) for line in output.splitlines()
                if re.match(r"^[a-z_0-9]+=", line))


PRELUDE = """. /etc/libshare.sh
wait_for_path /dev/pmem0 30 || { echo no-pmem0; ls /sys/bus/nd/devices; exit 3; }
mkdir -p /mnt/region /mnt/nodax
cached() { sync; echo 3 > /proc/sys/vm/drop_caches; awk '/^Cached:/{print $2}' /proc/meminfo; }
"""
#: guest script lines making the (read-only) region device writable for root
MAKE_PMEM_WRITABLE = """echo 0 > /sys/bus/nd/devices/region0/read_only
for p in /sys/bus/nd/drivers/nd_pmem/pfn*; do
    n=$(basename $p); echo $n > /sys/bus/nd/drivers/nd_pmem/unbind
    echo $n > /sys/bus/nd/drivers/nd_pmem/bind
done
wait_for_path /dev/pmem0 10
"""


def dax_script(reg: Region, fstype: str) -> str:
    """Return the guest script that mounts ``reg``'s filesystem (``fstype``) -o ro,dax,
    runs a program with libc bound from it, reads its big file with and without DAX and
    prints what it saw (pfn devices, mounts, maps, Cached growth, kernel messages)."""
    libc, big = reg.libc["path"], reg.big["path"]
    return PRELUDE + f"""
for d in /sys/bus/nd/devices/pfn*; do
    echo "pfn_$(basename $d | tr . _)=$(cat $d/mode),$(cat $d/namespace),$(cat $d/align)"
done
echo pmem_dax=$(cat /sys/block/pmem0/queue/dax)
echo pmem_dev=$(cat /sys/block/pmem0/dev)
mount -t {fstype} -o ro,dax /dev/pmem0 /mnt/region; echo mount_rc=$?
echo mounts_dax=$(grep ' /mnt/region ' /proc/mounts)
echo libc_ino=$(stat -c %i /mnt/region{libc})
mount --bind /mnt/region{libc} /lib/x86_64-linux-gnu/libc.so.6; echo bind_rc=$?
/usr/bin/cat /proc/self/maps > /tmp/maps; echo run_rc=$?
grep libc.so.6 /tmp/maps | sed 's/^/maps: /'
c0=$(cached); cat /mnt/region{big} > /dev/null; c1=$(awk '/^Cached:/{{print $2}}' /proc/meminfo)
echo dax_delta_kb=$((c1 - c0))
echo dax_sha=$(sha256sum /mnt/region{big} | cut -d' ' -f1)
umount /lib/x86_64-linux-gnu/libc.so.6; umount /mnt/region
mount -t {fstype} -o ro /dev/pmem0 /mnt/nodax; echo nodax_rc=$?
echo mounts_nodax=$(grep ' /mnt/nodax ' /proc/mounts)
c0=$(cached); cat /mnt/nodax{big} > /dev/null; c1=$(awk '/^Cached:/{{print $2}}' /proc/meminfo)
echo nodax_delta_kb=$((c1 - c0))
umount /mnt/nodax
echo daxoff=$(dmesg | grep -ciE 'turning off dax|dax unsupported')
echo experimental=$(dmesg | grep -ci 'experimental')
dmesg | grep -iE 'dax|pfn|pmem|{fstype}' | sed 's/^/dmesg: /'
"""


def check_dax(reg: Region, res: Any) -> dict[str, str]:
    """Assert what :func:`dax_script` saw in the guest of result ``res``: an fsdax pfn
    device in RAM mode, a DAX mount, libc mapped from the pmem device, a DAX read adding
    nothing to the page cache and a non-DAX read adding the file; return its values."""
    print(res.console)
    assert res.rc == 0, res.console
    out = kv(res.output)
    # the kernel built an fsdax pfn device in RAM mode from our info block
    pfns = [v.split(",") for k, v in out.items() if k.startswith("pfn_")]
    assert ["ram", "namespace0.0", str(2 * 1024 * 1024)] in pfns, pfns
    assert out["pmem_dax"] == "1"
    assert out["mount_rc"] == "0"
    opts = out["mounts_dax"].split()[3].split(",")
    assert any(o.startswith("dax") for o in opts), out["mounts_dax"]
    assert out["daxoff"] == "0"
    # a dynamically linked program ran with libc mapped from the region (pmem0 device)
    assert out["bind_rc"] == "0" and out["run_rc"] == "0"
    major, minor = (int(x) for x in out["pmem_dev"].split(":"))
    maps = [line.split() for line in res.output.splitlines() if line.startswith("maps: ")]
    assert maps, res.output
    assert any("x" in m[2] for m in maps)          # the code segment
    for m in maps:
        dev_major, dev_minor = (int(x, 16) for x in m[4].split(":"))
        assert (dev_major, dev_minor) == (major, minor), m
        assert m[5] == out["libc_ino"], m
    # page cache: DAX reads add nothing, the non-DAX control adds the file
    big_kb = reg.big["size"] // 1024
    assert out["dax_sha"] == reg.big["sha256"]
    assert int(out["dax_delta_kb"]) < 1024, out
    assert "dax" not in out["mounts_nodax"].split()[3]
    assert int(out["nodax_delta_kb"]) > 0.9 * big_kb, (out, big_kb)
    print(f"Cached growth reading {big_kb} kB: DAX {out['dax_delta_kb']} kB, "
          f"non-DAX {out['nodax_delta_kb']} kB; dmesg: "
          + "; ".join(ln[8:] for ln in res.output.splitlines() if ln.startswith("dmesg: ")))
    return out


def test_region_is_fsdax_and_served_by_dax(libvirt_conn: Any, domain_name: Callable[[], str],
                                           guest_kernel: KernelPackage, built_region: Region) -> None:
    reg = built_region
    res = run_guest(libvirt_conn, domain_name(), dax_script(reg, "erofs"),
                    options(guest_kernel, reg), timeout=240)
    check_dax(reg, res)
    assert "DAX enabled" in res.output


@pytest.fixture(scope="module")
def ext4_region(built_region: Region) -> Iterator[Region]:
    """Yield the same files as ``built_region`` in a region on ext4 (``--fs ext4``),
    for its own test group."""
    reg = built_region
    cfg = reg.cfg
    res = build.build_region(cfg, GROUP + "-ext4", [reg.libc["sha256"], reg.big["sha256"]],
                             filesystem="ext4")
    assert verify.verify(res.path) is None
    with open(res.path, "rb") as fh:
        files = manifest.read_manifest(layout.open_filesystem(fh))["files"]
    yield Region(cfg, Path(res.path), res.digest, res.size,
                 next(f for f in files if f["soname"] == "libc.so.6"),
                 next(f for f in files if f["size"] >= MIN_BIG), 0)


def test_ext4_region_is_served_by_dax(libvirt_conn: Any, domain_name: Callable[[], str],
                                      guest_kernel: KernelPackage, ext4_region: Region) -> None:
    """The ext4 option: the same image layout and guarantees, mounted -o ro,dax by the
    6.1 kernel with no EXPERIMENTAL warning."""
    reg = ext4_region
    res = run_guest(libvirt_conn, domain_name(), dax_script(reg, "ext4"),
                    options(guest_kernel, reg, path=reg.path), timeout=240)
    out = check_dax(reg, res)
    assert out["experimental"] == "0", res.output


# ------------------------------------------------------------------ host-side memory views

@dataclass
class Mapping:
    """One mapping of the region file in a process."""

    start: int
    end: int
    pgoff: int
    fields: dict[str, int]


def region_mapping(pid: int, image: Path) -> Mapping:
    """Return ``pid``'s mapping of ``image`` (from /proc/PID/smaps)."""
    real = os.path.realpath(image)
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s+(.*)$")
    found: Mapping | None = None
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            m = head.match(line)
            if m:
                if found is not None:
                    break
                if m.group(4).removesuffix(" (deleted)") == real:
                    found = Mapping(int(m.group(1), 16), int(m.group(2), 16),
                                    int(m.group(3), 16), {})
            elif found is not None and line.endswith(" kB\n"):
                key, val = line.split(":", 1)
                found.fields[key] = int(val.split()[0])
    if found is None:
        raise AssertionError(f"QEMU {pid} does not map {real}")
    return found


def pfns(pid: int, mp: Mapping, file_off: int, pages: int) -> list[int | None]:
    """Return the host page frame of each page of ``mp`` from file offset ``file_off``
    (None where not present), read from /proc/PID/pagemap (root sees PFNs)."""
    vaddr = mp.start + file_off - mp.pgoff * PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(vaddr // PAGE * 8)
        data = fh.read(pages * 8)
    out: list[int | None] = []
    for i in range(pages):
        e = int.from_bytes(data[i * 8:i * 8 + 8], "little")
        out.append(e & ((1 << 55) - 1) if e >> 63 else None)
    return out


def test_two_guests_one_copy_and_private_writes(libvirt_conn: Any,
                                                domain_name: Callable[[], str],
                                                guest_kernel: KernelPackage,
                                                built_region: Region) -> None:
    reg = built_region
    libc, big, blk = reg.libc["path"], reg.big["path"], reg.big_blk
    use = f"""
mount -t erofs -o ro,dax /dev/pmem0 /mnt/region || exit 4
mount --bind /mnt/region{libc} /lib/x86_64-linux-gnu/libc.so.6 || exit 5
/usr/bin/cat /mnt/region{big} > /dev/null; echo run_rc=$?
echo sha=$(sha256sum /mnt/region{big} | cut -d' ' -f1)
"""
    writer = PRELUDE + use + f"""
echo before=$(dd if=/dev/pmem0 bs=4096 skip={blk} count=1 2>/dev/null | sha256sum | cut -c1-64)
umount /lib/x86_64-linux-gnu/libc.so.6; umount /mnt/region
# make the device writable for root in this guest, then overwrite a library block
""" + MAKE_PMEM_WRITABLE + f"""echo ro_after=$(cat /sys/block/pmem0/ro)
dd if=/dev/urandom of=/dev/pmem0 bs=4096 seek={blk} count=1 conv=fsync 2>/dev/null
echo dd_rc=$?
echo 3 > /proc/sys/vm/drop_caches
echo after=$(dd if=/dev/pmem0 bs=4096 skip={blk} count=1 2>/dev/null | sha256sum | cut -c1-64)
ready written
park
"""
    reader = PRELUDE + use + f"""
echo block=$(dd if=/dev/pmem0 bs=4096 skip={blk} count=1 2>/dev/null | sha256sum | cut -c1-64)
ready read
park
"""
    with running_guest(libvirt_conn, domain_name(), writer,
                       options(guest_kernel, reg)) as a:
        assert a.wait_ready(timeout=240) == "written", a.console()
        with running_guest(libvirt_conn, domain_name(), reader,
                           options(guest_kernel, reg)) as b:
            assert b.wait_ready(timeout=240) == "read", b.console()
            out_a, out_b = kv(a.result().output), kv(b.result().output)
            pid_a, pid_b = a.qemu_pid(), b.qemu_pid()
            assert pid_a and pid_b
            map_a, map_b = region_mapping(pid_a, reg.path), region_mapping(pid_b, reg.path)
            first = layout.DATAOFF + blk * PAGE
            npages = -(-reg.big["size"] // PAGE)
            pa, pb = pfns(pid_a, map_a, first, npages), pfns(pid_b, map_b, first, npages)
    print("A:", out_a, map_a.fields, "\nB:", out_b, map_b.fields)
    # both guests read the library through DAX and saw the right bytes
    assert out_a["run_rc"] == "0" and out_b["run_rc"] == "0"
    assert out_a["sha"] == reg.big["sha256"] == out_b["sha"]
    # each QEMU maps region pages that are shared with the other
    assert map_a.fields["Shared_Clean"] > 0 and map_b.fields["Shared_Clean"] > 0
    both = [(x, y) for x, y in zip(pa[1:], pb[1:], strict=True)
            if x is not None and y is not None]
    same = sum(1 for x, y in both if x == y)
    print(f"library pages present in both QEMUs: {len(both)}/{npages - 1}, "
          f"same host page: {same}; Shared_Clean A {map_a.fields['Shared_Clean']} kB, "
          f"B {map_b.fields['Shared_Clean']} kB; copied (Anonymous) A "
          f"{map_a.fields['Anonymous']} kB, B {map_b.fields['Anonymous']} kB")
    assert len(both) > 0.9 * (npages - 1)
    assert same == len(both)                       # one copy in the host page cache
    # the writer changed its own view only (a private copy-on-write page)
    assert out_a["ro_after"] == "0" and out_a["dd_rc"] == "0"
    assert out_a["after"] != out_a["before"]
    assert out_b["block"] == out_a["before"]
    assert pa[0] is not None and pb[0] is not None and pa[0] != pb[0]
    assert map_a.fields["Anonymous"] >= 4 and map_b.fields["Anonymous"] == 0
    assert sha256_file(reg.path) == reg.digest     # the host file never changed


@pytest.mark.parametrize("damage", ["checksum", "truncated", "library"])
def test_corrupt_image_refused(libvirt_conn: Any, domain_name: Callable[[], str],
                               guest_kernel: KernelPackage, built_region: Region, damage: str) -> None:
    reg = built_region
    bad = reg.path.parent / f"bad-{damage}-{secrets.token_hex(3)}.img"
    try:
        if damage == "checksum":
            corrupt_copy(reg.path, bad, offset=4096 + 2000)
            want = "checksum"
        elif damage == "truncated":
            corrupt_copy(reg.path, bad, size=reg.size - 2 * 1024 * 1024)
            want = "npfns"
        else:
            corrupt_copy(reg.path, bad, offset=layout.DATAOFF + reg.big_blk * PAGE + 4242)
            want = "SHA-256"
        # libshare region verify exits 1 with the first problem
        proc = subprocess.run([*LIBSHARE, "region", "verify", str(bad)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 1, proc
        assert want in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        # the hook's prepare check refuses to start a domain enrolled with it
        with pytest.raises(GuestError) as info:
            run_guest(libvirt_conn, domain_name(), "echo should-not-run\n",
                      options(guest_kernel, reg, path=bad, size=reg.size), timeout=60)
        msg = str(info.value)
        print(msg)
        assert "hook" in msg.lower(), msg
        # its quick structural check names a broken PFN block; the full digest, damage
        # inside a file
        hook_says = {"checksum": "bad checksum", "truncated": "bytes", "library": "digest"}
        assert hook_says[damage] in msg, msg
    finally:
        bad.unlink(missing_ok=True)
