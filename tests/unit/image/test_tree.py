"""The guest root tree of an image (libshare.image.tree) on fake trees: paths resolved as
the guest sees them (never out of the tree), what the tree is, writing and removing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libshare.errors import LibshareError, RefusedError
from libshare.image import tree


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("etc", "usr/lib/modules", "usr/sbin", "boot", "var/lib"):
        (root / d).mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")          # Debian 12's merged /usr
    return root


def test_resolve_follows_links_inside_the_tree_only(tmp_path: Path) -> None:
    root = _root(tmp_path)
    outside = tmp_path / "host-etc"
    outside.mkdir()
    os.symlink(str(outside), root / "etc" / "abs")         # absolute: the guest's, not ours
    os.symlink("../../../../..", root / "usr" / "up")      # climbs: stops at the root
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    assert tree.resolve(root, "/lib/modules") == root / "usr/lib/modules"
    assert tree.resolve(root, "/etc/abs/x") == root / str(outside).lstrip("/") / "x"
    assert tree.resolve(root, "/usr/up/etc") == root / "etc"
    assert tree.resolve(root, "/no/such/../file") == root / "no" / "file"
    with pytest.raises(LibshareError, match="too many symbolic links"):
        tree.resolve(root, "/loop1/x")


def test_writes_never_leave_the_tree(tmp_path: Path) -> None:
    """A folder that is an absolute link in the image (as a hostile or odd image may
    have) is followed inside the image: the host's folder of that name is untouched."""
    root = _root(tmp_path)
    host_dir = tmp_path / "host-sbin"
    host_dir.mkdir()
    (root / "usr" / "sbin").rmdir()
    os.symlink(str(host_dir), root / "usr" / "sbin")
    created: list[str] = []
    rec = tree.write_file(root, "/usr/sbin/libshare-redirect", b"#!/bin/sh\n", 0o755, created)
    assert list(host_dir.iterdir()) == []
    inside = root / str(host_dir).lstrip("/") / "libshare-redirect"
    assert inside.read_bytes() == b"#!/bin/sh\n" and oct(inside.stat().st_mode & 0o777) == "0o755"
    assert tree.check_entry(root, rec) == "ok"
    # a file that is a link is replaced, not followed
    target = tmp_path / "host-file"
    target.write_text("host")
    os.symlink(str(target), root / "etc" / "unit")
    tree.write_file(root, "/etc/unit", b"ours", 0o644, created)
    assert target.read_text() == "host" and (root / "etc" / "unit").read_bytes() == b"ours"


def test_write_check_and_remove(tmp_path: Path) -> None:
    root = _root(tmp_path)
    created: list[str] = []
    recs = [tree.write_file(root, "/usr/lib/dracut/modules.d/90libshare/module-setup.sh",
                            b"x", 0o755, created),
            tree.write_link(root, "/etc/systemd/system/multi-user.target.wants/u.service",
                            "/etc/systemd/system/u.service", created)]
    assert created == ["/usr/lib/dracut", "/usr/lib/dracut/modules.d",
                       "/usr/lib/dracut/modules.d/90libshare", "/etc/systemd",
                       "/etc/systemd/system", "/etc/systemd/system/multi-user.target.wants"]
    assert [tree.check_entry(root, r) for r in recs] == ["ok", "ok"]
    (root / "usr/lib/dracut/modules.d/90libshare/module-setup.sh").write_bytes(b"y")
    assert tree.check_entry(root, recs[0]) == "changed"
    (root / "usr/lib/dracut/modules.d/90libshare/module-setup.sh").chmod(0o644)
    for r in recs:
        assert tree.remove_entry(root, r["path"])
        assert not tree.remove_entry(root, r["path"])
        assert tree.check_entry(root, r) == "missing"
    (root / "etc/systemd/system/keep").write_text("not ours")
    gone = tree.remove_dirs(root, created)
    assert "/usr/lib/dracut" in gone and "/etc/systemd" not in gone
    assert not (root / "usr/lib/dracut").exists() and (root / "etc/systemd/system/keep").exists()
    assert not tree.remove_entry(root, "/etc/systemd")          # never a folder
    with pytest.raises(LibshareError, match="not a folder"):
        tree.make_dirs(root, "/etc/systemd/system/keep/sub", [])


