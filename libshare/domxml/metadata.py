"""libshare's record inside a domain's ``<metadata>``: what enrolment added or changed.

One element in the libshare namespace holds the enrolment (group, model, region path,
digest, size, the state directory of the installation that owns the domain) and one
child per change, in the order they were made, so that disable can undo them::

    <libshare:enrolment xmlns:libshare="https://libshare.dev/xmlns/domain/1"
        version="1" group="web" model="nvdimm" region="/var/lib/.../D.img"
        digest="D" size="56623104" state-dir="/var/lib/libshare"
        memory-kib="262144" current-memory-kib="262144" redirect="runtime">
      <libshare:added what="features"/>          element created by enable
      <libshare:changed what="maxMemory"><maxMemory .../></libshare:changed>
      <libshare:changed what="freePageReporting" previous="off"/>  (no previous: absent)
      <libshare:implicit what="virtio-serial-controller"/>  libvirt adds one for us
      <libshare:changed what="initrd" previous="/boot/initrd.img"
          current="/var/lib/libshare/boot/UUID/initrd.img"/>  direct kernel boot: libshare's
                                                               initrd (guest install)
    </libshare:enrolment>

``redirect`` (the automatic redirect mode, "runtime") is absent when it is "off", so
domains enrolled without it carry exactly the record they always did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lxml import etree

from libshare import XMLNS
from libshare.domxml.tree import Element
from libshare.errors import LibshareError, RefusedError
from libshare.util.units import ascii_int

NS = XMLNS
PREFIX = "libshare"
VERSION = "1"
#: automatic redirect modes a domain can be enrolled with ("off": nothing automatic)
REDIRECT_MODES = ("off", "runtime")


#: the one rule for trust-group names, wherever they come from (config, ``--group``,
#: enrolment metadata): they become file names (``groups/GROUP.img``, ``/dev/shm/
#: libshare-GROUP``) and shell-quoted hints, so ASCII letters, digits, ``_ . -`` only,
#: a letter or digit first, at most 64 characters, and no ``..``
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
GROUP_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit, no '..'"


def valid_group(name: object) -> bool:
    """Return True when ``name`` is an acceptable trust-group name (see GROUP_NAME)."""
    return isinstance(name, str) and GROUP_NAME.fullmatch(name) is not None \
        and ".." not in name


def check_group(name: object, what: str = "group name",
                error: type[LibshareError] = RefusedError) -> str:
    """Return ``name`` when it is a valid trust-group name; raise ``error`` (one line,
    naming ``what``) otherwise."""
    if not valid_group(name):
        raise error(f"invalid {what} {name!r} ({GROUP_RULE})")
    assert isinstance(name, str)
    return name


def q(tag: str) -> str:
    """Return the Clark-notation name of ``tag`` in the libshare namespace."""
    return f"{{{NS}}}{tag}"


@dataclass
class Change:
    """One undoable change: ``kind`` is added/changed/implicit, ``what`` names the target;
    ``previous`` is the value before, ``current`` (when recorded) the value libshare set,
    ``saved`` a copy of an element before it changed."""

    kind: str
    what: str
    previous: str | None = None
    saved: Element | None = None
    current: str | None = None


@dataclass
class Enrolment:
    """The parsed libshare record of an enrolled domain."""

    group: str
    model: str
    region: str
    size: int
    digest: str | None = None
    state_dir: str | None = None
    memory_kib: int | None = None
    current_memory_kib: int | None = None
    redirect: str = "off"
    changes: list[Change] = field(default_factory=list)
    #: the record's ``size`` attribute as written (None: absent); ``size`` is 0 when it
    #: is not a byte count, and :meth:`checked_size` says so
    size_text: str | None = None

    def checked_size(self) -> int:
        """Return the recorded region size in bytes; raise RefusedError naming the
        metadata value when the record's ``size`` is missing or not a positive integer."""
        if self.size > 0:
            return self.size
        raise RefusedError(f"libshare metadata of this domain has a bad region size "
                           f"size={self.size_text!r} (not a positive byte count); "
                           "re-enrol it with 'libshare enable --group NAME'")

    def has(self, kind: str, what: str) -> bool:
        """Return True when a change of this kind and target was recorded."""
        return any(c.kind == kind and c.what == what for c in self.changes)

    def change(self, kind: str, what: str) -> Change | None:
        """Return the recorded change of this kind and target, or None."""
        return next((c for c in self.changes if c.kind == kind and c.what == what), None)


def find_record(root: Element) -> Element | None:
    """Return the ``<libshare:enrolment>`` element of a domain, or None if not enrolled."""
    meta = root.find("metadata")
    if meta is None:
        return None
    return meta.find(q("enrolment"))


def _int_or_none(value: str | None) -> int | None:
    return ascii_int(value) if value is not None else None


def parse_record(elem: Element, strict: bool = True) -> Enrolment:
    """Return the Enrolment described by a ``<libshare:enrolment>`` element.

    ``strict`` (the default) raises RefusedError when the recorded group is not a
    valid group name (a domain definition is input like any other); ``disable`` reads
    the record with ``strict=False`` so that such an enrolment can still be undone.
    """
    group = elem.get("group", "")
    if strict and not valid_group(group):
        raise RefusedError(f"libshare metadata of this domain has an invalid group name "
                           f"{group!r} ({GROUP_RULE}); re-enrol it with 'libshare enable --group NAME'")
    changes = []
    for child in elem:
        if not isinstance(child.tag, str) or not child.tag.startswith(f"{{{NS}}}"):
            continue
        kind = etree.QName(child).localname
        saved = next((c for c in child if isinstance(c.tag, str)), None)
        changes.append(Change(kind, child.get("what", ""), child.get("previous"), saved,
                              child.get("current")))
    return Enrolment(
        group=group,
        model=elem.get("model", "nvdimm"),
        region=elem.get("region", ""),
        size=_int_or_none(elem.get("size")) or 0,
        digest=elem.get("digest"),
        state_dir=elem.get("state-dir"),
        memory_kib=_int_or_none(elem.get("memory-kib")),
        current_memory_kib=_int_or_none(elem.get("current-memory-kib")),
        redirect=elem.get("redirect") or "off",
        changes=changes,
        size_text=elem.get("size"),
    )


def set_redirect(elem: Element, mode: str) -> None:
    """Record automatic redirect ``mode`` on a ``<libshare:enrolment>`` element in place
    ("off" removes the attribute)."""
    if mode == "off":
        if "redirect" in elem.attrib:
            del elem.attrib["redirect"]
    else:
        elem.set("redirect", mode)


def build_record(enr: Enrolment) -> Element:
    """Return a new ``<libshare:enrolment>`` element describing ``enr``."""
    attrs = {"version": VERSION, "group": enr.group, "model": enr.model,
             "region": enr.region, "size": str(enr.size)}
    if enr.digest:
        attrs["digest"] = enr.digest
    if enr.state_dir:
        attrs["state-dir"] = enr.state_dir
    if enr.memory_kib is not None:
        attrs["memory-kib"] = str(enr.memory_kib)
    if enr.current_memory_kib is not None:
        attrs["current-memory-kib"] = str(enr.current_memory_kib)
    elem = etree.Element(q("enrolment"), attrs, nsmap={PREFIX: NS})
    set_redirect(elem, enr.redirect)
    for ch in enr.changes:
        sub = etree.SubElement(elem, q(ch.kind), {"what": ch.what})
        if ch.previous is not None:
            sub.set("previous", ch.previous)
        if ch.current is not None:
            sub.set("current", ch.current)
        if ch.saved is not None:
            sub.append(ch.saved)
    return elem
