"""The libvirt qemu hook's logic (``hooks/qemu`` is only a shim that calls ``run``).

libvirt runs the hook synchronously, as root, with a domain definition anyone allowed
to define domains wrote. So every path here is bounded in time (the config's
``hook_timeout``, at most 5 s, counted from the start of the hook process so that
interpreter start-up, imports, reading stdin, loading the config and writing the logs
all count: libshare.hook.ops), never calls the libvirt API (deadlock), never starts
children, and trusts nothing it is given:

- the domain name (argument) must follow libvirt's rules and be the definition's own
  ``<name>`` before it names a file (libshare.hook.state.check_name);
- the state directory the enrolment names is honoured only when it is the config's
  ``state_dir``, one of its ``state_dirs`` or inside one of them
  (:meth:`libshare.config.Config.trusted_state_dir`); otherwise prepare, migrate and
  restore refuse, and the other operations only log, in the config's state directory;
- a region image is served only from the ``regions/images`` folder of a state
  directory the config trusts (symbolic links resolved, none may lead out of it), only as
  a regular file opened without blocking, only when it passes the layout check
  (``quick_verify``) and has the recorded size and digest; refusals say nothing about
  any other file.

It logs to syslog (identifier ``libshare``, libshare.util.syslog, at the config's
``log_level``; refusals as errors), to stderr (warnings and errors, one line each: libvirt shows them) and to
``STATE/log/hook.log`` (one JSON line per run, with the traceback of an unexpected
error; bounded in size: libshare.hook.state).

Per operation, for enrolled domains only:
- ``prepare begin``: check the region device and image as above; exit 1 with one line
  otherwise (an enrolled domain whose region cannot be checked, because its device is
  gone or points elsewhere, its model is unknown or its region empty, is refused too),
  so libvirt refuses to start the guest. For the ivshmem model, publish the image into
  ``/dev/shm``, zero-padded to the device's power-of-two size. A domain the enrolment
  switched to libshare's initrd (direct kernel boot) must boot ``boot/UUID/initrd.img``
  of that trusted state directory, with its record; it is rebuilt there when the
  domain's own initrd changed (:func:`libshare.boot.store.check`).
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
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from libshare import config, domxml
from libshare.domxml import devices as dev
from libshare.domxml.metadata import Enrolment
from libshare.errors import LibshareError, RefusedError
from libshare.hook import ops, state
from libshare.hook.state import printable
from libshare.util.digest import cached_sha256_open, load_entries, save_entries, stat_key
from libshare.util.files import NotRegularFile, open_regular
from libshare.util.syslog import SafeFormatter, syslog_handler
from libshare.virt.process import qemu_pid

#: where the ivshmem model's shared memory objects live
SHM_DIR = Path("/dev/shm")
#: seconds of the config's budget kept back for writing the log after a timeout
MARGIN = 0.5

log = logging.getLogger("libshare.hook.handler")


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
    err.setFormatter(SafeFormatter("libshare: %(message)s"))
    log.addHandler(err)
    syslog = syslog_handler(syslog_level)
    if syslog is not None:
        log.addHandler(syslog)


def _open_image(path: str, cfg: config.Config) -> tuple[BinaryIO, str]:
    """Return the region image ``path`` open for reading and its real path, when its
    real path lies directly in the ``regions/images`` folder of a state directory the
    config trusts (Config.trusted_state_dir) and it is a regular file; raise
    RefusedError otherwise, saying nothing about a file outside those folders."""
    if not path or not os.path.isabs(path):
        raise RefusedError(f"the enrolment names no absolute region image path "
                           f"({printable(path)}); re-enrol with 'libshare enable'")
    real = os.path.realpath(path)
    folder = Path(real).parent
    if (folder.name, folder.parent.name) != ("images", "regions") \
            or cfg.trusted_state_dir(folder.parent.parent) is None:
        raise RefusedError(f"region image {printable(path)} is not in the regions/images "
                           "folder of a state directory this host's configuration lists "
                           "(state_dir, state_dirs); libshare serves only images "
                           "'libshare region build' made there")
    try:
        fh = open_regular(real, follow=False)
    except FileNotFoundError as exc:
        raise RefusedError(f"region image {printable(path)} is missing") from exc
    except NotRegularFile as exc:
        raise RefusedError(f"region image {printable(path)} is not a regular file") from exc
    except OSError as exc:
        raise RefusedError(f"region image {printable(path)} cannot be read: "
                           f"{exc.strerror or exc}") from exc
    return fh, real


def _check_region_file(enr: Enrolment, state_dir: Path, cfg: config.Config
                       ) -> tuple[BinaryIO, str]:
    """Return the region image open for reading, and its real path, after checking it
    lives in an images folder (:func:`_open_image`), has the recorded size, a sound
    region layout and the recorded digest; raise LibshareError with the reason
    otherwise."""
    from libshare.sharing.region.verify import quick_verify_open

    fh, real = _open_image(enr.region, cfg)
    try:
        path = printable(enr.region)
        size = os.fstat(fh.fileno()).st_size
        if size != enr.checked_size():
            raise RefusedError(f"region image {path} has {size} bytes, the domain was "
                               f"enrolled with {enr.size}; re-enrol with 'libshare enable'")
        problem = quick_verify_open(fh)
        if problem:
            raise RefusedError(f"region image {path} is not a sound region: {problem}")
        if enr.digest:
            digest = cached_sha256_open(fh, real, state_dir / "digests.json")
            if digest != enr.digest:
                raise RefusedError(f"region image {path} has digest {digest[:16]}..., the "
                                   f"domain was enrolled with {enr.digest[:16]}...; the "
                                   "image changed")
    except BaseException:
        fh.close()
        raise
    return fh, real


def _publish_shm(image: BinaryIO, enr: Enrolment, state_dir: Path) -> Path:
    """Make ``SHM_DIR/libshare-GROUP`` a copy of the open region ``image`` zero-padded
    to the ivshmem device's size ``shmem_size(size)`` (ivshmem model); return its path.

    ``SHM_DIR`` is writable by every user, so the copy is written to a fresh temporary
    file (O_EXCL) and renamed over the name, and an existing file is reused only when
    it is a regular file (not a link) owned by this user, of the device size, and
    ``STATE/shm.json`` says this very file (device, inode, size, mtime) was published
    from an image of that digest (or, for an enrolment without a digest, from this very
    image file): the padded file's own SHA-256 is not the image's."""
    target = SHM_DIR / dev.shmem_name(enr.group)
    want = dev.shmem_size(enr.checked_size())
    cache = state_dir / "shm.json"
    entries = load_entries(cache)
    source = enr.digest or stat_key(os.fstat(image.fileno()))

    def record(st: os.stat_result) -> str:
        return f"{stat_key(st, ctime=False)}={source}"

    with contextlib.suppress(OSError):
        st = os.lstat(target)
        if (st.st_size == want and st.st_uid == os.geteuid() and os.path.isfile(target)
                and not os.path.islink(target) and entries.get(str(target)) == record(st)):
            return target
    fd, tmp = tempfile.mkstemp(dir=SHM_DIR, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            image.seek(0)
            while chunk := image.read(4 << 20):
                out.write(chunk)
            out.truncate(want)  # the padding reads as zeros and takes no memory
            os.fchmod(out.fileno(), 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    entries[str(target)] = record(os.lstat(target))
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


def local_image(enr: Enrolment, cfg: config.Config, state_dir: Path | None = None
                ) -> Path | None:
    """Return this host's image with the enrolment's digest (or path), or None: only
    regular files in the images folder of a trusted state directory count
    (:func:`_open_image`); ``state_dir`` (default the config's) is searched besides the
    recorded path and the config's images folder."""
    state_dir = state_dir or cfg.state_dir
    candidates = [enr.region]
    if enr.digest:
        candidates.append(str(cfg.region_image(enr.digest)))
        candidates.append(str(state_dir / "regions" / "images" / f"{enr.digest}.img"))
    for cand in dict.fromkeys(candidates):
        try:
            fh, real = _open_image(cand, cfg)
        except RefusedError:
            continue
        with fh:
            if os.fstat(fh.fileno()).st_size == enr.checked_size() and (
                    not enr.digest
                    or cached_sha256_open(fh, real, cfg.digest_cache) == enr.digest):
                return Path(cand)
    return None


def _map_region(root: Any, enr: Enrolment, cfg: config.Config, state_dir: Path
                ) -> str | None:
    """Return the domain XML with the region path mapped to this host's image, None when
    nothing changes; raise when this host has no image with the recorded digest."""
    image = local_image(enr, cfg, state_dir)
    if image is None:
        raise RefusedError(f"this host has no region image with digest "
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


def _checked_name(argv_name: str, root: Any) -> str:
    """Return the domain name libvirt passed when it follows libvirt's rules
    (state.check_name) and is the definition's own ``<name>``; raise RefusedError."""
    name = state.check_name(argv_name)
    if root.findtext("name") != name:
        raise RefusedError(f"called for domain {printable(name)} with the definition of "
                           f"domain {printable(root.findtext('name'))}")
    return name


def state_dir_of(enr: Enrolment, cfg: config.Config) -> Path:
    """Return the real path of the state directory the hook serves enrolment ``enr``
    from: its recorded one when the config trusts it (Config.trusted_state_dir), the
    config's when it records none; raise RefusedError for any other."""
    trusted = cfg.trusted_state_dir(enr.state_dir)
    if trusted is None:
        where = cfg.source or config.SYSTEM_CONFIG
        raise RefusedError(f"the enrolment names state directory {printable(enr.state_dir)}"
                           f", which this host's configuration ({where}) does not list "
                           "(state_dir, state_dirs); re-enrol the domain here with "
                           "'libshare enable' or list that directory in state_dirs")
    return trusted


def _check_boot_initrd(root: Any, enr: Enrolment, state_dir: Path) -> str:
    """For a domain the enrolment switched to libshare's initrd (direct kernel boot),
    check it (:func:`libshare.boot.store.check`: in the trusted ``state_dir`` only,
    rebuilt when the domain's own initrd changed); return '' or '; RESULT' for the log.
    Raises LibshareError (refusing the start) when it cannot be verified."""
    ch = enr.change("changed", "initrd")
    if ch is None:
        return ""
    from libshare.boot import store as boot_store

    result = boot_store.check(state_dir, root.findtext("uuid") or "",
                              root.findtext("os/initrd"), ch.current, ch.previous,
                              state_dir / "digests.json")
    if result == "initrd-not-libshare":
        log.warning("%s: its <initrd> is no longer libshare's: no boot-time redirect "
                    "(run 'libshare guest install' again)", printable(root.findtext("name")))
    elif result != "initrd-ok":
        log.warning("%s: libshare's %s", printable(root.findtext("name")), result)
    return f"; {result}"


def _dispatch(name: str, op: str, sub: str, root: Any, enr: Enrolment, cfg: config.Config,
              state_dir: Path, out: Any) -> str:
    """Carry out ``op``/``sub`` for enrolled domain ``name`` (XML tree ``root``) with its
    trusted ``state_dir``; return a short result for the log."""
    if op in ops.STRICT:
        enr.checked_size()  # a corrupt record is refused, not read as 0 bytes
    if op == "prepare" and sub == "begin":
        if enr.model not in dev.MODELS:
            raise RefusedError(f"the enrolment names an unknown region model "
                               f"{printable(enr.model)}; re-enrol with 'libshare enable'")
        if dev.find_region_device(root.find("devices"), enr.model, enr.region,
                                  enr.group) is None:
            raise RefusedError("enrolled in libshare, but its region device is gone or is "
                               "backed by another file than the enrolment's region, so "
                               "it cannot be checked; run 'libshare enable' (or "
                               "'libshare disable') for this domain")
        image, _real = _check_region_file(enr, state_dir, cfg)
        with image:
            if enr.model == "ivshmem":
                _publish_shm(image, enr, state_dir)
        return "region-ok" + _check_boot_initrd(root, enr, state_dir)
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
        new_xml = _map_region(root, enr, cfg, state_dir)
        if new_xml is None:
            return "unchanged"
        out.write(new_xml)
        out.flush()
        return "mapped"
    return "ignored"


def run(argv: list[str], data: bytes, out: Any = None, started: float | None = None) -> int:
    """Run the hook for libvirt's arguments ``argv`` (DOMAIN OP SUB EXTRA) and the domain
    XML ``data``; return the exit status libvirt should see.

    Everything, the last log line included, ends by ``ops.hard_deadline(started)``;
    the work itself by the config's ``hook_timeout`` (minus MARGIN) after ``started``, a
    ``time.monotonic()`` value: the shim passes ``ops.process_start()`` so that
    interpreter start-up, imports and reading stdin count; None means now.
    """
    if started is None:
        started = time.monotonic()
    hard = ops.hard_deadline(started)
    _setup_logging()
    argv_name = argv[0] if argv else ""
    shown = printable(argv_name)  # until it is checked
    op = argv[1] if len(argv) > 1 else "?"
    sub = argv[2] if len(argv) > 2 else "-"
    strict = ops.is_strict(op, sub)
    result, status = "error", 1 if strict else 0
    entry: dict[str, Any] = {}
    log_dir: Path | None = None
    cfg: config.Config | None = None
    try:
        ops.arm(hard)
        cfg_error: LibshareError | None = None
        try:
            cfg = config.load()
            _setup_logging(cfg.log_level)
        except LibshareError as exc:  # reported below, as the operation's failure
            cfg_error = exc
        root = domxml.parse(data)
        enr = domxml.enrolment(root)
        if enr is None:
            return 0
        timeout = cfg.hook_timeout if cfg is not None else config.MAX_HOOK_TIMEOUT
        ops.arm(min(hard, started + timeout - MARGIN))
        if cfg is None:
            assert cfg_error is not None
            raise cfg_error
        name = _checked_name(argv_name, root)
        shown = name
        state_dir = state_dir_of(enr, cfg)
        log_dir = state_dir
        result = _dispatch(name, op, sub, root, enr, cfg, state_dir, out or sys.stdout)
        status = 0
    except ops.Expired:
        log.log(logging.ERROR if strict else logging.WARNING, "%s: %s %s: timed out after "
                "%.1f s%s", shown, op, sub, time.monotonic() - started,
                "; refusing" if strict else "")
        result = "timeout"
    except LibshareError as exc:
        log.log(logging.ERROR if strict else logging.WARNING, "%s: %s", shown, exc)
        result = f"refused: {exc}" if strict else f"failed: {exc}"
    except Exception as exc:
        trace = traceback.format_exc()
        log.log(logging.ERROR if strict else logging.WARNING, "%s: %s %s failed: %s",
                shown, op, sub, exc)
        log.debug("%s: %s %s failed:\n%s", shown, op, sub, trace)
        if not strict:  # libvirt logs the hook's stderr; a refusal stays one line
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(trace)
                sys.stderr.flush()
        result = f"error: {exc}"
        entry["traceback"] = trace
    finally:
        ops.disarm()
    _finish(log_dir, cfg, hard, {
        "domain": shown, "op": op, "sub": sub, "status": status, "result": result,
        "seconds": round(time.monotonic() - started, 4), **entry})
    return status


def _finish(log_dir: Path | None, cfg: config.Config | None, deadline: float,
            entry: dict[str, Any]) -> None:
    """Write the run's ``entry`` to the hook log of ``log_dir`` (else of the config's
    state directory, else of the default one) and a summary to syslog, all by
    ``deadline``; what cannot be written by then is dropped."""
    if log_dir is None:
        log_dir = cfg.state_dir if cfg is not None else config.DEFAULT_STATE_DIR
    try:
        ops.arm(deadline)
        state.append_hook_log(log_dir, entry)
        log.info("%s: %s %s -> %s (%s) in %.3f s", entry["domain"], entry["op"],
                entry["sub"], entry["status"], entry["result"], entry["seconds"])
    except ops.Expired:
        pass
    finally:
        ops.disarm()
