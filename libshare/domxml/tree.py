"""Small lxml helpers for editing libvirt domain XML without disturbing it.

Insertions copy the surrounding indentation and removals undo exactly what an insertion
did, so ``remove_child(insert_child(...))`` gives back the same document (byte for byte
and in C14N). Also libvirt's size units.
"""

from __future__ import annotations

import re

from lxml import etree

from libshare.errors import RefusedError

Element = etree._Element

# libvirt's scaled-integer units (docs: formatdomain.html#memory-allocation)
_UNIT_BYTES = {
    "b": 1, "bytes": 1,
    "kb": 10**3, "k": 2**10, "kib": 2**10,
    "mb": 10**6, "m": 2**20, "mib": 2**20,
    "gb": 10**9, "g": 2**30, "gib": 2**30,
    "tb": 10**12, "t": 2**40, "tib": 2**40,
    "pb": 10**15, "p": 2**50, "pib": 2**50,
    "eb": 10**18, "e": 2**60, "eib": 2**60,
}


#: a non-negative integer in ASCII digits, the only form libvirt's parsers accept
#: (``str.isdigit`` and ``int`` also take Arabic-Indic and other Unicode digits)
_ASCII_INT = re.compile(r"[0-9]+", re.ASCII)
_XML_SPACE = " \t\r\n"


def ascii_int(value: str | None) -> int | None:
    """Return ``value`` (surrounding XML whitespace allowed) as a non-negative integer
    when it is written in ASCII digits only, else None."""
    text = (value or "").strip(_XML_SPACE)
    return int(text) if _ASCII_INT.fullmatch(text) else None


def to_bytes(value: str | None, unit: str | None, default_unit: str = "KiB",
             what: str = "size") -> int:
    """Return the byte count of libvirt scaled integer ``value`` in ``unit``; raise
    RefusedError unless the value is ASCII digits and the unit one libvirt knows."""
    number = ascii_int(value)
    key = (unit or default_unit).lower()
    if number is None or key not in _UNIT_BYTES:
        raise RefusedError(f"cannot read {what} {(value or '').strip()!r} "
                           f"{unit or default_unit!r}")
    return number * _UNIT_BYTES[key]


def scaled_bytes(elem: Element, default_unit: str = "KiB") -> int:
    """Return the byte count of a libvirt scaled integer element (``<memory unit=...>``)."""
    return to_bytes(elem.text, elem.get("unit"), default_unit, f"<{elem.tag}> size")


def text_before(elem: Element) -> str | None:
    """Return the text node just before ``elem`` (previous sibling's tail or parent text)."""
    prev = elem.getprevious()
    if prev is not None:
        return prev.tail
    parent = elem.getparent()
    return parent.text if parent is not None else None


def _set_text_before(elem: Element, value: str | None) -> None:
    prev = elem.getprevious()
    if prev is not None:
        prev.tail = value
    else:
        parent = elem.getparent()
        if parent is not None:
            parent.text = value


def _indent_of(parent: Element) -> str:
    """Return the whitespace that precedes children of ``parent`` (a guess if it has none)."""
    for child in parent:
        before = text_before(child)
        if before is not None and before.strip() == "":
            return before
    depth = sum(1 for _ in parent.iterancestors())
    return "\n" + "  " * (depth + 1)


def insert_child(parent: Element, child: Element, index: int | None = None) -> Element:
    """Insert ``child`` into ``parent`` at ``index`` (default: last), indented like its
    siblings. Returns ``child``. ``remove_child`` undoes it exactly.
    """
    children = list(parent)
    if index is None or index >= len(children):
        if children:
            last = children[-1]
            closing = last.tail
            last.tail = _indent_of(parent)
            parent.append(child)
            child.tail = closing
        else:
            closing = parent.text
            parent.text = _indent_of(parent)
            parent.append(child)
            child.tail = closing
        return child
    anchor = children[index]
    before = text_before(anchor)
    anchor.addprevious(child)
    # addprevious moves no text: the text before anchor is now before child.
    child.tail = before if before is not None and before.strip() == "" else _indent_of(parent)
    return child


def remove_child(child: Element) -> None:
    """Remove ``child`` and the whitespace ``insert_child`` gave it, leaving the rest as is."""
    parent = child.getparent()
    if parent is None:
        return
    if child.getnext() is None:
        _set_text_before(child, child.tail)
    # lxml's remove() drops the element's tail with it.
    parent.remove(child)


def find_or_none(parent: Element, path: str) -> Element | None:
    """Return the first element matching ``path`` below ``parent``, or None."""
    found = parent.find(path)
    return found


def index_after(parent: Element, names: tuple[str, ...]) -> int:
    """Return the child index just after the last child whose tag is in ``names`` (0 if none)."""
    pos = 0
    for i, child in enumerate(parent):
        if isinstance(child.tag, str) and child.tag in names:
            pos = i + 1
    return pos


def make(tag: str, attrib: dict[str, str] | None = None, text: str | None = None,
         children: list[Element] | None = None) -> Element:
    """Return a new element with the given attributes, text and children."""
    elem = etree.Element(tag, attrib or {})
    if text is not None:
        elem.text = text
    for c in children or []:
        elem.append(c)
    return elem


def pretty_subtree(elem: Element, base_indent: str) -> Element:
    """Indent ``elem``'s descendants one step (two spaces) deeper than ``base_indent``
    (the whitespace, starting with a newline, that precedes ``elem``). Returns ``elem``.
    """
    def walk(node: Element, indent: str) -> None:
        kids = list(node)
        if not kids:
            return
        inner = indent + "  "
        node.text = inner
        for i, kid in enumerate(kids):
            kid.tail = inner if i < len(kids) - 1 else indent
            walk(kid, inner)

    walk(elem, base_indent if base_indent.startswith("\n") else "\n" + base_indent)
    return elem
