"""The libvirt qemu hook's logic (``hooks/qemu`` is only a shim that calls ``run``).

libvirt runs the hook synchronously, so every path here is bounded in time (the
config's ``hook_timeout``, at most 5 s, counted from the start of the hook process so
interpreter start-up and imports count), never calls the libvirt API (deadlock), never
starts children, and logs to syslog (at the config's ``log_level``), to stderr
(warnings, which libvirt shows in its error message and logs) and to
``STATE/log/hook.log`` (one JSON line per run, with the traceback of an unexpected error).

Per operation, for enrolled domains only:
- ``prepare begin``: check the region file (exists, regular, readable, recorded size and
  digest); exit 1 with one line otherwise, so libvirt refuses to start the guest. For
  the ivshmem model, publish the image into ``/dev/shm``, zero-padded to the device's
  power-of-two size. A domain the enrolment switched to libshare's initrd (direct
  kernel boot) must boot it from the configured state directory, with its record; it
  is rebuilt when the domain's own initrd changed (:func:`libshare.boot.store.check`).
- ``started begin`` / ``reconnect begin``: record the running domain; ``reconnect``
  always exits 0 (a failure there makes libvirt kill the guest). At ``started`` only,
  for a domain enrolled with ``redirect="runtime"``, also leave an automatic redirect
  request in ``STATE/requests/`` for ``libshare daemon`` (never waited for).
- ``stopped end`` / ``release end``: drop the record and any pending request; always
  exit 0.
- ``migrate begin`` / ``restore begin``: print the XML with the region path mapped to
  this host's image of the same digest (nothing when unchanged); exit 1 when this host
  has no such image. Devices are never added or removed.
Anything else exits 0. Unexpected errors: 0 for operations that cannot harm the guest,
1 with a one-line message for prepare/migrate/restore.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from libshare import config, domxml
from libshare.domxml import devices as dev
from libshare.domxml.metadata import Enrolment
from libshare.errors import LibshareError
from libshare.hook import ops, state
from libshare.util.digest import cached_sha256, load_entries, save_entries, stat_key
from libshare.virt.process import qemu_pid

#: where the ivshmem model's shared memory objects live
SHM_DIR = Path("/dev/shm")
#: seconds kept back from the budget for writing the log after a timeout
MARGIN = 0.2

log = logging.getLogger("libshare.hook.handler")


class HookTimeout(Exception):
    """The hook ran out of its time budget."""


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise HookTimeout


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """A handler writing to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _setup_logging(level: str = "info") -> None:
    """Send the hook's log to stderr (warnings and above, always: libvirt shows them) and
    to syslog when ``/dev/log`` exists (``level`` and above, a config ``log_level``).
    Called again once the config is loaded, it only sets the level."""
    syslog_level = getattr(logging, level.upper(), logging.INFO)
    log.setLevel(min(syslog_level, logging.WARNING))
    for handler in log.handlers:
        if isinstance(handler, logging.handlers.SysLogHandler):
            handler.setLevel(syslog_level)
    if log.handlers:
        return
    log.propagate = False
    err = _StderrHandler()
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("libshare: %(message)s"))
    log.addHandler(err)
    if os.path.exists("/dev/log"):
        try:
            syslog = logging.handlers.SysLogHandler(address="/dev/log")
            syslog.setFormatter(logging.Formatter("libshare-hook: %(message)s"))
            syslog.setLevel(syslog_level)
            log.addHandler(syslog)
        except OSError:
            pass


