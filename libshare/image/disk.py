"""Opening guest disk images on the host, offline, without booting them.

Owns how an image is reached without any kernel module this machine may lack (no nbd):
``qemu-storage-daemon`` exports the image (qcow2 or raw, with its backing chain) as a
FUSE file; its partitions are read from that file (``sfdisk --json``: the kernel need
not parse partition tables) and a filesystem is mounted through an auto-clearing loop
device at its offset (``mount -o loop,offset=,sizelimit=``: unmounting frees the loop
device). The export daemon is a child that dies with this process; the command line
runs the whole work in a child with a private mount namespace (:func:`run_private`),
so no mount outlives it.

What makes an image unsafe to change is found here: attached to a loop device
(``losetup -j``) or held by a QEMU process (:func:`probe_write_lock`: the writable open
fails for a running domain and for a running clone that uses it as a backing file).
Whether a defined domain's disk chain names it (a stopped clone takes no lock) is the
caller's question to libvirt, answered with :func:`backing_chain`.

Changes are made on a qcow2 overlay (:func:`create_overlay`) and committed into the
image at the very end (:func:`commit`, with SIGINT/SIGTERM held off), so a failure or an
interrupt before that leaves the image exactly as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from libshare.errors import LibshareError, RefusedError
from libshare.image import tree

#: programs opening an image needs, and the Debian package shipping each
REQUIRED_TOOLS: dict[str, str] = {
    "qemu-img": "qemu-utils", "qemu-io": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common", "sfdisk": "fdisk",
    "blkid": "util-linux", "losetup": "mount", "mount": "mount", "umount": "mount",
    "unshare": "util-linux", "chroot": "coreutils",
}
FUSE_DEVICE = Path("/dev/fuse")
T = TypeVar("T")
#: image formats handled (what ``qemu-img info`` calls them)
FORMATS = ("qcow2", "raw")
#: seconds the export daemon may take to show its FUSE file
EXPORT_TIMEOUT = 30.0
#: mount options of a read-only look per filesystem type (no journal replay)
RO_OPTIONS = {"ext2": "ro,noload", "ext3": "ro,noload", "ext4": "ro,noload",
              "xfs": "ro,norecovery,nouuid"}
RW_OPTIONS = {"xfs": "nouuid"}
#: btrfs subvolumes a root may live in when it is not the top level
BTRFS_ROOTS = ("", "@", "root")
#: filesystem types that cannot hold the root: skipped when looking for it
NOT_ROOT = ("swap", "vfat", "LVM2_member", "crypto_LUKS", "linux_raid_member", "iso9660")
#: what to tell about an unsupported root layout
UNSUPPORTED = {"LVM2_member": "LVM", "crypto_LUKS": "LUKS encryption",
               "linux_raid_member": "software RAID"}


def run(argv: Sequence[str], *, error: str, timeout: float = 600.0,
        stdin: bytes | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    """Return the finished ``argv``; raise LibshareError "ERROR: <its last stderr line>"
    when it fails or cannot be run."""
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout,
                              env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LibshareError(f"{error}: {exc}") from exc
    if proc.returncode != 0:
        raise LibshareError(f"{error}: {last_line(proc.stderr or proc.stdout)}")
    return proc


def _lock_failure(stderr: bytes) -> bool:
    """Return True if QEMU's ``stderr`` says it could not take an image's lock."""
    return re.search(rb'Failed to get (shared )?"[a-z ]+" lock', stderr) is not None


def last_line(data: bytes) -> str:
    """Return the last non-empty line of a program's output ('no output' if none)."""
    lines = [x for x in data.decode(errors="replace").strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "no output"


def check_requirements(action: str = "image prepare") -> None:
    """Raise RefusedError unless this process is root; LibshareError naming every missing
    program (and its Debian package) or a missing /dev/fuse."""
    if os.geteuid() != 0:
        raise RefusedError(f"{action} needs root (a FUSE export, loop devices, mounts, chroot)")
    missing = sorted(f"{tool} (Debian package {pkg})" for tool, pkg in REQUIRED_TOOLS.items()
                     if shutil.which(tool) is None)
    if missing:
        raise LibshareError(f"{action} needs " + ", ".join(missing))
    if not FUSE_DEVICE.exists():
        raise LibshareError(f"{action} needs {FUSE_DEVICE} (the kernel's FUSE support: "
                            "modprobe fuse) for qemu-storage-daemon's export")


def private_mounts() -> None:
    """Give this process a private mount namespace, so every mount it (and its
    children) makes disappears with it, even if it is killed. Raises LibshareError if the
    kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns = 0x00020000
    if libc.unshare(clone_newns) != 0:
        err = ctypes.get_errno()
        raise LibshareError(f"cannot make a private mount namespace: {os.strerror(err)}")
    run(["mount", "--make-rprivate", "/"], error="cannot make the mounts private")


def _on_term(_signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signal.SIGTERM)


def run_private(work: Callable[[], T]) -> T:
    """Return ``work()`` run in a child process with a private mount namespace
    (:func:`private_mounts`): no mount it makes outlives it, whatever happens to it, and
    this process's mounts stay as they are. The child dies with this process and turns
    SIGTERM into an exit that unwinds (mounts undone, the work folder removed). A
    LibshareError it raises is raised here again, with its type and message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            _die_with_parent()
            signal.signal(signal.SIGTERM, _on_term)
            private_mounts()
            outcome: tuple[str, Any] = ("ok", work())
        except LibshareError as exc:
            outcome = ("error", exc)
        except BaseException as exc:  # an unexpected error: one line, exit 1
            outcome = ("error", LibshareError(f"{type(exc).__name__}: {exc}"))
            code = 1
        try:
            with os.fdopen(write_end, "wb") as fh:
                pickle.dump(outcome, fh)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise LibshareError(f"the image work stopped (wait status {status})")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    result: T = value
    return result


# ------------------------------------------------------------------ what the image is

@dataclass(frozen=True)
class ImageInfo:
    """A disk image as ``qemu-img info`` sees it: its real ``path``, ``format`` (qcow2
    or raw), ``virtual_size`` in bytes and the files of its backing ``chain`` (the
    image first)."""

    path: Path
    format: str
    virtual_size: int
    chain: tuple[str, ...] = ()


def _info_chain(path: Path) -> list[dict[str, Any]]:
    """Return ``qemu-img info --backing-chain`` of ``path`` (no lock taken) as JSON."""
    out = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
              error=f"cannot read disk image {path}", timeout=60).stdout
    data = json.loads(out)
    return data if isinstance(data, list) else [data]


