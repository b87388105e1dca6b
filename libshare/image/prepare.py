"""libshare's guest side in disk images, offline: :func:`prepare`, :func:`status` and
:func:`unprepare` (``libshare image prepare|status|unprepare DISK``).

:func:`prepare` puts into a qcow2 or raw guest image, without booting it and without a
guest agent, what ``libshare guest install`` puts into a running guest: the files of
the guest script's table that the image's initramfs tool and package managers need
(:func:`libshare.redirect.actions.needed_files`), then rebuilds the initramfs of every
kernel of the image inside it (chroot, ``libshare-redirect initramfs --kver K
--generic``: update-initramfs or dracut) and checks that the new initramfs holds the
script and its boot hook. With a group, the image's libraries are also hashed against
the group's region (the script's ``prime``, the region on a loop device), so that its
clones bind them at their first boot without hashing anything. What was written is
recorded in the image (:data:`libshare.image.tree.MARKER`), read back, and checked
again after the commit.

Nothing is changed when the image is in use (attached to a loop device, locked by a
QEMU process, named by a libvirt domain's disk chain: a stopped clone's overlay would
be corrupted by a changed backing file), of an unknown distribution or initramfs tool,
full, or laid out in a way that is not handled; all work happens on an overlay that is
committed only at the very end (:mod:`libshare.image.disk`). An image that already holds
this libshare's guest side, complete, for the same group is left alone (``unchanged``)
unless forced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare import __version__
from libshare.config import Config
from libshare.errors import LibshareError, RefusedError
from libshare.image import disk, tree
from libshare.image.disk import ImageInfo, Opened
from libshare.redirect import actions
from libshare.sharing.region.layout import DATAOFF
from libshare.util.digest import cached_sha256
from libshare.virt import api

Progress = Callable[[str], None]
#: seconds one initramfs rebuild in the image may take
INITRAMFS_TIMEOUT = 1800.0


def _quiet(_phase: str) -> None:
    """A progress sink that says nothing."""


@dataclass
class ImageReport:
    """What an image holds, or what :func:`prepare`/:func:`unprepare` did to it.

    ``action``: prepared, unchanged, unprepared or status. ``prepared``: it holds
    libshare's record; ``current``: what it holds is this libshare's guest side, complete
    (every file needed, identical, and in the initramfs of every kernel). ``in_use`` says
    why it could not be looked at or changed now. ``seconds`` per step."""

    image: str
    format: str
    action: str
    prepared: bool | None = None
    current: bool | None = None
    in_use: str | None = None
    distribution: dict[str, str] | None = None
    initramfs_tool: str | None = None
    kernels: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    group: str | None = None
    region_digest: str | None = None
    primed: dict[str, Any] | None = None
    libshare: str | None = None
    prepared_at: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return dict(self.__dict__)


class _Clock:
    """Seconds per step into a report."""

    def __init__(self, report: ImageReport, progress: Progress) -> None:
        self.report, self.progress = report, progress
        self.t0 = self.last = time.monotonic()

    def step(self, name: str) -> None:
        """Close the step that ran until now as ``name`` and report the next one."""
        now = time.monotonic()
        self.report.seconds[name] = round(now - self.last, 2)
        self.last = now

    def say(self, phase: str) -> None:
        """Tell the progress sink what starts now."""
        self.progress(phase)

    def total(self) -> None:
        """Record the total time."""
        self.report.seconds["total"] = round(time.monotonic() - self.t0, 2)


# ------------------------------------------------------------------ checks

def domains_using(info: ImageInfo, uri: str) -> list[tuple[str, bool]]:
    """Return ``(domain, running)`` for every libvirt domain at ``uri`` whose disk chain
    names the image (its own disk, or a backing file of one); raise LibshareError if
    libvirt cannot tell."""
    try:
        with api.connect(uri) as conn:
            disks = api.domain_disk_files(conn)
    except LibshareError as exc:
        raise LibshareError(f"cannot check which domains use {info.path}: {exc}") from exc
    target = str(info.path)
    users = []
    for name, (running, files) in sorted(disks.items()):
        if any(target in disk.backing_chain(f) for f in sorted(files)):
            users.append((name, running))
    return users


def check_unused(info: ImageInfo, uri: str) -> None:
    """Raise RefusedError, with the reason, if the image must not change now: attached
    to a loop device, named by a domain's disk chain, or locked by a QEMU process."""
    loops = disk.loop_devices(info.path)
    if loops:
        raise RefusedError(f"{info.path} is attached to {', '.join(loops)} (mounted or in "
                           f"use on this host; detach it with 'losetup -d' first)")
    users = domains_using(info, uri)
    if users:
        names = ", ".join(f"{n} (running)" if r else n for n, r in users)
        raise RefusedError(f"{info.path} is in the disk chain of domain {names}: changing it "
                           "would corrupt what is written on top of it (prepare the "
                           "template before making clones, or a copy of it)")
    disk.probe_write_lock(info)


