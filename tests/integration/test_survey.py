"""Integration test of ``libshare survey`` against ground truth printed by the guest.

A busybox initramfs guest on Debian's kernel runs several dynamically linked host
programs (copied in with their libraries) and prints, every ~2 s, a snapshot of its task
list (pid + comm from /proc/*/stat) and of the unique ``.so`` paths in /proc/*/maps,
using only shell builtins so that printing creates no process. The test pauses the
guest between two snapshots, runs the survey, resumes; when the snapshots before and
after the pause agree, the survey must agree with them exactly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from libshare.demo.tiny.domain import DEFAULT_CMDLINE
from libshare.demo.tiny.kernel import KernelPackage
from libshare.demo.tiny.runner import GuestOptions, running_guest
from libshare.virt import api

pytestmark = pytest.mark.integration

PROGRAMS = ["/usr/bin/sleep", "/usr/bin/cat", "/usr/bin/tail", "/usr/bin/xz",
            "/usr/bin/openssl", "/usr/bin/zstd"]

# Only builtins between snapshots: read -t on a FIFO we hold open is the sleep.
GUEST_SCRIPT = r"""
. /etc/libshare.sh
read -r rel < /proc/sys/kernel/osrelease
echo "RELEASE $rel"
pti=off
while read -r key rest; do
    case "$key" in flags) case " $rest " in *" pti "*) pti=on ;; esac ;; esac
done < /proc/cpuinfo
echo "PTI $pti"
mkfifo /tmp/tick
exec 3<>/tmp/tick
/usr/bin/sleep 100000 &
/usr/bin/sleep 100001 | /usr/bin/cat >/dev/null &
/usr/bin/tail -f /dev/null &
/usr/bin/sleep 100002 | /usr/bin/xz -dc >/dev/null &
/usr/bin/sleep 100003 | /usr/bin/openssl dgst -sha256 >/dev/null &
/usr/bin/sleep 100004 | /usr/bin/zstd -dc >/dev/null &
read -t 3 -u 3 x
n=0
while :; do
    n=$((n + 1))
    echo "SNAP-BEGIN $n"
    for d in /proc/[0-9]*; do
        read -r line < "$d/stat" 2>/dev/null && echo "TASK $line"
    done
    seen=" "
    for d in /proc/[0-9]*; do
        while read -r a b c e f p; do
            case "$p" in
            *.so*) case "$seen" in
                   *" $p "*) ;;
                   *) seen="$seen$p "; echo "LIB $p" ;;
                   esac ;;
            esac
        done < "$d/maps" 2>/dev/null
    done
    echo "SNAP-END $n"
    [ "$n" = 1 ] && ready
    read -t 2 -u 3 x
done
"""

def proc_comm(comm: str) -> str:
    """Return the task's ``comm`` (what the survey reads: ``task_struct.comm``, at most
    15 bytes) for a name from /proc/PID/stat, which shows kernel threads' full names
    and appends "-<workqueue>" to a kworker's."""
    if comm.startswith("kworker/"):
        comm = comm.split("-", 1)[0]
    return comm[:15]


def idle_sign(name: str) -> str:
    """Return a /proc name without a workqueue worker's "+desc"/"-desc" suffix: whether
    it is busy, and which workqueue it last served, are matters of the instant (a
    snapshot and the survey seconds later may differ)."""
    return re.sub(r"^(kworker/[^+-]*)[+-].*$", r"\1", name)


_SNAP = re.compile(r"^SNAP-BEGIN (\d+)\n(.*?)^SNAP-END \1$", re.M | re.S)
_TASK = re.compile(r"^TASK (\d+) \((.*)\) \S")


def guest_facts(console: str) -> dict[str, str]:
    """Return what the guest said of itself before its first snapshot: ``release``
    (/proc/sys/kernel/osrelease) and ``pti`` ("on" when its CPU flags in /proc/cpuinfo
    list "pti", the kernel's page-table isolation, else "off")."""
    rel = re.search(r"^RELEASE (\S+)$", console, re.M)
    pti = re.search(r"^PTI (on|off)$", console, re.M)
    assert rel and pti, console[-2000:]
    return {"release": rel.group(1), "pti": pti.group(1)}


def snapshots(console: str) -> dict[int, tuple[set[tuple[int, str]], set[str]]]:
    """Return ``{n: (tasks, libraries)}`` for every complete snapshot on the console."""
    out = {}
    for m in _SNAP.finditer(console):
        tasks, libs = set(), set()
        for line in m.group(2).splitlines():
            t = _TASK.match(line)
            if t:
                tasks.add((int(t.group(1)), t.group(2)))
            elif line.startswith("LIB "):
                libs.add(line[4:])
        out[int(m.group(1))] = (tasks, libs)
    return out


