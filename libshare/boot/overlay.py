"""The archive libshare appends to a domain's own initramfs-tools initrd so that a guest
booted with direct kernel boot runs libshare's boot-time redirect (the guest's own
initramfs, where ``guest install`` puts the hook, is never booted then).

Everything it adds lives under ``/usr/lib/libshare`` but one file, so nothing of the
domain's own initrd is replaced (its libraries, its modules and their ``modules.dep``
stay as they are)::

    conf/conf.d/libshare                sourced by /init before any script runs: puts
                                        /usr/lib/libshare/init-bottom first in
                                        /scripts/init-bottom/ORDER (libshare/data/guest/
                                        initrd-conf)
    usr/lib/libshare/init-bottom        the init-bottom script (libshare/data/guest/
                                        init-bottom, the one the guest's hook installs)
    usr/lib/libshare/libshare-redirect  the guest script
    usr/lib/libshare/initrd             "host": this initrd got libshare on the host
    usr/lib/libshare/exe/TOOL           the guest's own tools (util-linux, coreutils)...
    usr/lib/libshare/lib/SONAME         ...their libraries and ELF interpreter...
    usr/lib/libshare/bin/TOOL           ...run through a two-line wrapper: the guest's
                                        interpreter with --library-path lib/ (the
                                        initrd's own libc is never mixed in)
    usr/lib/libshare/modules/RELEASE/   the region's kernel modules of the guest's
                                        kernel, uncompressed, with ORDER (insmod order)

The guest's files are listed by ``libshare/data/guest/boot-files`` (run in the guest
through its agent) and read out through the agent; :func:`parse_listing` checks that
listing (it comes from the guest: every name is validated, sizes are bounded) and
:func:`build` assembles the archive (deterministic for the same inputs).
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from libshare.errors import LibshareError
from libshare.util import cpio

PREFIX = "usr/lib/libshare"
CONF = "conf/conf.d/libshare"
#: the init-bottom script's path in libshare's overlay (ORDER runs it)
INIT_BOTTOM = f"/{PREFIX}/init-bottom"
#: bytes of guest files one overlay may hold
MAX_TOTAL = 256 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}", re.ASCII)
_MODULE_SUFFIX = re.compile(r"\.ko(\.(xz|gz|zst))?$")


def _check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise LibshareError(f"the guest listed an invalid {what} name {name!r}")
    return name


@dataclass
class Listing:
    """What ``boot-files files`` printed: per tool its guest path and interpreter name
    (``exes``: name -> (path, interp or None)), ``libs`` (soname -> guest path; the
    interpreters too), ``modules`` (file name -> guest path, in insmod order),
    ``builtin`` modules and ``missing`` items ("tool NAME", "lib NAME", "module NAME")."""

    exes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    libs: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    builtin: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def parse_listing(text: str) -> Listing:
    """Return the :class:`Listing` of ``boot-files files`` output ``text``; raise
    LibshareError on a line that is not one of its forms or names an invalid file."""
    out = Listing()
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, _, rest = line.partition(" ")
        name, _, path = rest.partition(" ")
        if kind in ("exe", "interp", "lib", "module"):
            _check_name(name, kind)
            if not path.startswith("/") or "\0" in path or len(path) > 4096:
                raise LibshareError(f"the guest listed an invalid path for {name!r}")
        if kind == "exe":
            out.exes[name] = (path, None)
            last = name
        elif kind == "interp":
            out.libs.setdefault(name, path)
            if last is not None:
                out.exes[last] = (out.exes[last][0], name)
        elif kind == "lib":
            out.libs.setdefault(name, path)
        elif kind == "module":
            if not _MODULE_SUFFIX.search(name):
                raise LibshareError(f"the guest listed a module {name!r} that is no .ko")
            out.modules.setdefault(name, path)
        elif kind == "builtin":
            out.builtin.append(_check_name(name, "module"))
        elif kind == "missing":
            out.missing.append(f"{_check_name(name, 'item')} {path}".strip())
        else:
            raise LibshareError(f"unexpected line from the guest's boot-files: {line[:80]!r}")
    return out


def unpacked_module(name: str, data: bytes) -> tuple[str, bytes]:
    """Return ``(NAME.ko, bytes)`` of kernel module file ``name`` holding ``data``,
    unpacked when it is ``.ko.xz``, ``.ko.gz`` or ``.ko.zst`` (an initrd's insmod, klibc's
    too, then loads it). Raises LibshareError when it cannot be unpacked."""
    plain = _MODULE_SUFFIX.sub(".ko", name)
    try:
        if name.endswith(".xz"):
            return plain, lzma.decompress(data)
        if name.endswith(".gz"):
            return plain, gzip.decompress(data)
        if name.endswith(".zst"):
            if shutil.which("zstd") is None:
                raise LibshareError(f"module {name} is zstd-compressed and zstd is not "
                                    "installed on this host")
            return plain, subprocess.run(["zstd", "-dcq"], input=data, capture_output=True,
                                         check=True, timeout=120).stdout
    except (lzma.LZMAError, OSError, EOFError, subprocess.SubprocessError) as exc:
        raise LibshareError(f"cannot unpack module {name}: {exc}") from exc
    return plain, data


def wrapper(tool: str, interp: str | None) -> bytes:
    """Return the ``bin/TOOL`` wrapper running ``exe/TOOL`` with interpreter ``interp``
    and the overlay's libraries (a static tool, ``interp`` None, is run as it is)."""
    exe = f"/{PREFIX}/exe/{tool}"
    if interp is None:
        return f'#!/bin/sh\nexec {exe} "$@"\n'.encode()
    return (f"#!/bin/sh\n# libshare: the guest's {tool}, with its own libraries\n"
            f'exec /{PREFIX}/lib/{interp} --library-path /{PREFIX}/lib {exe} "$@"\n'
            ).encode()


