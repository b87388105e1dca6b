"""The ext4 reader: what it refuses (the rest is read through region images in
tests/unit/sharing/region/test_ext4fs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from libshare.sharing.formats.erofs import ErofsError
from libshare.sharing.formats.ext4 import Ext4


def test_not_ext4(tmp_path: Path) -> None:
    img = tmp_path / "zero"
    img.write_bytes(bytes(1 << 20))
    with open(img, "rb") as fh, pytest.raises(ErofsError, match="no ext4 superblock"):
        Ext4(fh)


def test_truncated(tmp_path: Path) -> None:
    img = tmp_path / "short"
    raw = bytearray(4096)
    raw[1024 + 56:1024 + 58] = (0xEF53).to_bytes(2, "little")
    raw[1024 + 4:1024 + 8] = (1000).to_bytes(4, "little")     # 1000 blocks of 1 KiB
    raw[1024 + 40:1024 + 44] = (128).to_bytes(4, "little")
    raw[1024 + 88:1024 + 90] = (256).to_bytes(2, "little")
    img.write_bytes(bytes(raw))
    with open(img, "rb") as fh, pytest.raises(ErofsError, match="truncated"):
        Ext4(fh)
