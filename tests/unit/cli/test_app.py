"""The command line: exit codes, one-line errors, JSON, and input left untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

MiB = 1 << 20
DOMAIN = """<domain type='kvm'>
  <name>c</name>
  <memory unit='MiB'>256</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
</domain>
"""


def cli(*args: str, stdin: str | None = None, tmp: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "LIBSHARE_CONFIG": "", "LC_ALL": "C"}
    if tmp is not None:
        env["LIBSHARE_STATE_DIR"] = str(tmp / "state")
    return subprocess.run([sys.executable, "-m", "libshare", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def region(tmp_path: Path) -> Path:
    path = tmp_path / "region.img"
    path.write_bytes(b"\0" * (4 * MiB))
    return path


def test_xml_enable_show_disable_pipeline(tmp_path: Path, region: Path) -> None:
    src = tmp_path / "d.xml"
    src.write_text(DOMAIN)
    res = cli("xml", "enable", "--region", str(region), "--group", "web", str(src), tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert src.read_text() == DOMAIN
    shown = cli("xml", "show", "-", stdin=res.stdout, tmp=tmp_path)
    info = json.loads(shown.stdout)
    assert info["enrolled"] and info["group"] == "web" and info["size"] == 4 * MiB
    assert info["region"] == str(region) and len(info["digest"]) == 64
    back = cli("xml", "disable", "-", stdin=res.stdout, tmp=tmp_path)
    assert back.returncode == 0
    c14n = lambda text: etree.tostring(etree.fromstring(text), method="c14n")  # noqa: E731
    assert c14n(back.stdout) == c14n(DOMAIN)


def test_refusal_is_one_line_exit_1(tmp_path: Path, region: Path) -> None:
    res = cli("xml", "enable", "--region", str(region), "-",
              stdin=DOMAIN.replace("kvm", "xen"), tmp=tmp_path)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "domain type 'xen'" in res.stderr


def test_missing_group_region_explains(tmp_path: Path) -> None:
    res = cli("xml", "enable", "-", stdin=DOMAIN, tmp=tmp_path)
    assert res.returncode == 1 and "libshare region build --group default" in res.stderr


def test_size_mismatch_refused(tmp_path: Path, region: Path) -> None:
    res = cli("xml", "enable", "--region", str(region), "--size", "8M", "-", stdin=DOMAIN,
              tmp=tmp_path)
    assert res.returncode == 1 and "does not match" in res.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("xml", tmp=tmp_path).returncode == 2
    assert cli("xml", "enable", "--model", "floppy", "-", tmp=tmp_path).returncode == 2
    res = cli("xml", "enable", "--size", "lots", "--region", "/nope.img", "-", stdin=DOMAIN,
              tmp=tmp_path)
    assert res.returncode == 2 and "invalid size" in res.stderr


def test_bad_xml_file(tmp_path: Path) -> None:
    res = cli("xml", "show", str(tmp_path / "missing.xml"), tmp=tmp_path)
    assert res.returncode == 1 and "cannot read" in res.stderr
    res = cli("xml", "show", "-", stdin="<domain>", tmp=tmp_path)
    assert res.returncode == 1 and "not well-formed" in res.stderr


def test_help_mentions_trust_for_ivshmem() -> None:
    res = cli("xml", "enable", "--help")
    assert res.returncode == 0 and "trusted groups only" in " ".join(res.stdout.split())


@pytest.mark.parametrize("argv,state_dir,config_path,verbose", [
    (["--state-dir", "/a", "xml", "show", "-"], "/a", None, False),
    (["xml", "show", "--state-dir", "/b", "-"], "/b", None, False),
    (["--state-dir", "/a", "xml", "show", "-", "--state-dir", "/b"], "/b", None, False),
    (["region", "build", "--state-dir", "/c", "--config", "/c.toml", "-v"], "/c", "/c.toml",
     True),
    (["-v", "--config", "/g.toml", "region", "build"], None, "/g.toml", True),
    (["daemon", "install", "--state-dir", "/d"], "/d", None, False),
    (["hook", "log", "--config", "/h.toml"], None, "/h.toml", False),
    (["status"], None, None, False),
])
def test_global_options_before_or_after_the_sub_command(
        argv: list[str], state_dir: str | None, config_path: str | None,
        verbose: bool) -> None:
    from libshare.cli.app import build_parser
    args = build_parser().parse_args(argv)
    assert (args.state_dir, args.config, args.verbose) == (state_dir, config_path, verbose)


def test_every_sub_command_takes_the_global_options() -> None:
    from libshare.cli.app import _sub_parsers, build_parser
    subs = _sub_parsers(build_parser())
    assert len(subs) > 20
    for p in subs:
        opts = {o for a in p._actions for o in a.option_strings}
        assert {"--state-dir", "--config", "-v"} <= opts, p.prog


def test_state_dir_after_sub_command_is_used(tmp_path: Path) -> None:
    # 'xml enable' with no --region reads the group link under the state directory
    res = cli("xml", "enable", "--state-dir", str(tmp_path / "late"), "-", stdin=DOMAIN,
              tmp=tmp_path)
    assert res.returncode == 1 and str(tmp_path / "late" / "regions") in res.stderr
    res = cli("xml", "enable", "-", stdin=DOMAIN, tmp=tmp_path)  # env var still works
    assert res.returncode == 1 and str(tmp_path / "state" / "regions") in res.stderr
    res = cli("--state-dir", str(tmp_path / "early"), "xml", "enable", "-", stdin=DOMAIN,
              tmp=tmp_path)
    assert res.returncode == 1 and str(tmp_path / "early" / "regions") in res.stderr
    missing = tmp_path / "none.toml"
    res = cli("xml", "show", "--config", str(missing), "-", stdin=DOMAIN, tmp=tmp_path)
    assert res.returncode == 1 and "does not exist" in res.stderr