def process_start() -> float:
    """Return when this process started, on the ``time.monotonic()`` clock (from
    ``/proc/self/stat``, 10 ms resolution); the current time when that cannot be read."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return now
    return now - max(0.0, age)


def _check_region_file(enr: Enrolment, state_dir: Path) -> Path:
    """Return the region image path after checking it exists with the recorded size and
    digest (or, when enrolment recorded no digest because the image did not exist yet, a
    sound region layout); raise LibshareError with the reason otherwise."""
    path = Path(enr.region)
    if not path.exists():
        raise LibshareError(f"region image {path} is missing (group {enr.group}); "
                            f"rebuild it with 'libshare region build --group {enr.group}' "
                            "or run 'libshare disable' for this domain")
    if not path.is_file():
        raise LibshareError(f"region image {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise LibshareError(f"region image {path} is not readable")
    size = path.stat().st_size
    if size != enr.checked_size():
        raise LibshareError(f"region image {path} has {size} bytes, the domain was enrolled "
                            f"with {enr.size}; re-enrol with 'libshare enable'")
    if enr.digest:
        digest = cached_sha256(path, state_dir / "digests.json")
        if digest != enr.digest:
            raise LibshareError(f"region image {path} has digest {digest[:16]}..., the domain "
                                f"was enrolled with {enr.digest[:16]}...; the image changed")
    else:  # enrolled before the image existed: at least its layout must be sound
        from libshare.sharing.region.verify import quick_verify

        problem = quick_verify(path)
        if problem:
            raise LibshareError(f"region image {path} (enrolled without a digest) is not a "
                                f"sound region: {problem}")
    return path


def _publish_shm(image: Path, enr: Enrolment, state_dir: Path) -> Path:
    """Make ``SHM_DIR/libshare-GROUP`` a copy of ``image`` zero-padded to the ivshmem
    device's size ``shmem_size(size)`` (ivshmem model); return its path.

    A copy is reused while its size is the device size and, for an enrolment with a
    digest, ``STATE/shm.json`` says this very file (device, inode, size, mtime) was
    published from an image of that digest: the padded file's own SHA-256 is not the
    image's, so the digest cache cannot tell."""
    target = SHM_DIR / dev.shmem_name(enr.group)
    want = dev.shmem_size(enr.checked_size())
    cache = state_dir / "shm.json"
    entries = load_entries(cache)

    def record(st: os.stat_result) -> str:
        return f"{stat_key(st, ctime=False)}={enr.digest}"

    with contextlib.suppress(OSError):
        st = target.stat()
        if st.st_size == want and (not enr.digest or entries.get(str(target)) == record(st)):
            return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        shutil.copyfile(image, tmp)
        os.truncate(tmp, want)  # the padding reads as zeros and takes no memory
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    if enr.digest:
        entries[str(target)] = record(target.stat())
        save_entries(cache, entries)
    return target


def _record(name: str, root: Any, enr: Enrolment, state_dir: Path, op: str,
            pid: int | None) -> None:
    state.write_running(state_dir, {
        "name": name,
        "uuid": root.findtext("uuid"),
        "pid": pid,
        "group": enr.group,
        "model": enr.model,
        "region": enr.region,
        "digest": enr.digest,
        "size": enr.size,
        "recorded_by": op,
        "recorded_at": round(time.time(), 3),
    })


def _request_redirect(name: str, root: Any, enr: Enrolment, state_dir: Path,
                      pid: int | None) -> None:
    """Leave an automatic redirect request for ``libshare daemon`` (atomic write)."""
    state.write_request(state_dir, {
        "domain": name,
        "uuid": root.findtext("uuid"),
        "pid": pid,
        "mode": enr.redirect,
        "requested_at": round(time.time(), 3),
    })


def local_image(enr: Enrolment, cfg: config.Config) -> Path | None:
    """Return this host's image with the enrolment's digest (or path), or None."""
    candidates = [Path(enr.region)]
    if enr.digest:
        candidates.append(cfg.region_image(enr.digest))
        if enr.state_dir:
            candidates.append(Path(enr.state_dir) / "regions" / "images" / f"{enr.digest}.img")
    for cand in candidates:
        if cand.is_file() and cand.stat().st_size == enr.checked_size() and (
                not enr.digest or cached_sha256(cand, cfg.digest_cache) == enr.digest):
            return cand
    return None


def _map_region(root: Any, enr: Enrolment, cfg: config.Config) -> str | None:
    """Return the domain XML with the region path mapped to this host's image, None when
    nothing changes; raise when this host has no image with the recorded digest."""
    image = local_image(enr, cfg)
    if image is None:
        raise LibshareError(f"this host has no region image with digest "
                            f"{(enr.digest or '?')[:16]}... (group {enr.group}); build it "
                            f"with 'libshare region build --group {enr.group}' first")
    if enr.model == "ivshmem" or str(image) == enr.region:
        return None
    device = dev.find_region_device(root.find("devices"), enr.model, enr.region, enr.group)
    rec = root.find(f"metadata/{{{domxml.NS}}}enrolment")
    if device is None or rec is None:
        return None
    path_elem = device.find("source/path")
    assert path_elem is not None
    path_elem.text = str(image)
    rec.set("region", str(image))
    return domxml.serialize(root)


def _check_boot_initrd(root: Any, enr: Enrolment, cfg: config.Config) -> str:
    """For a domain the enrolment switched to libshare's initrd (direct kernel boot),
    check it (:func:`libshare.boot.store.check`: under the configured state directory
    only, rebuilt when the domain's own initrd changed); return '' or '; RESULT' for the
    log. Raises LibshareError (refusing the start) when it cannot be verified."""
    ch = enr.change("changed", "initrd")
    if ch is None:
        return ""
    from libshare.boot import store as boot_store

    result = boot_store.check(cfg.state_dir, root.findtext("uuid") or "",
                              root.findtext("os/initrd"), ch.current, ch.previous,
                              cfg.digest_cache)
    if result == "initrd-not-libshare":
        log.warning("%s: its <initrd> is no longer libshare's: no boot-time redirect "
                    "(run 'libshare guest install' again)", root.findtext("name"))
    elif result != "initrd-ok":
        log.warning("%s: libshare's %s", root.findtext("name"), result)
    return f"; {result}"


