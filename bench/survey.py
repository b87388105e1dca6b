"""Benchmark: ``libshare survey`` wall and CPU time on a running guest.

Measures, on one running TCG guest (a busybox guest on Debian's kernel with dynamically
linked programs and ``--extra`` more sleeping processes, booted here and always removed,
or an existing running domain given by name):

1. the first survey of a boot: scanning guest RAM for the kernel's BTF, ``init_task``
   and the banner, then the walk (``cold``);
2. later surveys, the kernel found from the per-boot cache (``warm``), median of
   ``--runs``; the same with ``--pause`` (suspend/resume around the walk);
3. the whole command line ``python -m libshare survey DOMAIN --json`` as a user runs it
   (interpreter start-up included), median of 3, CPU from the child's rusage.

``--peer drgn`` instead answers the same question with a peer tool, once, on the same
moment of the same guest (by default the systemd Debian 12 guest of
:mod:`libshare.demo.debian.guest` with ``--extra`` sleeping processes, ~75 tasks; with
``--guest busybox`` the busybox guest), the guest given a ``vmcoreinfo`` device so that
its dump says where its kernel is. With the guest paused: ``libshare survey`` (first
survey of the boot, then cached, in process; then the whole command line), and ``virsh
dump --memory-only --format elf``; then, on that dump, a drgn script listing the
thread-group leaders and the ``.so`` paths of their file-backed VMAs
(``for_each_task``, ``for_each_vma``, ``d_path``) with the kernel's debug info from
Debian's ``linux-image-<release>-dbg`` (``apt-get download``, cached with the extracted
vmlinux under /var/cache/libshare/dbg/: ~850 MB). Prints both times, the ratio, and
whether both tools found the same tasks and libraries. drgn comes from PyPI through the
``bench`` extra (``pip install -e '.[bench]'``); it is no dependency of libshare.

Needs root and a running system libvirtd. Usage (from the project root):
``.venv/bin/python -m bench.survey [DOMAIN] [--runs N] [--extra N] [--json]``
``.venv/bin/python -m bench.survey --peer drgn [--guest debian|busybox]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import machine, median, print_header, reproduce_command
from libshare.virt import api

DBG_CACHE = Path("/var/cache/libshare/dbg")
#: The extra sleeping processes that bring each guest to ~75 tasks.
EXTRA_FOR_75 = {"busybox": 20, "debian": 17}

PROGRAMS = ["/usr/bin/sleep", "/usr/bin/cat", "/usr/bin/tail", "/usr/bin/xz",
            "/usr/bin/openssl", "/usr/bin/zstd"]


def guest_script(extra: int) -> str:
    """Return the bench guest's /test.sh: programs that block forever, then ``ready``."""
    lines = [". /etc/libshare.sh",
             "/usr/bin/sleep 100000 | /usr/bin/cat >/dev/null &",
             "/usr/bin/tail -f /dev/null &",
             "/usr/bin/sleep 100001 | /usr/bin/xz -dc >/dev/null &",
             "/usr/bin/sleep 100002 | /usr/bin/openssl dgst -sha256 >/dev/null &",
             "/usr/bin/sleep 100003 | /usr/bin/zstd -dc >/dev/null &"]
    lines += [f"/usr/bin/sleep {200000 + i} &" for i in range(extra)]
    lines += ["sleep 2", "ready", "park"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def bench_guest(conn: Any, extra: int) -> Iterator[str]:
    """Boot the bench guest (named ``lstest-p<PID>-bench-survey``, always removed) and
    yield its name once its programs run."""
    from libshare.demo.tiny.runner import GuestOptions, running_guest

    name = f"lstest-p{os.getpid()}-bench-survey"
    options = GuestOptions(binaries=PROGRAMS, memory_mib=256)
    with running_guest(conn, name, guest_script(extra), options) as guest:
        guest.wait_ready(timeout=180)
        yield name


def _vmcoreinfo(dom: Any) -> None:
    """Give the guest QEMU's vmcoreinfo device: its kernel (qemu_fw_cfg) then tells
    QEMU where its VMCOREINFO is, and ``virsh dump`` writes it into the dump."""
    from lxml import etree

    features = dom.find("features")
    if features is None:
        features = etree.SubElement(dom, "features")
    etree.SubElement(features, "vmcoreinfo", state="on")


@contextlib.contextmanager
def peer_guest(conn: Any, kind: str, extra: int) -> Iterator[tuple[str, str]]:
    """Boot the peer-benchmark guest of ``kind`` (``debian`` or ``busybox``, named
    ``lstest-p<PID>-bench-peer``, always removed) with ``extra`` sleeping processes;
    yield its name and the Debian version of its kernel package, once it is idle."""
    name = f"lstest-p{os.getpid()}-bench-peer"
    if kind == "busybox":
        from libshare.demo.tiny.kernel import DEFAULT_MODULES, fetch_kernel
        from libshare.demo.tiny.runner import GuestOptions, running_guest

        kernel = fetch_kernel()
        busybox = GuestOptions(kernel=kernel, binaries=PROGRAMS, memory_mib=512,
                               modules=[*DEFAULT_MODULES, "qemu_fw_cfg"],
                               customize=[_vmcoreinfo])
        with running_guest(conn, name, guest_script(extra), busybox) as guest:
            guest.wait_ready(timeout=180)
            yield name, kernel.version
        return
    from libshare.demo.debian.guest import DebianGuestOptions, running_debian_guest

    debian = DebianGuestOptions(memory_mib=512, customize=[_vmcoreinfo])
    with running_debian_guest(conn, name, debian) as dguest:
        dguest.exec(["systemctl", "is-system-running", "--wait"], timeout=180)
        dguest.exec(["/bin/sh", "-c", f"for i in $(seq {extra}); do "
                     "sleep $((200000 + i)) </dev/null >/dev/null 2>&1 & done"], check=True)
        dguest.exec(["modprobe", "qemu_fw_cfg"], check=True)  # udev loads it; make sure
        time.sleep(5)
        yield name, dguest.image.kernel_version


def debug_vmlinux(release: str, version: str, cache: Path = DBG_CACHE) -> Path:
    """Return the vmlinux with debug info of Debian kernel ``release`` (package version
    ``version``): ``apt-get download linux-image-<release>-dbg=<version>`` into
    ``cache`` and ``dpkg --fsys-tarfile`` + ``tar`` of the vmlinux alone, both kept."""
    out = cache / f"vmlinux-{release}_{version}"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    package = f"linux-image-{release}-dbg"
    deb = cache / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=cache,
                       check=True, capture_output=True)
    member = f"./usr/lib/debug/boot/vmlinux-{release}"
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tar = subprocess.Popen(["tar", "-x", "-C", tmp, member], stdin=subprocess.PIPE)
        subprocess.run(["dpkg", "--fsys-tarfile", str(deb)], stdout=tar.stdin, check=True)
        assert tar.stdin is not None
        tar.stdin.close()
        if tar.wait() != 0:
            raise RuntimeError(f"no {member} in {deb}")
        os.replace(Path(tmp) / member, out)
    return out


