"""libshare's per-domain initrd for direct kernel boot, on the host:
``STATE/boot/UUID/`` (UUID: the domain's) holds

- ``initrd.img``: the domain's own initrd, zero padding to 4 bytes, then
  ``overlay.cpio`` (the kernel unpacks concatenated archives), what the domain boots;
- ``overlay.cpio``: the archive libshare appends (:mod:`libshare.boot.overlay`);
- ``boot.json``: the :class:`Record`: the original initrd's path, size and SHA-256, the
  overlay's and the built file's SHA-256, the kernel release the overlay's modules are
  for, when and by what it was built, and why it was last rebuilt.

:func:`build` writes it (``guest install``); :func:`check` is the hook's ``prepare``
check, which reads only what the record and the state directory name: it refuses when
libshare's initrd or its record cannot be verified, and rebuilds ``initrd.img`` from the
domain's original and the recorded overlay when the original changed since (a kernel
update on the host) or the built file does not match its record. The hook starts no
program: everything here is file I/O. :func:`refresh` does the same rebuild for
``libshare enable``; :func:`remove` drops the folder (``disable``, ``unredirect``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from libshare.errors import LibshareError, RefusedError
from libshare.util.cpio import append_archive
from libshare.util.digest import cached_sha256
from libshare.util.files import atomic_write

BOOT_DIR = "boot"
INITRD, OVERLAY, RECORD = "initrd.img", "overlay.cpio", "boot.json"
#: a record larger than this is not read
MAX_RECORD = 64 * 1024
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Record:
    """``boot.json``: what libshare's initrd of domain ``domain`` (``uuid``) was built
    from (``original``: path, ``original_size``, ``original_sha256``; the appended
    ``overlay_sha256``), what it is (``initrd_sha256``), the kernel ``release`` of the
    overlay's modules and the domain's ``kernel`` path at the time, the initrd
    ``generator`` found, ``built_at`` (epoch seconds) and ``built_by`` (guest install,
    enable, prepare) and ``note`` (why it was last rebuilt, or None)."""

    domain: str
    uuid: str
    original: str
    original_size: int
    original_sha256: str
    overlay_sha256: str
    initrd_sha256: str
    release: str
    kernel: str | None
    generator: str
    built_at: float
    built_by: str
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict."""
        return asdict(self)


def domain_dir(state_dir: Path, uuid: str) -> Path:
    """Return ``STATE/boot/UUID``; raise RefusedError when ``uuid`` is not a UUID in
    libvirt's lower-case form (it becomes a folder name)."""
    if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
        raise RefusedError(f"domain UUID {uuid!r} is not a UUID")
    return state_dir / BOOT_DIR / uuid


def initrd_path(state_dir: Path, uuid: str) -> Path:
    """Return where libshare's initrd of domain ``uuid`` lives under ``state_dir``."""
    return domain_dir(state_dir, uuid) / INITRD


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(state_dir: Path, uuid: str, domain: str, original: Path, original_sha256: str,
          overlay: bytes, *, release: str, kernel: str | None, generator: str,
          built_by: str) -> Record:
    """Write ``STATE/boot/UUID/`` for domain ``domain``: ``overlay.cpio``, ``initrd.img``
    (the file ``original``, which must still have the SHA-256 ``original_sha256`` that
    was inspected, followed by ``overlay``) and ``boot.json``; return the Record.
    ``initrd.img`` is readable by others only if the original is. Raises LibshareError
    (nothing replaced) when a write fails or the original changed meanwhile."""
    folder = domain_dir(state_dir, uuid)
    try:
        for d in (state_dir, state_dir / BOOT_DIR, folder):
            d.mkdir(mode=0o755, exist_ok=True)
        st = original.stat()
        mode = 0o644 if st.st_mode & stat.S_IROTH else 0o600
        atomic_write(folder / OVERLAY, overlay, mode=mode)
        built = append_archive(original, overlay, folder / INITRD, mode=mode)
    except OSError as exc:
        raise LibshareError(f"cannot write libshare's initrd in {folder}: "
                            f"{exc.strerror or exc}") from exc
    record = Record(domain=domain, uuid=uuid, original=str(original),
                    original_size=st.st_size, original_sha256=original_sha256,
                    overlay_sha256=_sha256(overlay), initrd_sha256=built, release=release,
                    kernel=kernel, generator=generator, built_at=round(time.time(), 3),
                    built_by=built_by)
    if _prefix_sha256(folder / INITRD, st.st_size) != original_sha256:
        raise LibshareError(f"the domain's initrd {original} changed while libshare read it")
    _save(folder, record)
    return record


