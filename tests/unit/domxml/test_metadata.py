"""The per-domain automatic redirect mode: recorded in the enrolment metadata by
``enable --redirect``, defaulted from the config's ``redirect``, reported by
``describe``/``xml show``, changed alone in place, and undone by disable."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from libshare import config, domxml
from libshare.errors import LibshareError, RefusedError
from libshare.virt import enrol
from tests.support.fakes import FakeConnection, FakeDomain

MiB = 1 << 20
DOMAIN = """<domain type='kvm'>
  <name>r</name>
  <memory unit='MiB'>256</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices/>
</domain>
"""


def c14n(root: etree._Element) -> bytes:
    return etree.tostring(root, method="c14n")


def spec(redirect: str | None = None) -> domxml.RegionSpec:
    return domxml.RegionSpec("/r/a.img", 64 * MiB, "g", digest="d" * 64,
                             state_dir="/var/lib/libshare", redirect=redirect)


def test_runtime_is_recorded_and_disable_removes_it() -> None:
    root = domxml.parse(DOMAIN)
    on = domxml.enable(root, spec("runtime"))
    assert domxml.describe(on)["redirect"] == "runtime"
    assert domxml.enrolment(on).redirect == "runtime"  # type: ignore[union-attr]
    assert b'redirect="runtime"' in c14n(on)
    assert c14n(domxml.disable(on)) == c14n(root)
    assert c14n(domxml.enable(on, spec("runtime"))) == c14n(on)  # idempotent


def test_off_leaves_no_attribute_and_describe_says_off() -> None:
    root = domxml.parse(DOMAIN)
    off = domxml.enable(root, spec())
    assert b"redirect=" not in c14n(off)
    assert domxml.describe(off)["redirect"] == "off"
    assert domxml.describe(root)["redirect"] is None


def test_changing_only_the_mode_touches_only_the_attribute() -> None:
    root = domxml.parse(DOMAIN)
    off = domxml.enable(root, spec("off"))
    on = domxml.enable(off, spec("runtime"))
    assert domxml.describe(on)["redirect"] == "runtime"
    # everything but the attribute is what it was
    assert c14n(domxml.enable(on, spec("off"))) == c14n(off)
    assert c14n(domxml.disable(on)) == c14n(root)
    # None keeps the recorded mode, whatever the default
    assert c14n(domxml.enable(on, spec(None), default_redirect="off")) == c14n(on)


def test_default_applies_to_new_enrolments_and_re_enrolment_keeps_the_mode() -> None:
    root = domxml.parse(DOMAIN)
    on = domxml.enable(root, spec(None), default_redirect="runtime")
    assert domxml.describe(on)["redirect"] == "runtime"
    moved = domxml.enable(on, replace(spec(None), path="/r/b.img"))
    assert domxml.describe(moved)["region"] == "/r/b.img"
    assert domxml.describe(moved)["redirect"] == "runtime"
    assert c14n(domxml.disable(moved)) == c14n(root)


def test_unknown_mode_refused() -> None:
    with pytest.raises(RefusedError, match="unknown redirect mode 'boot'"):
        domxml.enable(domxml.parse(DOMAIN), spec("boot"))


def test_config_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('redirect = "runtime"\nredirect_wait = 60\n')
    cfg = config.load(str(f), environ={})
    assert cfg.redirect == "runtime" and cfg.redirect_wait == 60.0
    assert config.load(path=None, environ={"LIBSHARE_CONFIG": ""}).redirect in \
        config.REDIRECT_MODES
    for text, match in (('redirect = "boot"\n', "redirect must be one of"),
                        ("redirect_wait = 0\n", "redirect_wait must be a positive")):
        f.write_text(text)
        with pytest.raises(LibshareError, match=match):
            config.load(str(f), environ={})


def cli(tmp: Path, *args: str, stdin: str | None = None,
        conf: str = "") -> subprocess.CompletedProcess[str]:
    (tmp / "c.toml").write_text(conf)
    env = {"PATH": "/usr/bin:/bin", "LIBSHARE_CONFIG": str(tmp / "c.toml"), "LC_ALL": "C",
           "LIBSHARE_STATE_DIR": str(tmp / "state")}
    return subprocess.run([sys.executable, "-m", "libshare", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def test_xml_enable_redirect_and_show(tmp_path: Path) -> None:
    region = tmp_path / "region.img"
    region.write_bytes(b"\0" * (4 * MiB))
    res = cli(tmp_path, "xml", "enable", "--region", str(region), "--redirect", "runtime",
              "-", stdin=DOMAIN)
    assert res.returncode == 0, res.stderr
    assert json.loads(cli(tmp_path, "xml", "show", "-", stdin=res.stdout).stdout)[
        "redirect"] == "runtime"
    # the config's default applies without --redirect ...
    dflt = cli(tmp_path, "xml", "enable", "--region", str(region), "-", stdin=DOMAIN,
               conf='redirect = "runtime"\n')
    assert json.loads(cli(tmp_path, "xml", "show", "-", stdin=dflt.stdout).stdout)[
        "redirect"] == "runtime"
    # ... and --redirect off switches an enrolled domain back
    off = cli(tmp_path, "xml", "enable", "--region", str(region), "--redirect", "off", "-",
              stdin=res.stdout)
    assert json.loads(cli(tmp_path, "xml", "show", "-", stdin=off.stdout).stdout)[
        "redirect"] == "off"
    back = cli(tmp_path, "xml", "disable", "-", stdin=res.stdout)
    assert c14n(etree.fromstring(back.stdout)) == c14n(etree.fromstring(DOMAIN))
    bad = cli(tmp_path, "xml", "enable", "--redirect", "sometimes", "-", stdin=DOMAIN)
    assert bad.returncode == 2


def connection(xml: str) -> FakeConnection:
    """Return a connection holding domain ``r`` defined by ``xml``."""
    return FakeConnection(FakeDomain("r", xml))


def test_enable_domain_changes_only_the_mode() -> None:
    enrolled = domxml.serialize(domxml.enable(domxml.parse(DOMAIN), spec()))
    conn = connection(enrolled)
    out = enrol.enable_domain(conn, "r", spec("runtime"))
    assert out.action == "enabled" and out.message == "automatic redirect set to runtime"
    assert out.info is not None and out.info["redirect"] == "runtime"
    assert len(conn.defined) == 1
    again = enrol.enable_domain(conn, "r", spec("runtime"))
    assert again.action == "unchanged" and len(conn.defined) == 1
    kept = enrol.enable_domain(conn, "r", spec(None), default_redirect="off")
    assert kept.action == "unchanged"
    fresh = connection(DOMAIN)
    new = enrol.enable_domain(fresh, "r", spec(None), default_redirect="runtime")
    assert new.action == "enabled" and "automatic redirect runtime" in new.message


def test_enable_cli_sets_and_changes_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from contextlib import contextmanager

    from libshare import cli
    from libshare.virt import api

    region = tmp_path / "region.img"
    region.write_bytes(b"\0" * (4 * MiB))
    conn = connection(DOMAIN)

    @contextmanager
    def connect(uri: str) -> Any:
        yield conn

    monkeypatch.setattr(api, "connect", connect)
    (tmp_path / "c.toml").write_text('redirect = "runtime"\n')
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "c.toml"))
    base = ["--state-dir", str(tmp_path / "state"), "enable", "r", "--region", str(region)]
    assert cli.main(base) == 0
    assert "automatic redirect runtime" in capsys.readouterr().out
    assert cli.main([*base, "--redirect", "off", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["domains"][0]
    assert out["message"] == "automatic redirect set to off"
    assert out["libshare"]["redirect"] == "off"
    assert cli.main(base) == 0  # no --redirect: the recorded mode stays
    assert "already enrolled" in capsys.readouterr().out