#: Run by a fresh interpreter: ``python -c DRGN_SCRIPT DUMP VMLINUX``; prints JSON.
DRGN_SCRIPT = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import drgn
from drgn.helpers.linux.fs import d_path
from drgn.helpers.linux.mm import for_each_vma
from drgn.helpers.linux.pid import for_each_task
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.load_debug_info([sys.argv[2]])
t1, c1 = time.perf_counter(), time.process_time()
tasks, libs = [], set()
for task in for_each_task(prog):
    if task.pid.value_() != task.tgid.value_():
        continue
    tasks.append((task.pid.value_(), task.comm.string_().decode()))
    if not task.mm:
        continue
    for vma in for_each_vma(task.mm):
        if vma.vm_file:
            path = d_path(vma.vm_file.f_path).decode()
            if ".so" in path:
                libs.add(path)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"load": t1 - t0, "walk": t2 - t1, "load_cpu": c1 - c0, "walk_cpu": c2 - c1, "tasks": tasks, "libraries": sorted(libs),
                  "release": prog["init_uts_ns"].name.release.string_().decode()}))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; return its wall and CPU (rusage of the child) seconds and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, proc.stdout


def measure_peer(conn: Any, name: str, vmlinux: Path, runs: int) -> dict[str, Any]:
    """Survey paused domain ``name`` with libshare (cached surveys: median of ``runs``)
    and dump it; run the drgn script on the dump; return both timings and whether both
    found the same tasks and libraries."""
    from libshare.introspect import qemu
    from libshare.introspect.survey import survey_domain

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lsbench-", dir="/var/tmp") as tmp:
        cache_dir = Path(tmp) / "state"
        dump = Path(tmp) / "guest.elf"
        dom = api.running_domain(conn, name)
        with qemu.paused(dom, timeout=600):
            cold = survey_domain(conn, name, cache_dir=cache_dir / "introspect")
            warms = [survey_domain(conn, name, cache_dir=cache_dir / "introspect")
                     for _ in range(runs)]
            warm = warms[-1]
            env = dict(os.environ, LIBSHARE_STATE_DIR=str(cache_dir))
            cli_cold = timed([sys.executable, "-m", "libshare", "survey", name, "--json",
                              "--no-cache"], env)
            cli = timed([sys.executable, "-m", "libshare", "survey", name, "--json"], env)
            t0 = time.perf_counter()
            subprocess.run(["virsh", "-c", "qemu:///system", "dump", "--memory-only",
                            "--format", "elf", name, str(dump)], check=True,
                           capture_output=True)
            out["dump_seconds"] = time.perf_counter() - t0
        out["dump_bytes"] = dump.stat().st_size
        wall, cpu, text = timed([sys.executable, "-c", DRGN_SCRIPT, str(dump), str(vmlinux)])
        peer = json.loads(text)
    cli_doc = json.loads(cli[2])["domains"][0]
    ours_tasks = {(pid, comm) for pid, comm, _ in warm.task_list}
    ours_libs = {lib.path for lib in warm.libraries}
    peer_tasks = {(pid, comm) for pid, comm in peer["tasks"]}
    peer_libs = set(peer["libraries"])
    out.update(
        kernel=warm.kernel, tasks=warm.tasks, threads=warm.threads,
        libraries=len(warm.libraries), partial=warm.partial or cold.partial,
        cold={"wall": cold.wall_seconds, "cpu": cold.cpu_seconds},
        warm={"wall": median([w.wall_seconds for w in warms]),
              "cpu": median([w.cpu_seconds for w in warms])},
        cli_cold={"wall": cli_cold[0], "cpu": cli_cold[1]},
        cli={"wall": cli[0], "cpu": cli[1]},
        drgn={"wall": wall, "cpu": cpu, "load": peer["load"], "walk": peer["walk"],
              "load_cpu": peer["load_cpu"], "walk_cpu": peer["walk_cpu"],
              "tasks": len(peer_tasks), "libraries": len(peer_libs),
              "release": peer["release"]},
        same_release=peer["release"] == warm.kernel,
        same_tasks=ours_tasks == peer_tasks, same_libraries=ours_libs == peer_libs,
        cli_agrees=({(t["pid"], t["comm"]) for t in cli_doc["task_list"]} == ours_tasks
                    and {lib["path"] for lib in cli_doc["libraries"]} == ours_libs),
        only_libshare={"tasks": sorted(ours_tasks - peer_tasks),
                       "libraries": sorted(ours_libs - peer_libs)},
        only_drgn={"tasks": sorted(peer_tasks - ours_tasks),
                   "libraries": sorted(peer_libs - ours_libs)},
    )
    return out


