"""Enrolment and the hook against the real system libvirtd with a TCG guest.

Ground truth is read inside the guest (serial console): the pmem device exists, has the
region's size and is read-only. The hook's effect is read from its log and records.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from libshare.demo.tiny.runner import GuestOptions, defined_guest
from libshare.hook import install, state
from libshare.sharing.region import layout
from libshare.util.digest import sha256_file
from tests.support.images import region_image

MiB = 1 << 20
REGION_SIZE = 8 * MiB
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE

PMEM_SCRIPT = """. /etc/libshare.sh
for d in /dev/pmem*; do [ -b "$d" ] && echo "PMEM $d"; done
[ -e /sys/block/pmem0/size ] && echo "SECTORS $(cat /sys/block/pmem0/size)"
[ -e /sys/block/pmem0/ro ] && echo "RO $(cat /sys/block/pmem0/ro)"
echo "BOUNCE $(dmesg | grep -c 'software IO TLB: mapped')"
ready
park
"""


@pytest.fixture(scope="module")
def hook_installed(libvirt_conn: Any) -> Iterator[Path]:
    """Make sure libshare's hook is installed in libvirt's real hooks directory (as CI's
    setup-host does). A libshare hook already there is left as it is (an operator's, or
    another checkout's); if this fixture had to install it, it removes it afterwards."""
    hooks = install.DEFAULT_HOOKS_DIR
    present = [p for p in (hooks / "qemu", hooks / "qemu.d" / "libshare")
               if p.exists() and install.is_ours(p)]
    if present:
        yield present[0]
        return
    res = install.install(hooks)
    try:
        yield res.path
    finally:
        install.uninstall(hooks)


@pytest.fixture
def state_dir(scratch_dir: Path) -> Path:
    """Return a fresh state directory QEMU can traverse (the region image lives in it)."""
    return scratch_dir


def make_region(state_dir: Path) -> Path:
    """Return a real region image of REGION_SIZE in ``state_dir``'s images folder (the
    hook serves only those), fsynced as region build leaves it (dirty pages would show
    as Private_Dirty)."""
    image = region_image(state_dir, REGION_SIZE)
    for d in (state_dir / "regions", image.parent):
        d.chmod(0o755)
    with open(image, "rb") as fh:
        os.fsync(fh.fileno())
    return image


def libshare(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "libshare", "--state-dir", str(state_dir),
                           *args], capture_output=True, text=True, timeout=120)


def ops_for(state_dir: Path, name: str) -> list[tuple[str, str, int]]:
    return [(e["op"], e["sub"], e["status"]) for e in state.read_hook_log(state_dir)
            if e["domain"] == name]


def test_enrol_boot_hook_and_disable(libvirt_conn: Any, domain_name: Callable[[], str],
                                     hook_installed: Path, state_dir: Path) -> None:
    name = domain_name()
    image = make_region(state_dir)
    with defined_guest(libvirt_conn, name, PMEM_SCRIPT, GuestOptions()) as defined:
        check_enrol_boot_disable(defined, name, image, state_dir)


