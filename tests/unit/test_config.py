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
