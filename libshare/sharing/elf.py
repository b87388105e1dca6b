"""ELF identity of one candidate library or executable (pyelftools).

Owns the question "is this file something the sharing engine may store, and what is
it": an x86-64 little-endian ELF of type ET_DYN (shared objects, PIE executables) or
ET_EXEC, with its GNU build-id, SONAME, PT_LOAD segments, SHA-256 and size.

Anything else -- not ELF, 32-bit, foreign architecture, relocatable objects, core files,
truncated or corrupt files -- yields a :class:`Skipped` with a one-line reason; no input
file makes :func:`identify` raise (only the caller's own mistakes, such as a missing
path, surface as a ``Skipped`` with the OS error as reason).

Identity is the SHA-256 of the bytes, never the build-id: two files with the same
build-id but different bytes (a re-stripped or patched build) are different libraries
(:func:`same_library`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from libshare.util.digest import sha256_stream
from libshare.util.files import open_regular

EM_X86_64 = 62
ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
MACHINES = {
    3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390", 40: "ARM",
    43: "SPARCv9", 50: "IA-64", 62: "x86-64", 183: "AArch64", 243: "RISC-V", 258: "LoongArch",
}
ELF_MAGIC = b"\x7fELF"
PAGE = 4096


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header (file offset, virtual address, sizes, flags, alignment)."""

    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: str
    align: int

    def as_dict(self) -> dict[str, Any]:
        """Return the segment as a JSON-ready dict."""
        return {"offset": self.offset, "vaddr": self.vaddr, "filesz": self.filesz,
                "memsz": self.memsz, "flags": self.flags, "align": self.align}


@dataclass(frozen=True)
class ElfIdentity:
    """What the sharing engine knows about one acceptable ELF file."""

    path: str
    sha256: str
    size: int
    elf_type: str                      # "ET_DYN" or "ET_EXEC"
    build_id: str | None
    soname: str | None
    segments: tuple[Segment, ...] = field(default=())

    @property
    def page_congruent(self) -> bool:
        """Return True if every PT_LOAD has offset == vaddr modulo 4 KiB (mmap-able)."""
        return all((s.offset - s.vaddr) % PAGE == 0 for s in self.segments)

    def as_dict(self) -> dict[str, Any]:
        """Return the identity as a JSON-ready dict."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size,
                "elf_type": self.elf_type, "build_id": self.build_id, "soname": self.soname,
                "segments": [s.as_dict() for s in self.segments]}


@dataclass(frozen=True)
class Skipped:
    """A file that is not a storable x86-64 ELF, and why (one line)."""

    path: str
    reason: str


def same_library(a: ElfIdentity, b: ElfIdentity) -> bool:
    """Return True only if ``a`` and ``b`` are byte-identical (same SHA-256 and size).

    A shared build-id is not enough: it says "same build", not "same bytes".
    """
    return a.sha256 == b.sha256 and a.size == b.size


def _flags(p_flags: int) -> str:
    return "".join(c if p_flags & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))


def check_header(head: bytes) -> str | None:
    """Return why the first 64 bytes ``head`` are not an x86-64 ET_DYN/ET_EXEC ELF, or None."""
    if len(head) < 4 or head[:4] != ELF_MAGIC:
        return "not an ELF file"
    if len(head) < 64:
        return "truncated ELF header"
    if head[4] != 2:
        if head[4] == 1:
            return "not a 64-bit ELF (ELFCLASS32)"
        return f"corrupt ELF header (bad class {head[4]})"
    if head[5] != 1:
        return "not a little-endian ELF"
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    if e_machine != EM_X86_64:
        name = MACHINES.get(e_machine, f"machine {e_machine}")
        return f"foreign architecture ({name})"
    if e_type not in (2, 3):
        return f"not a shared object or executable ({ET_NAMES.get(e_type, f'type {e_type}')})"
    return None


def header_type(head: bytes) -> str | None:
    """Return the ELF type name ("ET_REL", "ET_DYN"...) of the first 64 bytes ``head``
    of an x86-64 little-endian 64-bit ELF file, None for anything else."""
    if len(head) < 64 or head[:4] != ELF_MAGIC or head[4] != 2 or head[5] != 1:
        return None
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    if e_machine != EM_X86_64:
        return None
    return ET_NAMES.get(e_type)


def identify(path: str | os.PathLike[str], follow: bool = True) -> ElfIdentity | Skipped:
    """Return the :class:`ElfIdentity` of the file at ``path`` or a :class:`Skipped`.

    Never raises for bad file contents; unreadable files are skipped with the OS error.
    Only a regular file is opened (a FIFO or device is skipped, never waited on; with
    ``follow`` False a symlink too), and everything is read from that one open file.
    """
    spath = os.fspath(path)
    try:
        with open_regular(spath, follow=follow) as fh:
            st = os.fstat(fh.fileno())
            head = fh.read(64)
            why = check_header(head)
            if why is not None:
                return Skipped(spath, why)
            fh.seek(0)
            parsed = _parse(fh, st.st_size)
            if isinstance(parsed, str):
                return Skipped(spath, parsed)
            elf_type, build_id, soname, segments = parsed
            fh.seek(0)
            digest = sha256_stream(fh)
            if fh.tell() != st.st_size:
                return Skipped(spath, "file changed while being read")
    except OSError as exc:
        return Skipped(spath, f"cannot read: {exc.strerror or exc}")
    return ElfIdentity(path=spath, sha256=digest, size=st.st_size, elf_type=elf_type,
                       build_id=build_id, soname=soname, segments=segments)


def _parse(fh: Any, size: int) -> str | tuple[str, str | None, str | None, tuple[Segment, ...]]:
    """Return (type, build-id, soname, segments) parsed from ``fh``, or a skip reason."""
    from elftools.elf.dynamic import DynamicSegment
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import NoteSegment

    try:
        elf = ELFFile(fh)
        if elf.header["e_phoff"] + elf.num_segments() * elf.header["e_phentsize"] > size:
            return "truncated ELF (program headers beyond end of file)"
        segments: list[Segment] = []
        build_id: str | None = None
        soname: str | None = None
        for seg in elf.iter_segments():
            ptype = seg["p_type"]
            if seg["p_filesz"] and seg["p_offset"] + seg["p_filesz"] > size:
                return f"truncated ELF ({ptype} segment ends beyond end of file)"
            if ptype == "PT_LOAD":
                segments.append(Segment(seg["p_offset"], seg["p_vaddr"], seg["p_filesz"],
                                        seg["p_memsz"], _flags(seg["p_flags"]), seg["p_align"]))
            elif isinstance(seg, NoteSegment) and build_id is None:
                for note in seg.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                        build_id = str(note["n_desc"])
                        break
            elif isinstance(seg, DynamicSegment):
                for tag in seg.iter_tags():
                    if tag.entry.d_tag == "DT_SONAME":
                        soname = str(getattr(tag, "soname", "")) or None
                        break
        if not segments:
            return "no PT_LOAD segment"
        elf_type = str(elf.header["e_type"])
    except Exception as exc:  # pyelftools raises many types on corrupt input
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"corrupt ELF ({msg[:120]})"
    return elf_type, build_id, soname, tuple(segments)
