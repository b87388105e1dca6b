"""Host KSM read from (and set through) a hand-written sysfs folder and /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare.sharing import ksm
from tests.support.proc import write_ksm, write_process


def test_host_ksm_saving_knobs_and_ksmd(tmp_path: Path) -> None:
    write_ksm(tmp_path / "ksm", run=1, pages_shared=100, pages_sharing=900,
              ksm_zero_pages=50)
    write_process(tmp_path / "proc", 37, [], comm="ksmd", ppid=2)
    write_process(tmp_path / "proc", 38, [], comm="ksmd", ppid=1)  # not a kernel thread
    state = ksm.host_ksm(tmp_path / "ksm", tmp_path / "proc")
    assert state["available"] and state["running"]
    assert state["saved_bytes"] == 950 * ksm.PAGE
    assert state["knobs"]["pages_to_scan"] == "100"
    assert state["knobs"]["advisor_mode"] == "none"      # the bracketed choice
    assert state["counters"]["pages_shared"] == 100
    assert ksm.ksmd_pid(tmp_path / "proc") == 37
    assert state["ksmd_cpu_seconds"] == pytest.approx(400 / ksm.CLOCK_TICKS)


def test_host_ksm_absent(tmp_path: Path) -> None:
    state = ksm.host_ksm(tmp_path / "none", tmp_path)
    assert state["available"] is False and state["saved_bytes"] == 0


def test_process_ksm(tmp_path: Path) -> None:
    write_process(tmp_path, 10, [], ksm_stat="ksm_rmap_items 7\nksm_merging_pages 5\n"
                  "ksm_process_profit -12\nksm_merge_any: no\n")
    assert ksm.process_ksm(10, tmp_path) == {"ksm_rmap_items": 7, "ksm_merging_pages": 5,
                                            "ksm_process_profit": -12}
    write_process(tmp_path, 11, [])
    (tmp_path / "11" / "ksm_merging_pages").write_text("3\n")
    assert ksm.process_ksm(11, tmp_path) == {"ksm_merging_pages": 3}
    write_process(tmp_path, 12, [])
    assert ksm.process_ksm(12, tmp_path) is None


def test_knobs_set_restores_everything_on_error(tmp_path: Path) -> None:
    d = tmp_path / "ksm"
    write_ksm(d, run=0, pages_to_scan=100, sleep_millisecs=20)
    with pytest.raises(KeyboardInterrupt), ksm.knobs_set({"run": 1, "pages_to_scan": 5000}, d) \
            as before:
        assert before["run"] == "0" and before["pages_to_scan"] == "100"
        assert (d / "run").read_text() == "1\n"
        assert (d / "pages_to_scan").read_text() == "5000\n"
        raise KeyboardInterrupt
    assert (d / "run").read_text() == "0\n"
    assert (d / "pages_to_scan").read_text() == "100\n"
    assert (d / "sleep_millisecs").read_text() == "20\n"


def test_knobs_set_keeps_ksm_running_when_it_ran(tmp_path: Path) -> None:
    d = tmp_path / "ksm"
    write_ksm(d, run=1, pages_to_scan=300)
    with ksm.knobs_set({"pages_to_scan": 5000}, d):
        pass
    assert (d / "run").read_text() == "1\n" and (d / "pages_to_scan").read_text() == "300\n"
