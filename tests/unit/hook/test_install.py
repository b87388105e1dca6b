"""Installing the hook never overwrites someone else's hook."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare.errors import LibshareError
from libshare.hook import install
from tests.support.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


def test_packaged_hook_is_the_repository_hook() -> None:
    assert install.hook_source() == (ROOT / "hooks" / "qemu").read_text()


def test_fresh_install_update_uninstall(tmp_path: Path) -> None:
    res = install.install(tmp_path, python="/opt/py/bin/python3", reload=False)
    assert res.path == tmp_path / "qemu" and res.action == "installed"
    text = res.path.read_text()
    assert text.startswith("#!/opt/py/bin/python3\n") and install.MARKER in text
    assert res.path.stat().st_mode & 0o111
    assert install.install(tmp_path, python="/opt/py/bin/python3",
                                reload=False).action == "unchanged"
    assert install.install(tmp_path, python="/usr/bin/python3",
                                reload=False).action == "updated"
    assert install.uninstall(tmp_path, reload=False).action == "removed"
    assert not (tmp_path / "qemu").exists()
    assert install.uninstall(tmp_path, reload=False).action == "absent"


def test_foreign_hook_is_kept(tmp_path: Path) -> None:
    foreign = tmp_path / "qemu"
    foreign.write_text("#!/bin/sh\nexit 0\n")
    res = install.install(tmp_path, reload=False)
    assert res.path == tmp_path / "qemu.d" / "libshare"
    assert foreign.read_text() == "#!/bin/sh\nexit 0\n"
    install.uninstall(tmp_path, reload=False)
    assert foreign.exists() and not res.path.exists()


def test_foreign_file_in_qemu_d_is_refused(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_text("#!/bin/sh\n")
    (tmp_path / "qemu.d").mkdir()
    (tmp_path / "qemu.d" / "libshare").write_text("#!/bin/sh\n# someone else\n")
    with pytest.raises(LibshareError, match="not libshare's hook"):
        install.install(tmp_path, reload=False)