def _dispatch(name: str, op: str, sub: str, root: Any, enr: Enrolment, cfg: config.Config,
              out: Any) -> str:
    """Carry out ``op``/``sub`` for enrolled domain ``name`` (XML tree ``root``); return
    a short result for the log."""
    state_dir = Path(enr.state_dir) if enr.state_dir else cfg.state_dir
    if op in ops.STRICT:
        enr.checked_size()  # a corrupt record is refused, not read as 0 bytes
    if op == "prepare" and sub == "begin":
        if dev.find_region_device(root.find("devices"), enr.model, enr.region,
                                  enr.group) is None:
            log.warning("%s: enrolled but its region device was removed; not checking", name)
            return "no-device"
        image = _check_region_file(enr, state_dir)
        if enr.model == "ivshmem":
            _publish_shm(image, enr, state_dir)
        return "region-ok" + _check_boot_initrd(root, enr, cfg)
    if op in ("started", "reconnect") and sub == "begin":
        pid = qemu_pid(name)
        request = op == "started" and enr.redirect == "runtime"
        try:
            _record(name, root, enr, state_dir, op, pid)
        finally:  # a failed record must not cost the guest its redirect
            if request:
                _request_redirect(name, root, enr, state_dir, pid)
        return "recorded" + ("; redirect requested" if request else "")
    if op in ("stopped", "release") and sub == "end":
        result = "removed" if state.remove_running(state_dir, name) else "no-record"
        if state.remove_request(state_dir, name):
            result += "; request dropped"
        return result
    if op in ("migrate", "restore") and sub == "begin":
        new_xml = _map_region(root, enr, cfg)
        if new_xml is None:
            return "unchanged"
        out.write(new_xml)
        out.flush()
        return "mapped"
    return "ignored"


def run(argv: list[str], data: bytes, out: Any = None, started: float | None = None) -> int:
    """Run the hook for libvirt's arguments ``argv`` (DOMAIN OP SUB EXTRA) and the domain
    XML ``data``; return the exit status libvirt should see.

    The time budget (the config's ``hook_timeout``) counts from ``started``, a
    ``time.monotonic()`` value: the shim passes :func:`process_start` so that
    interpreter start-up and imports count; None means now.
    """
    _setup_logging()
    name = argv[0] if argv else "?"
    op = argv[1] if len(argv) > 1 else "?"
    sub = argv[2] if len(argv) > 2 else "-"
    strict = ops.is_strict(op, sub)
    if started is None:
        started = time.monotonic()
    result, status = "error", 1 if strict else 0
    entry: dict[str, Any] = {}
    state_dir: Path | None = None
    signal.signal(signal.SIGALRM, _on_alarm)
    cfg: config.Config | None = None
    cfg_error: LibshareError | None = None
    try:
        cfg = config.load()
        _setup_logging(cfg.log_level)
    except LibshareError as exc:  # reported below, as the operation's failure
        cfg_error = exc
    timeout = cfg.hook_timeout if cfg is not None else config.MAX_HOOK_TIMEOUT
    left = timeout - (time.monotonic() - started) - MARGIN
    try:
        if left > 0:
            signal.setitimer(signal.ITIMER_REAL, left)
        root = domxml.parse(data)
        enr = domxml.enrolment(root)
        if enr is None:
            return 0
        if left <= 0:  # start-up and imports used up the budget
            raise HookTimeout
        if enr.state_dir:
            state_dir = Path(enr.state_dir)
        if cfg is None:
            assert cfg_error is not None
            raise cfg_error
        result = _dispatch(name, op, sub, root, enr, cfg, out or sys.stdout)
        status = 0
    except HookTimeout:
        log.warning("%s: %s %s: timed out after %.1f s%s", name, op, sub, timeout,
                    "; refusing" if strict else "")
        result = "timeout"
    except LibshareError as exc:
        log.warning("%s: %s", name, exc)
        result = f"refused: {exc}" if strict else f"failed: {exc}"
    except Exception as exc:
        trace = traceback.format_exc()
        log.warning("%s: %s %s failed: %s", name, op, sub, exc)
        log.info("%s: %s %s failed:\n%s", name, op, sub, trace)
        if not strict:  # libvirt logs the hook's stderr; a refusal stays one line
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(trace)
                sys.stderr.flush()
        result = f"error: {exc}"
        entry["traceback"] = trace
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if state_dir is None:
        state_dir = cfg.state_dir if cfg is not None else config.DEFAULT_STATE_DIR
    elapsed = time.monotonic() - started
    state.append_hook_log(state_dir, {"domain": name, "op": op, "sub": sub,
                                      "status": status, "result": result,
                                      "seconds": round(elapsed, 4), **entry})
    log.info("%s: %s %s -> %s (%s) in %.3f s", name, op, sub, status, result, elapsed)
    return status