def image_info(path: str | os.PathLike[str]) -> ImageInfo:
    """Return the :class:`ImageInfo` of disk image ``path``; RefusedError if it is not a
    regular file or not qcow2/raw."""
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise RefusedError(f"disk image {path} does not exist")
    if not real.is_file():
        raise RefusedError(f"{path} is not a regular file (a disk image is expected)")
    chain = _info_chain(real)
    fmt = str(chain[0].get("format", "?"))
    if fmt not in FORMATS:
        raise RefusedError(f"{path} is a {fmt} image; image prepare handles "
                           + " and ".join(FORMATS))
    return ImageInfo(real, fmt, int(chain[0].get("virtual-size", 0)),
                     tuple(os.path.realpath(str(c.get("filename", ""))) for c in chain))


def backing_chain(path: str) -> list[str]:
    """Return the real paths of ``path`` and every file of its backing chain ([] when
    it cannot be read: a missing disk names nothing)."""
    try:
        return [os.path.realpath(str(c.get("filename", ""))) for c in _info_chain(Path(path))]
    except (LibshareError, ValueError):
        return []


def loop_devices(path: Path) -> list[str]:
    """Return the loop devices attached to file ``path`` (``losetup -j``)."""
    proc = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True,
                          check=False, timeout=30)
    return [line.split(":", 1)[0] for line in proc.stdout.splitlines() if ":" in line]