def group_region(cfg: Config, group: str) -> tuple[Path, str]:
    """Return the path and digest of ``group``'s current region image on this host;
    RefusedError if it has none."""
    link = cfg.group_region_link(group)
    if not link.exists():
        raise RefusedError(f"group {group!r} has no region on this host ({link} is missing; "
                           f"build it with 'libshare region build --group {group}')")
    path = Path(os.path.realpath(link))
    return path, cached_sha256(path, cfg.digest_cache)


@contextlib.contextmanager
def _workspace(parent: Path | None) -> Iterator[Path]:
    """Yield a fresh folder under ``parent`` (default: the system's temporary folder) for
    the export file, mount points and overlay; removed at the end unless a file named
    ``keep`` was left in it."""
    work = Path(tempfile.mkdtemp(prefix=".libshare-image-", dir=parent))
    try:
        yield work
    finally:
        if not (work / "keep").exists():
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ inside the image

def run_script(root: Path, args: list[str], env: dict[str, str] | None = None,
               timeout: float = 600.0) -> dict[str, Any]:
    """Run this libshare's guest script with ``args`` in the image (``/bin/sh -s``,
    the script on stdin) and return its ``key=value`` output; RefusedError for its
    ``refused=`` line, LibshareError when it fails."""
    proc = tree.chroot(root, ["/bin/sh", "-s", "--", *args], stdin=actions.script_bytes(),
                       env=env, timeout=timeout)
    kv = actions.parse_kv(proc.stdout.decode(errors="replace"))
    if "refused" in kv:
        raise RefusedError(f"in the image: {kv['refused']}")
    if proc.returncode != 0:
        raise LibshareError(f"libshare-redirect {args[0]} failed in the image (exit "
                            f"{proc.returncode}): {disk.last_line(proc.stderr or proc.stdout)}")
    return kv


def initramfs_state(root: Path, kernel: str, rebuild: bool) -> dict[str, Any]:
    """Return, for ``kernel`` of the image, what its initramfs holds after rebuilding it
    (``rebuild``, generic: for any machine) or as it is: ``{version, initramfs_image,
    entries, script, hook}``."""
    args = ["initramfs", "--kver", kernel, "--generic" if rebuild else "--list"]
    kv = run_script(root, args, timeout=INITRAMFS_TIMEOUT)
    return {"version": kernel, "initramfs_image": kv.get("initramfs_image") or None,
            "entries": int(kv.get("initramfs_entries") or 0),
            "script": kv.get("initramfs_script") == "1",
            "hook": kv.get("initramfs_hook") == "1"}


def prime(root: Path, region: Path) -> dict[str, Any]:
    """Hash the image's files against ``region`` (attached read-only to a loop device at
    its filesystem, run by the script's ``prime`` in the image) and return the counts:
    the verdicts it records in the image let clones bind at their first boot without
    hashing."""
    loop = disk.run(["losetup", "--find", "--show", "--read-only", "--offset", str(DATAOFF),
                     str(region)], error=f"cannot attach region {region}").stdout
    device = loop.decode().strip()
    try:
        kv = run_script(root, ["prime"], env={"LIBSHARE_DEVICES": device,
                                              "LIBSHARE_ALLOW_NODAX": "1",
                                              "LIBSHARE_RUN": "/run/libshare-prime"})
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
    differs = kv.get("differs", [])
    return {"identical": int(kv.get("identical") or 0),
            "differs": len(differs) if isinstance(differs, list) else 1,
            "missing": int(kv.get("missing") or 0), "hashed": int(kv.get("hashed") or 0)}


def look(op: Opened, report: ImageReport) -> None:
    """Fill ``report`` with what the opened image holds: its distribution, initramfs
    tool, kernels and their initramfs, libshare's record and the state of each file it
    lists, and whether all of that is this libshare's guest side, complete."""
    root = op.root
    with contextlib.suppress(RefusedError):
        report.distribution = tree.distribution(root).as_dict()
    detected = run_script(root, ["detect"])
    report.initramfs_tool = str(detected.get("initramfs_tool"))
    report.kernels = [initramfs_state(root, k, rebuild=False) for k in tree.kernels(root)]
    marker = tree.read_marker(root)
    report.prepared = marker is not None
    if marker is None:
        report.current = False
        return
    report.group, report.region_digest = marker.get("group"), marker.get("region_digest")
    report.primed, report.libshare = marker.get("primed"), marker.get("libshare")
    report.prepared_at = marker.get("prepared_at")
    records = {r["path"]: r for r in marker.get("files", [])}
    report.files = [{**r, "state": tree.check_entry(root, r)} for r in records.values()]
    wanted = [_record_of(f) for f in actions.needed_files(detected)]
    report.current = (all(records.get(w["path"]) == w for w in wanted)
                      and all(f["state"] == "ok" for f in report.files)
                      and bool(report.kernels)
                      and all(k["script"] and k["hook"] for k in report.kernels))


