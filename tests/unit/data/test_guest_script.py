"""The guest-side ``libshare-redirect`` script, run on the host against a fake root.

A real region image is built from a few host libraries; its filesystem part is attached
to a read-only loop device (what a guest sees as /dev/pmemN, minus DAX), the fake root
holds copies of the libraries, one of them differing by one byte. Needs root (loop
devices, mounts); skipped otherwise. Every mount and loop device is removed afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libshare.config import Config
from libshare.data import guest_path
from libshare.errors import LibshareError
from libshare.redirect import actions
from libshare.sharing.region import build, layout
from libshare.sharing.store import import_tree
from libshare.util.digest import sha256_file
from tests.support.images import make_guest_tree

SCRIPT = guest_path("libshare-redirect")
LIBDIR = "usr/lib/x86_64-linux-gnu"
LIBS = ["libz.so.1", "libacl.so.1", "libattr.so.1"]
SHELL_FILES = ["libshare-redirect", "initramfs-hook", "init-bottom", "dracut-module-setup.sh",
               "dracut-pre-pivot.sh", "boot-files", "initrd-conf", "grub-default.cfg"]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("mkfs.erofs") is None,
    reason="needs root, losetup and mkfs.erofs (loop devices and mounts)")


@pytest.mark.parametrize("name", SHELL_FILES)
def test_shell_syntax(name: str) -> None:
    path = SCRIPT.parent / name
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stdout


def test_guest_file_table_is_read_from_the_script() -> None:
    """The host installs what the script's GUEST_FILES table lists (the list the
    script's uninstall removes): the script itself, its boot-time hooks, the unit and
    its enabling link; every listed file is shipped; a malformed table is refused."""
    paths = {f.path: f for f in actions.GUEST_FILES}
    assert paths["/usr/sbin/libshare-redirect"].mode == 0o755
    assert paths["/usr/sbin/libshare-redirect"].source == "libshare-redirect"
    link = paths["/etc/systemd/system/multi-user.target.wants/libshare-redirect.service"]
    assert link.source is None and link.link == "/etc/systemd/system/libshare-redirect.service"
    for f in actions.GUEST_FILES:
        if f.source:
            assert actions.guest_file_bytes(f.source)
    for bad in ("x=1\n", 'GUEST_FILES="a b"\n', 'GUEST_FILES="- 644 /a"\n'):
        with pytest.raises(LibshareError):
            actions.parse_guest_files("#!/bin/sh\n" + bad)


@dataclass
class Fake:
    """A fake guest: root tree, run dir, region loop device, manifest lines."""

    base: Path
    root: Path
    run: Path
    loop: str
    manifest: list[list[str]]

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "LIBSHARE_RUN": str(self.run), "LIBSHARE_DEVICES": self.loop,
                "LIBSHARE_ALLOW_NODAX": "1", **extra}

    def run_script(self, *args: str, root: bool = True, **extra: str) -> dict[str, Any]:
        argv = ["sh", str(SCRIPT), *args] + (["--root", str(self.root)] if root else [])
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env(**extra),
                              check=False, timeout=120)
        assert proc.returncode == 0, proc
        kv = actions.parse_kv(proc.stdout)
        kv["_stderr"] = proc.stderr
        return kv

    def mounts(self) -> list[str]:
        """Return the mount points under the fake base directory."""
        out = []
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                mp = _mount_point(line.split()[4])
                if mp.startswith(str(self.base)):
                    out.append(mp)
        return out


def _mount_point(field: str) -> str:
    """Return a mount point as /proc/self/mountinfo writes it, unescaped (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _umount_all(base: Path) -> None:
    for _ in range(3):
        with open("/proc/self/mountinfo") as fh:
            mps = [_mount_point(line.split()[4]) for line in fh
                   if line.split()[4].startswith(str(base))]
        for mp in reversed(mps):
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Fake]:
    tree = tmp_path / "tree"
    (tree / LIBDIR).mkdir(parents=True)
    for name in LIBS:
        src = Path("/lib/x86_64-linux-gnu") / name
        if not src.exists():
            pytest.skip(f"{src} missing")
        shutil.copyfile(os.path.realpath(src), tree / LIBDIR / name)
    os.symlink("libz.so.1", tree / LIBDIR / "libz.so")
    cfg = Config(state_dir=tmp_path / "state")
    import_tree(cfg.store_dir, [tree])
    res = build.build_region(cfg, "t")
    root = tmp_path / "root"
    shutil.copytree(tree, root, symlinks=True)
    acl = root / LIBDIR / "libacl.so.1"          # differs by one byte, same size
    data = bytearray(acl.read_bytes())
    data[100] ^= 0xFF
    acl.write_bytes(bytes(data))
    loop = subprocess.run(["losetup", "-f", "--show", "-r", "-o", str(layout.DATAOFF),
                           res.path], capture_output=True, text=True, check=True).stdout.strip()
    manifest: list[list[str]] = []
    try:
        mnt = tmp_path / "peek"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro", loop, str(mnt)], check=True)
        try:
            # (sha256, size, region path, guest path) of every file the region serves
            manifest = [line.split("\t") for line in
                        (mnt / ".libshare/manifest.tsv").read_text().splitlines()]
            for line in (mnt / ".libshare/tree.tsv").read_text().splitlines():
                tid, path, kind, _m, _u, _g, size, sha, _o = line.split("\t")
                if kind == "f":
                    manifest.append([sha, size, f"/tree/{tid}{path}", path])
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        yield Fake(tmp_path, root, tmp_path / "run", loop, manifest)
    finally:
        _umount_all(tmp_path)
        subprocess.run(["losetup", "-d", loop], check=False)


