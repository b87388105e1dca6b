"""Reading a domain's own initrd on the host: its archives in order (uncompressed newc
archives such as early microcode, then at most one compressed archive: gzip, xz, lzma
and bzip2 through the standard library, zstd, lz4 and lzo through the host's own tool),
the member names they hold, and which generator made it (:func:`classify`).

Everything is bounded (file size, members, bytes unpacked, seconds a decompressor may
run). This is for the CLI only (it may start a decompressor); the hook never reads an
initrd's contents.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import shutil
import subprocess
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from libshare.errors import LibshareError
from libshare.util.cpio import ArchiveError, ArchiveReader

#: the generators libshare tells apart
INITRAMFS_TOOLS, DRACUT, UNKNOWN = "initramfs-tools", "dracut", "unknown"
#: an initrd larger than this is not read
MAX_INITRD = 1 << 30
#: bytes a compressed archive may unpack to
MAX_UNPACKED = 4 << 30
#: seconds an external decompressor may run
DECOMPRESS_TIMEOUT = 120.0

#: leading bytes of each compressed format the kernel unpacks, and its name
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"), (b"BZh", "bzip2"), (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO\x00", "lzo"))
#: formats the standard library cannot unpack: the host tool that can
TOOLS: dict[str, list[str]] = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"],
                               "lzo": ["lzop", "-dc"]}
#: members every initrd that initramfs-tools built has, and libshare's overlay needs:
#: /init sources conf/conf.d/* before it runs the init-bottom scripts through ORDER
INITRAMFS_TOOLS_MEMBERS = frozenset({"init", "scripts/functions", "conf/initramfs.conf",
                                     "scripts/init-bottom/ORDER"})


class InitrdError(LibshareError):
    """A domain's initrd cannot be read (missing, too large, unknown or broken format)."""


@dataclass(frozen=True)
class InitrdInfo:
    """What :func:`inspect` found: ``path``, ``size``, ``sha256``, ``archives`` (one
    format name per archive in order: "cpio" or a compression), ``names`` (every
    member) and ``kind`` (:func:`classify`)."""

    path: str
    size: int
    sha256: str
    archives: tuple[str, ...]
    names: frozenset[str]
    kind: str


def classify(names: Iterable[str]) -> str:
    """Return which generator made an initrd holding members ``names``:
    :data:`INITRAMFS_TOOLS` (every member of :data:`INITRAMFS_TOOLS_MEMBERS`),
    :data:`DRACUT` (anything under ``usr/lib/dracut/`` or ``lib/dracut/``) or
    :data:`UNKNOWN`."""
    have = {n.lstrip("./") for n in names}
    if have >= INITRAMFS_TOOLS_MEMBERS:
        return INITRAMFS_TOOLS
    if any(n.startswith(("usr/lib/dracut/", "lib/dracut/")) for n in have):
        return DRACUT
    return UNKNOWN


def compression(head: bytes) -> str | None:
    """Return the compressed format whose magic ``head`` starts with, or None."""
    return next((name for magic, name in MAGICS if head.startswith(magic)), None)


class _Bounded:
    """A read-only stream over ``raw`` that raises InitrdError past ``limit`` bytes."""

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw, self.left = raw, limit

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n >= 0 else 1 << 20)
        self.left -= len(data)
        if self.left < 0:
            raise InitrdError(f"a compressed archive unpacks to more than {MAX_UNPACKED} "
                              "bytes")
        return bytes(data)


def _names(reader: ArchiveReader, out: set[str]) -> None:
    """Add the member names ``reader`` yields to ``out``."""
    for entry in reader.entries(data=False):
        out.add(entry.name)


