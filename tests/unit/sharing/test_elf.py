"""ELF identity: real system libraries, and files that must be skipped, never crash."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from libshare.sharing.elf import ElfIdentity, Skipped, identify, same_library
from libshare.util.digest import sha256_file

LIBDIR = Path("/lib/x86_64-linux-gnu")
LIBZ = LIBDIR / "libz.so.1"
LIBC = LIBDIR / "libc.so.6"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not on this machine")
    return path


def test_real_library_identity() -> None:
    ident = identify(need(LIBC))
    assert isinstance(ident, ElfIdentity), ident
    assert ident.elf_type == "ET_DYN"
    assert ident.soname == "libc.so.6"
    assert ident.build_id is not None and len(ident.build_id) == 40
    assert ident.sha256 == sha256_file(LIBC)
    assert ident.size == LIBC.stat().st_size
    assert len(ident.segments) >= 2
    assert any("x" in s.flags for s in ident.segments)
    assert all(s.align >= 4096 for s in ident.segments)
    assert ident.page_congruent


def test_pie_executable_has_no_soname() -> None:
    ident = identify(need(Path("/bin/ls")))
    assert isinstance(ident, ElfIdentity)
    assert ident.soname is None


def test_non_elf(tmp_path: Path) -> None:
    p = tmp_path / "text"
    p.write_text("hello\n")
    r = identify(p)
    assert isinstance(r, Skipped) and r.reason == "not an ELF file"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert isinstance(identify(empty), Skipped)


def test_missing_file_is_skipped(tmp_path: Path) -> None:
    r = identify(tmp_path / "nope")
    assert isinstance(r, Skipped) and "cannot read" in r.reason


def test_foreign_architecture(tmp_path: Path) -> None:
    data = bytearray(need(LIBZ).read_bytes())
    struct.pack_into("<H", data, 18, 183)  # e_machine = EM_AARCH64
    p = tmp_path / "libfoo-arm64.so"
    p.write_bytes(bytes(data))
    r = identify(p)
    assert isinstance(r, Skipped)
    assert "foreign architecture" in r.reason and "AArch64" in r.reason


def test_32_bit_and_relocatable(tmp_path: Path) -> None:
    data = bytearray(need(LIBZ).read_bytes()[:64])
    data[4] = 1
    p = tmp_path / "elf32"
    p.write_bytes(bytes(data))
    r = identify(p)
    assert isinstance(r, Skipped) and "64-bit" in r.reason
    data = bytearray(need(LIBZ).read_bytes())
    struct.pack_into("<H", data, 16, 1)  # ET_REL
    p.write_bytes(bytes(data))
    r = identify(p)
    assert isinstance(r, Skipped) and "ET_REL" in r.reason


@pytest.mark.parametrize("keep", [3, 40, 64, 200, 4096, 30000])
def test_truncated(tmp_path: Path, keep: int) -> None:
    p = tmp_path / "trunc.so"
    p.write_bytes(need(LIBZ).read_bytes()[:keep])
    r = identify(p)
    assert isinstance(r, Skipped), r
    assert r.reason


def test_corrupt_headers_never_crash(tmp_path: Path) -> None:
    data = bytearray(need(LIBZ).read_bytes())
    p = tmp_path / "corrupt.so"
    # program header table offset far beyond the end of the file
    bad = bytearray(data)
    struct.pack_into("<Q", bad, 32, 1 << 40)
    p.write_bytes(bytes(bad))
    r = identify(p)
    assert isinstance(r, Skipped) and "truncated" in r.reason
    # garbage over the program headers and the dynamic section
    phoff = struct.unpack_from("<Q", data, 32)[0]
    bad = bytearray(data)
    bad[phoff:phoff + 400] = bytes((i * 37 + 11) & 0xFF for i in range(400))
    p.write_bytes(bytes(bad))
    r = identify(p)
    assert isinstance(r, Skipped | ElfIdentity)  # any answer, but no exception


def test_same_build_id_different_bytes_is_not_same_library(tmp_path: Path) -> None:
    src = need(LIBZ)
    a = tmp_path / "a.so"
    b = tmp_path / "b.so"
    shutil.copyfile(src, a)
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF  # last byte: section headers/strtab, build-id note unaffected
    b.write_bytes(bytes(data))
    ia, ib = identify(a), identify(b)
    assert isinstance(ia, ElfIdentity) and isinstance(ib, ElfIdentity)
    assert ia.build_id == ib.build_id
    assert not same_library(ia, ib)
    isrc = identify(src)
    assert isinstance(isrc, ElfIdentity) and same_library(ia, isrc)