def _record_of(f: actions.GuestFile) -> dict[str, Any]:
    """Return the record :func:`libshare.image.tree.write_file`/``write_link`` makes for
    guest file ``f`` as this libshare ships it."""
    if f.source is None:
        return {"path": f.path, "link": f.link}
    return {"path": f.path, "sha256": hashlib.sha256(actions.guest_file_bytes(f.source))
            .hexdigest(), "mode": f.mode}


def _install(op: Opened, report: ImageReport, clock: _Clock,
             region: tuple[Path, str] | None) -> None:
    """Write the guest side into the opened (writable) image, rebuild and check its
    initramfs, record it all in the image; fill ``report``."""
    root = op.root
    dist = tree.distribution(root)
    report.distribution = dist.as_dict()
    detected = run_script(root, ["detect"])
    tool = str(detected.get("initramfs_tool"))
    tree.check_tool(dist, tool)
    tree.check_offline_build(root, tool)
    report.initramfs_tool = tool
    kernels = tree.kernels(root)
    if not kernels:
        raise RefusedError("the image has no kernel (a /lib/modules/VERSION folder with "
                           "/boot/vmlinuz-VERSION): nothing would boot an initramfs")
    tree.check_free_space(root)
    clock.step("open")
    clock.say("install")
    before = tree.read_marker(root) or {}          # an earlier preparation: updated
    created: list[str] = list(before.get("dirs", []))
    needed = actions.needed_files(detected)
    for old in before.get("files", []):
        if old["path"] not in {f.path for f in needed}:
            tree.remove_entry(root, old["path"])   # no longer part of the guest side
    for f in needed:
        if f.source is None:
            assert f.link is not None
            report.files.append(tree.write_link(root, f.path, f.link, created))
        else:
            report.files.append(tree.write_file(root, f.path,
                                                actions.guest_file_bytes(f.source), f.mode,
                                                created))
    clock.step("install")
    if region is not None:
        clock.say("prime")
        report.primed = prime(root, region[0])
        clock.step("prime")
    clock.say("initramfs")
    report.kernels = [initramfs_state(root, k, rebuild=True) for k in kernels]
    clock.step("initramfs")
    bad = [k["version"] for k in report.kernels if not (k["script"] and k["hook"])]
    if bad:
        raise LibshareError(f"the rebuilt initramfs of kernel {', '.join(bad)} lacks "
                            f"libshare-redirect or its {tool} hook (nothing was changed)")
    states = {r["path"]: tree.check_entry(root, r) for r in report.files}
    wrong = sorted(p for p, s in states.items() if s != "ok")
    if wrong:
        raise LibshareError(f"reading back {', '.join(wrong)} from the image failed "
                            "(nothing was changed)")
    report.prepared, report.current, report.libshare = True, True, __version__
    report.prepared_at = round(time.time(), 3)
    tree.write_marker(root, {
        "libshare": __version__, "prepared_at": report.prepared_at, "group": report.group,
        "region_digest": report.region_digest, "primed": report.primed,
        "initramfs_tool": tool, "distribution": report.distribution,
        "kernels": [k["version"] for k in report.kernels], "files": report.files,
        "dirs": created}, created)
    report.files = [{**r, "state": "ok"} for r in report.files]
    clock.step("verify")


def _remove(op: Opened, report: ImageReport, clock: _Clock) -> None:
    """Take out of the opened (writable) image exactly what :func:`prepare` recorded,
    rebuild its initramfs without libshare and check it; fill ``report``."""
    root = op.root
    marker = tree.read_marker(root)
    if marker is None:
        raise RefusedError(f"{op.image} was not prepared by libshare (no {tree.MARKER} "
                           "in it): nothing to undo")
    clock.step("open")
    clock.say("remove")
    report.files = [{"path": r["path"], "removed": tree.remove_entry(root, r["path"])}
                    for r in marker.get("files", [])]
    tree.remove_dirs(root, marker.get("dirs", []))
    state = tree.resolve(root, actions.GUEST_STATE_DIR)
    if state.is_dir() and not state.is_symlink():
        shutil.rmtree(state)
    clock.step("remove")
    clock.say("initramfs")
    report.kernels = [initramfs_state(root, k, rebuild=True) for k in tree.kernels(root)]
    clock.step("initramfs")
    left = [k["version"] for k in report.kernels if k["script"] or k["hook"]]
    if left:
        raise LibshareError(f"the rebuilt initramfs of kernel {', '.join(left)} still holds "
                            "libshare's files (nothing was changed)")
    report.prepared, report.current = False, False


