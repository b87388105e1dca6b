"""Integration tests of the small-guest kit: real TCG guests in the system libvirtd.

Ground truth is what the guest prints on its serial console from inside.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare.demo.domain import add_numa_nvdimm_support, nvdimm_device_xml
from libshare.demo.tiny.kernel import KernelPackage
from libshare.demo.tiny.runner import GuestOptions, run_guest, running_guest

pytestmark = pytest.mark.integration

NVDIMM_DIR = Path("/var/lib/libshare-test")


def _domain_exists(conn: Any, name: str) -> bool:
    return name in {d.name() for d in conn.listAllDomains()}


def test_guest_runs_script_and_reports_from_inside(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    token = secrets.token_hex(8)
    name = domain_name()
    script = (
        "echo kernel=$(uname -r)\n"
        "echo version=$(cat /proc/version)\n"
        "echo cmdline=$(cat /proc/cmdline)\n"
        f"echo token=$(echo {token} | rev)\n"
        "echo modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ,)\n"
    )
    started = time.monotonic()
    res = run_guest(libvirt_conn, name, script, GuestOptions(kernel=guest_kernel), timeout=90)
    wall = time.monotonic() - started
    print(f"guest wall time {wall:.1f}s, in-guest boot {res.boot_seconds}s")
    assert not res.timed_out, res.console
    assert res.rc == 0, res.console
    lines = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    assert lines["kernel"] == guest_kernel.release
    assert f"Debian {guest_kernel.version} " in lines["version"]
    assert "console=ttyS0" in lines["cmdline"]
    # the token comes back reversed: only a shell that ran the script could have done that
    assert lines["token"] == token[::-1]
    loaded = set(lines["modules"].split(","))
    assert {"nfit", "nd_pmem", "erofs", "virtio_console"} <= loaded, lines["modules"]
    assert "LIBSHARE-INSMOD-FAILED" not in res.console
    # the guest says when its init ran (boot speed is the bench's: no budget here)
    assert res.boot_seconds is not None and 0 < res.boot_seconds < wall
    assert not _domain_exists(libvirt_conn, name)


def test_script_exit_code_is_reported(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    res = run_guest(libvirt_conn, domain_name(), "echo about to fail\nexit 7\n",
                    GuestOptions(kernel=guest_kernel), timeout=90)
    assert res.rc == 7, res.console
    assert res.output.strip() == "about to fail"
    assert not res.ok


def test_dynamically_linked_host_binary_runs(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    opts = GuestOptions(kernel=guest_kernel, binaries=["/usr/bin/basename"])
    res = run_guest(libvirt_conn, domain_name(), "/usr/bin/basename --version | head -n1\n",
                    opts, timeout=90)
    assert res.rc == 0, res.console
    assert "GNU coreutils" in res.output  # busybox's basename has no --version


def test_running_guest_ready_then_destroyed(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    name = domain_name()
    token = secrets.token_hex(4)
    script = f". /etc/libshare.sh\nready {token}\npark\n"
    with running_guest(libvirt_conn, name, script, GuestOptions(kernel=guest_kernel)) as g:
        assert g.wait_ready(timeout=60) == token
        assert g.is_active()
        pid = g.qemu_pid()
        assert pid is not None and Path(f"/proc/{pid}").exists()
    assert not _domain_exists(libvirt_conn, name)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def test_timeout_still_cleans_up(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    name = domain_name()
    res = run_guest(libvirt_conn, name, "echo parked\nwhile :; do sleep 1; done\n",
                    GuestOptions(kernel=guest_kernel), timeout=8)
    assert res.timed_out and res.rc is None
    assert not _domain_exists(libvirt_conn, name)


@pytest.fixture
def nvdimm_file() -> Any:
    """Yield an 8 MiB backing file whose first bytes hold a random token."""
    NVDIMM_DIR.mkdir(parents=True, exist_ok=True)
    NVDIMM_DIR.chmod(0o755)
    path = NVDIMM_DIR / f"nvdimm-{os.getpid()}-{secrets.token_hex(3)}.img"
    token = secrets.token_hex(8).encode()
    with open(path, "wb") as fh:
        fh.truncate(8 * 1024 * 1024)
        fh.write(token)
    path.chmod(0o644)
    yield path, token.decode()
    path.unlink(missing_ok=True)


def test_nvdimm_shows_as_readonly_pmem0(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage,
    nvdimm_file: tuple[Path, str],
) -> None:
    path, token = nvdimm_file
    script = (
        ". /etc/libshare.sh\n"
        "wait_for_path /dev/pmem0 20 || { echo no-pmem0; ls /sys/bus/nd/devices; exit 3; }\n"
        "echo size=$(cat /sys/block/pmem0/size)\n"
        "echo ro=$(cat /sys/block/pmem0/ro)\n"
        "echo head=$(dd if=/dev/pmem0 bs=16 count=1 2>/dev/null)\n"
    )
    opts = GuestOptions(
        kernel=guest_kernel,
        devices=[nvdimm_device_xml(path, 8 * 1024)],
        customize=[add_numa_nvdimm_support],
    )
    res = run_guest(libvirt_conn, domain_name(), script, opts, timeout=90)
    assert res.rc == 0, res.console
    lines = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    assert int(lines["size"]) * 512 == 8 * 1024 * 1024
    assert lines["ro"] == "1"
    assert lines["head"] == token  # the guest reads the host file's bytes


def test_debian11_kernel_boots_and_sees_pmem0(
    libvirt_conn: Any, domain_name: Callable[[], str], nvdimm_file: tuple[Path, str]
) -> None:
    """The kit's second kernel: Debian 11's 5.10 from bullseye, same image and modules."""
    from libshare.demo.tiny.kernel import KernelPackageError, fetch_kernel

    try:
        kernel = fetch_kernel(suite="bullseye")
    except KernelPackageError as exc:
        pytest.skip(f"Debian 11 kernel not available: {exc}")
    path, token = nvdimm_file
    script = (
        ". /etc/libshare.sh\n"
        "echo kernel=$(uname -r)\n"
        "wait_for_path /dev/pmem0 20 || exit 3\n"
        "echo head=$(dd if=/dev/pmem0 bs=16 count=1 2>/dev/null)\n"
    )
    opts = GuestOptions(kernel=kernel, devices=[nvdimm_device_xml(path, 8 * 1024)],
                        customize=[add_numa_nvdimm_support])
    res = run_guest(libvirt_conn, domain_name(), script, opts, timeout=90)
    assert res.rc == 0, res.console
    assert "LIBSHARE-INSMOD-FAILED" not in res.console
    lines = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    assert lines["kernel"] == kernel.release and kernel.release.startswith("5.10.")
    assert lines["head"] == token


def test_defined_guest_can_be_changed_before_start(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage
) -> None:
    """Define, change the persistent definition through libvirt, then start."""
    from libshare.demo.tiny.runner import defined_guest

    name = domain_name()
    with defined_guest(libvirt_conn, name, "cat /proc/cmdline\n",
                       GuestOptions(kernel=guest_kernel)) as defined:
        assert not defined.domain.isActive()
        xml = defined.domain.XMLDesc(0).replace("</cmdline>", " lstoken=changed</cmdline>")
        defined.domain = libvirt_conn.defineXML(xml)
        res = defined.start().wait_end(90)
    assert res.rc == 0, res.console
    assert "lstoken=changed" in res.output
    assert not _domain_exists(libvirt_conn, name)
