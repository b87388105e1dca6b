"""The README's main job: ``libshare demo`` on the real libvirtd with TCG guests.

The per-guest figures are what the guests printed on their consoles (DAX mount, library
mappings on the pmem device); the host figures are the QEMUs' smaps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.paths import TEST_ROOT


def test_demo_shares_one_copy(libvirt_conn: Any, tmp_path: Path) -> None:
    state = TEST_ROOT / f"demo-{tmp_path.name}"
    TEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        res = subprocess.run([sys.executable, "-m", "libshare", "--state-dir", str(state),
                              "demo", "--tiny", "--guests", "2", "--json"],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert [g["name"] for g in report["guests"]] == ["lsdemo-1", "lsdemo-2"]
    assert {d.name() for d in libvirt_conn.listAllDomains()} & {"lsdemo-1", "lsdemo-2"} == set()
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