def peer_main(args: argparse.Namespace) -> int:
    """Run the ``--peer drgn`` benchmark; print its report (or JSON)."""
    import libvirt

    try:
        import drgn  # noqa: F401
    except ImportError:
        print("drgn is not installed: pip install -e '.[bench]' (from the project root, "
              "into this interpreter's venv)", file=sys.stderr)
        return 2
    if shutil.which("virsh") is None:
        print("virsh not found", file=sys.stderr)
        return 2
    conn = libvirt.open("qemu:///system")
    if args.guest == "debian" and importlib.util.find_spec("libshare.demo.debian.guest") is None:
        print("libshare.demo.debian.guest is not there: using the busybox guest", file=sys.stderr)
        args.guest = "busybox"
    extra = EXTRA_FOR_75[args.guest] if args.extra is None else args.extra
    with peer_guest(conn, args.guest, extra) as (name, version):
        release = qemu_release(conn, name)
        t0 = time.perf_counter()
        vmlinux = debug_vmlinux(release, version)
        fetch = time.perf_counter() - t0
        result = measure_peer(conn, name, vmlinux, args.runs)
    result.update(domain=f"booted {args.guest} guest", vmlinux=str(vmlinux),
                  debug_info_seconds=fetch)
    drgn_wall = result["drgn"]["wall"]
    result["ratios"] = {
        "cold": drgn_wall / result["cli_cold"]["wall"],
        "cold_with_dump": (drgn_wall + result["dump_seconds"]) / result["cli_cold"]["wall"],
        "cached": drgn_wall / result["cli"]["wall"],
        "walk": result["drgn"]["walk"] / result["warm"]["wall"],
        "walk_cpu": result["drgn"]["walk_cpu"] / result["warm"]["cpu"]}
    if args.json:
        print(json.dumps({"command": reproduce_command("bench.survey"), "machine": machine(),
                          "result": result}, indent=2))
        return 0
    print_header("libshare survey against drgn on a dump of the same paused guest",
                 "bench.survey")
    r = result
    print(f"guest: {r['domain']}, kernel {r['kernel']}, {r['tasks']} tasks ({r['threads']} "
          f"threads), {r['libraries']} libraries{', PARTIAL' if r['partial'] else ''}")
    print(f"debug info: {vmlinux} (ready in {fetch:.1f} s); dump "
          f"{r['dump_bytes'] / 2**20:.0f} MiB in {r['dump_seconds']:.1f} s (not counted)")
    rows = [("libshare survey, first of the boot (RAM scan + walk), in process", r["cold"]),
            (f"libshare survey, kernel cached, in process, median of {args.runs}", r["warm"]),
            ("libshare survey --json --no-cache, whole command line", r["cli_cold"]),
            ("libshare survey --json, whole command line (cached)", r["cli"]),
            ("drgn on the dump, whole command line", r["drgn"])]
    for text, t in rows:
        print(f"{text:66s} wall {t['wall'] * 1000:8.1f} ms   CPU {t['cpu'] * 1000:8.1f} ms")
    d = r["drgn"]
    print(f"{'  of which drgn load (core dump + vmlinux debug info)':66s} wall "
          f"{d['load'] * 1000:8.1f} ms   CPU {d['load_cpu'] * 1000:8.1f} ms")
    print(f"{'  of which drgn walk (tasks, VMAs, d_path)':66s} wall "
          f"{d['walk'] * 1000:8.1f} ms   CPU {d['walk_cpu'] * 1000:8.1f} ms")
    ratios = r["ratios"]
    print(f"ratio drgn / libshare, whole command lines, nothing cached: "
          f"{ratios['cold']:.2f}x wall ({ratios['cold_with_dump']:.2f}x counting the dump drgn "
          f"needs), {d['cpu'] / r['cli_cold']['cpu']:.2f}x CPU")
    print(f"ratio drgn / libshare, whole command lines, libshare's per-boot cache warm: "
          f"{ratios['cached']:.2f}x wall")
    print(f"ratio drgn walk / libshare survey (kernel cached, in process): "
          f"{ratios['walk']:.2f}x wall, {ratios['walk_cpu']:.2f}x CPU")
    print(f"agreement: tasks {'same' if r['same_tasks'] else 'DIFFERENT'} "
          f"({r['tasks']} libshare, {d['tasks']} drgn), libraries "
          f"{'same' if r['same_libraries'] else 'DIFFERENT'} ({r['libraries']} libshare, "
          f"{d['libraries']} drgn); command line agrees with in-process survey: "
          f"{'yes' if r['cli_agrees'] else 'NO'}; kernel release "
          f"{'same' if r['same_release'] else 'DIFFERENT: ' + d['release']}")
    if not (r["same_tasks"] and r["same_libraries"]):
        print(f"only libshare: {r['only_libshare']}\nonly drgn: {r['only_drgn']}")
    return 0 if r["same_tasks"] and r["same_libraries"] else 1


