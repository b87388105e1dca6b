"""libshare.image.prepare without images: the records it compares, the command line's
refusals (one line, exit status), and what counts as using an image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libshare import cli
from libshare.image import disk, prepare, tree
from libshare.redirect import actions


def test_records_match_what_the_tree_writes(tmp_path: Path) -> None:
    """An image is current when its record holds, per needed file, exactly what
    writing this libshare's file makes: the two must agree."""
    root = tmp_path / "root"
    root.mkdir()
    for f in actions.GUEST_FILES:
        if f.source is None:
            assert f.link is not None
            written = tree.write_link(root, f.path, f.link, [])
        else:
            written = tree.write_file(root, f.path, actions.guest_file_bytes(f.source),
                                      f.mode, [])
        assert written == prepare._record_of(f)
        assert tree.check_entry(root, written) == "ok"


def test_cli_refuses_without_root(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(disk.os, "geteuid", lambda: 1000)
    for action in ("prepare", "status", "unprepare"):
        assert cli.main(["image", action, "/nonexistent.qcow2"]) == 1
        err = capsys.readouterr().err
        assert err == f"libshare: image {action} needs root (a FUSE export, loop devices, " \
                      "mounts, chroot)\n"
    assert cli.main(["image", "prepare", "x.qcow2", "--group", "bad group"]) == 2
    assert "--group" in capsys.readouterr().err


def test_domains_whose_chain_names_the_image(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """A domain uses the image when the image is its disk or in its disk's backing chain;
    libvirt that cannot answer is an error, never a guess."""
    from contextlib import contextmanager

    from libshare.errors import LibshareError
    from libshare.virt import api

    info = disk.ImageInfo(tmp_path / "tpl.qcow2", "qcow2", 1 << 30)
    chains = {"/d/web1.qcow2": [str(tmp_path / "web1.qcow2"), str(info.path)],
              "/d/db.qcow2": ["/d/db.qcow2", "/base/other.qcow2"],
              str(info.path): [str(info.path)]}

    @contextmanager
    def connect(uri: str) -> Any:
        yield object()

    monkeypatch.setattr(api, "connect", connect)
    monkeypatch.setattr(api, "domain_disk_files", lambda conn: {
        "web1": (False, {"/d/web1.qcow2"}), "db": (True, {"/d/db.qcow2"}),
        "tpl-vm": (True, {str(info.path)})})
    monkeypatch.setattr(disk, "backing_chain", lambda f: chains.get(f, []))
    assert prepare.domains_using(info, "qemu:///system") == [("tpl-vm", True),
                                                             ("web1", False)]

    def broken(conn: Any) -> Any:
        raise LibshareError("cannot list domains: nope")

    monkeypatch.setattr(api, "domain_disk_files", broken)
    with pytest.raises(LibshareError, match="cannot check which domains use"):
        prepare.domains_using(info, "qemu:///system")