def _prefix_sha256(path: Path, size: int) -> str:
    """Return the SHA-256 of the first ``size`` bytes of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = size
        while left > 0 and (chunk := fh.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _save(folder: Path, record: Record) -> None:
    try:
        atomic_write(folder / RECORD, (json.dumps(record.as_dict(), indent=1) + "\n")
                     .encode(), durable=False)
    except OSError as exc:
        raise LibshareError(f"cannot write {folder / RECORD}: {exc.strerror}") from exc


def _regular(path: Path) -> os.stat_result | None:
    """Return the lstat of ``path`` when it is a regular file (not a symlink), else None."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def load(state_dir: Path, uuid: str) -> Record | None:
    """Return the Record of domain ``uuid`` under ``state_dir``, or None when there is
    none (or it is not a small regular file holding a well-formed record)."""
    path = domain_dir(state_dir, uuid) / RECORD
    st = _regular(path)
    if st is None or st.st_size > MAX_RECORD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            doc = json.loads(fh.read(MAX_RECORD))
        rec = Record(**doc)
    except (OSError, ValueError, TypeError):
        return None
    return rec if rec.uuid == uuid else None


def _inside(state_dir: Path, folder: Path) -> bool:
    """True when ``folder`` resolves to itself inside the resolved ``state_dir`` (no
    symbolic link on the way leaves or redirects it)."""
    real_state = os.path.realpath(state_dir)
    want = os.path.join(real_state, os.path.relpath(folder, state_dir))
    return os.path.realpath(folder) == want and want.startswith(real_state + os.sep)


def _rebuild(state_dir: Path, rec: Record, original_sha256: str, by: str, note: str,
             cache: Path | None) -> Record:
    """Rebuild ``initrd.img`` of ``rec`` from its original (now ``original_sha256``) and
    the recorded overlay; return the new Record. RefusedError when the overlay does not
    match its record."""
    folder = domain_dir(state_dir, rec.uuid)
    path = folder / OVERLAY
    st = _regular(path)
    if st is None or st.st_size > 1 << 30:
        raise RefusedError(f"libshare's initrd overlay {path} is missing: run 'libshare "
                           f"guest install {rec.domain}' again or 'libshare disable "
                           f"{rec.domain}'")
    overlay = path.read_bytes()
    if _sha256(overlay) != rec.overlay_sha256:
        raise RefusedError(f"libshare's initrd overlay {path} does not match its record: "
                           f"run 'libshare guest install {rec.domain}' again")
    original = Path(rec.original)
    mode = 0o644 if original.stat().st_mode & stat.S_IROTH else 0o600
    built = append_archive(original, overlay, folder / INITRD, mode=mode)
    if _prefix_sha256(folder / INITRD, original.stat().st_size) != original_sha256:
        raise RefusedError(f"the domain's initrd {original} changes while libshare reads it")
    new = replace(rec, original_size=original.stat().st_size,
                  original_sha256=original_sha256, initrd_sha256=built,
                  built_at=round(time.time(), 3), built_by=by, note=note)
    _save(folder, new)
    if cache is not None:
        with contextlib.suppress(OSError):
            cached_sha256(folder / INITRD, cache)  # the next check is a stat
    return new


