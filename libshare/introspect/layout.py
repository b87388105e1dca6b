"""The guest kernel's structure layout: the member offsets libshare's walkers use.

Owns :class:`Layout` (``"struct.member" -> byte offset`` plus struct sizes) and the
three ways to get one:

- :func:`layout_from_btf`: from the kernel's own BTF (found in guest RAM; no debug
  packages needed) - the normal case;
- :func:`layout_from_isf`: from a Volatility3-style ISF JSON file (``user_types`` ->
  ``{"task_struct": {"size": N, "fields": {"comm": {"offset": X, "type": {...}}}}}``);
  anonymous members (``unnamed_field_*`` whose type is another user type) are searched
  too, and a dotted path follows ``type.name`` of struct members;
- :func:`layout_from_offsets`: a small offsets file, for kernels without BTF, either
  JSON (``{"task_struct.comm": 1752, "sizeof(task_struct)": 3264, ...}``) or text, one
  ``struct.member OFFSET`` per line (``#`` comments, decimal or ``0x`` hex), e.g.::

      task_struct.tasks   0x420
      task_struct.comm    1752

The keys a kernel must provide are :data:`REQUIRED`; :data:`OPTIONAL` keys select
between kernel generations (``mm_struct.mm_mt`` on Linux >= 6.1, ``mm_struct.mmap`` and
``vm_area_struct.vm_next`` before; ``task_struct.thread_group`` before 6.7,
``signal_struct.thread_head`` / ``task_struct.thread_node`` after).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.introspect.btf import Btf, BtfError
from libshare.util import files

#: bytes of an ISF or offsets file read at most (a whole kernel's ISF is ~50 MiB)
MAX_LAYOUT_FILE = 512 * 1024 * 1024

REQUIRED: tuple[str, ...] = (
    "task_struct.tasks", "task_struct.pid", "task_struct.tgid", "task_struct.comm",
    "task_struct.mm", "task_struct.active_mm", "task_struct.group_leader",
    "task_struct.real_parent", "task_struct.signal",
    "mm_struct.pgd", "mm_struct.map_count",
    "vm_area_struct.vm_start", "vm_area_struct.vm_end", "vm_area_struct.vm_flags",
    "vm_area_struct.vm_pgoff", "vm_area_struct.vm_file", "vm_area_struct.vm_mm",
    "file.f_path", "path.mnt", "path.dentry",
    "dentry.d_parent", "dentry.d_name.len", "dentry.d_name.name",
    "mount.mnt", "mount.mnt_parent", "mount.mnt_mountpoint", "vfsmount.mnt_root",
)
OPTIONAL: tuple[str, ...] = (
    "mm_struct.mm_mt", "maple_tree.ma_root", "maple_tree.ma_flags",
    "maple_range_64.pivot", "maple_range_64.slot", "maple_range_64.meta",
    "maple_arange_64.pivot", "maple_arange_64.slot", "maple_arange_64.meta",
    "mm_struct.mmap", "vm_area_struct.vm_next",
    "task_struct.thread_group", "task_struct.thread_node", "signal_struct.thread_head",
    "dentry.d_hash.pprev", "task_struct.parent",
    # /proc-style names of kernel threads and workqueue workers
    "task_struct.flags", "task_struct.worker_private", "task_struct.set_child_tid",
    "kthread.full_name", "kthread.data", "worker.desc", "worker.current_work",
    "worker.pool",
    # which filesystem (and block device) a mapped file lives on: region or not
    "file.f_inode", "inode.i_sb", "super_block.s_type", "super_block.s_id",
    "file_system_type.name",
    # --- the page-cache survey (pagecache.py): superblocks, their inodes and mounts ---
    "super_block.s_list", "super_block.s_inodes", "super_block.s_dev", "super_block.s_root",
    "super_block.s_mounts", "inode.i_sb_list", "inode.i_mode", "inode.i_ino",
    "inode.i_size", "inode.i_mapping", "inode.i_data", "inode.i_dentry",
    "address_space.nrpages", "dentry.d_u.d_alias", "dentry.d_inode",
    "mount.mnt_instance",     # a superblock's mounts: a list_head (Linux 5.10, 6.1) ...
    "mount.mnt_next_for_sb",  # ... or a pointer chain (Linux 6.18)
    "mount.mnt_ns", "vfsmount.mnt_sb", "task_struct.fs", "fs_struct.root",
    # --- end of the page-cache survey's members ---
)
SIZES: tuple[str, ...] = ("task_struct", "mm_struct", "vm_area_struct", "dentry")


class LayoutError(LibshareError):
    """The layout source lacks offsets libshare needs, or cannot be read."""


class Layout:
    """Byte offsets of struct members (``off("task_struct.comm")``) and struct sizes
    (``size("task_struct")``), with ``source`` naming where they came from."""

    def __init__(self, offsets: Mapping[str, int], sizes: Mapping[str, int] | None = None,
                 source: str = "") -> None:
        """Hold ``offsets`` and ``sizes``; raise LayoutError if a required key is missing."""
        self.offsets = dict(offsets)
        self.sizes = dict(sizes or {})
        self.source = source
        missing = [k for k in REQUIRED if k not in self.offsets]
        if missing:
            raise LayoutError(f"kernel layout from {source or 'input'} lacks "
                              f"{', '.join(missing)}")
        if "mm_struct.mm_mt" not in self.offsets and not (
                "mm_struct.mmap" in self.offsets and "vm_area_struct.vm_next" in self.offsets):
            raise LayoutError(f"kernel layout from {source or 'input'} has neither "
                              "mm_struct.mm_mt nor mm_struct.mmap + vm_area_struct.vm_next")

    def off(self, key: str) -> int:
        """Return the byte offset for ``"struct.member"``; raise LayoutError if unknown."""
        try:
            return self.offsets[key]
        except KeyError:
            raise LayoutError(f"kernel layout has no {key}") from None

    def has(self, key: str) -> bool:
        """Return True if the layout knows ``"struct.member"``."""
        return key in self.offsets

    def size(self, struct: str, default: int = 0) -> int:
        """Return ``sizeof(struct)``, or ``default`` if unknown."""
        return self.sizes.get(struct, default)

    @property
    def maple(self) -> bool:
        """Return True if VMAs live in a maple tree (Linux >= 6.1)."""
        return "mm_struct.mm_mt" in self.offsets

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able dict that :func:`layout_from_offsets` reads back."""
        out: dict[str, Any] = dict(self.offsets)
        out.update({f"sizeof({k})": v for k, v in self.sizes.items()})
        return out