def probe_write_lock(info: ImageInfo) -> None:
    """Raise RefusedError if a QEMU process holds ``info``'s image: the writable open
    of ``qemu-io`` (which changes nothing) fails then, for a running domain on it and a
    running clone using it as a backing file alike."""
    proc = subprocess.run(["qemu-io", "-f", info.format, "-c", "quit", str(info.path)],
                          capture_output=True, check=False, timeout=60)
    if proc.returncode != 0:
        why = last_line(proc.stderr or proc.stdout)
        if _lock_failure(proc.stderr):
            raise RefusedError(f"{info.path} is in use: QEMU cannot lock it for writing "
                               "(a running domain, or a running clone backed by it, "
                               "holds it)")
        raise LibshareError(f"cannot open {info.path} for writing: {why}")


# ------------------------------------------------------------------ partitions

@dataclass(frozen=True)
class Partition:
    """A filesystem area of the exported disk: partition ``number`` (0: the whole disk,
    no partition table), byte ``start`` and ``size``, the table's ``type`` and
    ``partuuid``; ``fs`` holds what ``blkid -p`` says about it (TYPE, UUID, LABEL)."""

    number: int
    start: int
    size: int
    type: str = ""
    partuuid: str = ""
    fs: dict[str, str] = field(default_factory=dict)

    @property
    def fstype(self) -> str:
        """Return the filesystem type blkid found ('' if none)."""
        return self.fs.get("TYPE", "")

    def name(self) -> str:
        """Return how messages name this area ("partition 2", "the whole disk")."""
        return f"partition {self.number}" if self.number else "the whole disk"


def parse_partition_table(data: dict[str, Any]) -> list[Partition]:
    """Return the partitions of ``sfdisk --json`` output ``data`` (MBR or GPT), with
    byte offsets and the PARTUUID the kernel would give each."""
    table = data.get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    disk_id = str(table.get("id", ""))
    out = []
    for i, p in enumerate(table.get("partitions", []), start=1):
        node = str(p.get("node", ""))
        digits = node[len(node.rstrip("0123456789")):]
        number = int(digits) if digits else i
        if table.get("label") == "gpt":
            partuuid = str(p.get("uuid", "")).lower()
        else:  # MBR: the disk signature and the partition number
            partuuid = f"{disk_id.removeprefix('0x').lower()}-{number:02x}" if disk_id else ""
        out.append(Partition(number, int(p["start"]) * sector, int(p["size"]) * sector,
                             str(p.get("type", "")), partuuid))
    return out


