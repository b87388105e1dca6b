"""``libshare report`` against running TCG guests of one trust group: its figures
cross-checked with the QEMUs' smaps read by the test itself, a guest's write to the
region seen as a copy, the guests' own copies of region files found in their page
cache, the PNG and the Prometheus metrics checked by their own rules, and its CPU cost.

Three tiny guests share the region of ``test_region_dax`` (the host's libc and a library
of at least 16 MiB): two read the big library through DAX, keep a copy of libc of their
own at the region's guest path and run a program with the region's libc bound;
the third reads too, then makes the device writable and overwrites one block, which
gives its QEMU a private copy of that page.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare.demo.tiny.kernel import KernelPackage
from libshare.demo.tiny.runner import GuestOptions, running_guest
from tests.integration.test_region_dax import (  # the region and its enrolment
    GROUP,
    MAKE_PMEM_WRITABLE,
    PRELUDE,
    Region,
    built_region,
    enrolled,
    kv,
)

__all__ = ["built_region"]  # a fixture of this module too

pytestmark = pytest.mark.integration
LIBSHARE = [sys.executable, "-m", "libshare"]
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PAGE = 4096


def smaps_of(pid: int, image: Path) -> dict[str, int]:
    """Return Rss, Pss and Anonymous (kB) summed over ``pid``'s mappings of ``image``,
    read from /proc/PID/smaps here (not with the code under test)."""
    real = os.path.realpath(image)
    head = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ [0-9a-f]+ \S+ \d+\s*(.*)$")
    out = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            m = head.match(line)
            if m:
                inside = m.group(1).removesuffix(" (deleted)") == real
            elif inside and line.split(":")[0] in out:
                out[line.split(":")[0]] += int(line.split()[1])
    return out


def reader(reg: Region) -> str:
    """Return the script of a guest that reads the big library through DAX, keeps its
    own copy of libc at the region's guest path (in RAM: the guest's root is its
    initramfs) and runs a program with the region's libc bound over its own."""
    return PRELUDE + f"""
mount -t erofs -o ro,dax /dev/pmem0 /mnt/region || exit 4
/usr/bin/cat /mnt/region{reg.big['path']} > /dev/null || exit 5
mkdir -p {os.path.dirname(reg.libc['guest_paths'][0])}
cp {LIBC} {reg.libc['guest_paths'][0]}
echo own_libc_size=$(stat -c %s {reg.libc['guest_paths'][0]})
mount --bind /mnt/region{reg.libc['path']} {LIBC} || exit 6
/usr/bin/tail -f /dev/null &
ready read
park
"""


def writer(reg: Region) -> str:
    """Return the script of a guest that reads the big library, then overwrites one
    block of its (copy-on-write) region device."""
    return PRELUDE + f"""
mount -t erofs -o ro,dax /dev/pmem0 /mnt/region || exit 4
/usr/bin/cat /mnt/region{reg.big['path']} > /dev/null || exit 5
umount /mnt/region
""" + MAKE_PMEM_WRITABLE + """dd if=/dev/urandom of=/dev/pmem0 bs=4096 seek=3 count=1 conv=fsync 2>/dev/null
echo dd_rc=$?
ready written
park
"""


