"""The README's main command: ``libshare demo`` with two Debian 12 TCG guests, the
``usr`` region and the product's boot-time redirect (guest install + reboot), checked
from its JSON report.

Per guest (read inside it through the agent): every mapping of a /usr file is on the
pmem device, none from disk, in a few binds, and its disk copies of /usr hold at most 5%
of the idle baseline in its page cache, far less than before libshare. From the host:
introspection sees region mappings, both QEMUs map the region Shared_Clean with no
copy-on-write copy (no Anonymous page), and one shared copy costs less than a copy per
guest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import TEST_ROOT

pytestmark = pytest.mark.integration

NAMES = ["lsdemo-1", "lsdemo-2"]


def test_debian_demo_shares_one_copy(libvirt_conn: Any, tmp_path: Path) -> None:
    state = TEST_ROOT / f"demo-debian-{tmp_path.name}"
    TEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        res = subprocess.run([sys.executable, "-m", "libshare", "--state-dir", str(state),
                              "demo", "--json"],
                             capture_output=True, text=True, timeout=1800)
        sys.stderr.write(res.stderr)
        assert res.returncode == 0, res.stderr[-3000:]
        report = json.loads(res.stdout)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps({k: v for k, v in report.items() if k != "guests"}, indent=1))
    assert report["kind"] == "debian"
    assert [g["name"] for g in report["guests"]] == NAMES
    assert {d.name() for d in libvirt_conn.listAllDomains()} & set(NAMES) == set()
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
