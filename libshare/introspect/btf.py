"""A reader of the Linux kernel's BTF type information (``Documentation/bpf/btf.rst``).

Owns the BTF byte format: the 24-byte header (magic 0xEB9F, version 1), the type
section (``struct btf_type`` records, type id 1 upward, each followed by its
kind-specific data) and the string section; finding a valid blob inside raw guest
memory (:func:`find_btf`); and answering layout questions: a struct's size, a member's
byte or bit offset by name, through anonymous unions and structs and nested members
(``"d_name.len"``).

Everything is bounded, since a blob found in guest memory may be planted by the guest:
the header's lengths are capped (:data:`MAX_SECTION`, and the kernel's own limits:
at most :data:`BTF_MAX_TYPE` types, a string section of at most 16 MiB that starts and
ends with a NUL, names of at most :data:`MAX_NAME` bytes), vlen is bounded by the section
it lives in, type chains (typedef/const/volatile..., array of array...) are followed to
:data:`MAX_CHAIN` links, anonymous nesting to :data:`MAX_NEST` levels, and one member
lookup examines at most :data:`MAX_LOOKUP` members, each type once (a struct that
contains itself is malformed); sizes above 4 GiB are refused. A malformed blob raises
:class:`BtfError`, never a RecursionError or a blow-up: a planted blob costs at most
about what the kernel's own blob does.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from libshare.errors import LibshareError

BTF_MAGIC = 0xEB9F
BTF_MAGIC_BYTES = b"\x9f\xeb\x01"  # magic (little-endian) followed by version 1
HDR_LEN = 24
MAX_SECTION = 64 << 20  # no kernel's BTF type or string section comes near 64 MiB
#: the kernel's own limits on the BTF it accepts (include/uapi/linux/btf.h,
#: kernel/bpf/btf.c btf_parse_str_sec): type ids and string offsets
BTF_MAX_TYPE = 0x000F_FFFF
BTF_MAX_NAME_OFFSET = 0x00FF_FFFF
#: longest name read (the kernel refuses identifiers of KSYM_NAME_LEN, 512, or more)
MAX_NAME = 1024
#: links of a typedef/const/volatile chain, or levels of an array of arrays
MAX_CHAIN = 32
#: levels of anonymous struct/union nesting searched for a member (real kernels: 3)
MAX_NEST = 8
#: members one lookup may examine (a real kernel's largest, task_struct.*: under 400)
MAX_LOOKUP = 1 << 12
#: the largest size sizeof answers (BTF stores struct sizes in 32 bits)
MAX_SIZE = 1 << 32

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

#: Bytes of kind-specific data after a btf_type record: (fixed, per vlen item).
_EXTRA: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0), KIND_PTR: (0, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12), KIND_ENUM: (0, 8), KIND_FWD: (0, 0), KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0), KIND_CONST: (0, 0), KIND_RESTRICT: (0, 0), KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12), KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0), KIND_TYPE_TAG: (0, 0), KIND_ENUM64: (0, 12),
}
#: what every header parse_header accepts starts with: magic, version 1, any flags,
#: hdr_len 24 (searched as one pattern: the 3-byte magic alone hits thousands of times)
_HEADER_START = re.compile(re.escape(BTF_MAGIC_BYTES) + rb".\x18\x00\x00\x00", re.S)
#: (fixed, per-vlen) extra bytes of each kind's record, indexed by kind (None: unknown)
_STEPS: list[tuple[int, int] | None] = [_EXTRA.get(k) for k in range(32)]
#: the kinds find_types looks up by name
_NAMED_KINDS = frozenset((KIND_STRUCT, KIND_UNION, KIND_TYPEDEF, KIND_INT, KIND_ENUM))
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)
_COMPOSITE = (KIND_STRUCT, KIND_UNION)

#: Structures a kernel's BTF must describe for libshare to walk tasks and mappings.
REQUIRED_STRUCTS = ("task_struct", "mm_struct", "vm_area_struct", "file", "dentry", "mount")

_HDR = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")
_ARRAY = struct.Struct("<III")


class BtfError(LibshareError):
    """The BTF blob is malformed, truncated, or lacks a type or member asked for."""


@dataclass(frozen=True)
class Member:
    """A struct/union member: ``bit_offset`` from the start of the outer type asked
    about, ``bit_size`` (0 unless a bitfield) and the member's ``type_id``."""

    name: str
    type_id: int
    bit_offset: int
    bit_size: int

    @property
    def offset(self) -> int:
        """Return the member's byte offset (the containing byte for a bitfield)."""
        return self.bit_offset // 8


