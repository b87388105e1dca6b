"""Benchmark: the libvirt hook's wall time per operation, and what it adds to a start.

Two measurements, one run, medians over ``--runs`` repetitions:

1. the installed hook script (``hooks/qemu`` under this Python), run as libvirt runs it
   (``LC_ALL=C``, minimal environment, XML on stdin) for each operation on an enrolled
   domain, and on a domain that is not enrolled (the fast path);
2. ``virsh start`` + ``virsh destroy`` of an enrolled TCG domain that has no bootable
   disk (so only QEMU's start is measured, not a guest boot) with libshare's hook as
   the only hook, against the same with no hook at all; ratio of the two medians.

Needs root and a running system libvirtd. For part 2 the whole hooks directory
(/etc/libvirt/hooks, with any other program's hooks) is moved aside, so that the
baseline runs no hook at all and the other measurement only libshare's; it is put
back afterwards (libvirtd is sent SIGHUP at each change) and what it held is printed.
The domain is named ``lsbench-hook-*`` and always removed.

Usage (from the project root): ``.venv/bin/python -m bench.hook [--runs N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from bench.common import machine, median, print_header, reproduce_command
from libshare import config, domxml
from libshare.hook import install
from libshare.util.digest import sha256_file

ROOT = Path(__file__).resolve().parents[1]
OPS = [("prepare", "begin"), ("start", "begin"), ("started", "begin"),
       ("reconnect", "begin"), ("migrate", "begin"), ("restore", "begin"), ("stopped", "end"),
       ("release", "end")]
MiB = 1 << 20


def domain_xml(name: str) -> str:
    """Return a small TCG domain with no disk (QEMU starts, SeaBIOS finds nothing)."""
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
<on_poweroff>destroy</on_poweroff><devices><memballoon model='none'/></devices></domain>"""


def time_hook_ops(script: Path, xml: bytes, plain: bytes, cfg: Path, runs: int
                  ) -> dict[str, float]:
    """Return median milliseconds per hook operation (and for the not-enrolled path)."""
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LIBSHARE_CONFIG": str(cfg)}
    out: dict[str, float] = {}
    cases = [(f"{op} {sub}", op, sub, xml) for op, sub in OPS]
    cases.append(("prepare begin (not enrolled)", "prepare", "begin", plain))
    for label, op, sub, data in cases:
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            res = subprocess.run([str(script), "bench", op, sub, "-"], input=data, env=env,
                                 capture_output=True, timeout=30)
            samples.append((time.perf_counter() - t0) * 1000)
            if res.returncode != 0:
                raise SystemExit(f"hook {label} failed: {res.stderr.decode().strip()}")
        out[label] = median(samples)
    return out


def time_starts(conn: Any, name: str, runs: int) -> float:
    """Return the median milliseconds of ``virsh start`` of domain ``name``."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "start", name], check=True,
                       capture_output=True, timeout=120)
        samples.append((time.perf_counter() - t0) * 1000)
        conn.lookupByName(name).destroy()
    return median(samples)


def hooks_present(hooks: Path) -> list[str]:
    """Return the hook files under ``hooks`` (relative names; qemu.d/ and the like
    included), sorted."""
    if not hooks.is_dir():
        return []
    return sorted(str(p.relative_to(hooks)) for p in hooks.rglob("*") if p.is_file())


def reload_libvirt() -> None:
    """Tell libvirtd to rescan its hooks and give it a moment to do so."""
    install.reload_daemons()
    time.sleep(1.0)


def bench_region(state_dir: Path) -> Path:
    """Return a real 16 MiB region image in ``state_dir``'s images folder (the hook
    serves only those), built from a few of this host's libraries."""
    from libshare.sharing.region import build
    from libshare.sharing.store import import_tree

    tree = state_dir.parent / "tree" / "usr" / "lib"
    tree.mkdir(parents=True)
    for lib in ("libz.so.1", "libacl.so.1", "libattr.so.1"):
        shutil.copyfile(Path("/lib/x86_64-linux-gnu") / lib, tree / lib)
    cfg = config.Config(state_dir=state_dir)
    import_tree(cfg.store_dir, [tree.parents[1]])
    image = Path(build.build_region(cfg, "bench", size=16 * MiB).path)
    for d in (state_dir, cfg.regions_dir, image.parent):
        d.chmod(0o755)
    image.chmod(0o644)
    return image


def main() -> int:
    """Run both measurements; print them (or JSON); return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/hook.py needs root (system libvirtd, /etc/libvirt/hooks)")
    # inside the configured state directory: the hook libvirt runs serves nothing else
    base = config.load(environ={}).state_dir / "bench"
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lsbench-hook-", dir=base))
    work.chmod(0o755)
    hooks = install.DEFAULT_HOOKS_DIR
    aside = hooks.with_name(f".{hooks.name}.lsbench-{secrets.token_hex(3)}")
    others = [h for h in hooks_present(hooks)
              if not install.is_ours(hooks / h)]
    moved = created = False
    conn = libvirt.open("qemu:///system")
    name = f"lsbench-hook-{secrets.token_hex(3)}"
    try:
        image = bench_region(work / "state")
        cfg = work / "libshare.toml"
        cfg.write_text(f'state_dir = "{work / "state"}"\n')
        spec = domxml.RegionSpec(str(image), image.stat().st_size, "bench",
                                 digest=sha256_file(image), state_dir=str(work / "state"))
        plain = domain_xml(name)
        enrolled = domxml.serialize(domxml.enable(domxml.parse(plain), spec))
        script = work / "qemu"
        script.write_text(install.render())
        script.chmod(0o755)
        ops = time_hook_ops(script, enrolled.encode(), plain.encode(), cfg, args.runs)

        conn.defineXML(enrolled)
        if hooks.exists():
            os.rename(hooks, aside)
            moved = True
        reload_libvirt()  # no hooks directory: libvirt runs no hook at all
        time_starts(conn, name, 2)  # warm QEMU's and libvirt's caches
        without = time_starts(conn, name, args.runs)
        hooks.mkdir(mode=0o755)
        created = True
        install.install(hooks, reload=False)
        reload_libvirt()  # libshare's hook and nothing else
        with_hook = time_starts(conn, name, args.runs)
    finally:
        try:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
        if created:  # only the directory made above, never the host's own
            shutil.rmtree(hooks, ignore_errors=True)
        if moved:
            os.rename(aside, hooks)
        if moved or created:
            reload_libvirt()
        shutil.rmtree(work, ignore_errors=True)
    report = {"command": reproduce_command("bench.hook"), "machine": machine(), "runs": args.runs,
              "hook_ms": ops, "virsh_start_ms": {"without_hook": without,
                                                 "with_hook": with_hook,
                                                 "ratio": with_hook / without},
              "other_hooks_set_aside": others}
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print_header("libshare hook: wall time per operation and added to virsh start", "bench.hook")
    print(f"runs per figure: {args.runs} (medians)")
    for label, ms in ops.items():
        print(f"  hook {label:<30} {ms:8.1f} ms")
    print(f"  virsh start, no hook at all      {without:8.1f} ms")
    print(f"  virsh start, libshare hook only  {with_hook:8.1f} ms")
    print(f"  ratio with/without               {with_hook / without:8.2f}")
    print("other hooks on this host (set aside for the virsh start figures): "
          + (", ".join(others) if others else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
