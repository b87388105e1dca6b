"""NVDIMM PFN info block: layout, Fletcher-64, validation rules of nd_pfn_validate()."""

from __future__ import annotations

import struct

import pytest

from libshare.sharing.formats import pfn

MiB = 1024 * 1024


def test_fletcher64_hand_computed() -> None:
    # words 1, 2, 3: lo = 1, 3, 6; hi = 1, 4, 10
    assert pfn.fletcher64(struct.pack("<3I", 1, 2, 3)) == (10 << 32) | 6
    # lo wraps at 32 bits, hi keeps only its low 32 bits after the shift
    # lo: 0xffffffff, 1; hi: 0xffffffff + 1 = 0x1_0000_0000 -> shifted out entirely
    assert pfn.fletcher64(struct.pack("<2I", 0xFFFFFFFF, 2)) == 1
    # little-endian words: bytes 01 00 00 00 is 1, 00 00 00 01 is 1 << 24
    assert pfn.fletcher64(b"\0\0\0\1") == ((1 << 24) << 32) | (1 << 24)
    with pytest.raises(ValueError):
        pfn.fletcher64(b"abc")


def _reference(block: bytes) -> int:
    """Independent Fletcher-64: closed form over the words (sum of prefix sums)."""
    words = [int.from_bytes(block[i:i + 4], "little") for i in range(0, len(block), 4)]
    n = len(words)
    lo = sum(words) % 2**32
    # the kernel accumulates lo *after* its own 32-bit wrap at each step
    hi = 0
    acc = 0
    for w in words:
        acc = (acc + w) % 2**32
        hi = (hi + acc) % 2**32
    assert n == 1024
    return (hi << 32) | lo


def test_block_layout_and_round_trip() -> None:
    size = 64 * MiB
    uuid = pfn.uuid_from(bytes(range(16)))
    block = pfn.build(size, 2 * MiB, uuid)
    assert len(block) == 4096
    assert block[:16] == b"NVDIMM_PFN_INFO\0"
    assert block[16:32] == uuid and block[32:48] == bytes(16)
    flags, vmaj, vmin, dataoff, npfns, mode = struct.unpack_from("<IHHQQI", block, 48)
    assert (flags, vmaj, vmin, dataoff, mode) == (0, 1, 4, 2 * MiB, 1)
    assert npfns == (size - 2 * MiB) // 4096
    start_pad, end_trunc, align, page_size = struct.unpack_from("<4I", block, 76)
    assert (start_pad, end_trunc, align, page_size) == (0, 0, 2 * MiB, 4096)
    assert struct.unpack_from("<H", block, 92)[0] == 64
    assert block[94:4088] == bytes(3994)
    checksum = struct.unpack_from("<Q", block, 4088)[0]
    assert checksum == _reference(block[:4088] + bytes(8))
    info = pfn.unpack(block)
    assert info.checksum == checksum
    assert pfn.validate(info, size, block) is None
    assert pfn.pack(info) == block


def test_bad_checksum_and_wrong_sizes_are_refused() -> None:
    size = 8 * MiB
    block = bytearray(pfn.build(size, 2 * MiB, bytes(16)))
    block[200] ^= 1
    info = pfn.unpack(bytes(block))
    assert "checksum" in (pfn.validate(info, size, bytes(block)) or "")
    good = pfn.build(size, 2 * MiB, bytes(16))
    info = pfn.unpack(good)
    assert "npfns" in (pfn.validate(info, size - 2 * MiB) or "")      # truncated image
    assert "multiple of 2 MiB" in (pfn.validate(info, size - 4096) or "")
    with pytest.raises(ValueError):
        pfn.build(size, 4096, bytes(16))                               # dataoff < align


def test_uuid_is_rfc4122_v8() -> None:
    import uuid as uuidlib
    u = uuidlib.UUID(bytes=pfn.uuid_from(b"\xff" * 32))
    assert u.version == 8 and u.variant == uuidlib.RFC_4122