def _bound_paths(fake: Fake) -> set[str]:
    binds = fake.run / "binds"
    if not binds.exists():
        return set()
    return {line.split("\t")[0] for line in binds.read_text().splitlines()}


@needs_root
def test_apply_binds_identical_files_only_and_remove_undoes_it(fake: Fake) -> None:
    out = fake.run_script("apply", "--no-restart")
    assert out["region_device"] == fake.loop
    want = {f"/{LIBDIR}/libz.so.1", f"/{LIBDIR}/libattr.so.1"}
    assert _bound_paths(fake) == want
    assert out["bound"] == "2" and out["hashed"] == "3" and out["cached"] == "0"
    assert out["differs"] == [f"/{LIBDIR}/libacl.so.1"]   # one byte differs: never bound
    assert out["missing"] == "1"                          # the libz.so symlink is skipped
    # the guest path now reads the region's copy (same bytes), on the region's device
    region_dev = os.stat(fake.run / "region").st_dev
    for p in want:
        st = os.stat(str(fake.root) + p)
        assert st.st_dev == region_dev
        sha = next(m[0] for m in fake.manifest if m[3] == p)
        assert actions.parse_kv(subprocess.run(
            ["sh", "-c", f"echo sha=$(sha256sum {fake.root}{p} | cut -d' ' -f1)"],
            capture_output=True, text=True, check=True).stdout)["sha"] == sha
    assert os.stat(fake.root / LIBDIR / "libacl.so.1").st_dev != region_dev
    assert set(fake.mounts()) == {str(fake.run / "region")} | {str(fake.root) + p
                                                               for p in want}
    # a second apply binds nothing twice and reads no file again (verdict cache)
    again = fake.run_script("apply", "--no-restart")
    assert again["bound"] == "0" and again["already"] == "2" and again["hashed"] == "0"
    assert again["cached"] == "3"                   # every file looked at, none re-read
    assert len(fake.mounts()) == 3
    status = fake.run_script("status")
    assert status["binds"] == "2" and status["region_mounted"] == "1"
    assert status["mode"] == "runtime" and status["boot_mode"] == "0"
    # remove undoes exactly that: no mount left, the record gone
    out = fake.run_script("remove", "--no-restart")
    assert out["removed"] == "2" and out["region_unmounted"] == "1"
    assert fake.mounts() == []
    assert not (fake.run / "binds").exists()
    assert os.stat(fake.root / LIBDIR / "libz.so.1").st_dev == os.stat(fake.root).st_dev


@needs_root
def test_remove_detach_lets_go_of_files_in_use(fake: Fake) -> None:
    """The unit's ExecStop (shutdown): one lazy umount for all, even a file held open."""
    fake.run_script("apply", "--no-restart")
    with open(str(fake.root) + f"/{LIBDIR}/libz.so.1", "rb") as held:  # a busy bind
        out = fake.run_script("remove", "--no-restart", "--detach")
        assert out["removed"] == "2" and out["region_unmounted"] == "1"
        assert fake.mounts() == []
        assert held.read(4) == b"\x7fELF"                       # still readable


