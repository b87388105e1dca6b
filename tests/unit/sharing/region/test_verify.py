"""Region verify: the cheap layout check and the full check catching every kind of
damage (library bytes, checksums, truncation, superblock, name, padding, manifests)."""


from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from libshare.config import Config
from libshare.sharing.formats.erofs import Erofs
from libshare.sharing.region import build, layout, manifest, verify
from libshare.sharing.store import load_index
from tests.support.fs import fill, small_tmpfs, within
from tests.support.images import (
    MiB,
    corrupt_copy,
    first_library,
    make_cfg,
    needs_mkfs,
)

pytestmark = needs_mkfs


def test_verify_catches_flipped_library_byte(built: tuple[Config, build.BuildResult],
                                             tmp_path: Path) -> None:
    _cfg, res = built
    item, start = first_library(res.path)
    bad = corrupt_copy(res.path, tmp_path / "x.img", offset=start + 100)
    problem = verify.verify(bad)
    assert problem and item["path"] in problem and "SHA-256" in problem


def test_verify_catches_bad_checksum(built: tuple[Config, build.BuildResult],
                                     tmp_path: Path) -> None:
    _cfg, res = built
    bad = corrupt_copy(res.path, tmp_path / "x.img", offset=4096 + 1000)  # padding byte
    problem = verify.verify(bad)
    assert problem and "checksum" in problem


def test_verify_catches_truncation(built: tuple[Config, build.BuildResult],
                                   tmp_path: Path) -> None:
    cfg, res = built
    big = build.build_region(cfg, "web", size=8 * MiB)
    bad = corrupt_copy(big.path, tmp_path / "x.img", size=big.size - 2 * MiB)
    assert "npfns" in (verify.verify(bad) or "")
    bad = corrupt_copy(big.path, tmp_path / "y.img", size=big.size - 4096)
    assert "multiple of 2 MiB" in (verify.verify(bad) or "")
    bad = corrupt_copy(res.path, tmp_path / "z.img", size=2 * MiB)
    assert "too small" in (verify.verify(bad) or "")


def test_verify_catches_superblock_and_name(built: tuple[Config, build.BuildResult],
                                            tmp_path: Path) -> None:
    _cfg, res = built
    bad = corrupt_copy(res.path, tmp_path / "x.img", offset=2 * MiB + 1024)
    assert "no EROFS superblock" in (verify.verify(bad) or "")
    bad = corrupt_copy(res.path, tmp_path / "y.img", offset=2 * MiB + 1024 + 40)
    assert "superblock checksum" in (verify.verify(bad) or "")
    # a sound image under another image's digest name
    named = corrupt_copy(res.path, tmp_path / ("0" * 64 + ".img"))
    assert "does not match the file name" in (verify.verify(named) or "")
    assert verify.verify(named, check_name=False) is None


@pytest.mark.parametrize("where", ["gap", "tail", "last"])
def test_verify_catches_nonzero_padding(built: tuple[Config, build.BuildResult],
                                        tmp_path: Path, where: str) -> None:
    """A byte changed at 1 MiB (between the info block and the filesystem) or after the
    filesystem's last block is refused, even without the digest in the file name."""
    _cfg, res = built
    with open(res.path, "rb") as fh:
        fs_end = 2 * MiB + Erofs(fh, offset=2 * MiB).sb.blocks * 4096
    offset = {"gap": 1 * MiB, "tail": fs_end, "last": res.size - 1}[where]
    bad = corrupt_copy(res.path, tmp_path / "pad.img", offset=offset)
    problem = verify.verify(bad) or ""
    assert problem.startswith(f"byte {offset} is not zero"), problem
    assert verify.quick_verify(bad) == problem
    assert verify.quick_verify(res.path) is None


def test_quick_verify_of_a_large_image_reads_only_the_ends_of_its_tail(
        tmp_path: Path) -> None:
    """A 64 MiB image: a byte in the middle of the zero tail escapes quick_verify (it
    reads QUICK_TAIL bytes at each end, so a 4 GiB image costs what a small one does)
    but not verify; one near either end is caught by both."""
    cfg = make_cfg(tmp_path)
    res = build.build_region(cfg, "web", size=64 * MiB)
    with open(res.path, "rb") as fh:
        fs_end = 2 * MiB + Erofs(fh, offset=2 * MiB).sb.blocks * 4096
    middle = (fs_end + res.size) // 2
    bad = corrupt_copy(res.path, tmp_path / "mid.img", offset=middle)
    assert verify.quick_verify(bad) is None
    assert (verify.verify(bad) or "").startswith(f"byte {middle} is not zero")
    for offset in (fs_end + verify.QUICK_TAIL - 1, res.size - verify.QUICK_TAIL):
        bad = corrupt_copy(res.path, tmp_path / f"{offset}.img", offset=offset)
        assert (verify.quick_verify(bad) or "").startswith(f"byte {offset} is not zero")