def check_enrol_boot_disable(defined: Any, name: str, image: Path, state_dir: Path) -> None:
    dom = defined.domain
    original = dom.XMLDesc(INACTIVE)

    res = libshare(state_dir, "enable", name, "--region", str(image), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["domains"][0]
    assert out["action"] == "enabled" and out["libshare"]["enrolled"] is True
    enrolled_xml = dom.XMLDesc(INACTIVE)
    assert "model='nvdimm'" in enrolled_xml and str(image) in enrolled_xml
    again = libshare(state_dir, "enable", name, "--region", str(image), "--json")
    assert json.loads(again.stdout)["domains"][0]["action"] == "unchanged"
    assert dom.XMLDesc(INACTIVE) == enrolled_xml

    guest = defined.start()
    guest.wait_ready(timeout=120)
    text = guest.console()
    # inside the guest: the region is a read-only pmem disk of the region's size
    assert "PMEM /dev/pmem0" in text
    # an fsdax namespace: the data after the region's PFN info block and memmap reserve
    assert f"SECTORS {(REGION_SIZE - layout.DATAOFF) // 512}" in text
    assert "RO 1" in text
    # enrolment's maxMemory would make the kernel reserve 64 MiB of bounce buffers; its
    # swiotlb=noforce on this direct-kernel-boot domain keeps them away
    assert "BOUNCE 0" in text, text[-2000:]
    records = {r["name"]: r for r in state.read_running(state_dir)}
    assert records[name]["region"] == str(image)
    assert records[name]["pid"] == guest.qemu_pid()
    report = json.loads(libshare(state_dir, "status", name, "--json").stdout)
    status = report["domains"][0]
    assert status["enrolled"] and status["running"] and status["region_ok"] is True
    memory = status["memory"]
    assert memory["qemu_pid"] == guest.qemu_pid()
    assert memory["region"]["mappings"] == 1 and memory["region"]["Anonymous"] == 0
    assert memory["guest_ram"]["mappings"] == 1 and memory["guest_ram"]["Rss"] > 1024
    assert str(image) in report["host"]["region_page_cache_kb"]
    # introspection ran: busybox is static, so the guest maps no library at all
    assert status["mappings"] == {"library": 0, "from_region": 0, "from_guest_files": 0,
                                  "partial": False}

    dom.destroy()
    assert name not in {r["name"] for r in state.read_running(state_dir)}
    ops = ops_for(state_dir, name)
    for op, sub in [("prepare", "begin"), ("started", "begin"), ("stopped", "end"),
                    ("release", "end")]:
        assert (op, sub, 0) in ops, ops

    res = libshare(state_dir, "disable", name)
    assert res.returncode == 0, res.stderr
    assert dom.XMLDesc(INACTIVE) == original


def test_missing_region_refuses_start(libvirt_conn: Any, domain_name: Callable[[], str],
                                      hook_installed: Path, state_dir: Path) -> None:
    name = domain_name()
    image = make_region(state_dir)
    with defined_guest(libvirt_conn, name, PMEM_SCRIPT, GuestOptions()) as defined:
        dom = defined.domain
        assert libshare(state_dir, "enable", name, "--region", str(image)).returncode == 0
        enrolled_xml = dom.XMLDesc(INACTIVE)
        image.rename(image.with_suffix(".moved"))

        with pytest.raises(libvirt.libvirtError) as err:
            dom.create()
        assert "region image" in str(err.value) and "is missing" in str(err.value)
        assert not dom.isActive()
        assert libvirt_conn.lookupByName(name).XMLDesc(INACTIVE) == enrolled_xml
        assert ("prepare", "begin", 1) in ops_for(state_dir, name)
        status = json.loads(libshare(state_dir, "status", name, "--json").stdout)["domains"][0]
        assert status["region_ok"] is False


def test_enable_refuses_unknown_domain_and_keeps_others(
        libvirt_conn: Any, domain_name: Callable[[], str], state_dir: Path) -> None:
    name = domain_name()
    image = make_region(state_dir)
    with defined_guest(libvirt_conn, name, PMEM_SCRIPT, GuestOptions()):
        res = libshare(state_dir, "enable", name, "lstest-no-such-domain", "--region",
                       str(image), "--json")
    assert res.returncode == 1
    assert "lstest-no-such-domain" in res.stderr and "not found" in res.stderr
    assert json.loads(res.stdout)["domains"][0]["action"] == "enabled"


def test_virtio_pmem_falls_back_to_nvdimm_where_it_cannot_start(
        libvirt_conn: Any, domain_name: Callable[[], str], state_dir: Path) -> None:
    from libshare.virt import capabilities

    name = domain_name()
    image = make_region(state_dir)
    works, _reason = capabilities.virtio_pmem_works(libvirt_conn, state_dir)
    with defined_guest(libvirt_conn, name, PMEM_SCRIPT, GuestOptions()):
        res = libshare(state_dir, "enable", name, "--region", str(image), "--model",
                       "virtio-pmem", "--json")
        assert res.returncode == 0, res.stderr
        model = json.loads(res.stdout)["domains"][0]["libshare"]["model"]
    assert model == ("virtio-pmem" if works else "nvdimm")
    assert works or "using nvdimm" in res.stderr
    assert not [d for d in libvirt_conn.listAllDomains() if d.name().startswith("libshare-probe")]


TICK_SCRIPT = """. /etc/libshare.sh
[ -b /dev/pmem0 ] && echo "PMEM /dev/pmem0"
ready
n=0
while :; do n=$((n + 1)); echo "TICK $n"; sleep 1; done
"""


def last_tick(text: str) -> int:
    ticks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("TICK ")]
    return ticks[-1] if ticks else 0


@contextlib.contextmanager
def saved_enrolled_guest(conn: Any, name: str, state_dir: Path, image: Path
                         ) -> Iterator[tuple[Any, Path]]:
    """Yield ``(guest, save file)``: guest ``name`` enrolled with region ``image``,
    booted until it ticks, then saved with ``virsh save`` (so it is not running)."""
    saved = state_dir / "guest.save"
    with defined_guest(conn, name, TICK_SCRIPT, GuestOptions()) as defined:
        assert libshare(state_dir, "enable", name, "--region", str(image)).returncode == 0
        guest = defined.start()
        guest.wait_ready(timeout=120)
        guest.wait_for(r"^TICK 2$", timeout=60)
        assert guest.domain.save(str(saved)) == 0
        yield guest, saved


def test_restore_maps_region_to_this_hosts_image(
        libvirt_conn: Any, domain_name: Callable[[], str], hook_installed: Path,
        state_dir: Path) -> None:
    """Save a running enrolled guest, move its region image to where this host keeps
    images of that digest, restore: the hook maps the path and the guest runs on."""
    name = domain_name()
    elsewhere = state_dir / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    image = make_region(elsewhere)
    with saved_enrolled_guest(libvirt_conn, name, state_dir, image) as (guest, saved):
        before = last_tick(guest.console())
        local = state_dir / "regions" / "images" / f"{sha256_file(image)}.img"
        local.parent.mkdir(parents=True)
        for d in (state_dir / "regions", local.parent):
            d.chmod(0o755)
        image.rename(local)

        assert libvirt_conn.restore(str(saved)) == 0
        live = guest.domain.XMLDesc(0)
        assert f"<path>{local}</path>" in live and str(image) not in live
        guest.wait_for(rf"^TICK {before + 2}$", timeout=60)  # the same guest runs on
        ops = ops_for(state_dir, name)
        assert ("restore", "begin", 0) in ops
        assert state.read_hook_log(state_dir)[-1]["domain"] == name


def test_restore_refused_without_the_region(
        libvirt_conn: Any, domain_name: Callable[[], str], hook_installed: Path,
        state_dir: Path) -> None:
    name = domain_name()
    image = make_region(state_dir)
    with saved_enrolled_guest(libvirt_conn, name, state_dir, image) as (guest, saved):
        image.unlink()
        with pytest.raises(libvirt.libvirtError) as err:
            libvirt_conn.restore(str(saved))
        assert "no region image with digest" in str(err.value)
        assert saved.exists() and not guest.domain.isActive()
        assert ("restore", "begin", 1) in ops_for(state_dir, name)