def latest(guest: Any) -> int:
    """Return the number of the newest complete snapshot (0 if none)."""
    snaps = snapshots(guest.console())
    return max(snaps) if snaps else 0


def wait_snapshot_after(guest: Any, n: int, timeout: float = 60.0) -> int:
    """Wait until a snapshot numbered above ``n`` is complete; return its number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = latest(guest)
        if last > n:
            return last
        time.sleep(0.2)
    raise AssertionError(f"no snapshot after {n}:\n{guest.console()[-2000:]}")


def run_survey(name: str | list[str], *extra: str) -> dict[str, Any]:
    """Run ``libshare survey NAME... --json EXTRA...`` as a user would; return the
    parsed JSON."""
    names = [name] if isinstance(name, str) else name
    proc = subprocess.run([sys.executable, "-m", "libshare", "survey", *names, "--json", *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr or [d["errors"] for d in
                                                 json.loads(proc.stdout)["domains"]]
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def survey_against_guest(libvirt_conn: Any, name: str, kernel: KernelPackage,
                         customize: Sequence[Callable[[Any], object]] = (),
                         cmdline: str = DEFAULT_CMDLINE
                         ) -> tuple[dict[str, Any], dict[str, str]]:
    """Compare ``libshare survey`` of a paused guest with what the guest printed;
    return the survey's domain object and :func:`guest_facts`."""
    options = GuestOptions(kernel=kernel, binaries=PROGRAMS, memory_mib=256,
                           customize=list(customize), cmdline=cmdline)
    with running_guest(libvirt_conn, name, GUEST_SCRIPT, options) as guest:
        guest.wait_ready(timeout=120)
        for _attempt in range(4):
            before = wait_snapshot_after(guest, latest(guest))
            guest.domain.suspend()
            try:
                doc = run_survey(name)
            finally:
                guest.domain.resume()
            after = wait_snapshot_after(guest, before + 1)
            snaps = snapshots(guest.console())
            # 'after' began after the resume only if it is at least two past 'before'
            after = wait_snapshot_after(guest, before + 1) if after < before + 2 else after
            if snaps[before] == snapshots(guest.console())[after]:
                break
        else:
            pytest.fail("the guest's task list kept changing; no stable snapshot")
        tasks, libs = snaps[before]
        facts = guest_facts(guest.console())
        dom = doc["domains"][0]
        print(f"survey of {name}: {dom['tasks']} tasks, {len(dom['libraries'])} libraries, "
              f"{dom['wall_seconds']}s wall, {dom['cpu_seconds']}s CPU, "
              f"kernel {dom['kernel']}")
        assert dom["name"] == name
        assert dom["kernel"] == kernel.release == facts["release"]
        assert not dom["partial"], dom["errors"]
        # /proc names (kernel threads' full names, workers' descriptions) and comms
        got_names = {(t["pid"], idle_sign(t["name"])) for t in dom["task_list"]}
        assert got_names == {(pid, idle_sign(name)) for pid, name in tasks}
        got_comms = {(t["pid"], t["comm"]) for t in dom["task_list"]}
        assert got_comms == {(pid, proc_comm(name)) for pid, name in tasks}
        assert dom["tasks"] == len(tasks)
        got_libs = {lib["path"] for lib in dom["libraries"]}
        assert got_libs == libs
        assert len(libs) >= 7  # libc, ld.so, liblzma, libssl, libcrypto, libz, liblz4...
        assert sum(1 for _, name in tasks if name in ("sleep", "cat", "xz", "zstd")) >= 8
        # Every library is mapped by a running program, so some of it is resident; the
        # libc's ELF header page is mapped by many processes: its build-id must be read.
        assert all(lib["resident_pages"] > 0 for lib in dom["libraries"])
        libc = [lib for lib in dom["libraries"] if "/libc.so" in lib["path"]]
        assert libc and re.fullmatch(r"[0-9a-f]{40}", libc[0]["build_id"] or "")
        # A second survey uses the per-boot cache (no RAM scan); --pause pauses the
        # guest for the walk and always resumes it.
        import libvirt

        again = run_survey(name, "--pause")["domains"][0]
        assert again["scanned"] is False
        assert again["kernel"] == kernel.release
        assert {lib["path"] for lib in again["libraries"]} == libs
        assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        return dom, facts


