"""Opening disk images (libshare.image.disk): partition tables as sfdisk reports them,
fstab sources, what the host must have, and which images are handled."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from libshare.errors import LibshareError, RefusedError
from libshare.image import disk

MBR = {"partitiontable": {"label": "dos", "id": "0x051ab116", "device": "/x/export",
                          "unit": "sectors", "sectorsize": 512, "partitions": [
                              {"node": "/x/export1", "start": 2048, "size": 8386560,
                               "type": "83", "bootable": True}]}}
GPT = {"partitiontable": {"label": "gpt", "id": "6F1B7C2A-0000", "sectorsize": 512,
                          "partitions": [
                              {"node": "/x/e1", "start": 2048, "size": 1048576,
                               "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                               "uuid": "AAAA-1111"},
                              {"node": "/x/e2", "start": 1050624, "size": 4096,
                               "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                               "uuid": "BBBB-2222"}]}}


def test_partition_tables() -> None:
    (p,) = disk.parse_partition_table(MBR)
    assert (p.number, p.start, p.size, p.partuuid) == (1, 1 << 20, 8386560 * 512,
                                                       "051ab116-01")
    efi, root = disk.parse_partition_table(GPT)
    assert (efi.number, root.number, root.start) == (1, 2, 1050624 * 512)
    assert root.partuuid == "bbbb-2222" and root.name() == "partition 2"
    assert disk.Partition(0, 0, 10).name() == "the whole disk"


def test_fstab_sources_find_their_partition() -> None:
    parts = [disk.Partition(1, 0, 1, partuuid="051ab116-01",
                            fs=disk.parse_blkid("TYPE=ext4\nUUID=u-1\nLABEL=boot\n")),
             disk.Partition(2, 1, 1, partuuid="051ab116-02", fs={"TYPE": "xfs", "UUID": "u-2"})]
    assert disk.find_partition(parts, "UUID=u-2") is parts[1]
    assert disk.find_partition(parts, 'LABEL="boot"') is parts[0]
    assert disk.find_partition(parts, "PARTUUID=051AB116-02") is parts[1]
    assert disk.find_partition(parts, "/dev/vda1") is None
    assert parts[0].fstype == "ext4"


def test_requirements_say_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk.os, "geteuid", lambda: 1000)
    with pytest.raises(RefusedError, match="image prepare needs root"):
        disk.check_requirements()
    monkeypatch.setattr(disk.os, "geteuid", lambda: 0)
    real = shutil.which
    monkeypatch.setattr(disk.shutil, "which",
                        lambda t: None if t in ("qemu-storage-daemon", "sfdisk") else real(t))
    with pytest.raises(LibshareError) as info:
        disk.check_requirements("image status")
    assert str(info.value) == ("image status needs qemu-storage-daemon (Debian package "
                               "qemu-system-common), sfdisk (Debian package fdisk)")
    monkeypatch.setattr(disk.shutil, "which", lambda t: "/usr/bin/" + t)
    monkeypatch.setattr(disk, "FUSE_DEVICE", Path("/nonexistent/fuse"))
    with pytest.raises(LibshareError, match="needs /nonexistent/fuse"):
        disk.check_requirements()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_image_info_handles_qcow2_and_raw_only(tmp_path: Path) -> None:
    with pytest.raises(RefusedError, match="does not exist"):
        disk.image_info(tmp_path / "none.qcow2")
    with pytest.raises(RefusedError, match="not a regular file"):
        disk.image_info(tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    over = tmp_path / "over.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(raw),
                    str(over)], check=True)
    os.symlink(over, tmp_path / "link.qcow2")
    info = disk.image_info(tmp_path / "link.qcow2")
    assert (info.path, info.format, info.virtual_size) == (over, "qcow2", 65536)
    assert info.chain == (str(over), str(raw))
    assert disk.backing_chain(str(over)) == [str(over), str(raw)]
    assert disk.backing_chain(str(tmp_path / "missing")) == []
    assert disk.image_info(raw).format == "raw"
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    with pytest.raises(RefusedError, match="is a vmdk image"):
        disk.image_info(vmdk)
    assert disk.loop_devices(raw) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace)")
def test_work_runs_in_a_child_with_private_mounts(tmp_path: Path) -> None:
    """What the child mounts is not seen here and ends with it; its result and its
    LibshareError come back."""
    target = tmp_path / "mnt"
    target.mkdir()

    def mount_and_look() -> bool:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
        return disk._is_mountpoint(target)

    assert disk.run_private(mount_and_look) is True
    assert not disk._is_mountpoint(target)

    def refuse() -> None:
        raise RefusedError("in the child")

    with pytest.raises(RefusedError, match="in the child"):
        disk.run_private(refuse)
    with pytest.raises(LibshareError, match="ZeroDivisionError"):
        disk.run_private(lambda: 1 // 0)