def parse_blkid(text: str) -> dict[str, str]:
    """Return the ``KEY=value`` lines of ``blkid -o export`` as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def partitions(export: Path, disk_size: int) -> list[Partition]:
    """Return the filesystem areas of the exported disk ``export``: its partitions, or
    the whole disk when it has no partition table; each with its blkid probe."""
    proc = subprocess.run(["sfdisk", "--json", str(export)], capture_output=True, text=True,
                          check=False, timeout=60)
    try:
        parts = parse_partition_table(json.loads(proc.stdout)) if proc.returncode == 0 else []
    except (ValueError, KeyError):
        parts = []
    if not parts:
        parts = [Partition(0, 0, disk_size)]
    out = []
    for p in parts:
        probe = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(p.start),
                                "-S", str(p.size), str(export)],
                               capture_output=True, text=True, check=False, timeout=60)
        out.append(Partition(p.number, p.start, p.size, p.type, p.partuuid,
                             parse_blkid(probe.stdout)))
    return out


def find_partition(parts: Sequence[Partition], spec: str) -> Partition | None:
    """Return the partition an fstab ``spec`` (UUID=, LABEL=, PARTUUID=) names."""
    key, _, value = spec.partition("=")
    value = value.strip('"')
    for p in parts:
        if key == "PARTUUID" and p.partuuid and p.partuuid == value.lower():
            return p
        if key in ("UUID", "LABEL") and p.fs.get(key) == value:
            return p
    return None


# ------------------------------------------------------------------ export and mounts

def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _is_mountpoint(path: Path) -> bool:
    """Return True if ``path`` is a mount point in this mount namespace."""
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(path) for line in fh)


@contextlib.contextmanager
def exported(path: Path, fmt: str, writable: bool, export: Path) -> Iterator[Path]:
    """Export disk image ``path`` (format ``fmt``; a qcow2's backing files are opened
    read-only) as the FUSE file ``export`` (absolute; created) through a
    qemu-storage-daemon child, and yield ``export``; the daemon is stopped at the end.
    With ``writable`` False nothing can be written. Raises RefusedError when QEMU cannot
    lock the image (someone uses it), LibshareError for other failures."""
    export = export.absolute()
    export.touch()
    ro = "off" if writable else "on"
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={path},read-only={ro}",
            "--blockdev", f"driver={fmt},node-name=disk0,file=file0,read-only={ro}",
            "--export", f"type=fuse,id=exp0,node-name=disk0,mountpoint={export},"
                        f"writable={'on' if writable else 'off'},allow-other=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + EXPORT_TIMEOUT
        while not _is_mountpoint(export):
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else b""
                why = last_line(err)
                if _lock_failure(err):
                    raise RefusedError(f"{path} is in use: QEMU cannot lock it (another "
                                       "process, a running domain perhaps, holds it)")
                raise LibshareError(f"qemu-storage-daemon cannot export {path}: {why}")
            if time.monotonic() > deadline:
                raise LibshareError(f"qemu-storage-daemon did not export {path} within "
                                    f"{EXPORT_TIMEOUT:.0f} s")
            time.sleep(0.05)
        yield export
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        if _is_mountpoint(export):  # the daemon died without unmounting
            subprocess.run(["umount", "-l", str(export)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            export.unlink()


def _umount(path: Path) -> None:
    """Unmount ``path`` (lazily if it is busy); its loop device clears itself."""
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(export: Path, part: Partition, target: Path, writable: bool,
            extra: str = "") -> Iterator[Path]:
    """Mount the filesystem of ``part`` of the exported disk on ``target`` through an
    auto-clearing loop device (read-only unless ``writable``; ``extra`` mount options
    added) and yield ``target``; unmounted at the end."""
    fstype = part.fstype
    opts = (RW_OPTIONS.get(fstype, "rw") if writable else RO_OPTIONS.get(fstype, "ro"))
    opts = ",".join(o for o in (f"loop,offset={part.start},sizelimit={part.size}", opts,
                                extra) if o)
    run(["mount", "-t", fstype, "-o", opts, str(export), str(target)],
        error=f"cannot mount {part.name()} ({fstype}) of the image")
    try:
        yield target
    finally:
        _umount(target)


@dataclass
class Opened:
    """An image opened on the host: its guest root tree mounted on ``root`` (and its
    separate /boot on ``root``/boot when the image has one), ``writable`` or not; the
    areas found (``parts``), the ``root_part`` and ``boot_part``."""

    image: Path
    export: Path
    root: Path
    writable: bool
    parts: list[Partition]
    root_part: Partition
    boot_part: Partition | None = None


def _root_of(export: Path, parts: Sequence[Partition], probe: Path
             ) -> tuple[Partition, str]:
    """Return the area holding the guest root (an ``etc/os-release``) and the extra
    mount option that reaches it (a btrfs subvolume); RefusedError saying what was
    found otherwise."""
    seen = []
    for p in parts:
        if not p.fstype or p.fstype in NOT_ROOT:
            seen.append(f"{p.name()}: {p.fstype or 'no filesystem'}")
            continue
        for sub in BTRFS_ROOTS if p.fstype == "btrfs" else ("",):
            extra = f"subvol={sub}" if sub else ""
            try:
                with mounted(export, p, probe, writable=False, extra=extra):
                    if tree.os_release_path(probe) is not None:
                        return p, extra
            except LibshareError:
                continue
        seen.append(f"{p.name()}: {p.fstype} without etc/os-release")
    unsupported = sorted({UNSUPPORTED[p.fstype] for p in parts if p.fstype in UNSUPPORTED})
    hint = f" ({', '.join(unsupported)} is not supported)" if unsupported else ""
    raise RefusedError("no filesystem of the image holds a guest root (etc/os-release); "
                       f"found {'; '.join(seen) or 'nothing'}{hint}")


@contextlib.contextmanager
def opened(path: Path, fmt: str, virtual_size: int, workdir: Path,
           writable: bool) -> Iterator[Opened]:
    """Open disk image ``path`` on the host: export it, find the filesystem holding the
    guest root, mount it on ``workdir/root`` (and a separate /boot named in its fstab),
    and yield an :class:`Opened`; everything is unmounted, detached and stopped at the
    end, on errors too. Raises RefusedError for a layout it cannot handle (no root found,
    LVM or LUKS, a separate /usr, a /boot it cannot find)."""
    workdir = workdir.absolute()
    with contextlib.ExitStack() as stack:
        export = stack.enter_context(exported(path, fmt, writable, workdir / "export"))
        parts = partitions(export, virtual_size)
        probe = workdir / "probe"
        probe.mkdir(exist_ok=True)
        root_part, extra = _root_of(export, parts, probe)
        root = workdir / "root"
        root.mkdir(exist_ok=True)
        stack.enter_context(mounted(export, root_part, root, writable, extra))
        opened_image = Opened(path, export, root, writable, parts, root_part)
        mounts = tree.fstab(root)
        if "/usr" in mounts:
            raise RefusedError("the image mounts /usr from a filesystem of its own "
                               "(not supported)")
        if "/boot" in mounts:
            boot = find_partition(parts, mounts["/boot"])
            if boot is None:
                raise RefusedError(f"the image's fstab mounts /boot from {mounts['/boot']}, "
                                   "which is not among its partitions")
            target = tree.resolve(root, "/boot")
            if not target.is_dir():
                raise RefusedError("the image's /boot is not a folder inside the image")
            stack.enter_context(mounted(export, boot, target, writable))
            opened_image.boot_part = boot
        yield opened_image


# ------------------------------------------------------------------ overlay and commit

def create_overlay(info: ImageInfo, overlay: Path) -> Path:
    """Create a qcow2 overlay at ``overlay`` backed by ``info``'s image (which is then
    only read until :func:`commit`); return ``overlay``."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", info.format, "-b",
         str(info.path), str(overlay)], error="cannot create the work overlay")
    return overlay


