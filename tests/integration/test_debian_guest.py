"""Integration test of full Debian guests (libshare.demo.debian.guest) and the guest agent
client (libshare.redirect.agent) in one real TCG boot of the cached image: GRUB and the image's own
initramfs boot the kernel whose banner matches ``uname -r``, systemd reaches multi-user,
files go in and out through the agent intact, an initramfs-tools hook added in the guest
runs at the next boot, a reboot comes back, and nothing is left behind."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare.demo.debian.guest import DebianGuestOptions, running_debian_guest
from libshare.demo.debian.image import DebianImage, debian_image
from libshare.redirect.agent import AgentError

#: Generous bound for boot to multi-user under TCG on a busy 2-core host (measured ~20 s).
BOOT_LIMIT = 150.0

INIT_BOTTOM = """#!/bin/sh
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
echo "LSTEST-INITRAMFS-HOOK {token} root=$rootmnt" > /dev/console
"""


@pytest.fixture(scope="module")
def image() -> DebianImage:
    """Return the cached Debian image (built on first use, a few minutes)."""
    return debian_image()


def _banners(console: str) -> list[str]:
    return re.findall(r"Linux version (\S+) ", console)


def test_debian_guest_boots_runs_agent_and_reboots(
        libvirt_conn: Any, domain_name: Callable[[], str], image: DebianImage) -> None:
    name = domain_name()
    base_stat = image.path.stat()
    token = secrets.token_hex(8)
    payload = os.urandom(300_000)  # more than one agent chunk
    with running_debian_guest(libvirt_conn, name,
                              DebianGuestOptions(image=image, keep_files=False)) as g:
        overlay = g.overlay
        assert overlay.exists() and overlay.parent.name == name
        boot = g.last_boot
        assert boot is not None and boot.index == 1
        assert boot.uptime < BOOT_LIMIT, f"multi-user after {boot.uptime}s of guest uptime"

        # the kernel the console announced is the one running, booted by GRUB from the disk
        console = g.console()
        assert "Booting `Debian GNU/Linux'" in console  # GRUB's own line on the serial port
        release = g.sh("uname -r").strip()
        assert _banners(console) == [release]
        assert release == boot.release == image.kernel_release
        cmdline = g.sh("cat /proc/cmdline")
        assert "BOOT_IMAGE=/vmlinuz" in cmdline and f"root=UUID={image.root_uuid}" in cmdline
        assert g.sh("findmnt -n -o SOURCE /").strip() == "/dev/vda1"
        assert g.sh("cat /proc/sys/kernel/random/boot_id").strip() == boot.boot_id
        state = g.exec(["systemctl", "is-system-running", "--wait"], timeout=120)
        assert state.out.strip() in ("running", "degraded"), state.out + state.err
        assert g.sh("hostname").strip() == "lsguest"

        # files through the agent: written bytes read back identical, sha256sum agrees
        assert g.agent.write_file("/root/payload.bin", payload, mode=0o600) == len(payload)
        assert g.agent.read_file("/root/payload.bin") == payload
        sha = g.sh("sha256sum /root/payload.bin").split()[0]
        assert sha == hashlib.sha256(payload).hexdigest()
        assert g.sh("stat -c %a /root/payload.bin").strip() == "600"
        with pytest.raises(AgentError, match=name):
            g.agent.read_file("/no/such/file")
        bad = g.exec(["sh", "-c", "echo oops >&2; exit 7"])
        assert bad.rc == 7 and bad.err == "oops\n"

        # the image boots its own initramfs: a hook added and built inside the guest runs
        g.agent.write_file("/etc/initramfs-tools/scripts/init-bottom/lstest",
                           INIT_BOTTOM.replace("{token}", token), mode=0o755)
        g.exec(["update-initramfs", "-u", "-k", release], timeout=400, check=True)
        g.sh("sync")

        second = g.reboot()
        assert second.index == 2 and second.boot_id != boot.boot_id
        assert second.uptime < BOOT_LIMIT
        console = g.console()
        assert _banners(console) == [release, release]
        # initramfs-tools prints "Begin: Running /scripts/init-bottom ... " before it
        second_boot = console[[m.start() for m in re.finditer("Linux version", console)][1]:]
        assert f"LSTEST-INITRAMFS-HOOK {token} root=/root\n" in second_boot
        g.agent.ping()
        assert g.sh("cat /proc/sys/kernel/random/boot_id").strip() == second.boot_id
        assert g.agent.read_file("/root/payload.bin") == payload  # on the overlay, kept
        assert g.qemu_pid() is not None
    assert not overlay.exists() and not overlay.parent.exists()
    import libvirt

    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
    after = image.path.stat()
    assert (after.st_size, after.st_mtime_ns) == (base_stat.st_size, base_stat.st_mtime_ns)
    assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()
