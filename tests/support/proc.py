"""A hand-written ``/proc`` and KSM sysfs folder for host-accounting tests: the smaps of
a QEMU process (guest RAM, the library region, TCG's translation buffer) written in the
kernel's own format, its ``ksm_stat``, a ksmd thread, and ``/sys/kernel/mm/ksm``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
#: the smaps counters every mapping prints, in the kernel's order
SMAPS_KEYS = ("Size", "KernelPageSize", "MMUPageSize", "Rss", "Pss", "Pss_Dirty",
              "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty",
              "Referenced", "Anonymous", "KSM", "LazyFree", "AnonHugePages",
              "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb",
              "Swap", "SwapPss", "Locked")


@dataclass
class Map:
    """One mapping for :func:`smaps_text`: address, length, permissions, path and the
    counters (kB) that are not 0."""

    start: int
    size: int
    perms: str = "rw-p"
    path: str = ""
    kb: dict[str, int] = field(default_factory=dict)
    page_kb: int = 4


def smaps_text(maps: list[Map]) -> str:
    """Return ``maps`` as the text of ``/proc/PID/smaps``."""
    out = []
    for m in maps:
        out.append(f"{m.start:x}-{m.start + m.size:x} {m.perms} 00000000 00:00 0"
                   + (f"                          {m.path}" if m.path else "") + "\n")
        for key in SMAPS_KEYS:
            value = {"Size": m.size // 1024, "KernelPageSize": m.page_kb,
                     "MMUPageSize": m.page_kb}.get(key, m.kb.get(key, 0))
            out.append(f"{key + ':':<16}{value:>8} kB\n")
        out.append("THPeligible:    0\nVmFlags: rd wr mr mw me ac sd\n")
    return "".join(out)


def qemu_maps(ram: int, region: str | None, ram_kb: dict[str, int],
              region_kb: dict[str, int] | None = None, ram_path: str = "",
              ram_page_kb: int = 4) -> list[Map]:
    """Return a QEMU process's mappings: its translation buffer (1 GiB rwx, 300 MiB
    resident), the guest RAM (``ram`` bytes, counters ``ram_kb``; ``ram_path`` and
    ``ram_page_kb`` for hugetlbfs), the region file (counters ``region_kb``) and a
    library."""
    maps = [Map(0x7F0000000000, 1 << 30, "rwxp", "", {"Rss": 300 * 1024, "Pss": 300 * 1024,
                                                       "Anonymous": 300 * 1024}),
            Map(0x7F8000000000, ram, "rw-p", ram_path, ram_kb, ram_page_kb),
            Map(0x7FA000000000, 4096, "r--p", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                {"Rss": 4, "Pss": 1})]
    if region:
        maps.append(Map(0x7FC000000000, 64 * MiB, "rw-p", region, region_kb or {}))
    return maps


def write_process(proc: Path, pid: int, maps: list[Map], ksm_stat: str | None = None,
                  comm: str = "qemu-system-x86", ppid: int = 1) -> None:
    """Write process ``pid`` under the fake ``proc``: its smaps, a stat line and, when
    given, its ksm_stat text."""
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "smaps").write_text(smaps_text(maps))
    # pid (comm) state ppid ... utime (14th) stime (15th) ...
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 0 0 0 -1 0 0 0 0 0 250 150 0 0\n")
    if ksm_stat is not None:
        (d / "ksm_stat").write_text(ksm_stat)


def write_ksm(ksm_dir: Path, **values: int | str) -> None:
    """Write a ``/sys/kernel/mm/ksm`` folder holding ``values`` (knob or counter ->
    value); the default knobs are the kernel's (run 0, pages_to_scan 100, sleep 20)."""
    ksm_dir.mkdir(parents=True, exist_ok=True)
    defaults: dict[str, int | str] = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20,
                                      "pages_shared": 0, "pages_sharing": 0,
                                      "advisor_mode": "[none] scan-time"}
    for key, value in {**defaults, **values}.items():
        (ksm_dir / key).write_text(f"{value}\n")