class _Unpacked:
    """The decompressed bytes of the one compressed stream at ``fh``'s position, read
    through ``dec`` (a zlib, lzma or bz2 decompressor object); what follows the stream
    is not read."""

    def __init__(self, fh: IO[bytes], dec: Any) -> None:
        self.fh, self.dec, self.buf = fh, dec, b""

    def read(self, n: int = -1) -> bytes:
        while not self.buf and not self.dec.eof:
            chunk = self.fh.read(1 << 14)
            if not chunk:
                raise EOFError("the compressed stream ends early")
            self.buf += self.dec.decompress(chunk)
        n = len(self.buf) if n < 0 else n
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _unpack_stdlib(fh: IO[bytes], fmt: str, out: set[str]) -> int:
    """List the compressed archive at ``fh``'s position; return the archives read."""
    dec: Any = {"gzip": lambda: zlib.decompressobj(31),
                "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
                "lzma": lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE),
                "bzip2": bz2.BZ2Decompressor}[fmt]()
    reader = ArchiveReader(_Bounded(_Unpacked(fh, dec), MAX_UNPACKED))
    try:
        _names(reader, out)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise InitrdError(f"broken {fmt} archive: {exc}") from exc
    return reader.archives


def _unpack_tool(path: Path, offset: int, fmt: str, out: set[str]) -> int:
    """List the compressed archive at ``offset`` of ``path`` with the host's tool for
    ``fmt``; return the archives read."""
    argv = TOOLS[fmt]
    if shutil.which(argv[0]) is None:
        raise InitrdError(f"the initrd is {fmt}-compressed and {argv[0]} is not installed "
                          f"on this host (install it to let libshare read the initrd)")
    with open(path, "rb") as src:
        src.seek(offset)
        proc = subprocess.Popen(argv, stdin=src, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        timer = threading.Timer(DECOMPRESS_TIMEOUT, proc.kill)
        timer.start()
        assert proc.stdout is not None
        reader = ArchiveReader(_Bounded(proc.stdout, MAX_UNPACKED))
        try:
            _names(reader, out)
        except ArchiveError as exc:
            if reader.archives == 0:
                raise InitrdError(f"broken {fmt} archive: {exc}") from exc
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
            proc.stdout.close()
    if reader.archives == 0:
        raise InitrdError(f"{argv[0]} could not unpack the initrd's {fmt} archive")
    return reader.archives


def inspect(path: str | os.PathLike[str]) -> InitrdInfo:
    """Return the :class:`InitrdInfo` of the initrd at ``path``; raise InitrdError (one
    line) when it is missing, not a regular file, larger than :data:`MAX_INITRD`, or
    not a sequence of newc archives of which only the last may be compressed."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise InitrdError(f"cannot read initrd {p}: {exc.strerror}") from exc
    if not p.is_file():
        raise InitrdError(f"initrd {p} is not a regular file")
    if st.st_size > MAX_INITRD:
        raise InitrdError(f"initrd {p} is larger than {MAX_INITRD >> 20} MiB")
    names: set[str] = set()
    archives: list[str] = []
    h = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            fh.seek(0)
            reader = ArchiveReader(fh)
            _names(reader, names)
            archives += ["cpio"] * reader.archives
            if reader.end is not None:
                fh.seek(reader.end)
                fmt = compression(fh.read(8))
                if fmt is None:
                    raise InitrdError(f"initrd {p}: unknown data at offset {reader.end} "
                                      "(neither a cpio archive nor a compressed one)")
                fh.seek(reader.end)
                count = _unpack_tool(p, reader.end, fmt, names) if fmt in TOOLS \
                    else _unpack_stdlib(fh, fmt, names)
                archives += [fmt] * count
    except ArchiveError as exc:
        raise InitrdError(f"initrd {p}: {exc}") from exc
    except OSError as exc:
        raise InitrdError(f"cannot read initrd {p}: {exc.strerror or exc}") from exc
    if not archives:
        raise InitrdError(f"initrd {p} holds no archive")
    return InitrdInfo(str(p), st.st_size, h.hexdigest(), tuple(archives),
                      frozenset(names), classify(names))
