"""``libshare enable``: a domain that does not exist is said so first, before anything
about its group's region."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from libshare import cli
from libshare.virt import api
from tests.support.fakes import FakeConnection


def test_enable_of_a_missing_domain_says_so_first(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(api, "connect", lambda uri: contextlib.nullcontext(FakeConnection()))
    # the group has no region image either: that must not be what the user hears
    assert cli.main(["--state-dir", str(tmp_path), "enable", "nosuch", "--group", "g"]) == 1
    err = capsys.readouterr().err
    assert err == "libshare: nosuch: domain 'nosuch' not found\n"
    assert cli.main(["--state-dir", str(tmp_path), "enable", "nosuch",
                     "not-utf8-\udcff"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "libshare: nosuch: domain 'nosuch' not found"
    assert err[1].startswith("libshare: not-utf8-\\udcff: domain ") and len(err) == 2
