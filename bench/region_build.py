"""Benchmark: region build time vs plain mkfs.erofs, and image size vs library bytes.

Owns one measurement, run once (no repetitions, so the ratio is from one run): every
regular ``*.so``/``*.so.*`` file under LIBDIR (default /usr/lib/x86_64-linux-gnu) is
copied into a scratch tree; then

* ``store import`` of that tree (timed, reported apart),
* ``region build --select all`` from the store (staging, mkfs.erofs, PFN block, hashing
  of the whole image, fsync, rename),
* plain ``mkfs.erofs -Enoinline_data`` on the same scratch tree (which may hold
  duplicate files: region build stores each distinct file once), and on a tree of the
  distinct store objects only (the fair comparison),

and prints the times, their ratio (region build also fsyncs its image and hashes it;
plain mkfs.erofs leaves its output in the page cache), the image size against the sum of the file sizes,
the command that reproduces the run and the machine it ran on.

Usage (from the project root): ``.venv/bin/python -m bench.region_build [--libdir DIR] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, reproduce_command
from libshare.config import Config
from libshare.sharing.region import build, verify
from libshare.sharing.store import import_tree, load_index, object_path


def timed_mkfs(image: Path, tree: Path) -> float:
    """Return the seconds plain ``mkfs.erofs -Enoinline_data`` takes to pack ``tree`` into
    ``image``, starting with no dirty pages."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["mkfs.erofs", "--quiet", "-Enoinline_data", str(image), str(tree)],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def collect(libdir: Path, dest: Path) -> tuple[int, int]:
    """Copy every regular .so file under ``libdir`` to ``dest``; return (count, bytes)."""
    count = total = 0
    for dirpath, _dirs, files in os.walk(libdir):
        for name in files:
            if not (name.endswith(".so") or ".so." in name):
                continue
            src = Path(dirpath) / name
            if src.is_symlink() or not src.is_file():
                continue
            rel = src.relative_to(libdir)
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
            count += 1
            total += out.stat().st_size
    return count, total


def run(libdir: Path, scratch: Path) -> dict[str, Any]:
    """Run the benchmark in ``scratch``; return the measurements."""
    tree = scratch / "tree"
    n_files, n_bytes = collect(libdir, tree)
    cfg = Config(state_dir=scratch / "state")
    os.sync()

    t0 = time.perf_counter()
    imp = import_tree(cfg.store_dir, [tree])
    t_import = time.perf_counter() - t0

    os.sync()  # each timed step starts with no dirty pages from the previous one
    t0 = time.perf_counter()
    res = build.build_region(cfg, "bench")
    t_build = time.perf_counter() - t0

    plain = scratch / "plain.erofs"
    t_mkfs = timed_mkfs(plain, tree)

    # the same distinct objects region build packs (one file per SHA-256, hard links)
    dedup = scratch / "dedup"
    dedup.mkdir()
    for sha in load_index(cfg.store_dir).entries:
        os.link(object_path(cfg.store_dir, sha), dedup / sha)
    plain2 = scratch / "plain-dedup.erofs"
    t_mkfs_dedup = timed_mkfs(plain2, dedup)

    t0 = time.perf_counter()
    problem = verify.verify(res.path)
    t_verify = time.perf_counter() - t0

    return {
        "libdir": str(libdir), "so_files": n_files, "so_bytes": n_bytes,
        "stored_objects": len(imp.added), "stored_bytes": res.data_size,
        "skipped": imp.skipped_counts(),
        "import_s": round(t_import, 3), "region_build_s": round(t_build, 3),
        "plain_mkfs_s": round(t_mkfs, 3),
        "ratio_build_vs_mkfs": round(t_build / t_mkfs, 2) if t_mkfs else None,
        "plain_mkfs_dedup_s": round(t_mkfs_dedup, 3),
        "ratio_build_vs_mkfs_dedup": round(t_build / t_mkfs_dedup, 2) if t_mkfs_dedup else None,
        "verify_s": round(t_verify, 3), "verify": problem or "ok",
        "image_bytes": res.size, "erofs_bytes": res.fs_size,
        "plain_erofs_bytes": plain.stat().st_size,
        "image_vs_files": round(res.size / res.data_size, 4),
        "digest": res.digest,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run once, print the report; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libdir", type=Path, default=Path("/usr/lib/x86_64-linux-gnu"))
    ap.add_argument("--scratch", type=Path, default=None,
                    help="scratch directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cmd = reproduce_command("bench.region_build", argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="libshare-bench-", dir="/var/tmp"))
    try:
        result = run(args.libdir, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report: dict[str, Any] = {"command": cmd, "machine": machine(), "result": result}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    r, m = result, report["machine"]
    mib = 1024 * 1024
    print(f"reproduce: {cmd}")
    print(f"machine:   {m['hostname']}: {m['cpu']}, {m['cores']} cores, "
          f"{m['memory_mib']} MiB, kernel {m['kernel']}")
    print(f"input:     {r['so_files']} .so files, {r['so_bytes'] / mib:.1f} MiB under "
          f"{r['libdir']}; {r['stored_objects']} distinct x86-64 ELF objects stored "
          f"({r['stored_bytes'] / mib:.1f} MiB)")
    print(f"import:    {r['import_s']:.2f} s (store import, hashing and copying)")
    print(f"build:     {r['region_build_s']:.2f} s (region build)  vs  "
          f"{r['plain_mkfs_s']:.2f} s plain mkfs.erofs on the tree  ->  ratio "
          f"{r['ratio_build_vs_mkfs']}")
    print(f"           plain mkfs.erofs on the deduplicated objects: "
          f"{r['plain_mkfs_dedup_s']:.2f} s  ->  ratio {r['ratio_build_vs_mkfs_dedup']}")
    print(f"verify:    {r['verify_s']:.2f} s ({r['verify']})")
    print(f"size:      image {r['image_bytes'] / mib:.1f} MiB (EROFS "
          f"{r['erofs_bytes'] / mib:.1f} MiB, plain mkfs {r['plain_erofs_bytes'] / mib:.1f} "
          f"MiB) vs files {r['stored_bytes'] / mib:.1f} MiB  ->  x{r['image_vs_files']}")
    return 0 if r["verify"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