@dataclass(frozen=True)
class BtfHeader:
    """The fixed header: section offsets are relative to the end of the header."""

    flags: int
    hdr_len: int
    type_off: int
    type_len: int
    str_off: int
    str_len: int

    @property
    def total_len(self) -> int:
        """Return the blob's full length in bytes (header plus both sections)."""
        return self.hdr_len + max(self.type_off + self.type_len, self.str_off + self.str_len)


def parse_header(data: bytes | memoryview, pos: int = 0) -> BtfHeader | None:
    """Return the BTF header at ``data[pos:]`` if it is plausible, else None.

    Plausible: magic 0xEB9F, version 1, hdr_len 24, type section first (type_off 0),
    strings right after (str_off == type_len), both sections non-empty, the type section
    under :data:`MAX_SECTION` and the string section within the kernel's 16 MiB.
    """
    if len(data) - pos < HDR_LEN:
        return None
    magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = \
        _HDR.unpack_from(data, pos)
    if magic != BTF_MAGIC or version != 1 or hdr_len != HDR_LEN:
        return None
    if type_off != 0 or str_off != type_len or not 0 < type_len <= MAX_SECTION:
        return None
    if not 0 < str_len <= BTF_MAX_NAME_OFFSET + 1:
        return None
    return BtfHeader(flags, hdr_len, type_off, type_len, str_off, str_len)


