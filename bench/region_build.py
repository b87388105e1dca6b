"""Benchmark: region build time vs plain mkfs, and image size vs the files' bytes.

Owns two measurements; in each, ``--repeat`` (3) region builds and as many plain mkfs
runs alternate, each from no dirty pages, and the medians are compared (every sample is
kept in the JSON). With ``--debian`` (the Debian test image's root, read on the host
read-only: :func:`libshare.demo.debian.image.image_root`) or ``--root DIR`` (any guest
root): a whole guest tree is imported, the region of ``--policy`` (default ``usr``) is
built on ``--fs`` (default erofs) and compared with plain ``mkfs.erofs -Enoinline_data``
(or ``mkfs.ext4 -d``) on the same files (the tree's /usr), with verify timed too.
Otherwise: every regular ``*.so``/``*.so.*`` file under LIBDIR (default
/usr/lib/x86_64-linux-gnu) is copied into a scratch tree; then

* ``store import`` of that tree (timed, reported apart),
* ``region build --select all`` from the store (the tree staged in memory, the image
  written, hashed and fsync'ed in one pass, renamed),
* plain ``mkfs.erofs -Enoinline_data`` on the same scratch tree (which may hold
  duplicate files: region build stores each distinct file once), and on a tree of the
  distinct store objects only (the fair comparison),

and prints the times and their ratios: against plain mkfs alone (which leaves its output
in the page cache) and against plain mkfs plus an fsync of its output (region build
leaves its image on disk, hashed); the image size against the sum of the file sizes,
the command that reproduces the run and the machine it ran on.

Usage (from the project root): ``.venv/bin/python -m bench.region_build [--libdir DIR]
[--debian | --root DIR] [--policy P] [--fs erofs|ext4] [--repeat N] [--json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
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


def _timed(cmd: list[str], image: Path) -> tuple[float, float]:
    """Run ``cmd`` (which writes ``image``) starting with no dirty pages; return its
    seconds, and the seconds until ``image`` is also on disk (fsync'ed, as region build
    leaves its image)."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    t1 = time.perf_counter()
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t0


def timed_mkfs(image: Path, tree: Path) -> tuple[float, float]:
    """Return the seconds plain ``mkfs.erofs -Enoinline_data`` takes to pack ``tree`` into
    ``image``, without and with the fsync of its output (:func:`_timed`)."""
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    return _timed(["mkfs.erofs", "--quiet", "-Enoinline_data", str(image), str(tree)], image)


def timed_mkfs_ext4(image: Path, tree: Path, size: int) -> tuple[float, float]:
    """Return the seconds plain ``mkfs.ext4 -d`` takes to format ``tree`` into a file
    ``image`` of ``size`` bytes (no journal, no lazy init: as region build does), without
    and with the fsync of its output."""
    with open(image, "wb") as fh:
        fh.truncate(size)
    return _timed(["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal",
                   "-E", "lazy_itable_init=0,nodiscard", "-d", str(tree), str(image)], image)


def timed_build(cfg: Config, group: str, **kw: Any) -> tuple[float, build.BuildResult]:
    """Return the seconds ``region build`` of ``group`` takes (starting with no dirty
    pages; a new group each time, so each run writes a new image) and its result."""
    os.sync()
    t0 = time.perf_counter()
    res = build.build_region(cfg, group, **kw)
    return time.perf_counter() - t0, res


def compare(cfg: Config, repeat: int, plain: Any, **kw: Any) -> dict[str, Any]:
    """Time ``repeat`` region builds and as many plain mkfs runs (``plain()``: seconds
    without and with fsync), alternating; return the medians, every sample, the ratios
    and the last build's result (key ``res``). The previous build's image is removed
    before the next build (untimed, as plain mkfs's output is): otherwise the next build
    finds its image already published and times the removal of its own copy."""
    builds, mkfs, mkfs_sync = [], [], []
    res = None
    for i in range(repeat):
        if res is not None:     # each build writes a new image, as each mkfs a new file
            Path(res.path).unlink()
        t, res = timed_build(cfg, f"bench{i}", **kw)
        builds.append(round(t, 3))
        a, b = plain()
        mkfs.append(round(a, 3))
        mkfs_sync.append(round(b, 3))
    tb, tm, ts = statistics.median(builds), statistics.median(mkfs), statistics.median(mkfs_sync)
    return {"res": res, "region_build_s": tb, "plain_mkfs_s": tm, "plain_mkfs_fsync_s": ts,
            "ratio_build_vs_mkfs": round(tb / tm, 2) if tm else None,
            "ratio_build_vs_mkfs_fsync": round(tb / ts, 2) if ts else None,
            "samples": {"region_build_s": builds, "plain_mkfs_s": mkfs,
                        "plain_mkfs_fsync_s": mkfs_sync}}