def qemu_release(conn: Any, name: str) -> str:
    """Return the guest kernel's release as the survey reads it from guest memory."""
    from libshare.introspect.survey import survey_domain

    release = survey_domain(conn, name).kernel
    if not re.fullmatch(r"[0-9][\w.+-]*", release):
        raise RuntimeError(f"unexpected kernel release {release!r}")
    return release


def measure(conn: Any, name: str, runs: int) -> dict[str, Any]:
    """Return the timings (seconds) and counts of surveys of running domain ``name``."""
    from libshare.introspect.survey import survey_domain

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lsbench-") as cache:
        cache_dir = Path(cache)
        cold = survey_domain(conn, name, cache_dir=cache_dir)
        assert cold.scanned
        out["cold"] = {"wall": cold.wall_seconds, "cpu": cold.cpu_seconds}
        out["tasks"], out["threads"] = cold.tasks, cold.threads
        out["libraries"] = len(cold.libraries)
        out["kernel"] = cold.kernel
        out["partial"] = cold.partial
        for label, pause in (("warm", False), ("warm_paused", True)):
            walls, cpus = [], []
            for _ in range(runs):
                s = survey_domain(conn, name, pause=pause, cache_dir=cache_dir)
                assert not s.scanned
                walls.append(s.wall_seconds)
                cpus.append(s.cpu_seconds)
            out[label] = {"wall": median(walls), "cpu": median(cpus),
                          "wall_min": min(walls), "wall_max": max(walls)}
        walls, cpus = [], []
        env = dict(os.environ, LIBSHARE_STATE_DIR=str(cache_dir))
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "libshare", "survey", name, "--json"],
                           check=True, capture_output=True, env=env)
            walls.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out["cli"] = {"wall": median(walls), "cpu": median(cpus)}
    return out


