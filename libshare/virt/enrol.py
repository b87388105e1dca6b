"""Enrolment of libvirt domains: choosing the region for a group, and redefining
persistent domains through the libvirt API with ``libshare.domxml``'s transforms (the
enrolment itself, the automatic redirect mode, and, for direct kernel boot, the switch to
libshare's initrd, whose files :mod:`libshare.boot.store` keeps under the state
directory: rebuilt at enable when the domain's own initrd changed, removed at disable).

A running domain keeps running unchanged; its new definition applies at its next boot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import libvirt

from libshare import domxml
from libshare.boot import store as boot_store
from libshare.config import Config
from libshare.domxml.devices import shmem_name
from libshare.errors import LibshareError, RefusedError
from libshare.util.digest import cached_sha256
from libshare.util.units import REGION_ALIGN, human
from libshare.virt import api


def resolve_region(cfg: Config, group: str, model: str, region: str | None = None,
                   size: int | None = None) -> domxml.RegionSpec:
    """Return the RegionSpec for enrolling into ``group``.

    ``region`` is an explicit image path (default: the group's current image, through
    its stable link). The size comes from the image; ``size`` is only needed, and only
    allowed to differ, when the image does not exist yet.
    """
    if region is None:
        link = cfg.group_region_link(group)
        if not link.exists():
            raise LibshareError(f"no region image for group {group!r} ({link} is missing); "
                                f"build one with 'libshare region build --group {group}' "
                                "or pass --region PATH")
        path = Path(os.path.realpath(link))
    else:
        path = Path(os.path.abspath(region))
    digest = None
    if path.exists():
        if not path.is_file():
            raise LibshareError(f"region {path} is not a regular file")
        actual = path.stat().st_size
        if size is not None and size != actual:
            raise RefusedError(f"--size {size} does not match region {path} ({actual} bytes)")
        size = actual
        try:
            digest = cached_sha256(path, cfg.digest_cache)
        except OSError as exc:
            raise LibshareError(f"cannot read region {path}: {exc.strerror}") from exc
    elif size is None:
        raise LibshareError(f"region {path} does not exist; give --size to enrol anyway")
    if size <= 0 or size % REGION_ALIGN:
        raise RefusedError(f"region size {size} ({human(size)}) is not a positive multiple "
                           "of 2 MiB")
    return domxml.RegionSpec(path=str(path), size=size, group=group, model=model,
                             digest=digest, state_dir=str(cfg.state_dir))


@dataclass
class Outcome:
    """What happened to one domain: ``action`` is enabled/disabled/unchanged/failed."""

    domain: str
    action: str
    message: str
    running: bool = False
    info: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the outcome as a JSON-ready dict."""
        return {"domain": self.domain, "action": self.action, "message": self.message,
                "running": self.running, "libshare": self.info}


def _redefine(conn: libvirt.virConnect, dom: libvirt.virDomain, new_xml: str) -> None:
    if not dom.isPersistent():
        raise RefusedError(f"{dom.name()}: transient domain; libshare enrols persistent "
                           "definitions only (virsh define it first)")
    api.define(conn, new_xml)


def _refresh_boot(dom: Any, root: Any, state_dir: str | None) -> str:
    """Rebuild libshare's initrd of ``dom`` (defined as ``root``) when the domain's own
    initrd changed since it was built; return a message suffix saying so ('' when
    nothing was done or the domain does not boot libshare's initrd)."""
    if not state_dir or not domxml.boot_of(root)["libshare_initrd"]:
        return ""
    result = boot_store.refresh(Path(state_dir), dom.UUIDString(),
                                Path(state_dir) / "digests.json")
    return f"; libshare's initrd {result}" if result and result != "ok" else ""


