"""Configuration: defaults, file, environment and option precedence, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare import config
from libshare.errors import LibshareError


def test_defaults_without_file(tmp_path: Path) -> None:
    cfg = config.load(path=None, environ={})
    assert cfg.default_model == "nvdimm" and cfg.default_group == "default"
    if not config.SYSTEM_CONFIG.exists():
        assert cfg.state_dir == config.DEFAULT_STATE_DIR


def test_file_env_and_option_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('state_dir = "/from/file"\ndefault_group = "web"\nhook_timeout = 3\n')
    cfg = config.load(str(f), environ={})
    assert cfg.state_dir == Path("/from/file") and cfg.default_group == "web"
    assert cfg.hook_timeout == 3.0 and cfg.source == f
    cfg = config.load(environ={"LIBSHARE_CONFIG": str(f), "LIBSHARE_STATE_DIR": "/env"})
    assert cfg.state_dir == Path("/env")
    cfg = config.load(str(f), state_dir="/opt", environ={"LIBSHARE_STATE_DIR": "/env"})
    assert cfg.state_dir == Path("/opt")
    assert cfg.group_region_link("web") == Path("/opt/regions/groups/web.img")


def test_table_form_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[libshare]\ndefault_model = "ivshmem"\n')
    assert config.load(str(f), environ={}).default_model == "ivshmem"


@pytest.mark.parametrize("text,match", [
    ('nope = 1\n', "unknown key"),
    ('default_model = "floppy"\n', "default_model"),
    ('log_level = "loud"\n', "log_level"),
    ('hook_timeout = "x"\n', "hook_timeout"),
    ('hook_timeout = 6\n', "hook_timeout must be between 0.5 and 5 seconds"),
    ('hook_timeout = 30.5\n', "not 30.5"),
    ('hook_timeout = 0\n', "hook_timeout"),
    ('state_dir = [\n', "cannot read"),
])
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(LibshareError, match=match):
        config.load(str(f), environ={})


def test_hook_timeout_up_to_five_seconds(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("hook_timeout = 5\n")
    assert config.load(str(f), environ={}).hook_timeout == 5.0
    assert config.Config().hook_timeout == config.MAX_HOOK_TIMEOUT == 5.0


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(LibshareError, match="does not exist"):
        config.load(str(tmp_path / "none.toml"), environ={})


def test_relative_state_dirs_are_made_absolute(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The state directory goes into domain metadata, where the hook (run by libvirt
    in another working directory) reads it: it must be absolute once loaded."""
    monkeypatch.chdir(tmp_path)
    assert config.load(state_dir="rel/s", environ={}).state_dir == tmp_path / "rel" / "s"
    assert config.load(environ={"LIBSHARE_STATE_DIR": "./e"}).state_dir == tmp_path / "e"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "c.toml").write_text('state_dir = "state"\nstate_dirs = ["../other", "/abs"]\n')
    cfg = config.load(str(etc / "c.toml"), environ={})
    assert cfg.state_dir == etc / "state"  # the file's folder, not the working one
    assert cfg.state_dirs == (tmp_path / "other", Path("/abs"))


def test_cli_writes_an_absolute_state_dir_into_metadata(tmp_path: Path) -> None:
    import subprocess
    import sys

    from libshare import domxml
    from tests.support.domains import plain

    doc = tmp_path / "d.xml"
    doc.write_text(plain("d"))
    res = subprocess.run([sys.executable, "-m", "libshare", "--state-dir", "st", "xml",
                          "enable", "--group", "g", "--size", "4M", "--region",
                          "/nonexistent/r.img", str(doc)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LIBSHARE_CONFIG": "",
                              "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert res.returncode == 0, res.stderr
    assert domxml.describe(domxml.parse(res.stdout))["state_dir"] == str(tmp_path / "st")


def test_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def load() -> None:
        try:
            config.load(str(fifo), environ={})
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=load, daemon=True)  # it blocked for good before
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "config.load blocked on a FIFO"
    assert isinstance(raised[0], LibshareError) and "not a regular file" in str(raised[0])


def test_trusted_state_dirs(tmp_path: Path) -> None:
    own, other = tmp_path / "own", tmp_path / "other"
    cfg = config.Config(state_dir=own, state_dirs=(other,))
    assert cfg.trusted_state_dir(None) == own
    assert cfg.trusted_state_dir(own / "sub") == own / "sub"
    assert cfg.trusted_state_dir(other) == other
    assert cfg.trusted_state_dir(own / ".." / "evil") is None
    assert cfg.trusted_state_dir("relative") is None
    (tmp_path / "link").symlink_to(tmp_path / "evil")
    assert cfg.trusted_state_dir(tmp_path / "link") is None
    (own).mkdir()
    (own / "out").symlink_to(tmp_path / "evil")
    assert cfg.trusted_state_dir(own / "out") is None  # a link leading out of it