def main() -> int:
    """Run the benchmark; print a report (or JSON); return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("domain", nargs="?", help="an existing running domain (default: boot one)")
    ap.add_argument("--runs", type=int, default=10, help="warm surveys to time (median)")
    ap.add_argument("--extra", type=int, default=None,
                    help="extra sleeping processes in the booted guest (default: ~75 tasks, "
                    "20 in the busybox guest, 17 in the Debian one)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--peer", choices=("drgn",),
                    help="compare with a peer tool on a dump of the same paused guest")
    ap.add_argument("--guest", choices=("debian", "busybox"), default="debian",
                    help="the guest --peer boots (default: the systemd Debian 12 guest)")
    args = ap.parse_args()
    if args.peer:
        return peer_main(args)
    if args.extra is None:
        args.extra = EXTRA_FOR_75["busybox"]

    import libvirt

    conn = libvirt.open("qemu:///system")
    ctx = contextlib.nullcontext(args.domain) if args.domain else bench_guest(conn, args.extra)
    with ctx as name:
        result = measure(conn, name, args.runs)
    result["domain"] = "booted busybox guest" if not args.domain else args.domain
    if args.json:
        print(json.dumps({"command": reproduce_command("bench.survey"), "machine": machine(),
                          "result": result}, indent=2))
        return 0
    print_header("libshare survey: wall and CPU time on a running guest", "bench.survey")
    print(f"guest: {result['domain']}, kernel {result['kernel']}, {result['tasks']} tasks "
          f"({result['threads']} threads), {result['libraries']} libraries"
          f"{', PARTIAL' if result['partial'] else ''}")
    for label, text in (("cold", "first survey of a boot (RAM scan + walk)"),
                        ("warm", f"later surveys (cached kernel), median of {args.runs}"),
                        ("warm_paused", f"later surveys with --pause, median of {args.runs}"),
                        ("cli", "whole command line incl. Python start-up, median of 3")):
        r = result[label]
        print(f"{text:58s} wall {r['wall'] * 1000:8.1f} ms   CPU {r['cpu'] * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