def run_tree(root: Path, scratch: Path, policy: str, fs: str,
             repeat: int = 3) -> dict[str, Any]:
    """Import the guest tree ``root``, build its ``policy`` region on ``fs`` and time
    plain mkfs of the tree's /usr (the same files), ``repeat`` times each; return the
    measurements."""
    cfg = Config(state_dir=scratch / "state")
    os.sync()
    t0 = time.perf_counter()
    imp = import_tree(cfg.store_dir, [root])
    t_import = time.perf_counter() - t0
    plain = scratch / f"plain.{fs}"
    fs_size = 0

    def plain_run() -> tuple[float, float]:
        if fs == "ext4":
            return timed_mkfs_ext4(plain, root / "usr", fs_size)
        return timed_mkfs(plain, root / "usr")

    if fs == "ext4":     # mkfs.ext4 needs the size: the region's own filesystem's
        fs_size = timed_build(cfg, "size", policy=policy, trees_wanted=imp.trees,
                              filesystem=fs)[1].fs_size
    timing = compare(cfg, repeat, plain_run, policy=policy, trees_wanted=imp.trees,
                     filesystem=fs)
    res = timing.pop("res")
    t0 = time.perf_counter()
    problem = verify.verify(res.path)
    t_verify = time.perf_counter() - t0
    usr_bytes = sum(e.size for e in load_index(cfg.store_dir).entries.values()
                    if any(p.startswith("/usr/") for p in e.paths))
    return {"root": str(root), "policy": policy, "filesystem": fs,
            "files_seen": imp.files_seen, "stored_objects": len(imp.added),
            "region_files": res.files, "region_data_bytes": res.data_size,
            "usr_object_bytes": usr_bytes,
            "directories_offered": sum(len(t["offered"]) for t in res.trees),
            "import_s": round(t_import, 3), **timing,
            "verify_s": round(t_verify, 3), "verify": problem or "ok",
            "image_bytes": res.size, "fs_bytes": res.fs_size,
            "plain_fs_bytes": plain.stat().st_size,
            "image_vs_files": round(res.size / res.data_size, 4), "digest": res.digest}


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


