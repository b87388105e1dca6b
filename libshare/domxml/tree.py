"""Small lxml helpers for editing libvirt domain XML without disturbing it.

Insertions copy the surrounding indentation and removals undo exactly what an insertion
did, so ``remove_child(insert_child(...))`` gives back the same document (byte for byte
and in C14N). Also libvirt's size units.
"""

from __future__ import annotations

from lxml import etree

from libshare.errors import RefusedError
from libshare.util.units import scaled

Element = etree._Element

def to_bytes(value: str | None, unit: str | None, default_unit: str = "KiB",
             what: str = "size") -> int:
    """Return the byte count of libvirt scaled integer ``value`` in ``unit``; raise
    RefusedError naming ``what`` when it is not one."""
    try:
        return scaled(value or "", unit or default_unit)
    except ValueError:
        raise RefusedError(f"cannot read {what} {(value or '').strip()!r} "
                           f"{unit or default_unit!r}") from None


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
