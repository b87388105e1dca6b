"""``libshare hook log``: ISO 8601 local times in the table, epoch seconds kept beside
them in JSON."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from libshare import cli
from libshare.hook import state


def test_hook_log_prints_iso_8601_local_times(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    state.append_hook_log(tmp_path, {"domain": "web1", "op": "prepare", "sub": "begin",
                                     "status": 0, "seconds": 0.07, "result": "ok"})
    epoch = state.read_hook_log(tmp_path)[0]["time"]
    local = datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
    assert cli.main(["--state-dir", str(tmp_path), "hook", "log"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[0] == local and row[1:3] == ["web1", "prepare"]
    assert datetime.datetime.fromisoformat(row[0]).utcoffset() is not None
    assert cli.main(["--state-dir", str(tmp_path), "hook", "log", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert entry["time"] == epoch and entry["local_time"] == local