def run(libdir: Path, scratch: Path, repeat: int = 3) -> dict[str, Any]:
    """Run the benchmark in ``scratch`` (``repeat`` builds and plain runs); return the
    measurements."""
    tree = scratch / "tree"
    n_files, n_bytes = collect(libdir, tree)
    cfg = Config(state_dir=scratch / "state")
    os.sync()

    t0 = time.perf_counter()
    imp = import_tree(cfg.store_dir, [tree])
    t_import = time.perf_counter() - t0

    plain = scratch / "plain.erofs"
    timing = compare(cfg, repeat, lambda: timed_mkfs(plain, tree))
    res = timing.pop("res")

    # the same distinct objects region build packs (one file per SHA-256, hard links)
    dedup = scratch / "dedup"
    dedup.mkdir()
    for sha in load_index(cfg.store_dir).entries:
        os.link(object_path(cfg.store_dir, sha), dedup / sha)
    plain2 = scratch / "plain-dedup.erofs"
    t_mkfs_dedup = statistics.median(timed_mkfs(plain2, dedup)[0] for _ in range(repeat))
    t_build = timing["region_build_s"]

    t0 = time.perf_counter()
    problem = verify.verify(res.path)
    t_verify = time.perf_counter() - t0

    return {
        "libdir": str(libdir), "so_files": n_files, "so_bytes": n_bytes,
        "stored_objects": len(imp.added), "stored_bytes": res.data_size,
        "skipped": imp.skipped_counts(),
        "import_s": round(t_import, 3), **timing,
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
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--debian", action="store_true",
                       help="a whole guest: the Debian test image's root (read-only)")
    where.add_argument("--root", type=Path, help="a whole guest: this root directory")
    ap.add_argument("--policy", default="usr", help="with --debian/--root (default usr)")
    ap.add_argument("--fs", default="erofs", choices=("erofs", "ext4"),
                    help="with --debian/--root: the region's filesystem")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="scratch directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="builds and plain mkfs runs timed, alternating (medians; 3)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cmd = reproduce_command("bench.region_build", argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="libshare-bench-", dir="/var/tmp"))
    try:
        if args.debian:
            from libshare.demo.debian.image import debian_image, image_root

            with image_root(debian_image(), workdir=scratch) as root:
                result = run_tree(root, scratch, args.policy, args.fs, args.repeat)
        elif args.root:
            result = run_tree(args.root.resolve(), scratch, args.policy, args.fs,
                              args.repeat)
        else:
            result = run(args.libdir, scratch, args.repeat)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report: dict[str, Any] = {"command": cmd, "machine": machine(), "result": result}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "root" in result:
        _print_tree(cmd, report["machine"], result)
        return 0 if result["verify"] == "ok" else 1
    r, m = result, report["machine"]
    mib = 1024 * 1024
    print(f"reproduce: {cmd}")
    print(f"machine:   {m['hostname']}: {m['cpu']}, {m['cores']} cores, "
          f"{m['memory_mib']} MiB, kernel {m['kernel']}")
    print(f"input:     {r['so_files']} .so files, {r['so_bytes'] / mib:.1f} MiB under "
          f"{r['libdir']}; {r['stored_objects']} distinct x86-64 ELF objects stored "
          f"({r['stored_bytes'] / mib:.1f} MiB)")
    print(f"import:    {r['import_s']:.2f} s (store import, hashing and copying)")
    _print_build(r, "plain mkfs.erofs on the tree")
    print(f"           plain mkfs.erofs on the deduplicated objects: "
          f"{r['plain_mkfs_dedup_s']:.2f} s  ->  ratio {r['ratio_build_vs_mkfs_dedup']}")
    print(f"verify:    {r['verify_s']:.2f} s ({r['verify']})")
    print(f"size:      image {r['image_bytes'] / mib:.1f} MiB (EROFS "
          f"{r['erofs_bytes'] / mib:.1f} MiB, plain mkfs {r['plain_erofs_bytes'] / mib:.1f} "
          f"MiB) vs files {r['stored_bytes'] / mib:.1f} MiB  ->  x{r['image_vs_files']}")
    return 0 if r["verify"] == "ok" else 1


def _print_build(r: dict[str, Any], plain: str) -> None:
    """Print the build-time comparison of the measurement ``r`` (medians)."""
    n = len(r["samples"]["region_build_s"])
    print(f"build:     {r['region_build_s']:.2f} s (region build: written, hashed, "
          f"fsync'ed; median of {n})  vs  {r['plain_mkfs_s']:.2f} s {plain}  ->  ratio "
          f"{r['ratio_build_vs_mkfs']}")
    print(f"           plain mkfs and an fsync of its output: "
          f"{r['plain_mkfs_fsync_s']:.2f} s  ->  ratio {r['ratio_build_vs_mkfs_fsync']}")


def _print_tree(cmd: str, m: dict[str, Any], r: dict[str, Any]) -> None:
    """Print the whole-guest measurement ``r``."""
    mib = 1024 * 1024
    print(f"reproduce: {cmd}")
    print(f"machine:   {m['hostname']}: {m['cpu']}, {m['cores']} cores, "
          f"{m['memory_mib']} MiB, kernel {m['kernel']}")
    print(f"input:     {r['files_seen']} files under {r['root']}; {r['stored_objects']} new "
          f"objects; {r['policy']} policy: {r['region_files']} files, "
          f"{r['region_data_bytes'] / mib:.1f} MiB, {r['directories_offered']} "
          "directories offered")
    print(f"import:    {r['import_s']:.2f} s")
    _print_build(r, f"plain mkfs.{r['filesystem']} on the tree's /usr")
    print(f"verify:    {r['verify_s']:.2f} s ({r['verify']})")
    print(f"size:      image {r['image_bytes'] / mib:.1f} MiB (filesystem "
          f"{r['fs_bytes'] / mib:.1f} MiB, plain mkfs {r['plain_fs_bytes'] / mib:.1f} MiB) "
          f"vs files {r['region_data_bytes'] / mib:.1f} MiB  ->  x{r['image_vs_files']}")


if __name__ == "__main__":
    sys.exit(main())