def test_survey_matches_guest_debian12(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    dom, facts = survey_against_guest(libvirt_conn, domain_name(), guest_kernel)
    assert facts["release"].startswith("6.1.")  # Debian 12's kernel: VMAs in a maple tree
    assert facts["pti"] == "off"  # mitigations=off
    assert dom["paging_levels"] == 4


def test_survey_matches_guest_with_pti(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    """The same comparison with kernel page-table isolation on (``pti=on``, no
    ``mitigations=off``): each process has a user/kernel PGD pair; the guest's CPU flags
    prove PTI is on."""
    cmdline = DEFAULT_CMDLINE.replace("mitigations=off", "pti=on")
    assert "pti=on" in cmdline and "mitigations=off" not in cmdline
    dom, facts = survey_against_guest(libvirt_conn, domain_name(), guest_kernel,
                                      cmdline=cmdline)
    assert facts["pti"] == "on" and facts["release"].startswith("6.1.")
    assert dom["paging_levels"] == 4


def test_survey_refuses_domain_not_running(libvirt_conn: Any) -> None:
    proc = subprocess.run([sys.executable, "-m", "libshare", "survey", "lstest-no-such-domain"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("libshare: ") and len(proc.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def bullseye_kernel() -> KernelPackage:
    """Return Debian 11's 5.10 kernel (VMAs in a linked list, before the maple tree)."""
    from libshare.demo.tiny.kernel import KernelPackageError, fetch_kernel

    try:
        return fetch_kernel(suite="bullseye")
    except KernelPackageError as exc:
        pytest.skip(f"Debian 11 kernel unavailable: {exc}")


def test_survey_matches_guest_debian11(
    libvirt_conn: Any, domain_name: Callable[[], str], bullseye_kernel: KernelPackage
) -> None:
    assert bullseye_kernel.release.startswith("5.10.")
    _dom, facts = survey_against_guest(libvirt_conn, domain_name(), bullseye_kernel)
    assert facts["release"].startswith("5.10.")  # VMAs in a linked list


def test_libvmi_crosscheck(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    """Two independent readers of the same paused guest give the same survey: the
    default one (/proc/PID/mem of QEMU) and LibVMI in FILE mode opened directly on the
    shared memfd backing the guest's RAM (nothing of libshare's reading in between);
    LibVMI's own page-table walk reads the same bytes as ours at every resident ELF
    header page of every process."""
    pytest.importorskip("libvmi")
    from libshare.introspect import qemu
    from libshare.introspect.discover import find_kernel
    from libshare.introspect.helpers.mm import for_each_vma, mm_pgd, read_user
    from libshare.introspect.helpers.tasks import for_each_task, task_info
    from libshare.introspect.kernel import Kernel as GuestKernel
    from libshare.introspect.survey import domain_json, walk_kernel
    from libshare.introspect.vmi import VmiMemory, vmi_read_va

    name = domain_name()
    options = GuestOptions(kernel=guest_kernel, binaries=PROGRAMS, memory_mib=256,
                           customize=[_shared_memfd])
    with running_guest(libvirt_conn, name, GUEST_SCRIPT, options) as guest:
        guest.wait_ready(timeout=120)
        dom = api.running_domain(libvirt_conn, name)
        path, blocks = qemu.ram_file(dom)
        # 256 MiB: one block, file offset = guest-physical (LibVMI's walk relies on it)
        assert [(b.start, b.backing_offset) for b in blocks] == [(0, 0)]
        assert path.startswith("/proc/") and "/map_files/" in path
        with qemu.paused(dom, timeout=600):
            proc = qemu.open_memory(dom)
            vmi = VmiMemory(path, blocks=blocks)
            try:
                assert proc.ram_ranges() == vmi.ram_ranges()
                k1 = GuestKernel(proc, find_kernel(proc))
                s1 = domain_json(walk_kernel(k1, name))
                k2 = GuestKernel(vmi, find_kernel(vmi))
                s2 = domain_json(walk_kernel(k2, name))
                assert k1.info.init_task == k2.info.init_task
                assert k1.info.page_offset_base == k2.info.page_offset_base
                compared = 0
                for t in map(lambda a: task_info(k1, a), for_each_task(k1)):
                    if not t.mm:
                        continue
                    pgd = mm_pgd(k1, t.mm)
                    for vma in for_each_vma(k1, t.mm):
                        if not vma.file or vma.pgoff:
                            continue
                        ours = read_user(k1, pgd, vma.start, 4096)
                        theirs = vmi_read_va(vmi, pgd, vma.start, 4096)
                        assert ours == theirs, (t.pid, hex(vma.start))
                        compared += ours is not None
            finally:
                vmi.close()
                proc.close()
        for key in ("wall_seconds", "cpu_seconds"):
            s1.pop(key), s2.pop(key)
        assert s1 == s2
        assert len(s1["libraries"]) >= 7
        assert compared >= 10


def _shared_memfd(dom: Any) -> None:
    """Back the guest's RAM with a shared memfd (libvirt ``<memoryBacking>``)."""
    from lxml import etree

    mb = etree.SubElement(dom, "memoryBacking")
    etree.SubElement(mb, "source", type="memfd")
    etree.SubElement(mb, "access", mode="shared")


def test_file_backend_and_running_guest(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage, tmp_path: Any
) -> None:
    """Guest RAM in a shared memfd: the file backend (mmap of the memfd) and the default
    backend agree on a paused guest, and so does a survey given an offsets file instead
    of the guest's BTF; on a guest that keeps forking, an unpaused survey still completes
    (torn walks are retried) with the long-lived tasks in it; the table output names the
    domain and its libraries."""
    import libvirt

    from libshare.introspect import qemu
    from libshare.introspect.discover import find_kernel

    name = domain_name()
    script = GUEST_SCRIPT.replace("read -t 3 -u 3 x\n", (
        "read -t 3 -u 3 x\n"
        "( while :; do /usr/bin/sleep 0.01; done ) &\n"), 1)
    options = GuestOptions(kernel=guest_kernel, binaries=PROGRAMS, memory_mib=256,
                           customize=[_shared_memfd])
    with running_guest(libvirt_conn, name, script, options) as guest:
        guest.wait_ready(timeout=120)
        for _ in range(3):  # unpaused, while the guest forks and execs all the time
            doc = run_survey(name, "--no-cache")
            dom = doc["domains"][0]
            comms = {t["comm"] for t in dom["task_list"]}
            assert {"init", "kthreadd", "xz", "zstd", "openssl"} <= comms
        guest.domain.suspend()
        try:
            by_file = run_survey(name, "--backend", "file")["domains"][0]
            by_proc = run_survey(name, "--backend", "proc")["domains"][0]
            mem = qemu.open_memory(api.running_domain(libvirt_conn, name))
            try:
                layout = find_kernel(mem).layout
            finally:
                mem.close()
            offsets = tmp_path / "offsets.json"
            offsets.write_text(json.dumps(layout.to_json()))
            by_offsets = run_survey(name, "--offsets", str(offsets), "--no-cache")["domains"][0]
            table = subprocess.run([sys.executable, "-m", "libshare", "survey", name],
                                   capture_output=True, text=True, timeout=300)
        finally:
            guest.domain.resume()
        assert table.returncode == 0, table.stderr
        assert table.stdout.startswith("DOMAIN") and name in table.stdout
        assert "/lib/x86_64-linux-gnu/libc.so.6" in table.stdout
        for d in (by_file, by_proc, by_offsets):
            for key in ("wall_seconds", "cpu_seconds", "scanned"):
                d.pop(key)
        assert by_file == by_proc
        assert by_offsets["task_list"] == by_proc["task_list"]
        assert by_offsets["libraries"] == by_proc["libraries"]
        assert len(by_file["libraries"]) >= 7
        assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def _la57_cpu(dom: Any) -> None:
    """Give the guest a CPU with 5-level paging (TCG emulates LA57)."""
    from lxml import etree

    for old in dom.findall("cpu"):
        dom.remove(old)
    cpu = etree.SubElement(dom, "cpu", mode="custom", match="exact")
    etree.SubElement(cpu, "model", fallback="allow").text = "qemu64"
    etree.SubElement(cpu, "feature", policy="require", name="la57")


def test_survey_matches_guest_5_level_paging(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    """The same ground-truth comparison on a CPU with LA57: Debian's kernel then runs
    5-level page tables and a direct map at 0xff11... (not 4-level canonical)."""
    dom, _facts = survey_against_guest(libvirt_conn, domain_name(), guest_kernel,
                                       customize=[_la57_cpu])
    assert dom["paging_levels"] == 5


def test_survey_two_domains(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    """One command surveys two guests (paused in turn): each library used by both shows
    two copies, and one shared copy would save the smaller one's shareable pages."""
    import libvirt

    options = GuestOptions(kernel=guest_kernel, binaries=PROGRAMS, memory_mib=256)
    a, b = domain_name(), domain_name()
    with running_guest(libvirt_conn, a, GUEST_SCRIPT, options) as ga, \
            running_guest(libvirt_conn, b, GUEST_SCRIPT, options) as gb:
        ga.wait_ready(timeout=180)
        gb.wait_ready(timeout=180)
        doc = run_survey([a, b], "--pause")
        assert [d["name"] for d in doc["domains"]] == [a, b]
        by_id = {g["build_id"]: g for g in doc["libraries"]}
        libc = next(g for g in doc["libraries"] if "/libc.so" in g["path"])
        assert libc["copies"] == 2 and sorted(libc["domains"]) == sorted([a, b])
        shared = [next(lib["shared_pages"] for lib in d["libraries"]
                       if lib["build_id"] == libc["build_id"]) for d in doc["domains"]]
        assert libc["saved_bytes"] == min(shared) * 4096 > 0
        assert doc["total_saved_bytes"] == sum(g["saved_bytes"] for g in by_id.values())
        savings = [g["saved_bytes"] for g in doc["libraries"]]
        assert savings == sorted(savings, reverse=True)
        for g in (ga, gb):
            assert g.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