# ------------------------------------------------------------------ the operations

def _change(info: ImageInfo, report: ImageReport, clock: _Clock,
            work_on: Callable[[Opened], None]) -> None:
    """Open an overlay of the image writable, let ``work_on`` change it, and commit it
    into the image once everything was checked (only then is the image changed)."""
    with _workspace(info.path.parent) as work:
        overlay = disk.create_overlay(info, work / "overlay.qcow2")
        with disk.opened(overlay, "qcow2", info.virtual_size, work, writable=True) as op:
            work_on(op)
        disk.check_commit_space(info, overlay)
        clock.say("commit")
        try:
            disk.commit(overlay, info)
        except RefusedError:
            raise
        except LibshareError:
            (work / "keep").touch()  # the only copy of the whole change
            raise
        clock.step("commit")


def prepare(path: str | os.PathLike[str], cfg: Config, uri: str, group: str | None = None,
            force: bool = False, progress: Progress = _quiet) -> ImageReport:
    """Put libshare's guest side into disk image ``path`` (see the module doc); return
    the :class:`ImageReport` (``action`` prepared, or unchanged when it already holds
    this libshare's guest side for ``group`` and ``force`` is False). ``uri``: the
    libvirt whose domains must not use the image. Refuses (RefusedError, nothing
    changed) as the module doc says."""
    disk.check_requirements("image prepare")
    info = disk.image_info(path)
    region = group_region(cfg, group) if group else None
    check_unused(info, uri)
    if not force:
        seen = status(info.path, cfg, progress=progress)
        # (verdicts are the files' own hashes: a group's newer region needs no new ones)
        if seen.prepared and seen.current and seen.group == group:
            seen.action = "unchanged"
            return seen
    report = ImageReport(str(info.path), info.format, "prepared", group=group,
                         region_digest=region[1] if region else None)
    clock = _Clock(report, progress)
    clock.say("open")
    _change(info, report, clock, lambda op: _install(op, report, clock, region))
    after = status(info.path, cfg, uri)
    if not (after.prepared and after.current):
        raise LibshareError(f"{info.path} was committed but does not read back as prepared "
                            f"({after.files}, {after.kernels})")
    clock.total()
    return report


def unprepare(path: str | os.PathLike[str], cfg: Config, uri: str,
              progress: Progress = _quiet) -> ImageReport:
    """Take out of disk image ``path`` exactly what :func:`prepare` put in (the files it
    recorded, the folders it made, the script's state folder) and rebuild its initramfs
    without libshare; return the :class:`ImageReport` (``action`` unprepared). Refuses
    like :func:`prepare`, and for an image libshare did not prepare."""
    disk.check_requirements("image unprepare")
    info = disk.image_info(path)
    check_unused(info, uri)
    report = ImageReport(str(info.path), info.format, "unprepared")
    clock = _Clock(report, progress)
    clock.say("open")
    _change(info, report, clock, lambda op: _remove(op, report, clock))
    clock.total()
    return report


def status(path: str | os.PathLike[str], cfg: Config, uri: str | None = None,
           progress: Progress = _quiet) -> ImageReport:
    """Return what disk image ``path`` holds (read-only: nothing is written, and a
    running clone may keep using it); ``in_use`` says why it cannot be looked at (a
    QEMU process writes it) or which domains' disk chains name it (``uri`` given)."""
    disk.check_requirements("image status")
    info = disk.image_info(path)
    report = ImageReport(str(info.path), info.format, "status")
    clock = _Clock(report, progress)
    notes = []
    loops = disk.loop_devices(info.path)
    if loops:
        notes.append(f"attached to {', '.join(loops)}")
    if uri is not None:
        with contextlib.suppress(LibshareError):
            users = domains_using(info, uri)
            if users:
                notes.append("in the disk chain of " + ", ".join(
                    f"{n} (running)" if r else n for n, r in users))
    try:
        with _workspace(None) as work, disk.opened(info.path, info.format, info.virtual_size,
                                                   work, writable=False) as op:
            look(op, report)
    except RefusedError as exc:
        if "in use" not in str(exc):
            raise
        notes.append(str(exc))
    report.in_use = "; ".join(notes) or None
    clock.total()
    return report
