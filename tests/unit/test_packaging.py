"""Packaging: one version number, a license file that matches the declared license, the
metadata an index and a distribution packager read."""

from __future__ import annotations

import tomllib

import libshare
from tests.support.paths import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def test_one_version_number() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "libshare.__version__"}
    assert libshare.__version__.count(".") == 2


def test_license_file_matches_the_expression() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "GPL-2.0-or-later"
    assert project["license-files"] == ["LICENSE"]
    text = (PROJECT_ROOT / "LICENSE").read_text()
    assert text.split()[:6] == ["GNU", "GENERAL", "PUBLIC", "LICENSE", "Version", "2,"]
    assert "(at your option) any later version" in text
    assert len(text) > 15000  # the whole license, not a stub


def test_index_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["authors"] and project["urls"]["Homepage"].startswith("https://")
    assert "Operating System :: POSIX :: Linux" in project["classifiers"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639
