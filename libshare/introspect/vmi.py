"""The optional LibVMI reader: a second, independent way to read guest memory.

Owns :class:`VmiMemory` (a :class:`~libshare.introspect.memory.PhysicalMemory` whose
reads go through LibVMI's FILE mode, ``vmi_read_pa``, over a raw physical-memory file:
a dump, or the shared file/memfd backing a running guest's RAM), :func:`vmi_read_va` (LibVMI's own x86-64
page-table walk, with the paging mode given in the access context, since FILE mode has
no registers to detect it) and :func:`dump_raw` (write guest RAM from any reader into
such a raw file, sparse over holes). Used to cross-check the default backend and the
page-table walker in tests; needs the ``libvmi`` PyPI package (extra ``vmi``).
No LibVMI OS profile or System.map is needed: libshare finds the kernel itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError
from libshare.introspect.memory import MemoryReadError, PhysicalMemory, RamBlock

ACCESS_CONTEXT_VERSION = 1  # what the libvmi 3.7.1 wheel accepts (it warns on 2)


def _libvmi() -> Any:
    try:
        import libvmi
    except ImportError as exc:
        raise LibshareError("the LibVMI binding is not installed (pip install libvmi)") from exc
    return libvmi


def dump_raw(mem: PhysicalMemory, path: str | os.PathLike[str],
             chunk: int = 16 << 20) -> Path:
    """Write every RAM block of ``mem`` to ``path`` at file offset = guest-physical
    address (holes left sparse); return the path."""
    out = Path(path)
    end = max(e for _, e in mem.ram_ranges())
    with open(out, "wb") as fh:
        fh.truncate(end)
        for block in mem.blocks:
            pos = block.start
            while pos < block.end:
                n = min(chunk, block.end - pos)
                fh.seek(pos)
                fh.write(mem.read_uncached(pos, n))
                pos += n
    return out


class VmiMemory(PhysicalMemory):
    """Guest RAM read by LibVMI (FILE mode) from a raw dump at ``path``."""

    def __init__(self, path: str | os.PathLike[str],
                 ranges: Sequence[tuple[int, int]] | None = None,
                 blocks: Sequence[RamBlock] | None = None) -> None:
        """Open ``path`` with LibVMI; ``ranges`` are the guest-physical ``(start, end)``
        ranges that are RAM, at file offset = guest-physical address (default: the whole
        file); or ``blocks`` give each RAM range's file offset (a shared RAM file or
        memfd, where RAM above 4 GiB follows the low RAM; LibVMI's own page-table walk,
        :func:`vmi_read_va`, is right only where offset = address)."""
        libvmi = _libvmi()
        try:
            self.vmi = libvmi.Libvmi(str(path), libvmi.INIT_DOMAINNAME,
                                     mode=libvmi.VMIMode.FILE, partial=True)
        except Exception as exc:  # LibVMI raises plain LibvmiError/RuntimeError
            raise MemoryReadError(f"LibVMI cannot open {path}: {exc}") from exc
        size = os.path.getsize(path)
        if blocks is None:
            blocks = [RamBlock(lo, hi - lo, lo) for lo, hi in ranges] if ranges else \
                [RamBlock(0, size, 0)]
        super().__init__(blocks)

    def _read_backing(self, offset: int, length: int) -> bytes:
        try:
            data, n = self.vmi.read_pa(offset, length)
        except Exception as exc:
            raise MemoryReadError(f"LibVMI read_pa {offset:#x}: {exc}") from exc
        return bytes(data[:n])

    def close(self) -> None:
        """Destroy the LibVMI instance."""
        if self.vmi is not None:
            self.vmi.destroy()
            self.vmi = None


def vmi_read_va(mem: VmiMemory, dtb: int, va: int, length: int,
                levels: int = 4) -> bytes | None:
    """Return ``length`` bytes at virtual ``va`` translated by LibVMI's own page-table
    walk from the tables at guest-physical ``dtb`` (IA-32e paging), or None if LibVMI
    cannot translate or read them."""
    libvmi = _libvmi()
    from libvmi.libvmi import ffi, lib

    if levels != 4:
        raise LibshareError("LibVMI's IA-32e mode walks 4-level tables only")
    ctx = ffi.new("access_context_t *")
    ctx.version = ACCESS_CONTEXT_VERSION
    ctx.pm = lib.VMI_PM_IA32E
    ctx.tm = lib.VMI_TM_PROCESS_PT
    ctx.pt = dtb
    ctx.addr = va
    buf = ffi.new("char[]", length)
    got = ffi.new("size_t *")
    status = lib.vmi_read(mem.vmi.vmi, ctx, length, buf, got)
    if status != libvmi.VMIStatus.SUCCESS.value or got[0] != length:
        return None
    return bytes(ffi.unpack(buf, length))