def allocated_bytes(path: Path) -> int:
    """Return the bytes the file ``path`` occupies on its filesystem."""
    return path.stat().st_blocks * 512


def check_commit_space(info: ImageInfo, overlay: Path, margin: int = 16 << 20) -> None:
    """Raise RefusedError (nothing changed yet) if the filesystem holding the image has
    less free space than committing ``overlay`` may need (its allocated size, plus
    ``margin``)."""
    need = allocated_bytes(overlay) + margin
    st = os.statvfs(info.path.parent)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise RefusedError(f"{info.path.parent} has {free >> 20} MiB free; committing the "
                           f"change into {info.path.name} needs {need >> 20} MiB "
                           "(nothing was changed)")


def commit(overlay: Path, info: ImageInfo) -> float:
    """Commit ``overlay`` into its backing image ``info`` (``qemu-img commit``, which
    takes the image's write lock) with SIGINT and SIGTERM held off until it is done;
    return the seconds it took. If the commit fails the overlay is kept, and the error
    says how to finish the change by hand."""
    t0 = time.monotonic()
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        proc = subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", str(overlay)],
                              capture_output=True, check=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if proc.returncode != 0:
        why = last_line(proc.stderr)
        if _lock_failure(proc.stderr):  # refused before anything was written
            raise RefusedError(f"{info.path} came into use meanwhile: QEMU cannot lock it "
                               "for writing (nothing was changed)")
        raise LibshareError(f"committing into {info.path} failed ({why}); it may be partly "
                            f"changed: the whole change is in {overlay}, finish it with "
                            f"'qemu-img commit {overlay}'")
    return time.monotonic() - t0