class Btf:
    """A parsed BTF blob: type records indexed by id, struct names indexed lazily."""

    def __init__(self, data: bytes) -> None:
        """Parse ``data`` (a whole blob, header first); raise BtfError if malformed."""
        hdr = parse_header(data)
        if hdr is None:
            raise BtfError("not a BTF blob (bad magic, version or header lengths)")
        if len(data) < hdr.total_len:
            raise BtfError(f"BTF blob truncated: {len(data)} of {hdr.total_len} bytes")
        self.header = hdr
        self._data = bytes(data[:hdr.total_len])
        self._types_start = hdr.hdr_len + hdr.type_off
        self._str_start = hdr.hdr_len + hdr.str_off
        self._str_end = self._str_start + hdr.str_len
        self._offs: list[int] = [0]  # record offset of each type id; id 0 is void
        self._by_name_off: dict[int, list[int]] = {}  # name offset -> ids (named kinds)
        self._names: dict[str, list[int]] | None = None  # name -> ids, built on first use
        self._resolved: dict[int, int] = {}  # type id -> id with modifiers stripped
        self._lookups: dict[tuple[int, str], Member | None] = {}  # (struct id, name) -> hit
        if self._data[self._str_start] or self._data[self._str_end - 1]:
            raise BtfError("BTF string section does not start and end with a NUL")
        self._index_types()

    def _index_types(self) -> None:
        """Record each type's offset and, for the named kinds :meth:`find_types` serves,
        its id under its name's string offset (one pass, no string decoding)."""
        data = self._data
        pos = self._types_start
        end = pos + self.header.type_len
        offs = self._offs
        by_name = self._by_name_off
        unpack = _TYPE.unpack_from
        steps = _STEPS
        named = _NAMED_KINDS
        while pos < end:
            if len(offs) > BTF_MAX_TYPE:
                raise BtfError(f"BTF has more than {BTF_MAX_TYPE} types")
            if end - pos < 12:
                raise BtfError(f"BTF type section ends inside a record at {pos}")
            name, info, _size = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            step = steps[kind]
            if step is None:
                raise BtfError(f"unknown BTF kind {kind} for type {len(offs)}")
            if name and kind in named:
                ids = by_name.get(name)
                if ids is None:
                    by_name[name] = [len(offs)]
                else:
                    ids.append(len(offs))
            offs.append(pos)
            pos += 12 + step[0] + step[1] * (info & 0xFFFF)
        if pos != end:
            raise BtfError("BTF type section overruns its declared length")

    # --- low-level accessors -------------------------------------------------------

    @property
    def ntypes(self) -> int:
        """Return the number of types (the largest type id)."""
        return len(self._offs) - 1

    def string(self, off: int) -> str:
        """Return the string at ``off`` in the string section ("" for 0); raise
        BtfError if it is outside the section or longer than :data:`MAX_NAME` bytes."""
        if off == 0:
            return ""
        start = self._str_start + off
        if not self._str_start <= start < self._str_end:
            raise BtfError(f"BTF string offset {off} outside the string section")
        stop = self._data.find(b"\0", start, min(self._str_end, start + MAX_NAME + 1))
        if stop < 0:
            raise BtfError(f"BTF string at {off} is longer than {MAX_NAME} bytes")
        return self._data[start:stop].decode("utf-8", "replace")

    def _record(self, type_id: int) -> tuple[int, int, int, int]:
        """Return (record offset, name_off, info, size_or_type) of ``type_id``."""
        if not 0 < type_id < len(self._offs):
            raise BtfError(f"BTF type id {type_id} out of range (1..{self.ntypes})")
        pos = self._offs[type_id]
        name_off, info, size = _TYPE.unpack_from(self._data, pos)
        return pos, name_off, info, size

    def kind(self, type_id: int) -> int:
        """Return the BTF kind number of ``type_id`` (0 for void)."""
        if type_id == 0:
            return 0
        return (self._record(type_id)[2] >> 24) & 0x1F

    def name(self, type_id: int) -> str:
        """Return the name of ``type_id`` ("" for anonymous types and void)."""
        if type_id == 0:
            return ""
        return self.string(self._record(type_id)[1])

    def find_types(self, name: str, kinds: Iterable[int] | None = None) -> list[int]:
        """Return the ids of struct/union/typedef/int/enum types named ``name``
        (optionally only of ``kinds``), in id order."""
        if self._names is None:
            names: dict[str, list[int]] = {}
            for off, ids in self._by_name_off.items():
                names.setdefault(self.string(off), []).extend(ids)
            self._names = names
        ids = sorted(self._names.get(name, []))
        if kinds is None:
            return ids
        wanted = set(kinds)
        return [i for i in ids if self.kind(i) in wanted]

    def struct_id(self, name: str) -> int:
        """Return the id of the complete struct or union called ``name``; raise if none."""
        for type_id in self.find_types(name, (KIND_STRUCT, KIND_UNION)):
            return type_id
        raise BtfError(f"BTF has no struct {name}")

    def has_struct(self, name: str) -> bool:
        """Return True if a struct or union called ``name`` is described."""
        return bool(self.find_types(name, (KIND_STRUCT, KIND_UNION)))

    def resolve(self, type_id: int) -> int:
        """Return ``type_id`` with typedefs, const, volatile, restrict and type tags
        stripped; raise BtfError after :data:`MAX_CHAIN` links (a loop, in a planted
        blob)."""
        done = self._resolved.get(type_id)
        if done is not None:
            return done
        start = type_id
        for _ in range(MAX_CHAIN):
            if type_id == 0 or self.kind(type_id) not in _MODIFIERS:
                self._resolved[start] = type_id
                return type_id
            type_id = self._record(type_id)[3]
        raise BtfError(f"BTF type chain longer than {MAX_CHAIN} at type {start}")

    def sizeof(self, type_id: int) -> int:
        """Return the size in bytes of ``type_id`` (pointers are 8, arrays multiply);
        raise BtfError for a type without a size, arrays nested deeper than
        :data:`MAX_CHAIN` (an array of itself) or a size of :data:`MAX_SIZE` or more."""
        start, count = type_id, 1
        for _ in range(MAX_CHAIN):
            type_id = self.resolve(type_id)
            if type_id == 0:
                raise BtfError("sizeof(void)")
            pos, _, info, size = self._record(type_id)
            kind = (info >> 24) & 0x1F
            if kind == KIND_ARRAY:
                type_id, _index, nelems = _ARRAY.unpack_from(self._data, pos + 12)
                count *= nelems
                continue
            if kind == KIND_PTR:
                size = 8
            elif kind not in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64,
                              KIND_FLOAT, KIND_DATASEC):
                raise BtfError(f"BTF type {type_id} (kind {kind}) has no size")
            if count * size >= MAX_SIZE:
                raise BtfError(f"BTF type {start} is {count * size} bytes, too large")
            return count * size
        raise BtfError(f"BTF arrays nested deeper than {MAX_CHAIN} at type {start}")

    def struct_size(self, name: str) -> int:
        """Return ``sizeof(struct name)``."""
        return self.sizeof(self.struct_id(name))

    def members(self, type_id: int) -> Iterator[Member]:
        """Yield the direct members of struct/union ``type_id`` (offsets relative to it)."""
        type_id = self.resolve(type_id)
        pos, _, info, _ = self._record(type_id)
        kind = (info >> 24) & 0x1F
        if kind not in _COMPOSITE:
            raise BtfError(f"BTF type {type_id} is not a struct or union")
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = _MEMBER.unpack_from(self._data, pos + 12 + 12 * i)
            if kflag:
                yield Member(self.string(name_off), mtype, offset & 0xFFFFFF, offset >> 24)
            else:
                yield Member(self.string(name_off), mtype, offset, 0)

    def _find_member(self, type_id: int, name: str) -> Member | None:
        """Return member ``name`` of struct/union ``type_id`` (resolved), searching its
        direct members first, then its anonymous struct/union members in order, depth
        first (as C does); None if there is none. Each type is searched once per lookup
        (at its shallowest depth, at most :data:`MAX_NEST`), at most :data:`MAX_LOOKUP`
        members are examined, results are remembered; an anonymous member whose type
        contains it (a loop) or a lookup over budget raises BtfError."""
        key = (type_id, name)
        if key in self._lookups:
            return self._lookups[key]
        searched: dict[int, int] = {}  # type id -> shallowest depth searched
        nesting: set[int] = set()  # the types being searched, outermost first
        budget = MAX_LOOKUP

        def search(tid: int, depth: int) -> Member | None:
            nonlocal budget
            if tid in nesting:
                raise BtfError(f"BTF type {tid} contains itself (anonymous member loop)")
            if depth > MAX_NEST or searched.get(tid, MAX_NEST + 1) <= depth:
                return None
            searched[tid] = depth
            nesting.add(tid)
            try:
                anonymous: list[tuple[Member, int]] = []
                for m in self.members(tid):
                    budget -= 1
                    if budget < 0:
                        raise BtfError(f"BTF lookup of member {name} of type {type_id} "
                                       f"examined more than {MAX_LOOKUP} members")
                    if m.name == name:
                        return m
                    if not m.name:
                        inner_id = self.resolve(m.type_id)
                        if self.kind(inner_id) in _COMPOSITE:
                            anonymous.append((m, inner_id))
                for a, inner_id in anonymous:
                    inner = search(inner_id, depth + 1)
                    if inner is not None:
                        return Member(inner.name, inner.type_id,
                                      a.bit_offset + inner.bit_offset, inner.bit_size)
                return None
            finally:
                nesting.discard(tid)

        found = search(self.resolve(type_id), 0)
        self._lookups[key] = found
        return found

    def member(self, struct: str | int, path: str) -> Member:
        """Return the member at dotted ``path`` (``"d_name.len"``) of ``struct`` (a name
        or type id), looking through anonymous unions and structs; its bit offset is from
        the start of ``struct``. Raise BtfError if there is no such member."""
        type_id = self.struct_id(struct) if isinstance(struct, str) else struct
        total = 0
        found: Member | None = None
        for part in path.split("."):
            if found is not None:
                type_id = found.type_id
                if self.kind(self.resolve(type_id)) not in _COMPOSITE:
                    raise BtfError(f"{struct}.{path}: {found.name} is not a struct")
            found = self._find_member(type_id, part)
            if found is None:
                raise BtfError(f"BTF: {struct} has no member {path}")
            total += found.bit_offset
        assert found is not None
        return Member(found.name, found.type_id, total, found.bit_size)

    def offsetof(self, struct: str, path: str) -> int:
        """Return the byte offset of ``path`` in ``struct``."""
        return self.member(struct, path).offset

    def has_member(self, struct: str, path: str) -> bool:
        """Return True if ``struct`` exists and has a member at ``path``."""
        try:
            self.member(struct, path)
        except BtfError:
            return False
        return True

    def validate_kernel(self) -> None:
        """Raise BtfError unless this blob describes the structures libshare walks
        (:data:`REQUIRED_STRUCTS`, and a VMA index: ``mm_struct.mm_mt`` or ``mmap``)."""
        missing = [s for s in REQUIRED_STRUCTS if not self.has_struct(s)]
        if missing:
            raise BtfError(f"BTF lacks {', '.join(missing)} (partial or module BTF)")
        if not (self.has_member("mm_struct", "mm_mt") or self.has_member("mm_struct", "mmap")):
            raise BtfError("BTF mm_struct has neither mm_mt nor mmap")


def find_btf(chunks: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, BtfHeader]]:
    """Yield ``(address, header)`` of every plausible BTF header in ``chunks``, an
    iterable of ``(address, data)`` pieces of memory (scan order). Candidates still need
    :meth:`Btf.validate_kernel` on the parsed blob: a partial copy has the same header."""
    for base, data in chunks:
        for m in _HEADER_START.finditer(data):
            hdr = parse_header(data, m.start())
            if hdr is not None:
                yield base + m.start(), hdr