def layout_from_btf(btf: Btf, source: str = "BTF") -> Layout:
    """Return the Layout for the kernel ``btf`` describes."""
    offsets: dict[str, int] = {}
    for key in REQUIRED + OPTIONAL:
        struct, _, path = key.partition(".")
        try:
            offsets[key] = btf.offsetof(struct, path)
        except BtfError:
            continue
    sizes = {}
    for s in SIZES:
        try:
            sizes[s] = btf.struct_size(s)
        except BtfError:
            continue
    return Layout(offsets, sizes, source)


def _isf_member(types: Mapping[str, Any], struct: str, name: str, depth: int = 0
                ) -> tuple[int, dict[str, Any]] | None:
    if depth > 8 or struct not in types:
        return None
    fields = types[struct].get("fields", {})
    if name in fields:
        f = fields[name]
        return int(f["offset"]), f.get("type", {})
    for fname, f in fields.items():
        ftype = f.get("type", {})
        if (fname.startswith("unnamed") or fname.startswith("__anon")) and \
                ftype.get("kind") in ("struct", "union"):
            inner = _isf_member(types, ftype.get("name", ""), name, depth + 1)
            if inner is not None:
                return int(f["offset"]) + inner[0], inner[1]
    return None


def layout_from_isf(path: str | Path) -> Layout:
    """Return the Layout read from a Volatility3-style ISF JSON file at ``path``."""
    try:
        doc = json.loads(files.read_regular(path, MAX_LAYOUT_FILE))
        types = doc["user_types"]
    except (OSError, ValueError, KeyError, TypeError, LibshareError) as exc:
        raise LayoutError(f"cannot read ISF {path}: {exc}") from exc
    offsets: dict[str, int] = {}
    for key in REQUIRED + OPTIONAL:
        struct, _, dotted = key.partition(".")
        total, cur, ok = 0, struct, True
        for part in dotted.split("."):
            hit = _isf_member(types, cur, part)
            if hit is None:
                ok = False
                break
            total += hit[0]
            cur = hit[1].get("name", "")
        if ok:
            offsets[key] = total
    sizes = {s: int(types[s]["size"]) for s in SIZES if s in types and "size" in types[s]}
    return Layout(offsets, sizes, f"ISF {path}")


_LINE = re.compile(r"^\s*([A-Za-z_][\w.()]*)\s*[=:]?\s*(0[xX][0-9a-fA-F]+|\d+)\s*$")


def layout_from_offsets(path: str | Path) -> Layout:
    """Return the Layout read from an offsets file (JSON object or ``key OFFSET`` lines)."""
    try:
        text = files.read_regular(path, MAX_LAYOUT_FILE).decode()
    except (OSError, ValueError, LibshareError) as exc:
        raise LayoutError(f"cannot read offsets file {path}: {exc}") from exc
    raw: dict[str, int] = {}
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
            raw = {str(k): int(v) for k, v in doc.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise LayoutError(f"bad offsets JSON {path}: {exc}") from exc
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0]
            if not line.strip():
                continue
            m = _LINE.match(line)
            if not m:
                raise LayoutError(f"{path}:{n}: expected 'struct.member OFFSET'")
            raw[m.group(1)] = int(m.group(2), 0)
    offsets = {k: v for k, v in raw.items() if not k.startswith("sizeof(")}
    sizes = {k[7:-1]: v for k, v in raw.items() if k.startswith("sizeof(") and k.endswith(")")}
    return Layout(offsets, sizes, f"offsets file {path}")