def _refresh(state_dir: Path, rec: Record, by: str, cache: Path | None) -> str:
    """Bring ``rec``'s initrd up to date with its original; return "ok" or what was
    rebuilt and why. RefusedError when the original is missing or the parts do not
    match their record."""
    original = Path(rec.original)
    if not original.is_file():
        raise RefusedError(f"the domain's own initrd {original} (that libshare's initrd "
                           f"extends) is missing: restore it, or run 'libshare disable "
                           f"{rec.domain}'")
    try:
        now = cached_sha256(original, cache)
    except OSError as exc:
        raise RefusedError(f"cannot read the domain's own initrd {original}: "
                           f"{exc.strerror}") from exc
    if now != rec.original_sha256:
        note = (f"the domain's initrd {original} changed (kernel update on the host?): "
                f"rebuilt from it; its modules are libshare's for {rec.release}")
        _rebuild(state_dir, rec, now, by, note, cache)
        return f"rebuilt: {original} changed"
    built = domain_dir(state_dir, rec.uuid) / INITRD
    try:
        ok = _regular(built) is not None and cached_sha256(built, cache) == rec.initrd_sha256
    except OSError:
        ok = False
    if not ok:
        _rebuild(state_dir, rec, now, by, f"{built} did not match its record: rebuilt",
                 cache)
        return f"rebuilt: {built} did not match its record"
    return "ok"


def check(state_dir: Path, uuid: str, initrd: str | None, current: str | None,
          previous: str | None, cache: Path | None) -> str:
    """The hook's ``prepare`` check of a domain whose enrolment records a switch to
    libshare's initrd (``current``, from the domain's own ``previous``) while the
    domain's definition names ``initrd``; return a short result for the hook's log.

    A definition that no longer boots ``current`` is not libshare's business
    ("initrd-not-libshare"). Otherwise ``current`` must be ``STATE/boot/UUID/initrd.img``
    under the configured ``state_dir`` (resolved: no symbolic link leaves it), with a
    record whose original is ``previous``; then the initrd is rebuilt if the original
    or the built file changed ("initrd-ok", "initrd-rebuilt: ..."). RefusedError (one
    line, naming nothing but libshare's own paths and the recorded original) when any of
    that cannot be verified."""
    if current is None or (initrd or "").strip() != current:
        return "initrd-not-libshare"
    want = initrd_path(state_dir, uuid)
    if current != str(want) or not _inside(state_dir, want.parent):
        raise RefusedError(f"the domain boots an initrd libshare recorded as its own, "
                           f"but it is not {want}: run 'libshare guest install' again, or "
                           "'libshare disable'")
    rec = load(state_dir, uuid)
    if rec is None:
        raise RefusedError(f"libshare's initrd record {want.parent / RECORD} is missing "
                           "or unreadable: run 'libshare guest install' again, or "
                           "'libshare disable'")
    if rec.original != previous:
        raise RefusedError(f"libshare's initrd record {want.parent / RECORD} was built "
                           "from another initrd than this definition's: run 'libshare "
                           "guest install' again, or 'libshare disable'")
    result = _refresh(state_dir, rec, "prepare", cache)
    return "initrd-ok" if result == "ok" else f"initrd-{result}"


def refresh(state_dir: Path, uuid: str, cache: Path | None, by: str = "enable"
            ) -> str | None:
    """Rebuild libshare's initrd of domain ``uuid`` if its original changed (as the hook
    would at the next start); return what was done ("ok", "rebuilt: ...") or None when
    there is no record. RefusedError as :func:`check`."""
    rec = load(state_dir, uuid)
    return None if rec is None else _refresh(state_dir, rec, by, cache)


def remove(state_dir: Path, uuid: str) -> bool:
    """Remove ``STATE/boot/UUID``; return True if it existed."""
    folder = domain_dir(state_dir, uuid)
    if not folder.is_dir() or folder.is_symlink():
        return False
    shutil.rmtree(folder)
    return True
