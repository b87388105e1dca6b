"""The README's main job, ``libshare demo``, on the real libvirtd with TCG guests: the
default demo (two Debian 12 guests, the ``usr`` region, the product's boot-time redirect:
guest install + reboot) and the tiny one (busybox guests, ``--tiny``), each checked from
its JSON report. Both demos name their guests ``lsdemo-1``/``lsdemo-2``, so they live in
this one file (one test worker runs them one after the other).

Debian, per guest (read inside it through the agent): every mapping of a /usr file is on
the pmem device, none from disk, in a few binds, and its disk copies of /usr hold at most
5% of the idle baseline in its page cache, far less than before libshare. Tiny, per
guest: what it printed on its console (DAX mount, library mappings on the pmem device).
From the host, both: introspection sees the region mappings, both QEMUs map the region
Shared_Clean with no copy-on-write copy (no Anonymous page), and one shared copy costs
less than a copy per guest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libshare.demo.lifecycle import cleanup_domain
from tests.support.paths import TEST_ROOT

pytestmark = pytest.mark.integration

NAMES = ["lsdemo-1", "lsdemo-2"]


def run_demo(conn: Any, state: Path, *args: str, timeout: float) -> dict[str, Any]:
    """Run ``libshare --state-dir STATE demo ARGS --json``; return its report. Its state
    directory and guests are removed afterwards whatever happened (a demo killed by a
    timeout or an interrupted test leaves them behind)."""
    TEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        res = subprocess.run([sys.executable, "-m", "libshare", "--state-dir", str(state),
                              "demo", *args, "--json"],
                             capture_output=True, text=True, timeout=timeout)
        sys.stderr.write(res.stderr)
        assert res.returncode == 0, res.stderr[-3000:]
        # its own cleanup removed the guests (checked before ours runs)
        assert {d.name() for d in conn.listAllDomains()} & set(NAMES) == set()
        report: dict[str, Any] = json.loads(res.stdout)
        return report
    finally:
        for name in NAMES:
            cleanup_domain(conn, name)
        shutil.rmtree(state, ignore_errors=True)


def test_debian_demo_shares_one_copy(libvirt_conn: Any, tmp_path: Path) -> None:
    report = run_demo(libvirt_conn, TEST_ROOT / f"demo-debian-{tmp_path.name}",
                      timeout=1800)
    print(json.dumps({k: v for k, v in report.items() if k != "guests"}, indent=1))
    assert report["kind"] == "debian"
    assert [g["name"] for g in report["guests"]] == NAMES
    for g in report["guests"]:
        print(g["name"], {k: v for k, v in g.items() if k != "name"})
        assert g["region_device"] and 0 < g["binds"] <= 64
        assert g["maps_region"] > 100
        assert g["maps_disk"] == 0, g["disk_maps"]
        assert g["usr_cache_kb"] <= 0.05 * report["idle_baseline_kb"], g["top_cached"]
        assert g["before"]["usr_cache_kb"] > 10 * max(g["usr_cache_kb"], 1)
        assert g["survey"]["region_mappings"] > 0
        assert g["region_mapping"]["Shared_Clean"] > 0
        assert g["region_mapping"]["Anonymous"] == 0      # no copy-on-write copy
    host = report["host"]
    assert host["region_copied_kb"] == 0
    assert 0 < host["with_sharing_kb"] < host["without_sharing_kb"]


def test_demo_shares_one_copy(libvirt_conn: Any, tmp_path: Path) -> None:
    report = run_demo(libvirt_conn, TEST_ROOT / f"demo-{tmp_path.name}",
                      "--tiny", "--guests", "2", timeout=600)
    assert [g["name"] for g in report["guests"]] == NAMES
    for g in report["guests"]:
        assert g["dax"] is True
        assert g["binds"] == report["region"]["files"] >= 2
        assert g["maps_region"] > 0 and g["maps_disk"] == 0
        assert g["cached_growth_kb"] < 1024
        assert g["region_mapping"]["Shared_Clean"] > 0
        assert g["region_mapping"]["Anonymous"] == 0      # no copy-on-write copy
        # the host's introspection agrees with what the guest counted from inside
        assert g["survey"]["region_mappings"] == g["maps_region"]
        assert g["survey"]["library_mappings"] == g["maps_region"] + g["maps_disk"]
    host = report["host"]
    assert host["with_sharing_kb"] < host["without_sharing_kb"]