def test_marker_round_trip(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert tree.read_marker(root) is None
    tree.write_marker(root, {"group": "web", "files": []}, [])
    assert tree.read_marker(root) == {"group": "web", "files": []}
    (root / tree.MARKER.lstrip("/")).write_text("{broken")
    assert tree.read_marker(root) is None


@pytest.mark.parametrize("text,family", [
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n', "debian"),
    ('ID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\n', "debian"),
    ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "rhel"),
    ("ID=fedora\n", "fedora"),
    ('ID="opensuse-leap"\nID_LIKE="suse opensuse"\n', "suse"),
])
def test_distribution(tmp_path: Path, text: str, family: str) -> None:
    root = _root(tmp_path)
    (root / "usr/lib/os-release").write_text(text)
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    dist = tree.distribution(root)
    assert dist.family == family and dist.id == tree.parse_os_release(text)["ID"]


def test_unknown_distribution_and_tools_are_refused(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with pytest.raises(RefusedError, match="no /etc/os-release"):
        tree.distribution(root)
    (root / "etc/os-release").write_text("ID=alpine\nVERSION_ID=3.19\n")
    with pytest.raises(RefusedError, match="unknown distribution 'alpine'"):
        tree.distribution(root)
    debian = tree.Distribution("debian", "12", "Debian 12", "debian")
    fedora = tree.Distribution("fedora", "40", "Fedora 40", "fedora")
    tree.check_tool(debian, "initramfs-tools")
    tree.check_tool(debian, "dracut")
    tree.check_tool(fedora, "dracut")
    with pytest.raises(RefusedError, match="no initramfs tool"):
        tree.check_tool(debian, "none")
    with pytest.raises(RefusedError, match="does not handle"):
        tree.check_tool(fedora, "initramfs-tools")


def test_kernels_fstab_and_initramfs_settings(tmp_path: Path) -> None:
    root = _root(tmp_path)
    for k in ("6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-1-amd64", "6.8.0-orphan"):
        (root / "usr/lib/modules" / k).mkdir()
    for k in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        (root / "boot" / f"vmlinuz-{k}").write_text("k")
    (root / "usr/lib/modules/5.10.0-1-amd64/vmlinuz").write_text("k")   # Fedora's place
    assert tree.kernels(root) == ["5.10.0-1-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]
    (root / "etc/fstab").write_text("# comment\nUUID=abc / ext4 defaults 0 1\n"
                                    "LABEL=boot /boot/ ext4 defaults 0 2 # trailing\n")
    assert tree.fstab(root) == {"/": "UUID=abc", "/boot": "LABEL=boot"}
    assert tree.initramfs_tools_modules(root) == "most"
    conf = root / "etc/initramfs-tools"
    (conf / "conf.d").mkdir(parents=True)
    (conf / "initramfs.conf").write_text("MODULES=most\n")
    (conf / "conf.d" / "zz").write_text('MODULES="dep"\n')
    tree.check_offline_build(root, "dracut")           # dracut runs --no-hostonly
    with pytest.raises(RefusedError, match="MODULES=dep"):
        tree.check_offline_build(root, "initramfs-tools")


def test_full_image_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _root(tmp_path)
    (root / "boot" / "initrd.img-6.1").write_bytes(b"\0" * 4096)

    class Full:
        f_bavail, f_frsize, f_favail = 2, 4096, 1000

    real = os.statvfs
    assert tree.check_free_space(root)["/"] > 0
    monkeypatch.setattr(tree.os, "statvfs",
                        lambda p: Full() if str(p).endswith("boot") else real(p))
    with pytest.raises(RefusedError, match="the image is full: its /boot has 0 MiB"):
        tree.check_free_space(root)


def test_chroot_needs_the_image_folders(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with pytest.raises(RefusedError, match="no /proc folder"):
        tree.chroot(root, ["/bin/true"])
