"""Installing the hook never overwrites someone else's hook."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare import hook_install
from libshare.errors import LibshareError

ROOT = Path(__file__).resolve().parents[2]


def test_packaged_hook_is_the_repository_hook() -> None:
    assert hook_install.hook_source() == (ROOT / "hooks" / "qemu").read_text()


def test_fresh_install_update_uninstall(tmp_path: Path) -> None:
    res = hook_install.install(tmp_path, python="/opt/py/bin/python3", reload=False)
    assert res.path == tmp_path / "qemu" and res.action == "installed"
    text = res.path.read_text()
    assert text.startswith("#!/opt/py/bin/python3\n") and hook_install.MARKER in text
    assert res.path.stat().st_mode & 0o111
    assert hook_install.install(tmp_path, python="/opt/py/bin/python3",
                                reload=False).action == "unchanged"
    assert hook_install.install(tmp_path, python="/usr/bin/python3",
                                reload=False).action == "updated"
    assert hook_install.uninstall(tmp_path, reload=False).action == "removed"
    assert not (tmp_path / "qemu").exists()
    assert hook_install.uninstall(tmp_path, reload=False).action == "absent"


def test_foreign_hook_is_kept(tmp_path: Path) -> None:
    foreign = tmp_path / "qemu"
    foreign.write_text("#!/bin/sh\nexit 0\n")
    res = hook_install.install(tmp_path, reload=False)
    assert res.path == tmp_path / "qemu.d" / "libshare"
    assert foreign.read_text() == "#!/bin/sh\nexit 0\n"
    hook_install.uninstall(tmp_path, reload=False)
    assert foreign.exists() and not res.path.exists()


def test_foreign_file_in_qemu_d_is_refused(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_text("#!/bin/sh\n")
    (tmp_path / "qemu.d").mkdir()
    (tmp_path / "qemu.d" / "libshare").write_text("#!/bin/sh\n# someone else\n")
    with pytest.raises(LibshareError, match="not libshare's hook"):
        hook_install.install(tmp_path, reload=False)