def test_quick_verify_reads_no_library(built: tuple[Config, build.BuildResult],
                                       tmp_path: Path) -> None:
    """quick_verify checks the layout only; verify also hashes every library."""
    _cfg, res = built
    _item, start = first_library(res.path)
    bad = corrupt_copy(res.path, tmp_path / "lib.img", offset=start)
    assert verify.quick_verify(bad) is None
    assert "does not match the manifest" in (verify.verify(bad) or "")
    assert "PFN info block" in (verify.quick_verify(
        corrupt_copy(res.path, tmp_path / "pfn.img", offset=4096 + 100)) or "")
    assert "truncated" in (verify.quick_verify(
        corrupt_copy(res.path, tmp_path / "t.img", size=res.size - 2 * MiB)) or "")


def test_verify_with_fsck(built: tuple[Config, build.BuildResult]) -> None:
    if shutil.which("fsck.erofs") is None:
        pytest.skip("no fsck.erofs")
    assert verify.verify(built[1].path, fsck=True) is None


def test_verify_catches_text_manifest_mismatch(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A text manifest line that pairs a hash with another path is refused."""
    cfg = make_cfg(tmp_path)
    idx = load_index(cfg.store_dir)
    entries = sorted(idx.entries.values(), key=lambda e: e.sha256)
    good = manifest.tsv_manifest_bytes(entries).decode().splitlines()
    assert all(len(line.split("\t")) == 4 for line in good)
    a, b = entries[0], entries[1]
    swapped = f"{a.sha256}\t{a.size}\t{layout.fs_path(b)}\t{sorted(a.paths)[0]}"
    monkeypatch.setattr(build, "tsv_manifest_bytes",
                        lambda e, skip=frozenset(), rpaths=None: (swapped + "\n").encode())
    res = build.build_region(cfg, "web")
    problem = verify.verify(res.path)
    assert problem and "manifest.tsv line 1" in problem, problem


def test_fsck_reads_the_unnamed_copy(built: tuple[Config, build.BuildResult],
                                     tmp_path: Path) -> None:
    """fsck.erofs checks the copy it is given as /proc/self/fd/N: a damaged superblock
    is reported (and no temporary file is left next to the image)."""
    if shutil.which("fsck.erofs") is None:
        pytest.skip("no fsck.erofs")
    (tmp_path / "copy").mkdir()
    bad = corrupt_copy(built[1].path, tmp_path / "copy/bad.img", offset=2 * MiB + 1024)
    problem = verify.fsck_region(str(bad))
    assert problem and problem.startswith("fsck.erofs: "), problem
    assert sorted(p.name for p in bad.parent.iterdir()) == ["bad.img"]


def test_verify_never_waits_on_a_fifo_or_device(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.img"
    os.mkfifo(fifo)
    with within(10):
        assert verify.verify(fifo) == "is a FIFO, not a regular file"
        assert verify.quick_verify(fifo) == "is a FIFO, not a regular file"
        assert verify.verify("/dev/zero") == "is a character device, not a regular file"
    assert verify.verify(tmp_path / "missing.img") == "No such file or directory"


def test_fsck_with_the_disk_full_is_one_line(built: tuple[Config, build.BuildResult],
                                             tmp_path: Path) -> None:
    if shutil.which("fsck.erofs") is None:
        pytest.skip("no fsck.erofs")
    with small_tmpfs(tmp_path / "small", "20m") as small:
        image = small / Path(built[1].path).name
        shutil.copyfile(built[1].path, image)
        ballast = fill(small, leave=0)
        problem = verify.verify(image, fsck=True) or ""
        assert problem == ("cannot run fsck.erofs on a copy of the filesystem: No space "
                           "left on device"), problem
        ballast.unlink()
        assert sorted(p.name for p in small.iterdir()) == [image.name]