def png_text(data: bytes) -> bytes:
    """Return the text chunks of PNG ``data``, checking its signature, chunk CRCs and
    that it ends with IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text, kinds = 8, b"", []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] \
            == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind in (b"tEXt", b"iTXt"):
            text += body + b"\n"
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    return text


def report(cfg_dir: Path, *argv: str) -> tuple[dict[str, Any], str]:
    """Run ``libshare report --json`` with ``argv``; return its JSON and stderr."""
    res = subprocess.run([*LIBSHARE, "--state-dir", str(cfg_dir), "report", "--json", *argv],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def test_report_against_running_guests(libvirt_conn: Any, domain_name: Callable[[], str],
                                       guest_kernel: KernelPackage, built_region: Region,
                                       scratch_dir: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    reg = built_region

    def opts() -> GuestOptions:
        return GuestOptions(kernel=guest_kernel, binaries=["/usr/bin/cat", "/usr/bin/tail"],
                            customize=[enrolled(reg)])

    names = [domain_name() for _ in range(3)]
    with running_guest(libvirt_conn, names[0], reader(reg), opts()) as a, \
            running_guest(libvirt_conn, names[1], reader(reg), opts()) as b, \
            running_guest(libvirt_conn, names[2], writer(reg), opts()) as c:
        assert a.wait_ready(timeout=300) == "read", a.console()
        assert b.wait_ready(timeout=300) == "read", b.console()
        assert c.wait_ready(timeout=300) == "written", c.console()
        assert kv(c.result().output)["dd_rc"] == "0"
        own_libc = int(kv(a.result().output)["own_libc_size"])
        pids = {g.name: g.qemu_pid() for g in (a, b, c)}
        png, prom = scratch_dir / "report.png", scratch_dir / "libshare.prom"
        state = scratch_dir / "state"
        rep, err = report(state, *names, "--png", str(png), "--prometheus", str(prom))
        truth = {n: smaps_of(pid, reg.path) for n, pid in pids.items() if pid}
        deep, _ = report(state, *names, "--page-cache")
    print(json.dumps({"truth": truth, "host": rep["host"], "groups": rep["groups"],
                      "cost": rep["cost"], "deep_cost": deep["cost"]}, indent=1, default=str))
    rows = {r["name"]: r for r in rep["domains"]}
    assert sorted(rows) == sorted(names)
    # every figure is that of the region mapping in the QEMU's smaps (read by the test)
    tol = 256  # kB: guests keep running between the two reads
    for n in names:
        region = rows[n]["region"]
        assert rows[n]["group"] == GROUP and rows[n]["qemu_pid"] == pids[n]
        assert abs(region["mapped_bytes"] // 1024 - truth[n]["Rss"]) <= tol, (n, region)
        assert abs(region["pss_bytes"] // 1024 - truth[n]["Pss"]) <= tol, (n, region)
        assert region["mapped_bytes"] >= reg.big["size"] * 0.9   # the big library was read
    # three guests read the same pages: the group saves about two of the three copies
    [group] = rep["groups"]
    saved_truth = sum(t["Rss"] for t in truth.values()) - sum(t["Pss"] for t in truth.values())
    assert abs(group["saved_bytes"] // 1024 - saved_truth) <= 3 * tol
    assert group["saved_bytes"] >= 2 * reg.big["size"] * 0.85
    assert rep["host"]["region_saved_bytes"] == group["saved_bytes"]
    # copies: the writer's overwritten block is an anonymous page of its mapping only
    assert truth[names[2]]["Anonymous"] >= 4
    assert rows[names[2]]["region"]["copied_bytes"] == truth[names[2]]["Anonymous"] * 1024
    assert rows[names[0]]["region"]["copied_bytes"] == 0 == truth[names[0]]["Anonymous"]
    assert rows[names[1]]["region"]["copied_bytes"] == 0
    assert f"{names[2]}: " in err and "copied" in err
    # the readers hold their own copy of the region's libc (in RAM): servable
    dr = {r["name"]: r for r in deep["domains"]}
    for n in names[:2]:
        pc = dr[n]["page_cache"]
        assert "error" not in pc, pc
        assert pc["servable_bytes"] >= own_libc // PAGE * PAGE, (n, pc, own_libc)
        assert pc["served_bytes"] > 0                          # the bound libc, via DAX
    assert deep["host"]["private_servable_bytes"] >= 2 * (own_libc // PAGE * PAGE)
    # the picture: a valid PNG naming every domain
    text = png_text(png.read_bytes())
    assert all(n.encode() in text for n in names), text
    # the metrics: Prometheus' own parser, the same numbers as the JSON
    fams = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    saved = {s.labels["group"]: s.value for s in fams["libshare_region_saved_bytes"].samples}
    assert saved == {GROUP: group["saved_bytes"]}
    copied = {s.labels["domain"]: s.value for s in fams["libshare_region_copied_bytes"].samples}
    assert copied == {n: rows[n]["region"]["copied_bytes"] for n in names}
    assert oct(prom.stat().st_mode & 0o777) == "0o644"
    # cheap enough for every minute: well under 1 s of CPU for 10 domains
    assert rep["cost"]["cpu_seconds"] / len(names) < 0.1, rep["cost"]