def _verdicts(table: Path) -> dict[str, tuple[str, str]]:
    """Return guest path -> (key, sha256) of the guest script's verdict table."""
    out = {}
    for line in table.read_text().splitlines():
        path, key, sha = line.split("\t")
        out[path] = (key, sha)
    return out


@needs_root
def test_verdicts_follow_file_changes(fake: Fake) -> None:
    fake.run_script("apply", "--no-restart")
    table = fake.root / "var/lib/libshare/verdicts.tsv"
    acl = f"/{LIBDIR}/libacl.so.1"
    key, sha = _verdicts(table)[acl]
    st = os.stat(fake.root / LIBDIR / "libacl.so.1")
    assert key.split(":")[:2] == [str(st.st_ino), str(st.st_size)]
    fake.run_script("remove", "--no-restart")
    # a package update replaces the differing file with the region's bytes (new inode)
    good = next(m for m in fake.manifest if m[3].endswith("libacl.so.1"))
    src = fake.base / "tree" / LIBDIR / "libacl.so.1"
    new = fake.root / LIBDIR / "libacl.so.1.dpkg-new"
    shutil.copyfile(src, new)
    os.replace(new, fake.root / LIBDIR / "libacl.so.1")
    out = fake.run_script("apply", "--no-restart")
    assert out["hashed"] == "1" and out["cached"] == "2"
    assert _verdicts(table)[acl][1] == good[0] != sha
    # every file of the tree is now identical: its directory is bound whole, once
    assert out["bound"] == "1" and out["dirs_bound"] == "1" and out["files_bound"] == "0"
    assert set(fake.mounts()) == {str(fake.run / "region"), str(fake.root / "usr/lib")}
    # and a file changed in place with the same size is re-read, then not bound
    fake.run_script("remove", "--no-restart")
    target = fake.root / LIBDIR / "libz.so.1"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    out = fake.run_script("apply", "--no-restart")
    assert f"/{LIBDIR}/libz.so.1" in out["differs"] and out["hashed"] == "1"
    assert f"/{LIBDIR}/libz.so.1" not in _bound_paths(fake)


@needs_root
def test_prime_records_verdicts_and_binds_nothing(fake: Fake) -> None:
    out = fake.run_script("prime")
    assert out["identical"] == "2" and out["hashed"] == "3" and "bound" not in out
    assert fake.mounts() == [] and not (fake.run / "binds").exists()
    out = fake.run_script("apply", "--no-restart", "--boot")
    assert out["bound"] == "2" and out["hashed"] == "0" and out["cached"] == "3"
    assert out["plan"] == "kept"                      # prime's decision, not made again
    # libshare's own state on the guest's disk leaves nothing in its page cache
    state = fake.root / "var/lib/libshare"
    for f in (state / "verdicts.tsv", state / "plan/list", state / "plan/served"):
        assert f.exists() and _resident(f) == 0, f


@needs_root
def test_hashing_does_not_fill_the_page_cache(fake: Fake) -> None:
    target = fake.root / LIBDIR / "libz.so.1"
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = _resident(target)
    fake.run_script("apply", "--no-restart")
    fake.run_script("remove", "--no-restart")
    assert before == 0 and _resident(target) == 0


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@needs_root
def test_read_only_root_keeps_verdicts_in_run_until_sync(fake: Fake) -> None:
    state = fake.base / "ro-state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(state)], check=True)
    try:
        out = fake.run_script("apply", "--no-restart", "--boot", LIBSHARE_STATE=str(state))
        assert out["bound"] == "2"
        assert f"/{LIBDIR}/libz.so.1" in _verdicts(fake.run / "verdicts.tsv")
        fake.run_script("remove", "--no-restart", LIBSHARE_STATE=str(state))
    finally:
        subprocess.run(["umount", str(state)], check=True)
    out = fake.run_script("sync", root=False, LIBSHARE_STATE=str(state))
    assert out["synced"] == "1"
    assert f"/{LIBDIR}/libz.so.1" in _verdicts(state / "verdicts.tsv")
    assert not (fake.run / "verdicts.tsv").exists()


