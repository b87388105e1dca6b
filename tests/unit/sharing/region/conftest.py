"""The region tests' fixture: a region built from a few of this host's libraries."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare.config import Config
from libshare.sharing.region import build
from tests.support.images import make_cfg


@pytest.fixture
def built(tmp_path: Path) -> tuple[Config, build.BuildResult]:
    cfg = make_cfg(tmp_path)
    return cfg, build.build_region(cfg, "web")
