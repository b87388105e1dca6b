"""Guest RAM layout: QEMU's ``info mtree -f`` output and the pc/q35 RAM split."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

from libshare.introspect import qemu
from libshare.introspect.memory import RamBlock, pc_ram_layout
from libshare.virt import api
from tests.support.fakes import FakeDomain
from tests.support.paths import PROJECT_ROOT

# Captured from QEMU 7.2 (libvirt 9.0) running a 4 GiB pc guest, plus an nvdimm and VGA.
MTREE = """FlatView #0
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): pc.ram @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): pc.ram @00000000000f0000
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000
  0000000140000000-00000001407fffff (prio 0, ram): memnvdimm0

FlatView #2
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""
HVA = 0x7FF5_0000_0000


def test_parse_mtree_takes_the_memory_view() -> None:
    ranges = qemu.parse_mtree(MTREE)
    assert ranges[0] == (0, 0xC3000, "pc.ram", 0)
    assert (0x1_0000_0000, 0x1_4000_0000, "pc.ram", 0xC000_0000) in ranges
    assert {r[2] for r in ranges} == {"pc.ram", "vga.vram", "memnvdimm0", "pc.bios"}


def test_ram_blocks_from_hmp(monkeypatch: Any) -> None:
    calls = []

    def fake_hmp(dom: Any, command: str) -> str:
        calls.append(command)
        if command == "info mtree -f":
            return MTREE
        gpa = int(command.split()[1], 16)
        return f"Host virtual address for {gpa:#x} (pc.ram) is {HVA + gpa:#x}\n"

    monkeypatch.setattr(api, "monitor_command", fake_hmp)
    blocks = qemu.ram_blocks_hmp(FakeDomain("fake"))
    # Device RAM (VGA, NVDIMM) and the BIOS ROM are left out; pc.ram is merged.
    assert blocks == [RamBlock(0, 0xC000_0000, HVA),
                      RamBlock(0x1_0000_0000, 0x4000_0000, HVA + 0xC000_0000)]
    assert sum(bool(re.match("gpa2hva", c)) for c in calls) == 1  # one per region
    assert blocks == pc_ram_layout(4 << 30, "pc-i440fx-7.2", HVA)


def test_pc_and_q35_splits() -> None:
    assert pc_ram_layout(256 << 20) == [RamBlock(0, 256 << 20, 0)]
    assert pc_ram_layout(0xE000_0000, "pc") == [RamBlock(0, 0xC000_0000, 0),
                                                RamBlock(1 << 32, 0x2000_0000, 0xC000_0000)]
    assert pc_ram_layout(0xD000_0000, "pc") == [RamBlock(0, 0xD000_0000, 0)]
    assert pc_ram_layout(3 << 30, "pc-q35-7.2", 0x1000) == [
        RamBlock(0, 0x8000_0000, 0x1000), RamBlock(1 << 32, 1 << 30, 0x8000_1000)]


def run_with_fake_domain(body: str) -> subprocess.CompletedProcess[str]:
    """Run, in a new Python process, ``body`` after a prelude that imports os, signal,
    sys, time and libshare's qemu module and starts ``class D(FakeDomain):`` (body
    goes on with its methods, then the code using it); return the finished process."""
    prelude = ("import os, signal, sys, time\n"
               # a run started in the background inherits SIGINT ignored: Ctrl-C's
               # usual effect is what these tests are about
               "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
               "from libshare.introspect import qemu\n"
               f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
               "from tests.support.fakes import FakeDomain\n"
               "class D(FakeDomain):\n")
    return subprocess.run([sys.executable, "-c", prelude + body], capture_output=True,
                          text=True, timeout=60)


def test_paused_resumes_on_exception_and_restores_handlers() -> None:
    import signal

    import pytest

    dom = FakeDomain("fake")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), qemu.paused(dom, timeout=30) as state:
        assert dom.calls == ["suspend"]
        assert signal.getsignal(signal.SIGTERM) is not before
        raise RuntimeError("walk failed")
    assert dom.calls == ["suspend", "resume"] and not state.expired
    assert signal.getsignal(signal.SIGTERM) is before


def test_paused_watchdog_resumes_and_says_so() -> None:
    import time

    dom = FakeDomain("fake")
    with qemu.paused(dom, timeout=0.05) as state:
        deadline = time.monotonic() + 5
        while not state.expired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dom.calls == ["suspend", "resume"]  # resumed while the body still runs
    assert state.expired and dom.calls == ["suspend", "resume"]  # once only


def test_paused_resumes_before_sigterm_takes_effect() -> None:
    """A Python SIGTERM handler still runs, after the resume; with the default action
    the process dies of SIGTERM, after the resume."""
    import signal

    dom = FakeDomain("fake")
    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        seen.append(list(dom.calls))
        raise Stop

    old = signal.signal(signal.SIGTERM, handler)
    try:
        try:
            with qemu.paused(dom, timeout=30):
                os.kill(os.getpid(), signal.SIGTERM)
                time_left = 100
                while time_left and not seen:  # the handler runs between bytecodes
                    time_left -= 1
        except Stop:
            pass
        assert seen == [["suspend", "resume"]] and dom.calls == ["suspend", "resume"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, old)
    proc = run_with_fake_domain(
        "    def resume(self):\n"
        "        print('resumed', flush=True)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "with qemu.paused(D(), timeout=30):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    for _ in range(1000): pass\n"
        "print('survived', flush=True)\n")
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "resumed\n"


def test_paused_signal_during_resume_does_not_hang() -> None:
    """A Ctrl-C handled while resume() is running (in the same thread) must not wait for
    the lock resume() holds; the guest is resumed once."""
    proc = run_with_fake_domain(
        "    def resume(self):\n"
        "        self.calls.append('resume')\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.2)\n"
        "d = D()\n"
        "try:\n"
        "    with qemu.paused(d, timeout=30):\n"
        "        pass\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', d.calls, flush=True)\n")
    assert proc.stdout == "interrupted ['suspend', 'resume']\n", (proc.stdout, proc.stderr)


def test_paused_signal_during_suspend_still_resumes() -> None:
    """A Ctrl-C that lands while suspend() runs still resumes the guest."""
    import signal

    import pytest

    class D(FakeDomain):
        def suspend(self) -> None:
            self.calls.append("suspend")
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes, here
                pass

    dom = D()
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if ignored
    try:
        with pytest.raises(KeyboardInterrupt), qemu.paused(dom, timeout=30):
            pass
    finally:
        signal.signal(signal.SIGINT, before)
    assert dom.calls == ["suspend", "resume"]
