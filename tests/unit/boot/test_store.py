"""libshare's per-domain initrd under STATE/boot/UUID: built from the domain's own
initrd and the overlay, checked by the hook at prepare (only under the configured state
directory, with its record), rebuilt when the domain's initrd changed (a kernel update
on the host) or the built file does not match its record, refused with one line when
it cannot be verified."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from libshare.boot import store
from libshare.errors import LibshareError, RefusedError
from libshare.util import cpio
from libshare.util.digest import sha256_file
from tests.support.domains import UUID
from tests.support.initrds import initramfs_tools_initrd

OVERLAY = cpio.write_archive([cpio.file_entry("usr/lib/libshare/initrd", b"host\n")])


def _built(tmp_path: Path) -> tuple[Path, Path, store.Record]:
    state = tmp_path / "state"
    original = initramfs_tools_initrd(tmp_path / "initrd.img", "gzip")
    original.write_bytes(original.read_bytes() + b"\x01")    # not 4-aligned: padded
    rec = store.build(state, UUID, "g1", original, sha256_file(original), OVERLAY,
                      release="6.1.0-50-amd64", kernel="/srv/vmlinuz",
                      generator="initramfs-tools", built_by="guest install")
    return state, original, rec


def _check(state: Path, original: Path, **kw: object) -> str:
    args = {"uuid": UUID, "initrd": str(store.initrd_path(state, UUID)),
            "current": str(store.initrd_path(state, UUID)), "previous": str(original),
            "cache": state / "digests.json"}
    args.update(kw)
    return store.check(state, **args)  # type: ignore[arg-type]


def test_build_appends_the_overlay_aligned(tmp_path: Path) -> None:
    state, original, rec = _built(tmp_path)
    built = store.initrd_path(state, UUID)
    data = built.read_bytes()
    size = original.stat().st_size
    assert data[:size] == original.read_bytes()
    assert data[size:size + 3] == b"\0\0\0" and data[size + 3:] == OVERLAY
    assert rec.initrd_sha256 == sha256_file(built) and rec.original_size == size
    assert store.load(state, UUID) == rec
    assert oct(built.stat().st_mode & 0o777) == "0o644"
    assert _check(state, original) == "initrd-ok"


def test_a_private_original_gives_a_private_initrd(tmp_path: Path) -> None:
    original = initramfs_tools_initrd(tmp_path / "initrd.img", None)
    original.chmod(0o600)
    store.build(tmp_path / "s", UUID, "g1", original, sha256_file(original), OVERLAY,
                release="r", kernel=None, generator="initramfs-tools", built_by="t")
    assert store.initrd_path(tmp_path / "s", UUID).stat().st_mode & 0o077 == 0


def test_original_changed_meanwhile_is_refused(tmp_path: Path) -> None:
    original = initramfs_tools_initrd(tmp_path / "initrd.img", None)
    with pytest.raises(LibshareError, match="changed while libshare read it"):
        store.build(tmp_path / "s", UUID, "g1", original, "0" * 64, OVERLAY, release="r",
                    kernel=None, generator="initramfs-tools", built_by="t")


def test_kernel_update_on_the_host_rebuilds_at_prepare(tmp_path: Path) -> None:
    """The domain's own initrd is replaced (new kernel): prepare rebuilds libshare's
    from it, keeping the overlay, and the record says why."""
    state, original, rec = _built(tmp_path)
    new = initramfs_tools_initrd(tmp_path / "new.img", "xz")
    os.replace(new, original)
    result = _check(state, original)
    assert result.startswith("initrd-rebuilt: ") and str(original) in result
    data = store.initrd_path(state, UUID).read_bytes()
    assert data.startswith(original.read_bytes()) and data.endswith(OVERLAY)
    now = store.load(state, UUID)
    assert now is not None and now.built_by == "prepare"
    assert now.original_sha256 == sha256_file(original) != rec.original_sha256
    assert now.note and "changed" in now.note and "6.1.0-50-amd64" in now.note
    assert _check(state, original) == "initrd-ok"
    # enable does the same, and says so (None when there is no record)
    os.replace(initramfs_tools_initrd(tmp_path / "n2.img", "gzip"), original)
    assert store.refresh(state, UUID, None) == f"rebuilt: {original} changed"
    assert store.refresh(state, "11111111-2222-3333-4444-555555555555", None) is None


def test_a_tampered_initrd_is_rebuilt(tmp_path: Path) -> None:
    state, original, _rec = _built(tmp_path)
    built = store.initrd_path(state, UUID)
    built.write_bytes(b"evil")
    assert _check(state, original).startswith("initrd-rebuilt: ")
    assert built.read_bytes().endswith(OVERLAY)


def test_an_initrd_set_by_someone_else_is_not_libshares_business(tmp_path: Path) -> None:
    state, original, _rec = _built(tmp_path)
    assert _check(state, original, initrd="/srv/other-initrd.img") == "initrd-not-libshare"
    assert _check(state, original, current=None) == "initrd-not-libshare"


@pytest.mark.parametrize("case,match", [
    ("elsewhere", "is not .*/state/boot/"),
    ("symlinked folder", "is not .*/state/boot/"),
    ("no record", "record .* is missing"),
    ("record of another initrd", "built from another initrd"),
    ("original missing", "is missing: restore it"),
    ("overlay changed", "overlay .* does not match its record"),
    ("bad uuid", "is not a UUID"),
])
def test_what_cannot_be_verified_is_refused(tmp_path: Path, case: str, match: str) -> None:
    state, original, _rec = _built(tmp_path)
    folder = store.domain_dir(state, UUID)
    kw: dict[str, object] = {}
    if case == "elsewhere":   # a definition naming another state directory's initrd
        other = tmp_path / "other" / "boot" / UUID / "initrd.img"
        kw = {"initrd": str(other), "current": str(other)}
    elif case == "symlinked folder":
        moved = tmp_path / "moved"
        folder.rename(moved)
        folder.symlink_to(moved)
    elif case == "no record":
        (folder / store.RECORD).unlink()
    elif case == "record of another initrd":
        kw = {"previous": "/srv/another.img"}
    elif case == "original missing":
        original.unlink()
    elif case == "overlay changed":
        (folder / store.OVERLAY).write_bytes(b"x")
        os.replace(initramfs_tools_initrd(tmp_path / "n.img", "xz"), original)
    elif case == "bad uuid":
        kw = {"uuid": "../../etc"}
    with pytest.raises(RefusedError, match=match) as info:
        _check(state, original, **kw)
    assert "\n" not in str(info.value)


def test_records_that_are_not_records(tmp_path: Path) -> None:
    state, _original, _rec = _built(tmp_path)
    path = store.domain_dir(state, UUID) / store.RECORD
    for bad in (b"[]", b"{\"uuid\": 1}", b"x" * (store.MAX_RECORD + 1)):
        path.write_bytes(bad)
        assert store.load(state, UUID) is None
    doc = json.loads(json.dumps({**_rec.as_dict(), "uuid": "0" * 8 + "-0000-0000-0000-" + "0" * 12}))
    path.write_text(json.dumps(doc))
    assert store.load(state, UUID) is None                   # another domain's record


def test_remove(tmp_path: Path) -> None:
    state, _original, _rec = _built(tmp_path)
    assert store.remove(state, UUID) and not store.domain_dir(state, UUID).exists()
    assert not store.remove(state, UUID)
