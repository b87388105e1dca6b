"""The command line: exit codes, one-line errors, JSON, and input left untouched."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.support.fs import within

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


# ------------------------------------------------------------- every verb, bad inputs

#: bad values per kind of argument (by metavar; ``dest`` where one metavar means two
#: things). Paths are names in the ``bad_files`` fixture or absolute.
BAD_PATHS = ["missing", "folder", "fifo", "/dev/zero", "empty", "garbage", "not-utf8"]
BAD = {
    "FILE|-": BAD_PATHS,                              # domain XML input
    "PATH": BAD_PATHS,                                # region image
    "DISK": BAD_PATHS,                                # guest disk image
    "FILE": BAD_PATHS,                                # --offsets
    "all|FILE": ["missing", "folder", "fifo", "/dev/zero", "garbage", "not-utf8"],
    "dirs": ["missing", "empty", "fifo", "/dev/zero", "not-utf8"],   # trees to import
    "DIR": ["empty", "fifo", "/dev/zero"],            # --hooks-dir, --unit-dir
    "OUT": ["folder", "fifo", "/dev/zero"],           # files a verb replaces (report)
    "SIZE": ["lots", "-1", "1.5G", "0", "\u0661\u0662M", "", "99999999999999999999E"],
    "NAME": ["", "a/../../b", "bad\nname", "x" * 300, "\udcff", "-"],
    "DOMAIN": ["nosuch", "\udcff", "", "a/../../b", "x" * 300],
    "SHA256": ["nosuch", "", "00" * 32, "\udcff", "0" * 65],
    "TREE": ["nosuch", "", "0000", "\udcff", "0" * 65],            # an imported tree
    "N": ["x", "-1", "0", "\u0661", "1e3", ""],
    "guests": ["x", "-1", "0", "99"],                 # demo: never started
    "SECONDS": ["x", "-1", "0", "nan", "inf", ""],
    "choice": ["floppy", ""],
}
#: harmless valid values for the required arguments of a verb (per metavar or dest)
GOOD = {"FILE|-": "domain.xml", "DOMAIN": "nosuch", "dirs": "folder", "SHA256": "00" * 32,
        "PATH": "garbage", "DISK": "garbage"}
#: verbs that would do real work with valid arguments: only bad ones are given
#: (``daemon`` gets --once; ``hook`` --no-reload)
EXTRA = {"libshare daemon": ["--once"], "libshare hook install": ["--no-reload"],
         "libshare hook uninstall": ["--no-reload"]}
#: arguments that are no input (flags, the global options handled below)
NOT_INPUT = {"help", "config", "state_dir", "connect", "verbose"}


def _verbs() -> list[tuple[str, argparse.ArgumentParser]]:
    from libshare.cli.app import _sub_parsers, build_parser
    return [(p.prog, p) for p in _sub_parsers(build_parser()) if p.get_default("func")]


def _kind(action: argparse.Action) -> str:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return "choice"
    if action.dest in BAD:
        return action.dest
    return str(action.metavar)


def _inputs(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest not in NOT_INPUT and a.nargs != 0
            and not isinstance(a, argparse._SubParsersAction)]


def _cases() -> list[Any]:
    """Return (verb, argv with one bad argument) for every argument of every verb, an
    unknown option for every verb, and a bad --config for every verb."""
    cases = []
    for prog, parser in _verbs():
        base: list[str] = []
        required = [a for a in _inputs(parser) if not a.option_strings
                    and a.nargs not in ("*", "?")]
        for a in required:
            base.append(GOOD[_kind(a)])
        words = prog.split()[1:] + EXTRA.get(prog, [])
        for a in _inputs(parser):
            for bad in BAD[_kind(a)]:
                if a.option_strings:
                    argv = [*words, *base, a.option_strings[-1], bad]
                elif a in required:
                    argv = [*words, *[bad if r is a else GOOD[_kind(r)] for r in required]]
                else:
                    argv = [*words, *base, bad]
                cases.append(pytest.param(argv, id=f"{prog} {a.dest}={bad[:20]!r}"))
        cases.append(pytest.param([*words, *base, "--nosuch"], id=f"{prog} --nosuch"))
        for bad in ("missing", "folder", "fifo", "/dev/zero", "garbage", "not-utf8"):
            cases.append(pytest.param(["--config", bad, *words, *base],
                                      id=f"{prog} --config={bad}"))
    return cases


@pytest.fixture
def bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding each kind of bad input (and a valid domain XML), as cwd."""
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbage").write_bytes(b"<domain>\x00\xff\xfe" + os.urandom(4096))
    (tmp_path / "domain.xml").write_text(DOMAIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    monkeypatch.setenv("LIBSHARE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def test_every_argument_of_every_verb_has_bad_inputs() -> None:
    """A new verb or option must say what bad input it gets (add its kind to BAD)."""
    verbs = _verbs()
    assert len(verbs) >= 25
    for prog, parser in verbs:
        for a in _inputs(parser):
            assert _kind(a) in BAD, f"{prog} {a.dest}: no bad inputs for {_kind(a)!r}"
            if not a.option_strings and a.nargs not in ("*", "?"):
                assert _kind(a) in GOOD, f"{prog} {a.dest}: no valid value to stand in"


@pytest.mark.parametrize("argv", _cases())
def test_bad_input_is_one_line_and_exit_1_or_2(argv: list[str], bad_files: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from libshare.cli.app import main
    argv = [os.fsdecode(b"not-utf8-\xff") if a == "not-utf8" else a for a in argv]
    with within(60):
        rc = main(["-c", "test:///default", *argv])
    out, err = capsys.readouterr()
    assert rc in (1, 2), (rc, out[-500:], err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and err.startswith("libshare"), err


def test_bad_input_through_the_real_entry_point(tmp_path: Path) -> None:
    """Non-UTF-8 bytes in argv, a FIFO, /dev/zero on stdin: one line, no traceback."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {"PATH": "/usr/bin:/bin", "LIBSHARE_CONFIG": "", "LC_ALL": "C.UTF-8",
           "LIBSHARE_STATE_DIR": str(tmp_path / "state")}
    for argv, stdin in (([b"region", b"build", b"--group", b"\xff"], None),
                        ([b"xml", b"show", bytes(fifo)], None),
                        ([b"region", b"verify", b"/nonexist\xff"], None),
                        ([b"xml", b"show", b"-"], "/dev/zero"),
                        ([b"region", b"build", b"--size", b"lots"], None)):
        with open(stdin or os.devnull, "rb") as fh:
            res = subprocess.run([sys.executable.encode(), b"-m", b"libshare", *argv],
                                 stdin=fh, capture_output=True, env=env, timeout=60)
        assert res.returncode in (1, 2), (argv, res.stderr)
        assert res.stderr.count(b"\n") == 1 and b"Traceback" not in res.stderr, res.stderr


def test_a_fifo_where_a_hook_or_unit_would_be_is_never_read(
        bad_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from libshare.cli.app import main
    os.mkfifo(bad_files / "folder" / "qemu")
    os.mkfifo(bad_files / "folder" / "libshare-daemon.service")
    with within(20):
        assert main(["hook", "uninstall", "--no-reload", "--hooks-dir", "folder"]) == 0
        assert "absent" in capsys.readouterr().out          # not libshare's: left alone
        assert main(["daemon", "uninstall", "--unit-dir", "folder"]) == 1
        err = capsys.readouterr().err
        assert "not written by libshare" in err and err.count("\n") == 1
        assert main(["daemon", "install", "--unit-dir", "folder"]) == 1
        assert "is a FIFO; not touching it" in capsys.readouterr().err
    assert (bad_files / "folder" / "qemu").is_fifo()


def test_an_os_error_no_one_worded_is_one_line(
        bad_files: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from libshare.cli.app import main
    from libshare.cli.commands import store as store_cmd

    def broken(_store_dir: Path) -> None:
        raise OSError(errno.EIO, "Input/output error", "/var/lib/libshare/store/index.json")

    monkeypatch.setattr(store_cmd, "load_index", broken)
    assert main(["store", "ls"]) == 1
    assert capsys.readouterr().err == ("libshare: Input/output error: "
                                       "/var/lib/libshare/store/index.json\n")