def build(listing: Listing, files: dict[str, bytes], release: str, *, script: bytes,
          init_bottom: bytes, conf: bytes) -> bytes:
    """Return the overlay archive: the guest's files ``files`` (guest path -> bytes, as
    read for ``listing``) placed as the module docstring says, modules of kernel
    ``release``, the packaged ``script``, ``init_bottom`` and ``conf`` (conf.d snippet).
    Raises LibshareError when a listed file was not read or the files exceed
    :data:`MAX_TOTAL` bytes."""
    _check_name(release, "kernel release")
    total = 0

    def data_of(path: str) -> bytes:
        nonlocal total
        if path not in files:
            raise LibshareError(f"guest file {path} was not read")
        total += len(files[path])
        if total > MAX_TOTAL:
            raise LibshareError(f"the guest's boot files exceed {MAX_TOTAL >> 20} MiB")
        return files[path]

    entries: list[cpio.Entry] = [
        cpio.file_entry(CONF, conf, 0o644),
        cpio.file_entry(f"{PREFIX}/init-bottom", init_bottom, 0o755),
        cpio.file_entry(f"{PREFIX}/libshare-redirect", script, 0o755),
        cpio.file_entry(f"{PREFIX}/initrd", b"host\n", 0o644),
    ]
    for tool, (path, interp) in sorted(listing.exes.items()):
        entries.append(cpio.file_entry(f"{PREFIX}/exe/{tool}", data_of(path), 0o755))
        entries.append(cpio.file_entry(f"{PREFIX}/bin/{tool}", wrapper(tool, interp), 0o755))
    for soname, path in sorted(listing.libs.items()):
        entries.append(cpio.file_entry(f"{PREFIX}/lib/{soname}", data_of(path), 0o755))
    order = []
    mods = f"{PREFIX}/modules/{release}"
    for name, path in listing.modules.items():
        plain, data = unpacked_module(name, data_of(path))
        if plain in order:
            continue
        order.append(plain)
        entries.append(cpio.file_entry(f"{mods}/{plain}", data, 0o644))
    entries.append(cpio.file_entry(f"{mods}/ORDER", "".join(f"{m}\n" for m in order)
                                   .encode(), 0o644))
    # usr, usr/lib, conf and conf/conf.d exist in every initramfs-tools initrd; a
    # directory entry for them changes nothing there (the kernel's mkdir fails, its
    # chmod sets 0755 again)
    return cpio.write_archive(cpio.with_parents(entries), first_ino=0x200000)


def listed_paths(listing: Listing) -> Iterable[str]:
    """Return the guest paths to read for ``listing``, each once, in a stable order."""
    seen: dict[str, None] = {}
    for path, _interp in listing.exes.values():
        seen[path] = None
    for path in [*listing.libs.values(), *listing.modules.values()]:
        seen[path] = None
    return list(seen)
