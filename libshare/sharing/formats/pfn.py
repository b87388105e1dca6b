"""The NVDIMM PFN info block (Linux ``struct nd_pfn_sb``, drivers/nvdimm/pfn.h).

Owns building, parsing and validating the 4 KiB block that a guest kernel looks for at
offset 4 KiB of a label-less NVDIMM namespace. With a valid block the kernel
(``nd_pfn_validate()``) turns the raw ``/dev/pmem0`` into an fsdax device whose data
starts at ``dataoff``; without it filesystems print "Turning off DAX".

Layout (little-endian, 4096 bytes)::

      0  signature[16]    "NVDIMM_PFN_INFO\\0"
     16  uuid[16]         identifies the pfn device
     32  parent_uuid[16]  namespace uuid: all zero for a label-less (io) namespace
     48  flags       u32  0
     52  version_major u16  1
     54  version_minor u16  4
     56  dataoff     u64  offset of the data (filesystem) from the namespace start
     64  npfns       u64  (size - dataoff) / 4096 (mode RAM: page structs in guest RAM)
     72  mode        u32  PFN_MODE_RAM = 1 (the guest never writes the image)
     76  start_pad   u32  0 (deprecated)
     80  end_trunc   u32  0
     84  align       u32  2 MiB (v1.2+)
     88  page_size   u32  4096 (v1.4)
     92  page_struct_size u16  64 (v1.4)
     94  padding[3994]
   4088  checksum    u64  Fletcher-64 of the block with this field zeroed

The checksum is the kernel's ``nd_fletcher64(.., le=1)``: over 32-bit little-endian
words, ``lo = (lo + w) mod 2**32; hi += lo``; result ``(hi << 32 | lo) mod 2**64``.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

INFO_OFFSET = 4096
BLOCK_SIZE = 4096
PFN_SIG = b"NVDIMM_PFN_INFO\0"
DAX_SIG = b"NVDIMM_DAX_INFO\0"
PFN_MODE_NONE, PFN_MODE_RAM, PFN_MODE_PMEM = 0, 1, 2
SZ_2M = 2 * 1024 * 1024
PAGE_SIZE = 4096
RESERVE = 8192  # nd_info_block_reserve(): the kernel wants dataoff >= 8 KiB in RAM mode

_HEAD = struct.Struct("<16s16s16sIHHQQIIIIIH")
_CHECKSUM_OFF = BLOCK_SIZE - 8
assert _HEAD.size == 94


@dataclass(frozen=True)
class PfnInfo:
    """The fields of one PFN info block."""

    uuid: bytes
    dataoff: int
    npfns: int
    parent_uuid: bytes = bytes(16)
    signature: bytes = PFN_SIG
    flags: int = 0
    version_major: int = 1
    version_minor: int = 4
    mode: int = PFN_MODE_RAM
    start_pad: int = 0
    end_trunc: int = 0
    align: int = SZ_2M
    page_size: int = PAGE_SIZE
    page_struct_size: int = 64
    checksum: int = 0


def fletcher64(data: bytes) -> int:
    """Return the kernel's nd_fletcher64 (little-endian words) of ``data``.

    ``len(data)`` must be a multiple of 4.
    """
    if len(data) % 4:
        raise ValueError("fletcher64 needs a multiple of 4 bytes")
    lo = 0
    hi = 0
    # Sum in closed form per chunk would be faster; 1024 words is cheap enough.
    for (word,) in struct.iter_unpack("<I", data):
        lo = (lo + word) & 0xFFFFFFFF
        hi += lo
    return ((hi << 32) | lo) & 0xFFFFFFFFFFFFFFFF


def block_checksum(block: bytes) -> int:
    """Return the checksum the kernel expects for the 4 KiB ``block`` (checksum field zeroed)."""
    if len(block) != BLOCK_SIZE:
        raise ValueError("a PFN info block is 4096 bytes")
    return fletcher64(block[:_CHECKSUM_OFF] + bytes(8))


def pack(info: PfnInfo) -> bytes:
    """Return the 4096-byte block for ``info`` with a correct checksum (``info.checksum`` ignored)."""
    head = _HEAD.pack(info.signature, info.uuid, info.parent_uuid, info.flags,
                      info.version_major, info.version_minor, info.dataoff, info.npfns,
                      info.mode, info.start_pad, info.end_trunc, info.align,
                      info.page_size, info.page_struct_size)
    body = head + bytes(_CHECKSUM_OFF - len(head))
    return body + struct.pack("<Q", fletcher64(body + bytes(8)))


def unpack(block: bytes) -> PfnInfo:
    """Return the fields of the 4096-byte ``block`` (no validation; see :func:`validate`)."""
    if len(block) != BLOCK_SIZE:
        raise ValueError(f"a PFN info block is {BLOCK_SIZE} bytes, got {len(block)}")
    f = _HEAD.unpack_from(block)
    (checksum,) = struct.unpack_from("<Q", block, _CHECKSUM_OFF)
    return PfnInfo(signature=f[0], uuid=f[1], parent_uuid=f[2], flags=f[3],
                   version_major=f[4], version_minor=f[5], dataoff=f[6], npfns=f[7],
                   mode=f[8], start_pad=f[9], end_trunc=f[10], align=f[11],
                   page_size=f[12], page_struct_size=f[13], checksum=checksum)


def build(image_size: int, dataoff: int, uuid: bytes, align: int = SZ_2M) -> bytes:
    """Return the info block for an image of ``image_size`` bytes with data at ``dataoff``.

    ``npfns`` is derived as the kernel's nd_pfn_init() does in RAM mode:
    ``(size - dataoff - end_trunc) / PAGE_SIZE``.
    """
    info = PfnInfo(uuid=uuid, dataoff=dataoff, npfns=(image_size - dataoff) // PAGE_SIZE,
                   align=align)
    problem = validate(info, image_size)
    if problem:
        raise ValueError(problem)
    return pack(info)


def uuid_from(seed: bytes) -> bytes:
    """Return a 16-byte RFC 4122 (version 8, "custom") UUID derived from ``seed``."""
    b = bytearray(seed[:16].ljust(16, b"\0"))
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    return bytes(uuidlib.UUID(bytes=bytes(b)).bytes)


def validate(info: PfnInfo, image_size: int, block: bytes | None = None) -> str | None:
    """Return why a guest kernel would refuse ``info`` on an image of ``image_size``, or None.

    Mirrors nd_pfn_validate() and __nvdimm_setup_pfn() (namespace start assumed 2 MiB
    aligned, as QEMU places NVDIMMs), plus libshare's own rules (mode RAM, PFN
    signature, npfns covering the whole data area). If ``block`` (the raw bytes) is
    given its checksum is checked too.
    """
    if info.signature != PFN_SIG:
        return f"bad signature {info.signature!r} (want {PFN_SIG!r})"
    if block is not None:
        want = block_checksum(block)
        if info.checksum != want:
            return f"bad checksum {info.checksum:#018x} (computed {want:#018x})"
    if info.parent_uuid != bytes(16):
        return "parent_uuid is not zero (a label-less namespace has a null uuid)"
    if info.version_major != 1 or info.version_minor < 4:
        return f"version {info.version_major}.{info.version_minor} (want 1.4)"
    if info.mode != PFN_MODE_RAM:
        return f"mode {info.mode} (want {PFN_MODE_RAM}, RAM)"
    if info.flags != 0 or info.start_pad != 0 or info.end_trunc != 0:
        return "flags, start_pad and end_trunc must be zero"
    if info.page_size != PAGE_SIZE or info.page_struct_size != 64:
        return f"page_size {info.page_size}/page_struct_size {info.page_struct_size}"
    if info.align != SZ_2M:
        return f"align {info.align} (want {SZ_2M})"
    if info.dataoff < RESERVE or info.dataoff % info.align:
        return f"dataoff {info.dataoff} not a multiple of align {info.align}"
    if image_size % SZ_2M:
        return f"size {image_size} not a multiple of 2 MiB"
    if info.dataoff >= image_size:
        return f"dataoff {info.dataoff} beyond the image size {image_size}"
    want_npfns = (image_size - info.dataoff) // PAGE_SIZE
    if info.npfns != want_npfns:
        return f"npfns {info.npfns} does not match the image size (want {want_npfns})"
    return None