@needs_root
def test_refusals_change_nothing(fake: Fake) -> None:
    # without DAX (a loop device has none) the script refuses and leaves nothing mounted
    kv = fake.run_script("apply", "--no-restart", LIBSHARE_ALLOW_NODAX="0")
    assert "DAX is not active" in str(kv["refused"]) and "bound" not in kv
    assert fake.mounts() == []
    assert "DAX is not active" in str(kv["_stderr"])
    probe = fake.run_script("probe", root=False, LIBSHARE_ALLOW_NODAX="0")
    assert probe["dax"] == "0" and "DAX" in str(probe["refused"])
    # no device labelled libshare: nothing to do
    kv = fake.run_script("apply", "--no-restart", LIBSHARE_DEVICES="/dev/null")
    assert kv["refused"] == "no region device"
    assert fake.mounts() == [] and not (fake.run / "binds").exists()
    assert not (fake.root / "var").exists()          # not even a verdict written


@needs_root
def test_uninstall_removes_binds_and_files(fake: Fake) -> None:
    for f in actions.GUEST_FILES:
        p = Path(str(fake.root) + f.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    fake.run_script("apply", "--no-restart")
    out = fake.run_script("uninstall", "--no-restart")
    assert out["removed"] == "2"
    assert sorted(out["deleted"]) == sorted(f.path for f in actions.GUEST_FILES)
    assert fake.mounts() == []
    assert not (fake.root / "var/lib/libshare").exists()
    for f in actions.GUEST_FILES:
        assert not Path(str(fake.root) + f.path).exists()
    assert not (fake.root / "usr/lib/dracut/modules.d/90libshare").exists()
    assert (fake.root / "usr/lib/dracut/modules.d").is_dir()


def test_usage_errors() -> None:
    for args in ([], ["bogus"], ["apply", "--root"], ["apply", "remove"]):
        proc = subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 2 and "usage" in proc.stderr


def test_script_can_be_sourced_without_running(tmp_path: Path) -> None:
    """With LIBSHARE_REDIRECT_MAIN=noop the script only defines its functions: a test
    can call one step alone (here the option parser, the path setup and has_dax)."""
    out = subprocess.run(
        ["sh", "-c", f'. "{SCRIPT}"; parse_args status --root /r/; set_paths; '
         'echo "cmd=$CMD root=$ROOT binds=$BINDS"; '
         'has_dax ro,relatime,dax=always && echo dax; has_dax ro,relatime || echo nodax'],
        env={"LIBSHARE_REDIRECT_MAIN": "noop", "PATH": "/usr/bin:/bin",
             "LIBSHARE_RUN": str(tmp_path / "run")},
        capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"cmd=status root=/r binds={tmp_path}/run/binds",
                                       "dax", "nodax"]
    # sourcing defines, it does not run: no usage error, nothing printed
    quiet = subprocess.run(["sh", "-c", f'. "{SCRIPT}"; echo sourced'],
                           env={"LIBSHARE_REDIRECT_MAIN": "noop", "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=30, check=False)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "sourced\n", "")


def test_boot_hooks_take_their_lists_from_the_script() -> None:
    """The initramfs-tools hook and the dracut module read the tools and kernel modules
    'apply --boot' needs from the script (BOOT_TOOLS, BOOT_MODULES), the one list."""
    lists = subprocess.run(["sh", "-c", f'. "{SCRIPT}"; echo "$BOOT_TOOLS"; echo "$BOOT_MODULES"'],
                           env={"LIBSHARE_REDIRECT_MAIN": "noop", "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, check=True).stdout.splitlines()
    tools, modules = lists[0].split(), lists[1].split()
    assert {"blkid", "mount", "dd", "sha256sum", "timeout"} <= set(tools)
    assert {"nfit", "nd_pmem", "dax_pmem", "erofs"} <= set(modules)
    setup = SCRIPT.parent / "dracut-module-setup.sh"
    got = subprocess.run(
        ["bash", "-c", f'. "{setup}"; LIBSHARE_SCRIPT="{SCRIPT}"; '
         'libshare_list BOOT_TOOLS; libshare_list BOOT_MODULES; check && echo included'],
        env={"PATH": "/usr/bin:/bin", "dracutsysrootdir": ""}, capture_output=True,
        text=True, check=True).stdout.splitlines()
    assert got == [" ".join(tools), " ".join(modules), "included"]
    hook = (SCRIPT.parent / "initramfs-hook").read_text()
    assert "boot_list BOOT_TOOLS" in hook and "boot_list BOOT_MODULES" in hook
    assert "sha256sum" not in hook                   # no list of its own
    pivot = (SCRIPT.parent / "dracut-pre-pivot.sh").read_text()
    assert "\nexit" not in pivot and " exit " not in pivot   # sourced by dracut: never exits
    assert 'apply --boot --root "${NEWROOT:-/sysroot}"' in pivot


def test_dracut_hook_records_what_the_boot_did(tmp_path: Path) -> None:
    """dracut's pre-pivot hook keeps the same record of this boot as init-bottom (for
    'status'): with the script missing from the initramfs, a refusal saying so."""
    if Path("/usr/lib/libshare/libshare-redirect").exists():
        pytest.skip("this host has libshare's initramfs copy of the script")
    pivot = SCRIPT.parent / "dracut-pre-pivot.sh"
    run = tmp_path / "run"
    subprocess.run(["sh", "-c", f'. "{pivot}"; echo "sourced"'], check=True, timeout=30,
                   env={"PATH": "/usr/bin:/bin", "LIBSHARE_RUN": str(run)},
                   capture_output=True)
    kv = actions.parse_kv((run / "boot.out").read_text())
    assert kv["via"] == "guest" and kv["release"] == os.uname().release
    assert kv["refused"] == "/usr/lib/libshare/libshare-redirect missing from the initramfs"


def test_detect_and_initramfs_on_this_host() -> None:
    """'detect' names the initramfs tool and package managers; 'initramfs' without a
    tool refuses with one line and changes nothing."""
    out = subprocess.run(["sh", str(SCRIPT), "detect"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    kv = actions.parse_kv(out)
    assert kv["initramfs_tool"] in ("initramfs-tools", "dracut", "none")
    assert set(kv["package_tools"].split()) <= {"apt", "dpkg", "rpm"}
    if shutil.which("dpkg"):
        assert "dpkg" in kv["package_tools"].split()
    if kv["initramfs_tool"] == "none":
        proc = subprocess.run(["sh", str(SCRIPT), "initramfs", "--kver", "0.0"],
                              capture_output=True, text=True, check=False, timeout=30)
        assert proc.returncode == 0
        assert actions.parse_kv(proc.stdout)["refused"].startswith("no initramfs tool")


# ------------------------------------------------------------------ directory binds

AWKS = [a for a in ("mawk", "gawk") if shutil.which(a)]


@pytest.fixture
def usr_fake(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fake]:
    """A fake guest whose /usr is the region's ``usr`` tree (libshare installed in it,
    as ``guest install`` leaves a guest), and a region built from that tree (EROFS, or
    the filesystem the test's ``fs`` parameter names)."""
    tree = make_guest_tree(tmp_path)
    cfg = Config(state_dir=tmp_path / "state")
    import_tree(cfg.store_dir, [tree])
    fs = getattr(request, "param", "erofs")
    res = build.build_region(cfg, "t", policy="usr", filesystem=fs)
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(tree), str(root)], check=True)
    script = root / "usr/sbin/libshare-redirect"
    shutil.copyfile(SCRIPT, script)
    os.chmod(script, 0o755)
    loop = subprocess.run(["losetup", "-f", "--show", "-r", "-o", str(layout.DATAOFF),
                           res.path], capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield Fake(tmp_path, root, tmp_path / "run", loop, [])
    finally:
        _umount_all(tmp_path)
        subprocess.run(["losetup", "-d", loop], check=False)


def _binds(fake: Fake) -> dict[str, str]:
    """Return guest path -> kind ("dir" or the sha256) of the binds recorded."""
    return {f[0]: f[2] for f in (line.split("\t") for line in
                                 (fake.run / "binds").read_text().splitlines())}


def _dev(path: Path) -> int:
    return os.stat(path).st_dev


@needs_root
@pytest.mark.parametrize(("awk", "usr_fake"), [(a, "erofs") for a in AWKS] + [("awk", "ext4")],
                         indirect=["usr_fake"])
def test_identical_usr_is_bound_in_a_few_directory_binds(usr_fake: Fake, awk: str) -> None:
    fake = usr_fake
    out = fake.run_script("apply", "--no-restart", LIBSHARE_AWK=awk)
    assert out["differs_count"] == "0" and out["failed"] == "0"
    dirs = {"/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share"}
    assert _binds(fake) == {d: "dir" for d in dirs}
    assert out["dirs_bound"] == "4" and out["files_bound"] == "0" and out["bound"] == "4"
    assert set(fake.mounts()) == {str(fake.run / "region")} | {str(fake.root) + d
                                                               for d in dirs}
    region = _dev(fake.run / "region")
    r = fake.root
    assert _dev(r / "usr/bin/hello") == region and _dev(r / "usr/lib/modules") == region
    # the guest sees its own modes and owners, setuid and setgid included
    assert os.stat(r / "usr/bin/suprog").st_mode & 0o7777 == 0o4755
    sg = os.stat(r / "usr/bin/sgprog")
    assert (sg.st_mode & 0o7777, sg.st_gid) == (0o2755, 42)
    assert os.readlink(r / "usr/bin/prog2") == "prog"
    assert (r / "usr/share/empty").is_dir() and (r / "usr/share/doc/other/read me").exists()
    # never /usr itself, /usr/local stays writable, /etc is not the usr policy's
    assert _dev(r / "usr/local/bin") == _dev(r) and os.access(r / "usr/local/bin", os.W_OK)
    assert _dev(r / "etc/copyright") == _dev(r)
    served = (fake.run / "manifest.tsv").read_text()
    assert "\t/usr/bin/hello\n" in served and "/etc/copyright" not in served
    assert out["plan"] == "new"
    again = fake.run_script("apply", "--no-restart", LIBSHARE_AWK=awk)
    assert again["bound"] == "0" and again["already"] == "4" and again["hashed"] == "0"
    out = fake.run_script("remove", "--no-restart")
    assert out["removed"] == "4" and fake.mounts() == []
    assert _dev(r / "usr/bin/hello") == _dev(r)
    # nothing changed: the next apply from scratch (a boot) reads the plan kept
    out = fake.run_script("apply", "--no-restart", "--boot", LIBSHARE_AWK=awk)
    assert out["plan"] == "kept" and _binds(fake) == {d: "dir" for d in dirs}
    # ... without caching any of it: the guest's page cache holds none of libshare's state
    plan = [str(fake.root / "var/lib/libshare/plan" / n) for n in ("list", "fstab", "want")]
    res = subprocess.run(["fincore", "-n", "-b", "-o", "RES,FILE", *plan],
                         capture_output=True, text=True, check=True).stdout
    assert [ln.split()[0] for ln in res.splitlines()] == ["0"] * 3, res
    assert out["identical"] == again["identical"] and out["bound"] == "4"
    fake.run_script("remove", "--no-restart")


@needs_root
def test_a_differing_file_keeps_its_own_copy_and_nothing_else(usr_fake: Fake) -> None:
    fake, r = usr_fake, usr_fake.root
    hello = r / "usr/bin/hello"
    data = bytearray(hello.read_bytes())
    data[-2] ^= 1                                       # one byte, same size
    hello.write_bytes(bytes(data))
    out = fake.run_script("apply", "--no-restart")
    assert out["differs"] == ["/usr/bin/hello"]
    binds = _binds(fake)
    assert "/usr/bin" not in binds and {"/usr/sbin", "/usr/lib", "/usr/share"} <= set(binds)
    region = _dev(fake.run / "region")
    assert _dev(hello) == _dev(r) and hello.read_bytes() == bytes(data)
    for name in ("prog", "suprog", "sgprog"):           # every other file of /usr/bin
        assert binds[f"/usr/bin/{name}"] != "dir" and _dev(r / "usr/bin" / name) == region
    assert os.stat(r / "usr/bin/suprog").st_mode & 0o7777 == 0o4755
    assert out["files_bound"] == "3" and out["dirs_bound"] == "3"


@needs_root
def test_extra_names_and_other_modes_are_never_covered(usr_fake: Fake) -> None:
    fake, r = usr_fake, usr_fake.root
    (r / "usr/share/doc/pkg/mine").write_text("only in this guest\n")
    os.chmod(r / "usr/sbin/sprog", 0o700)
    (r / "usr/lib/systemd/system/local.service").write_text("[Unit]\n")
    out = fake.run_script("apply", "--no-restart")
    binds = _binds(fake)
    region = _dev(fake.run / "region")
    # the extra file stays visible: its directories are not bound whole, but the
    # identical directories beside it are, and its identical neighbours alone
    assert "/usr/share" not in binds and binds["/usr/share/doc/other"] == "dir"
    assert (r / "usr/share/doc/pkg/mine").read_text() == "only in this guest\n"
    assert _dev(r / "usr/share/doc/pkg/copyright") == region
    assert "/usr/share/doc/pkg/empty" not in binds             # nothing to serve
    # a mode of its own: that file is not served (and /usr/sbin not whole)
    assert "/usr/sbin" not in binds and "/usr/sbin/sprog" not in binds
    assert os.stat(r / "usr/sbin/sprog").st_mode & 0o777 == 0o700
    assert binds["/usr/sbin/libshare-redirect"] != "dir"
    # names fstab cannot carry are bound alone (a space, a backslash)
    assert _dev(r / "usr/lib/systemd/system/system-foo\\x2dbar.slice") == region
    assert "/usr/lib/systemd/system/system-foo\\x2dbar.slice" in binds
    assert out["failed"] == "0" and out["differs"] == ["/usr/sbin/sprog"]
    out = fake.run_script("remove", "--no-restart")
    assert fake.mounts() == []


@needs_root
def test_package_update_under_a_directory_bind(usr_fake: Fake) -> None:
    """What the dpkg hooks do: remove every bind, dpkg changes files, apply again binds
    what is still identical; putting the region's bytes back gives the directory back."""
    fake, r = usr_fake, usr_fake.root
    fake.run_script("apply", "--no-restart")
    assert _binds(fake)["/usr/bin"] == "dir"
    fake.run_script("remove", "--no-restart")
    prog = r / "usr/bin/prog"
    original = prog.read_bytes()
    new = r / "usr/bin/prog.dpkg-new"
    new.write_bytes(original + b"\0new version")
    os.chmod(new, 0o755)
    os.replace(new, prog)
    out = fake.run_script("apply", "--no-restart")
    assert out["differs"] == ["/usr/bin/prog"] and out["hashed"] == "0"   # other size
    assert out["plan"] == "new"                               # not the plan kept before
    assert "/usr/bin" not in _binds(fake) and _dev(prog) == _dev(r)
    assert prog.read_bytes().endswith(b"new version")
    fake.run_script("remove", "--no-restart")
    prog.write_bytes(original)
    out = fake.run_script("apply", "--no-restart")
    assert _binds(fake)["/usr/bin"] == "dir" and out["hashed"] == "1"


@needs_root
def test_many_files_are_hashed_in_one_batch(usr_fake: Fake) -> None:
    fake = usr_fake
    out = fake.run_script("prime", LIBSHARE_HASH_DIRECT_MAX="0")
    table = _verdicts(fake.root / "var/lib/libshare/verdicts.tsv")
    files = [p for p in fake.root.rglob("*") if p.is_file() and not p.is_symlink()
             and str(p.relative_to(fake.root)).startswith("usr/")]
    assert out["hashed"] == str(len(files)) == str(len(table))
    for p in files:
        guest = "/" + str(p.relative_to(fake.root))
        assert table[guest][1] == sha256_file(p), guest      # names with \\ and spaces too
    assert out["identical"] == str(len(files)) and fake.mounts() == []
    assert fake.run_script("prime")["hashed"] == "0"


def test_status_reports_what_the_boot_did(tmp_path: Path) -> None:
    """init-bottom's record of this boot (refusal reason included) reaches status; a
    script newer than the boot says it was installed after it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "boot.out").write_text("via=host\nrelease=6.1.0-50-amd64\nmodules=1\n"
                                  "region_device=/dev/pmem0\nrefused=DAX is not active on "
                                  "/dev/pmem0\nrc=0\n")
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/libshare-redirect").write_bytes(SCRIPT.read_bytes())
    env = {**os.environ, "LIBSHARE_RUN": str(run), "LIBSHARE_DEVICES": str(tmp_path / "none")}

    def status() -> dict[str, Any]:
        out = subprocess.run(["sh", str(SCRIPT), "status", "--root", str(root)],
                             capture_output=True, text=True, env=env, check=True).stdout
        return actions.parse_kv(out)

    kv = status()
    assert (kv["boot_ran"], kv["boot_via"], kv["boot_release"], kv["boot_modules"],
            kv["boot_rc"]) == ("1", "host", "6.1.0-50-amd64", "1", "0")
    assert kv["boot_refused"] == "DAX is not active on /dev/pmem0"
    assert kv["installed_after_boot"] == "1"          # written just now, after boot
    os.utime(root / "usr/sbin/libshare-redirect", (1, 1))
    (run / "boot.out").unlink()
    kv = status()
    assert kv["boot_ran"] == "0" and kv["installed_after_boot"] == "0"


def _ram_above_4g() -> bool:
    """Return whether this host has System RAM at or above 4 GiB, from /proc/iomem."""
    for line in Path("/proc/iomem").read_text().splitlines():
        span, _, what = line.strip().partition(" : ")
        if what == "System RAM" and int(span.split("-")[0], 16) >= 1 << 32:
            return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="/proc/iomem shows addresses to root only")
def test_grub_dropin_adds_noforce_only_with_all_ram_below_4g() -> None:
    """The drop-in grub-mkconfig sources appends swiotlb=noforce to GRUB_CMDLINE_LINUX
    when no System RAM lies at or above 4 GiB (decided here from the host's own
    /proc/iomem), keeping what was there."""
    dropin = SCRIPT.parent / "grub-default.cfg"
    out = subprocess.run(["sh", "-c", f'GRUB_CMDLINE_LINUX="console=ttyS0"; . {dropin}; '
                          'echo "$GRUB_CMDLINE_LINUX"'], capture_output=True, text=True,
                         check=True).stdout.strip()
    want = "console=ttyS0" if _ram_above_4g() else "console=ttyS0 swiotlb=noforce"
    assert out == want


def _regen(tmp_path: Path, cfg: str | None, update_rc: int = 0) -> str:
    """Run the script's regen_grub against ROOT=tmp_path with a stand-in update-grub
    (first on PATH) that writes a grub-mkconfig configuration; return its output."""
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    (root / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    if cfg is not None:
        (root / "boot" / "grub" / "grub.cfg").write_text(cfg)
    tool = bin_dir / "update-grub"
    tool.write_text("#!/bin/sh\necho 'Generating grub configuration file ...' >&2\n"
                    f"[ {update_rc} = 0 ] || {{ echo 'error: cannot find a device' >&2; "
                    f"exit {update_rc}; }}\n"
                    "printf '# generated by grub-mkconfig\\nlinux /vmlinuz ro "
                    f"swiotlb=noforce\\n' > {root}/boot/grub/grub.cfg\n")
    tool.chmod(0o755)
    env = {**os.environ, "LIBSHARE_REDIRECT_MAIN": "noop"}
    proc = subprocess.run(["sh", "-c", f'. {SCRIPT}; PATH={bin_dir}:$PATH; ROOT={root}; '
                           'regen_grub'], env=env,
                          capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def test_regen_grub_keeps_a_hand_written_config(tmp_path: Path) -> None:
    """update-grub runs over a grub.cfg grub-mkconfig made (or none); a hand-written
    one is kept once, byte for byte, beside it first; a failing update-grub says so."""
    grub = tmp_path / "root" / "boot" / "grub"
    assert _regen(tmp_path, "# DO NOT EDIT: generated by grub-mkconfig\n") == (
        "grub=updated\nnoforce=1\n")
    assert not (grub / "grub.cfg.before-libshare").exists()
    hand = "# mine\nlinux /vmlinuz root=/dev/vda1\n"
    assert _regen(tmp_path, hand) == (
        "grub_saved=/boot/grub/grub.cfg.before-libshare\ngrub=updated\nnoforce=1\n")
    assert (grub / "grub.cfg.before-libshare").read_text() == hand
    _regen(tmp_path, "# another of mine\n")
    assert (grub / "grub.cfg.before-libshare").read_text() == hand
    (grub / "grub.cfg").unlink()
    out = _regen(tmp_path, None, update_rc=1)
    assert out.startswith("grub=failed\n") and "cannot find a device" in out