def enable_domain(conn: libvirt.virConnect, name: str, spec: domxml.RegionSpec,
                  default_redirect: str = "off") -> Outcome:
    """Enrol domain ``name`` into ``spec``'s region (automatic redirect mode
    ``spec.redirect``, else the domain's recorded one, else ``default_redirect``); return
    what was done. Changing only the redirect mode of an enrolled domain updates its
    record and nothing else. A domain booting libshare's initrd keeps it (rebuilt when
    the domain's own initrd changed)."""
    dom = api.lookup(conn, name)
    before = domxml.parse(api.inactive_xml(dom))
    after = domxml.enable(before, spec, default_redirect)
    running = api.is_active(dom)
    before_xml, after_xml = domxml.serialize(before), domxml.serialize(after)
    boot_note = _refresh_boot(dom, after, spec.state_dir)
    if after_xml == before_xml:
        return Outcome(dom.name(), "unchanged", "already enrolled" + boot_note, running,
                       domxml.describe(after))
    old = domxml.enrolment(before)
    mode_only = old is not None and domxml.serialize(
        domxml.enable(before, replace(spec, redirect=old.redirect))) == before_xml
    _redefine(conn, dom, after_xml)
    defined = domxml.describe(domxml.parse(api.inactive_xml(dom)))
    mode = domxml.describe(after)["redirect"]
    if mode_only:
        return Outcome(dom.name(), "enabled", f"automatic redirect set to {mode}" + boot_note,
                       running, defined)
    where = f"/dev/shm/{shmem_name(spec.group)}" if spec.model == "ivshmem" else spec.path
    msg = f"enrolled in group {spec.group} ({spec.model}, {where}, {human(spec.size)})"
    if mode != "off":
        msg += f", automatic redirect {mode}"
    if running:
        msg += "; the domain is running: the region is attached at its next boot"
    if domxml.boot_of(after)["direct_kernel"] and not domxml.boot_of(after)["libshare_initrd"]:
        msg += ("; direct kernel boot: its initrd gets libshare's boot-time redirect with "
                f"'libshare guest install {dom.name()}' while it runs")
    return Outcome(dom.name(), "enabled", msg + boot_note, running, defined)


def disable_domain(conn: libvirt.virConnect, name: str,
                   state_dir: Path | None = None) -> Outcome:
    """Undo the enrolment of domain ``name`` (a switch to libshare's initrd too, whose
    files under the enrolment's state directory, else ``state_dir``, are then removed);
    return what was done."""
    dom = api.lookup(conn, name)
    before = domxml.parse(api.inactive_xml(dom))
    running = api.is_active(dom)
    if not domxml.is_enrolled(before):  # a record with a bad group is undone too
        return Outcome(dom.name(), "unchanged", "not enrolled", running, domxml.describe(before))
    after = domxml.disable(before)
    _redefine(conn, dom, domxml.serialize(after))
    msg = "enrolment removed"
    if domxml.boot_of(before)["libshare_initrd"]:
        msg += f"; boots its own initrd {domxml.boot_of(after)['initrd']} again"
        enr = domxml.enrolment(before) if domxml.is_enrolled(before) else None
        where = Path(enr.state_dir) if enr is not None and enr.state_dir else state_dir
        if where is not None and boot_store.remove(where, dom.UUIDString()):
            msg += " (libshare's removed)"
    if running:
        msg += "; the domain is running: the region stays attached until it stops"
    return Outcome(dom.name(), "disabled", msg, running,
                   domxml.describe(domxml.parse(api.inactive_xml(dom))))


def _redefine_with(conn: libvirt.virConnect, name: str, change: Any) -> bool:
    """Redefine domain ``name`` with ``change(root)`` applied to its persistent
    definition; return False when that changes nothing (nothing is redefined)."""
    dom = api.lookup(conn, name)
    before = domxml.parse(api.inactive_xml(dom))
    after = change(before)
    if domxml.serialize(after) == domxml.serialize(before):
        return False
    _redefine(conn, dom, domxml.serialize(after))
    return True


def switch_initrd(conn: libvirt.virConnect, name: str, path: str) -> bool:
    """Make enrolled domain ``name`` (direct kernel boot) boot libshare's initrd ``path``
    from its next start (:func:`libshare.domxml.switch_initrd`); return True if its
    definition changed."""
    return _redefine_with(conn, name, lambda root: domxml.switch_initrd(root, path))


def restore_initrd(conn: libvirt.virConnect, name: str, state_dir: Path | None = None
                   ) -> bool:
    """Make domain ``name`` boot its own initrd again and remove libshare's files under
    ``state_dir``; return True if its definition changed."""
    dom = api.lookup(conn, name)
    changed = _redefine_with(conn, name, domxml.restore_initrd)
    if state_dir is not None:
        boot_store.remove(state_dir, dom.UUIDString())
    return changed


def set_redirect(conn: libvirt.virConnect, name: str, mode: str) -> bool:
    """Set enrolled domain ``name``'s automatic redirect mode to ``mode`` (nothing else
    changes); return True if its definition changed. RefusedError if not enrolled."""
    def change(root: Any) -> Any:
        enr = domxml.enrolment(root)
        if enr is None:
            raise RefusedError(f"{name} is not enrolled")
        spec = domxml.RegionSpec(enr.region, enr.size, enr.group, model=enr.model,
                                 digest=enr.digest, state_dir=enr.state_dir, redirect=mode)
        return domxml.enable(root, spec)
    return _redefine_with(conn, name, change)
