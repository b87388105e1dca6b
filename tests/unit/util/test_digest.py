"""The digest cache: in-place corruption with a restored mtime is seen; gc prunes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from libshare.util.digest import cached_sha256, forget, sha256_file


def test_restored_mtime_does_not_hide_corruption(tmp_path: Path) -> None:
    f = tmp_path / "image.img"
    f.write_bytes(b"a" * 65536)
    cache = tmp_path / "digests.json"
    first = cached_sha256(f, cache)
    st = f.stat()
    with open(f, "r+b") as fh:          # same size, one byte changed
        fh.seek(4096)
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))    # hide it from an mtime check
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (st.st_size, st.st_mtime_ns, st.st_ino)
    assert cached_sha256(f, cache) == sha256_file(f) != first


def test_cache_hit_is_kept_while_nothing_changes(tmp_path: Path) -> None:
    f = tmp_path / "image.img"
    f.write_bytes(b"x" * 4096)
    cache = tmp_path / "digests.json"
    digest = cached_sha256(f, cache)
    entry = json.loads(cache.read_text())[str(f.resolve())]
    assert entry.endswith("=" + digest)
    cache.write_text(json.dumps({str(f.resolve()): entry.rsplit("=", 1)[0] + "=fake"}))
    assert cached_sha256(f, cache) == "fake"        # proves the second call is a hit


def test_forget_prunes_given_and_vanished_files(tmp_path: Path) -> None:
    cache = tmp_path / "digests.json"
    files = [tmp_path / n for n in ("a.img", "b.img", "c.img")]
    for f in files:
        f.write_bytes(f.name.encode())
        cached_sha256(f, cache)
    files[1].unlink()
    gone = forget(cache, [str(files[0])])
    assert gone == sorted(str(f.resolve()) for f in files[:2])
    assert list(json.loads(cache.read_text())) == [str(files[2].resolve())]
    mtime = cache.stat().st_mtime_ns
    assert forget(cache, []) == [] and cache.stat().st_mtime_ns == mtime
    assert forget(tmp_path / "missing.json") == []
