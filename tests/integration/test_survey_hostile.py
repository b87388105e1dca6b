"""A guest that plants hostile BTF in its own memory is still surveyed right, in normal
time.

The busybox guest of :mod:`tests.integration.test_survey` (its programs, its snapshots of
``/proc`` on the serial console) also runs ``plant`` (``data/plant.c``, built static on
the host): it fills most of the guest's free memory with pages that each open with
``Linux version 9.9.9-planted`` (so 2 MiB-aligned ones look like the head of a kernel's
.rodata to the host's scan) and hold a BTF blob describing every structure libshare needs as made of
anonymous members of itself (what made kernel discovery take exponential time), locks
them in RAM and sleeps. It reports where its pages landed: when some 2 MiB-aligned
ones lie below the kernel's .rodata (``/proc/iomem``), the host's scan meets planted
blobs before the kernel's own BTF.

The test surveys the guest once before it plants (paused, so the guest cannot plant
meanwhile: the baseline cost) and once after, and requires the second survey to find
the real kernel (the guest's own release and banner), agree exactly with the guest's snapshot of
its tasks and libraries, and cost at most a small multiple of the first.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare.demo.tiny.kernel import KernelPackage
from libshare.demo.tiny.runner import GuestOptions, running_guest
from tests.integration.test_survey import (
    GUEST_SCRIPT,
    PROGRAMS,
    guest_facts,
    idle_sign,
    latest,
    proc_comm,
    snapshots,
    wait_snapshot_after,
)
from tests.support.btf import self_referencing_blob

pytestmark = pytest.mark.integration

PLANT_SOURCE = Path(__file__).parent / "data" / "plant.c"
#: the guest plants once it has printed this many snapshots (~2 s each, guest time,
#: which stands still while the host surveys the paused guest for the baseline)
PLANT_AT_SNAPSHOT = 4
_PLANTED = re.compile(r"^PLANTED pages=(\d+) aligned=(\d+) below=(\d+) rodata=(\S+)", re.M)


@pytest.fixture(scope="module")
def plant_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the ``plant`` program, built static with the host's gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on the host to build the guest's plant program")
    out = tmp_path_factory.mktemp("plant") / "plant"
    proc = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(out), str(PLANT_SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a static program here: {proc.stderr.strip()[-300:]}")
    return out


def plant_script() -> str:
    """Return the guest script: test_survey's, planting at snapshot PLANT_AT_SNAPSHOT."""
    marker = '    [ "$n" = 1 ] && ready\n'
    assert marker in GUEST_SCRIPT
    plant = (f'    if [ "$n" = {PLANT_AT_SNAPSHOT} ]; then '
             "/bin/plant /etc/plant.btf auto /tmp/planted & fi\n")  # no fork otherwise
    return GUEST_SCRIPT.replace(marker, marker + plant, 1)


def survey(name: str, timeout: float) -> dict[str, Any]:
    """Return the domain object of ``libshare survey NAME --json --no-cache`` (a full
    discovery of the kernel every time: no per-boot or layout cache)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "libshare", "survey", name, "--json",
                               "--no-cache"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the survey of {name} did not end within {timeout:.0f} s")
    assert proc.returncode == 0, proc.stderr or proc.stdout[-2000:]
    dom: dict[str, Any] = json.loads(proc.stdout)["domains"][0]
    return dom


def wait_planted(guest: Any, timeout: float = 120.0) -> re.Match[str]:
    """Wait until the guest's plant program has reported; return its report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _PLANTED.search(guest.console())
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"plant did not report:\n{guest.console()[-2000:]}")


def survey_planting_guest(libvirt_conn: Any, name: str, kernel: KernelPackage,
                          options: GuestOptions, last_boot: bool) -> bool:
    """Boot the planting guest ``name``, survey it before and after it plants and check
    the second survey; return False (checking nothing) if no planted page came before
    the kernel's .rodata and this is not ``last_boot``."""
    with running_guest(libvirt_conn, name, plant_script(), options) as guest:
        guest.wait_ready(timeout=120)
        guest.domain.suspend()  # guest time stands still: nothing is planted yet
        try:
            assert not _PLANTED.search(guest.console()), "planted before the baseline"
            baseline = survey(name, timeout=300)
        finally:
            guest.domain.resume()
        report = wait_planted(guest)
        pages, aligned, below = (int(report.group(i)) for i in (1, 2, 3))
        print(report.group(0))
        assert pages > 20000 and aligned > 0  # most of 256 MiB holds the blob
        if below == 0 and not last_boot:
            return False  # the scan would meet the kernel's own BTF first
        for _attempt in range(4):
            before = wait_snapshot_after(guest, latest(guest))
            guest.domain.suspend()
            try:
                dom = survey(name, timeout=120)  # was: no end (each blob > 30 s)
            finally:
                guest.domain.resume()
            after = wait_snapshot_after(guest, before + 1)  # begun after the resume
            snaps = snapshots(guest.console())
            if snaps[before] == snaps[after]:
                break
        else:
            pytest.fail("the guest's task list kept changing; no stable snapshot")
        tasks, libs = snaps[before]
        facts = guest_facts(guest.console())
    print(f"baseline: {baseline['cpu_seconds']} s CPU, {baseline['wall_seconds']} s wall; "
          f"planted: {dom['cpu_seconds']} s CPU, {dom['wall_seconds']} s wall")
    assert baseline["kernel"] == dom["kernel"] == kernel.release == facts["release"]
    assert dom["banner"] == baseline["banner"] and "planted" not in dom["banner"]
    assert not dom["partial"], dom["errors"]
    got_names = {(t["pid"], idle_sign(t["name"])) for t in dom["task_list"]}
    assert got_names == {(pid, idle_sign(n)) for pid, n in tasks}
    got_comms = {(t["pid"], t["comm"]) for t in dom["task_list"]}
    assert got_comms == {(pid, proc_comm(n)) for pid, n in tasks}
    assert "plant" in {t["comm"] for t in dom["task_list"]}
    assert {lib["path"] for lib in dom["libraries"]} == libs and len(libs) >= 7
    # normal time: a small multiple of the same guest's survey before it planted (the
    # margin is for a loaded host; the unbounded code took over 120 s)
    assert dom["cpu_seconds"] <= 5 * baseline["cpu_seconds"] + 2.0
    assert dom["wall_seconds"] <= 5 * baseline["wall_seconds"] + 5.0
    return True


def test_survey_of_a_guest_planting_hostile_btf(
    libvirt_conn: Any, domain_name: Callable[[], str], guest_kernel: KernelPackage,
    plant_binary: Path
) -> None:
    options = GuestOptions(kernel=guest_kernel, binaries=PROGRAMS, memory_mib=256,
                           files={"/bin/plant": plant_binary,
                                  "/etc/plant.btf": self_referencing_blob(6)})
    # KASLR may load the kernel below every planted page (a few % of boots): then the
    # planted blobs come after the kernel's own in the scan; boot once more
    if not survey_planting_guest(libvirt_conn, domain_name(), guest_kernel, options,
                                 last_boot=False):
        survey_planting_guest(libvirt_conn, domain_name(), guest_kernel, options,
                              last_boot=True)
