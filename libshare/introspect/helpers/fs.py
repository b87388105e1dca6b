"""Filesystem helpers: the path of an open file as ``/proc/PID/maps`` prints it.

Owns :func:`d_path` (``struct path`` -> string: the dentry chain up to the mount's root,
then across mount points through ``struct mount`` to the namespace root, " (deleted)"
appended for an unlinked dentry), :func:`file_path` (``struct file`` -> string) and
:func:`file_fs` (which filesystem type and device a file lives on; a file bound from the
library region is on ``erofs`` on a ``pmem`` device whatever path it is mapped at).
Paths deeper than :data:`MAX_DEPTH` components, names longer than 255 bytes, mount
chains longer than :data:`MAX_MOUNTS`, or a mount met twice on one walk or a dentry met
twice within one mount (a loop) raise :class:`~libshare.introspect.kernel.WalkError`.
"""

from __future__ import annotations

from libshare.introspect.kernel import Kernel, WalkError

MAX_DEPTH = 256
MAX_MOUNTS = 64
NAME_MAX = 255


def dentry_name(k: Kernel, dentry: int) -> bytes:
    """Return the name of ``dentry`` (its ``d_name``)."""
    lay = k.layout
    length = k.u32(dentry + lay.off("dentry.d_name.len"))
    if length > NAME_MAX:
        raise WalkError(f"dentry {dentry:#x} name length {length}")
    if length == 0:
        return b""
    return k.read(k.u64(dentry + lay.off("dentry.d_name.name")), length)


def d_unlinked(k: Kernel, dentry: int) -> bool:
    """Return True if ``dentry`` is unhashed and not a root (the file was deleted)."""
    lay = k.layout
    if not lay.has("dentry.d_hash.pprev"):
        return False
    if k.u64(dentry + lay.off("dentry.d_parent")) == dentry:
        return False
    return k.u64(dentry + lay.off("dentry.d_hash.pprev")) == 0


def d_path(k: Kernel, vfsmount: int, dentry: int) -> str:
    """Return the absolute path of (``vfsmount``, ``dentry``) in its mount namespace."""
    lay = k.layout
    mount = vfsmount - lay.off("mount.mnt")
    parts: list[bytes] = []
    deleted = d_unlinked(k, dentry)
    crossings = 0
    dentries: set[int] = set()
    mounts = {mount}
    for _ in range(MAX_DEPTH + MAX_MOUNTS):
        mnt_root = k.u64(mount + lay.off("mount.mnt") + lay.off("vfsmount.mnt_root"))
        if dentry == mnt_root:
            parent = k.u64(mount + lay.off("mount.mnt_parent"))
            if parent == mount or parent == 0:
                break
            crossings += 1
            if crossings > MAX_MOUNTS:
                raise WalkError("mount chain too long")
            if parent in mounts:
                raise WalkError(f"mount chain loops at {parent:#x}")
            mounts.add(parent)
            dentries.clear()  # a bind mount may show a dentry again above its mountpoint
            dentry = k.u64(mount + lay.off("mount.mnt_mountpoint"))
            mount = parent
            continue
        parent = k.u64(dentry + lay.off("dentry.d_parent"))
        if parent == dentry:  # a root that is not its mount's root (detached)
            break
        if dentry in dentries:
            raise WalkError(f"dentry chain loops at {dentry:#x}")
        dentries.add(dentry)
        parts.append(dentry_name(k, dentry))
        if len(parts) > MAX_DEPTH:
            raise WalkError("path deeper than 256 components")
        dentry = parent
    else:
        raise WalkError("path walk did not reach a root")
    path = "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in reversed(parts))
    return path + " (deleted)" if deleted else path


def file_path(k: Kernel, file: int) -> str:
    """Return the path of the open ``struct file`` at ``file``."""
    lay = k.layout
    fpath = file + lay.off("file.f_path")
    return d_path(k, k.u64(fpath + lay.off("path.mnt")), k.u64(fpath + lay.off("path.dentry")))


FS_KEYS = ("file.f_inode", "inode.i_sb", "super_block.s_type", "super_block.s_id",
           "file_system_type.name")


def file_fs(k: Kernel, file: int) -> tuple[str, str] | None:
    """Return ``(filesystem type, device name)`` of the open ``struct file`` at ``file``
    (e.g. ``("erofs", "pmem0")``), or None when the layout lacks the members."""
    lay = k.layout
    if not all(lay.has(key) for key in FS_KEYS):
        return None
    inode = k.u64(file + lay.off("file.f_inode"))
    sb = k.u64(inode + lay.off("inode.i_sb"))
    fstype = k.u64(sb + lay.off("super_block.s_type"))
    name = k.cstring(k.u64(fstype + lay.off("file_system_type.name")), 32)
    dev = k.cstring(sb + lay.off("super_block.s_id"), 32)
    return (name.decode("ascii", "replace"), dev.decode("ascii", "replace"))


def is_region_fs(fs: tuple[str, str] | None) -> bool:
    """Return True if ``fs`` (from :func:`file_fs`) is a libshare region: EROFS on pmem."""
    return fs is not None and fs[0] == "erofs" and fs[1].startswith("pmem")
