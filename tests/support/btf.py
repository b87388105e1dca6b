"""BTF blobs built by hand, as a hostile guest would plant them: :class:`Blob` (types
and strings, header added by :meth:`Blob.bytes`) and :func:`self_referencing_blob` (the
blob of issue 10: every structure libshare needs, each made of anonymous members of its
own type)."""

from __future__ import annotations

import struct

from libshare.introspect.btf import KIND_INT, KIND_STRUCT, REQUIRED_STRUCTS


class Blob:
    """A BTF blob under construction: type records (ids from 1) and a string section."""

    def __init__(self) -> None:
        self.types = b""
        self.strings = b"\0"
        self.count = 0

    def name(self, text: str) -> int:
        """Return the string offset of ``text``, adding it if new."""
        raw = text.encode() + b"\0"
        pos = self.strings.find(b"\0" + raw)
        if pos >= 0:
            return pos + 1
        self.strings += raw
        return len(self.strings) - len(raw)

    def add(self, record: bytes) -> int:
        """Append a whole type record; return its type id."""
        self.types += record
        self.count += 1
        return self.count

    def int_(self) -> int:
        """Add a 4-byte ``int``; return its type id."""
        return self.add(struct.pack("<III", self.name("int"), KIND_INT << 24, 4)
                        + struct.pack("<I", 32))

    def struct(self, name: str, members: list[tuple[str, int, int]], size: int = 8,
               type_id: int | None = None) -> int:
        """Add a struct of ``members`` (name, type id, bit offset; "" for anonymous);
        ``type_id`` asserts which id it gets (to let it refer to itself). Return its id."""
        rec = struct.pack("<III", self.name(name) if name else 0,
                          (KIND_STRUCT << 24) | len(members), size)
        for mname, mtype, off in members:
            rec += struct.pack("<III", self.name(mname) if mname else 0, mtype, off)
        got = self.add(rec)
        assert type_id is None or got == type_id
        return got

    def bytes(self) -> bytes:
        """Return the blob: header, type section, string section."""
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def self_referencing_blob(k: int) -> bytes:
    """Return a blob describing every structure libshare needs, each with ``k``
    anonymous members whose type is the structure itself (604 bytes at k=6): a member
    lookup that does not remember where it has been costs k**depth."""
    b = Blob()
    b.int_()
    for s in REQUIRED_STRUCTS:
        me = b.count + 1
        b.struct(s, [("", me, 0)] * k, type_id=me)
    return b.bytes()
