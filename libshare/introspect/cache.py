"""Remembering what discovery found, so that a survey reads only what it walks: the
kernel of each boot (``STATE/introspect/<boot>.json``, keyed by the QEMU process and
re-validated against guest memory before use) and the layouts derived from BTF blobs
(in this process and in ``btf-v<format>-<digest>.json`` files, so a kernel build seen in
another guest or boot is not parsed again). A cache that cannot be read or written only
costs the work it would have saved.
"""


from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.introspect.discover import find_kernel, pick_banner, probe_init_task
from libshare.introspect.kernel import KernelInfo
from libshare.introspect.layout import Layout
from libshare.introspect.memory import PhysicalMemory
from libshare.util.files import atomic_write

log = logging.getLogger(__name__)
#: probes of a cached init_task (a running guest may tear one)
RETRIES = 3


def boot_key(pid: int) -> str:
    """Return an identity of the QEMU process (pid and start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return str(pid)


def cached_kernel(mem: PhysicalMemory, cache_file: Path | None, key: str) -> KernelInfo | None:
    """Return the KernelInfo cached in ``cache_file`` for boot ``key`` if it still
    describes the kernel in ``mem`` (init_task re-validated, banner unchanged)."""
    if cache_file is None:
        return None
    try:
        doc = json.loads(cache_file.read_text())
        if doc.get("key") != key or doc.get("format") != CACHE_FORMAT:
            return None
        info = KernelInfo.from_json(doc["info"])
    except (OSError, ValueError, KeyError, TypeError, LibshareError):
        return None
    fresh = None
    for _ in range(RETRIES):  # a running guest may tear a probe
        fresh = probe_init_task(mem, info.layout, info.init_task_phys)
        if fresh is not None:
            break
        mem.invalidate()
    if fresh is None or fresh.init_task != info.init_task or \
            fresh.page_offset_base != info.page_offset_base:
        return None
    info.pgd = fresh.pgd  # the idle task's active_mm changes; take today's
    if info.banner_phys is not None and \
            pick_banner(mem, [info.banner_phys])[0] != info.banner:
        return None
    return info


CACHE_MAX_AGE = 7 * 86400.0


#: bumped whenever KernelInfo or the layout keys change, so old caches are not trusted
CACHE_FORMAT = 3  # 3: the page-cache survey's layout members


CACHE_MAX_FILES = 256


def prune_cache(cache_dir: Path, keep: Path | None = None) -> None:
    """Remove per-boot cache files older than a week, and the oldest beyond
    :data:`CACHE_MAX_FILES` (best effort; ``keep`` is never removed)."""
    try:
        files = sorted(cache_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    now = time.time()
    excess = len(files) - CACHE_MAX_FILES
    for i, f in enumerate(files):
        if f == keep:
            continue
        with contextlib.suppress(OSError):
            if i < excess or now - f.stat().st_mtime > CACHE_MAX_AGE:
                f.unlink()


def save_kernel(cache_file: Path | None, key: str, info: KernelInfo) -> None:
    """Write ``info`` for boot ``key`` to ``cache_file`` (best effort) and prune old
    cache files next to it."""
    if cache_file is None:
        return
    prune_cache(cache_file.parent, keep=cache_file)
    _write_cache(cache_file, {"key": key, "format": CACHE_FORMAT, "info": info.to_json()})


def _write_cache(path: Path, doc: Any) -> None:
    """Replace the cache file ``path`` with ``doc`` as JSON (atomically); a cache that
    cannot be written is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(doc).encode())
    except (OSError, LibshareError) as exc:
        log.debug("cannot write %s: %s", path, exc)


#: layouts derived from BTF blobs in this process, by blob digest
_BTF_LAYOUTS: dict[str, Layout] = {}


class BtfLayouts:
    """The :class:`~libshare.introspect.kernel.LayoutStore` of a survey: layouts already
    derived from BTF blobs, in this process and (with ``cache_dir``) in
    ``btf-<digest>.json`` files there, so a kernel build already seen - in another
    guest, or an earlier boot - is not parsed again (a bad cache file only costs the
    parse)."""

    def __init__(self, cache_dir: Path | None) -> None:
        """Keep layouts in memory and, if given, under ``cache_dir``."""
        self.cache_dir = cache_dir

    def path(self, digest: str) -> Path:
        """Return the cache file of the layout of the BTF blob with ``digest`` (named by
        CACHE_FORMAT too: files of another layout format are never read)."""
        assert self.cache_dir is not None
        return self.cache_dir / f"btf-v{CACHE_FORMAT}-{digest}.json"

    def get(self, digest: str, /) -> Layout | None:
        """Return the layout derived from the BTF blob with ``digest``, or None (also
        when its cache file is unreadable or not a valid layout)."""
        if digest in _BTF_LAYOUTS:
            return _BTF_LAYOUTS[digest]
        if self.cache_dir is None:
            return None
        try:
            raw = json.loads(self.path(digest).read_text())
            offsets = {k: int(v) for k, v in raw.items() if not k.startswith("sizeof(")}
            sizes = {k[7:-1]: int(v) for k, v in raw.items() if k.startswith("sizeof(")}
            layout = Layout(offsets, sizes, f"cached layout of BTF {digest}")
        except (OSError, ValueError, TypeError, AttributeError, LibshareError) as exc:
            log.debug("BTF layout cache for %s unusable (%s); parsing BTF", digest, exc)
            return None
        _BTF_LAYOUTS[digest] = layout
        return layout

    def __setitem__(self, digest: str, layout: Layout, /) -> None:
        """Remember ``layout`` for ``digest`` (on disk best effort)."""
        _BTF_LAYOUTS[digest] = layout
        if self.cache_dir is not None:
            _write_cache(self.path(digest), layout.to_json())


def understand(mem: PhysicalMemory, layout: Layout | None = None,
               cache_file: Path | None = None, key: str = "") -> tuple[KernelInfo, bool]:
    """Return ``(KernelInfo, scanned)`` for the kernel in ``mem``: from the cache when
    valid (``scanned`` False), else by scanning guest RAM (and caching the result; a
    BTF blob already seen is not parsed again, see :class:`BtfLayouts`)."""
    if layout is None:
        info = cached_kernel(mem, cache_file, key)
        if info is not None:
            return info, False
    info = find_kernel(mem, layout,
                       layouts=BtfLayouts(cache_file.parent if cache_file else None))
    if layout is None:
        save_kernel(cache_file, key, info)
    return info, True
