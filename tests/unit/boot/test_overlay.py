"""The archive libshare appends to a domain's own initrd: what the guest lists is
checked, the archive places everything under /usr/lib/libshare (one conf.d file aside,
nothing of the initrd replaced), its wrappers run the guest's tools with their own
loader and libraries only, and its conf.d snippet puts libshare's init-bottom script
first in ORDER, once, with nothing but sh builtins."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from libshare.boot import overlay
from libshare.data import guest_bytes, guest_path
from libshare.errors import LibshareError
from libshare.util import cpio
from tests.support.initrds import UDEV_ORDER, initramfs_tools_entries

LISTING = """exe mount /usr/bin/mount
lib libmount.so.1 /usr/lib/x86_64-linux-gnu/libmount.so.1.1.0
lib libc.so.6 /usr/lib/x86_64-linux-gnu/libc.so.6
interp ld-linux-x86-64.so.2 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
exe sleep /usr/bin/sleep
lib libc.so.6 /usr/lib/x86_64-linux-gnu/libc.so.6
interp ld-linux-x86-64.so.2 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
module libnvdimm.ko /lib/modules/6.1.0-50-amd64/kernel/drivers/nvdimm/libnvdimm.ko
module nfit.ko.xz /lib/modules/6.1.0-50-amd64/kernel/drivers/acpi/nfit/nfit.ko.xz
module libnvdimm.ko /lib/modules/6.1.0-50-amd64/kernel/drivers/nvdimm/libnvdimm.ko
builtin crc32c_generic
missing module nd_btt
"""


def _files(listing: overlay.Listing) -> dict[str, bytes]:
    out = {p: f"contents of {p}".encode() for p in overlay.listed_paths(listing)}
    out["/lib/modules/6.1.0-50-amd64/kernel/drivers/acpi/nfit/nfit.ko.xz"] = \
        lzma.compress(b"\x7fELF nfit module")
    return out


def _build(listing: overlay.Listing, files: dict[str, bytes]) -> bytes:
    return overlay.build(listing, files, "6.1.0-50-amd64", script=b"#!/bin/sh\n",
                         init_bottom=guest_bytes("init-bottom"),
                         conf=guest_bytes("initrd-conf"))


def test_listing() -> None:
    lst = overlay.parse_listing(LISTING)
    assert lst.exes == {"mount": ("/usr/bin/mount", "ld-linux-x86-64.so.2"),
                        "sleep": ("/usr/bin/sleep", "ld-linux-x86-64.so.2")}
    assert set(lst.libs) == {"libmount.so.1", "libc.so.6", "ld-linux-x86-64.so.2"}
    assert list(lst.modules) == ["libnvdimm.ko", "nfit.ko.xz"]
    assert lst.builtin == ["crc32c_generic"] and lst.missing == ["module nd_btt"]


@pytest.mark.parametrize("line", [
    "exe ../../etc/shadow /etc/shadow", "lib libc.so.6 relative/path", "exe a/b /usr/bin/x",
    "module evil.sh /lib/modules/x/evil.sh", "chmod 777 /", "lib .hidden /usr/lib/x",
])
def test_listing_from_a_hostile_guest_is_refused(line: str) -> None:
    with pytest.raises(LibshareError) as info:
        overlay.parse_listing(line + "\n")
    assert "\n" not in str(info.value)


def test_archive_layout() -> None:
    lst = overlay.parse_listing(LISTING)
    blob = _build(lst, _files(lst))
    assert blob == _build(lst, _files(lst))              # deterministic
    entries = {e.name: e for e in cpio.read_archive(blob)}
    files = {n for n, e in entries.items() if not stat.S_ISDIR(e.mode)}
    # nothing of the domain's own initrd is replaced: one conf.d file, the rest is ours
    assert {n for n in files if not n.startswith("usr/lib/libshare/")} == \
        {"conf/conf.d/libshare"}
    assert {n for n, e in entries.items() if stat.S_ISDIR(e.mode)} <= \
        {"conf", "conf/conf.d", "usr", "usr/lib", "usr/lib/libshare"} | \
        {n for n in entries if n.startswith("usr/lib/libshare/")}
    p = "usr/lib/libshare"
    assert entries[f"{p}/exe/mount"].data == b"contents of /usr/bin/mount"
    wrapper = entries[f"{p}/bin/mount"].data.decode()
    assert wrapper.startswith("#!/bin/sh\n") and stat.S_IMODE(entries[f"{p}/bin/mount"].mode) == 0o755
    assert (f"exec /{p}/lib/ld-linux-x86-64.so.2 --library-path /{p}/lib "
            f'/{p}/exe/mount "$@"') in wrapper
    assert entries[f"{p}/lib/libmount.so.1"].data.endswith(b"libmount.so.1.1.0")
    mods = f"{p}/modules/6.1.0-50-amd64"
    assert entries[f"{mods}/ORDER"].data == b"libnvdimm.ko\nnfit.ko\n"
    assert entries[f"{mods}/nfit.ko"].data == b"\x7fELF nfit module"   # unpacked
    assert entries[f"{p}/init-bottom"].data == guest_bytes("init-bottom")
    assert entries[f"{p}/initrd"].data == b"host\n"
    # the kernel pads by absolute offset: the overlay is appended 4-byte aligned
    base = cpio.write_archive(initramfs_tools_entries())
    names = [e.name for e in cpio.read_archive(base + b"\0" * 8 + blob)]
    assert "scripts/init-bottom/ORDER" in names and f"{p}/bin/mount" in names


def test_unlisted_or_oversized_files_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    lst = overlay.parse_listing(LISTING)
    files = _files(lst)
    del files["/usr/bin/sleep"]
    with pytest.raises(LibshareError, match="was not read"):
        _build(lst, files)
    monkeypatch.setattr(overlay, "MAX_TOTAL", 64)
    with pytest.raises(LibshareError, match="exceed"):
        _build(lst, _files(lst))
    with pytest.raises(LibshareError, match="kernel release"):
        overlay.build(lst, _files(lst), "../6.1", script=b"", init_bottom=b"", conf=b"")


def _unpack(entries: list[cpio.Entry], root: Path) -> None:
    for e in entries:
        target = root / e.name
        if stat.S_ISDIR(e.mode):
            target.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(e.data.decode())
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(e.data)
            target.chmod(stat.S_IMODE(e.mode))


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/bin/busybox").exists(),
                    reason="needs root (chroot) and a static /bin/busybox")
def test_wrappers_run_the_tools_with_their_own_libraries_only(tmp_path: Path) -> None:
    """This host's own tools, listed by the guest-side lister and placed by the
    overlay, run in a root that has no other libc (a static busybox as /bin/sh, as
    klibc's sh is in Debian's initramfs)."""
    listed = subprocess.run(["sh", str(guest_path("boot-files")), "files", "stat", "sleep",
                             "--"], capture_output=True, text=True, check=True).stdout
    lst = overlay.parse_listing(listed)
    files = {p: Path(p).read_bytes() for p in overlay.listed_paths(lst)}
    root = tmp_path / "initrd"
    _unpack(cpio.read_archive(overlay.build(
        lst, files, "6.1.0-50-amd64", script=b"", init_bottom=b"", conf=b"")), root)
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "sh")
    assert not (root / "lib").exists() and not (root / "usr/lib/x86_64-linux-gnu").exists()
    out = subprocess.run(["chroot", str(root), "/usr/lib/libshare/bin/stat", "-c", "%s",
                          "/usr/lib/libshare/initrd"], capture_output=True, text=True,
                         check=False, timeout=60)
    assert (out.returncode, out.stdout) == (0, "5\n"), out.stderr


def _source_conf(root: Path, order: bytes | None, times: int = 1) -> subprocess.CompletedProcess[str]:
    (root / "scripts/init-bottom").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/libshare").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/libshare/init-bottom").write_bytes(b"#!/bin/sh\n")
    if order is not None:
        (root / "scripts/init-bottom/ORDER").write_bytes(order)
    conf = guest_path("initrd-conf")
    script = f". {conf}; " * times + 'echo "alive $libshare_order"'
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False,
                          env={"PATH": "/nonexistent", "LIBSHARE_INITRD_ROOT": str(root)},
                          executable="/bin/dash" if Path("/bin/dash").exists() else None)


def test_conf_snippet_runs_libshare_first_once(tmp_path: Path) -> None:
    """Sourced as /init sources conf.d (twice here), with no program on PATH: ORDER
    runs libshare's script first, then the initrd's own, unchanged; nothing leaks."""
    proc = _source_conf(tmp_path, UDEV_ORDER, times=2)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "alive \n", "")
    assert (tmp_path / "scripts/init-bottom/ORDER").read_bytes() == (
        b'/usr/lib/libshare/init-bottom "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'
        + UDEV_ORDER)


@pytest.mark.parametrize("order", [
    b'/scripts/init-bottom/libshare "$@"\n' + UDEV_ORDER,     # the guest's own build
    None,                                                    # no ORDER: nothing to do
])
def test_conf_snippet_leaves_other_initrds_alone(tmp_path: Path, order: bytes | None) -> None:
    proc = _source_conf(tmp_path, order)
    assert proc.returncode == 0 and proc.stderr == ""
    path = tmp_path / "scripts/init-bottom/ORDER"
    assert (path.read_bytes() if path.exists() else None) == order
