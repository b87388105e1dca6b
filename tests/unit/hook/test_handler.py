"""The hook's logic, run directly and through the shim script, without libvirt."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree

from libshare import domxml
from libshare.hook import handler, ops, state
from libshare.util.digest import sha256_file
from tests.support.images import needs_mkfs, region_image
from tests.support.paths import PROJECT_ROOT

pytestmark = needs_mkfs

ROOT = PROJECT_ROOT
MiB = 1 << 20
PLAIN = """<domain type='qemu'><name>h</name><uuid>0d4c2cf5-1b5e-4b53-9d7f-1f9b3c7b9a11</uuid>
<memory unit='MiB'>256</memory><os><type arch='x86_64'>hvm</type></os><devices/></domain>"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    state_dir = tmp_path / "state"
    image = region_image(state_dir)
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "libshare.toml"))
    (tmp_path / "libshare.toml").write_text(f'state_dir = "{state_dir}"\n')
    return {"state": state_dir, "image": image, "tmp": tmp_path}


def enrolled_xml(image: Path, state_dir: Path, model: str = "nvdimm") -> bytes:
    spec = domxml.RegionSpec(str(image), image.stat().st_size, "g", model=model,
                             digest=sha256_file(image), state_dir=str(state_dir))
    return domxml.serialize(domxml.enable(domxml.parse(PLAIN), spec)).encode()


def test_prepare_accepts_intact_region(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0
    assert state.read_hook_log(env["state"])[-1]["result"] == "region-ok"


@pytest.mark.parametrize("damage", ["missing", "size", "bytes"])
def test_prepare_refuses_bad_region(env: dict[str, Path], damage: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    if damage == "missing":
        env["image"].unlink()
    elif damage == "size":
        with open(env["image"], "ab") as fh:
            fh.write(b"\0" * MiB)
    else:
        with open(env["image"], "r+b") as fh:
            fh.seek(12345)
            fh.write(b"\x02")
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("libshare: h: region image")


def test_started_and_stopped_manage_record(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    assert handler.run(["h", "started", "begin", "-"], xml) == 0
    recs = state.read_running(env["state"])
    assert [r["name"] for r in recs] == ["h"] and recs[0]["region"] == str(env["image"])
    assert handler.run(["h", "reconnect", "begin", "-"], xml) == 0
    assert handler.run(["h", "stopped", "end", "-"], xml) == 0
    assert state.read_running(env["state"]) == []
    assert handler.run(["h", "release", "end", "-"], xml) == 0


def test_safe_ops_exit_zero_on_garbage_state(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    env["state"].mkdir(exist_ok=True)
    (env["state"] / "running").write_text("not a dir")  # makes recording fail
    assert handler.run(["h", "reconnect", "begin", "-"], xml) == 0
    assert handler.run(["h", "started", "begin", "-"], xml) == 0


def test_migrate_maps_to_local_image(env: dict[str, Path]) -> None:
    local = env["image"]  # STATE/regions/images/DIGEST.img
    # the source host's path, which does not exist here
    source = Path("/srv/elsewhere/regions/images") / local.name
    spec = domxml.RegionSpec(str(source), local.stat().st_size, "g",
                             digest=sha256_file(local), state_dir=str(env["state"]))
    xml = domxml.serialize(domxml.enable(domxml.parse(PLAIN), spec)).encode()
    out = io.StringIO()
    assert handler.run(["h", "migrate", "begin", "-"], xml, out=out) == 0
    mapped = domxml.parse(out.getvalue())
    assert mapped.findtext("devices/memory/source/path") == str(local)
    assert domxml.describe(mapped)["region"] == str(local)
    assert len(mapped.findall("devices/*")) == len(domxml.parse(xml).findall("devices/*"))
    # same path on this host: nothing printed
    out = io.StringIO()
    assert handler.run(["h", "restore", "begin", "-"], mapped_bytes := out.getvalue().encode()
                    or domxml.serialize(mapped).encode(), out=out) == 0
    assert out.getvalue() == "" and mapped_bytes


def test_migrate_refused_without_image(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    env["image"].unlink()
    assert handler.run(["h", "migrate", "begin", "-"], xml, out=io.StringIO()) == 1


def test_unenrolled_domain_is_ignored(env: dict[str, Path]) -> None:
    assert handler.run(["h", "prepare", "begin", "-"], PLAIN.encode()) == 0


def run_shim(args: list[str], data: bytes, tmp: Path) -> subprocess.CompletedProcess[bytes]:
    env = {"LC_ALL": "C", "PATH": "/usr/bin:/bin",
           "LIBSHARE_CONFIG": str(tmp / "libshare.toml")}
    return subprocess.run([sys.executable, str(ROOT / "hooks" / "qemu"), *args], input=data,
                          capture_output=True, env=env, timeout=30)


def test_shim_fast_path_and_refusal(env: dict[str, Path]) -> None:
    res = run_shim(["h", "prepare", "begin", "-"], PLAIN.encode(), env["tmp"])
    assert res.returncode == 0 and res.stdout == b"" and res.stderr == b""
    xml = enrolled_xml(env["image"], env["state"])
    env["image"].unlink()
    res = run_shim(["h", "prepare", "begin", "-"], xml, env["tmp"])
    assert res.returncode == 1
    assert len(res.stderr.decode().strip().splitlines()) == 1
    res = run_shim(["h", "reconnect", "begin", "-"], b"<domain", env["tmp"])
    assert res.returncode == 0


def test_shim_reconnect_garbage_never_fails(env: dict[str, Path]) -> None:
    bad = b"<domain xmlns:x='https://libshare.dev/xmlns/domain/1'><broken"
    assert run_shim(["h", "reconnect", "begin", "-"], bad, env["tmp"]).returncode == 0
    assert run_shim(["h", "prepare", "begin", "-"], bad, env["tmp"]).returncode == 1


def test_hook_log_is_json_lines(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    handler.run(["h", "prepare", "begin", "-"], xml)
    lines = state.hook_log_path(env["state"]).read_text().splitlines()
    assert json.loads(lines[-1])["op"] == "prepare"


def test_ivshmem_prepare_publishes_padded_copy(env: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shm = env["tmp"] / "shm"
    shm.mkdir()
    monkeypatch.setattr(handler, "SHM_DIR", shm)
    image = region_image(env["state"], 6 * MiB)  # libvirt wants a power of two: 8 MiB
    xml = enrolled_xml(image, env["state"], model="ivshmem")
    assert domxml.parse(xml).findtext("devices/shmem/size") == str(8 * 1024)
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0
    copy = shm / "libshare-g"
    data = copy.read_bytes()
    assert len(data) == 8 * MiB and data[:6 * MiB] == image.read_bytes()
    assert data[6 * MiB:] == bytes(2 * MiB)
    ino = copy.stat().st_ino
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0
    assert copy.stat().st_ino == ino  # an intact copy is reused, not rewritten
    with open(copy, "r+b") as fh:  # a changed copy (new mtime) is published again
        fh.write(b"\x09")
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0
    assert copy.read_bytes() == data
    # disable restores the definition exactly
    plain = domxml.parse(PLAIN)
    assert etree.tostring(domxml.disable(domxml.parse(xml)), method="c14n") == \
        etree.tostring(plain, method="c14n")


def test_corrupt_size_in_metadata_is_refused(env: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    size = env["image"].stat().st_size
    xml = enrolled_xml(env["image"], env["state"]).replace(
        f'size="{size}"'.encode(), b'size="2MiB"')
    assert b'size="2MiB"' in xml
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size='2MiB'" in err[0] and "enrolled with 0" not in err[0]
    assert handler.run(["h", "migrate", "begin", "-"], xml, out=io.StringIO()) == 1


def test_unexpected_error_keeps_its_traceback(env: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_args: object) -> str:
        raise KeyError("deep inside")

    monkeypatch.setattr(handler, "_dispatch", broken)
    xml = enrolled_xml(env["image"], env["state"])
    assert handler.run(["h", "started", "begin", "-"], xml) == 0
    err = capsys.readouterr().err  # an op that cannot refuse: the traceback for libvirt's log
    assert err.count("Traceback (most recent call last)") == 1 and "in broken" in err
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 1
    entry = state.read_hook_log(env["state"])[-1]
    assert entry["status"] == 1 and "Traceback" in entry["traceback"]
    assert "in broken" in entry["traceback"] and "KeyError: 'deep inside'" in entry["traceback"]
    err = capsys.readouterr().err.strip().splitlines()  # a refusal: one line for the user
    assert len(err) == 1 and "deep inside" in err[0], err


def test_budget_counts_from_process_start(env: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    late = time.monotonic() - 4.6  # start-up took almost all of the 5 s
    assert handler.run(["h", "prepare", "begin", "-"], xml, started=late) == 1
    assert "timed out" in capsys.readouterr().err
    assert state.read_hook_log(env["state"])[-1]["result"] == "timeout"
    assert handler.run(["h", "reconnect", "begin", "-"], xml, started=late) == 0
    # the same late start within a longer-than-used budget succeeds
    assert handler.run(["h", "prepare", "begin", "-"], xml,
                    started=time.monotonic() - 3.0) == 0
    # not enrolled: never a timeout, whatever the start
    assert handler.run(["h", "prepare", "begin", "-"], PLAIN.encode(), started=late) == 0


def test_process_start_counts_interpreter_start() -> None:
    code = ("import time; time.sleep(0.4); from libshare.hook.ops import process_start; "
            "print(time.monotonic() - process_start())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=30)
    assert 0.4 <= float(res.stdout) < 5.0
    assert ops.process_start() <= time.monotonic()


@pytest.mark.parametrize("level,expected", [("debug", logging.DEBUG),
                                            ("info", logging.INFO),
                                            ("error", logging.WARNING)])
def test_log_level_from_config(env: dict[str, Path], level: str, expected: int) -> None:
    (env["tmp"] / "libshare.toml").write_text(
        f'state_dir = "{env["state"]}"\nlog_level = "{level}"\n')
    syslog = logging.handlers.SysLogHandler(address=str(env["tmp"] / "no-such-socket"))
    handler.log.addHandler(syslog)
    try:
        handler.run(["h", "prepare", "begin", "-"], PLAIN.encode())
        # stderr keeps warnings (libvirt shows refusals) whatever the level; syslog
        # gets the configured level
        assert handler.log.level == expected
        assert syslog.level == getattr(logging, level.upper())
    finally:
        handler.log.removeHandler(syslog)
        syslog.close()
        handler._setup_logging()


def test_shim_keeps_traceback_when_libshare_cannot_load(env: dict[str, Path]) -> None:
    """Without a loadable libshare the shim cannot tell which operations refuse (that
    table is libshare.hook.ops): it refuses nothing, so that a broken installation stops
    no guest, and leaves the traceback for libvirt's log."""
    broken = env["tmp"] / "broken" / "libshare"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('boom at import')\n")
    xml = enrolled_xml(env["image"], env["state"])
    for op in ("prepare", "started"):
        res = subprocess.run([sys.executable, str(ROOT / "hooks" / "qemu"), "h", op,
                              "begin", "-"], input=xml, capture_output=True, timeout=30,
                             env={"LC_ALL": "C", "PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": str(broken.parent)})
        err = res.stderr.decode()
        assert res.returncode == 0, err
        assert err.startswith("libshare: hook failed: boom at import\n")
        assert "Traceback (most recent call last)" in err and "__init__.py" in err


def test_prepare_without_recorded_digest_checks_the_layout(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A domain enrolled before its image existed has no digest: prepare then refuses an
    image that is not a sound region and accepts a real one."""
    built = env["image"]
    image = built.with_name("later.img")
    spec = domxml.RegionSpec(str(image), built.stat().st_size, "g", digest=None,
                             state_dir=str(env["state"]))
    xml = domxml.serialize(domxml.enable(domxml.parse(PLAIN), spec)).encode()

    image.write_bytes(b"\x01" * built.stat().st_size)  # right size, not a region
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a sound region" in err[0], err
    shutil.copyfile(built, image)
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0


def _switched_xml(env: dict[str, Path], original: Path, initrd: str | None = None) -> bytes:
    """A domain with direct kernel boot, enrolled, switched to libshare's initrd
    (``initrd``: another path than the configured state directory's)."""
    from libshare.boot import store
    from tests.support.domains import UUID, direct_kernel

    spec = domxml.RegionSpec(str(env["image"]), env["image"].stat().st_size, "g",
                             digest=sha256_file(env["image"]), state_dir=str(env["state"]))
    root = domxml.enable(domxml.parse(direct_kernel("h", initrd=str(original))), spec)
    path = initrd or str(store.initrd_path(env["state"], UUID))
    return domxml.serialize(domxml.switch_initrd(root, path)).encode()


def test_prepare_checks_and_rebuilds_libshares_initrd(env: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """Direct kernel boot with libshare's initrd: checked at prepare, rebuilt when the
    domain's own initrd changed (kernel update on the host), refused with one line when
    it lives outside the configured state directory or has no record."""
    from libshare.boot import store
    from tests.support.domains import UUID
    from tests.support.initrds import initramfs_tools_initrd

    original = initramfs_tools_initrd(env["tmp"] / "initrd.img", "gzip")
    overlay = b"070701" + b"0" * 104  # any bytes: the check compares digests
    store.build(env["state"], UUID, "h", original, sha256_file(original), overlay,
                release="r", kernel="/srv/boot/vmlinuz", generator="initramfs-tools",
                built_by="test")
    xml = _switched_xml(env, original)
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0
    assert state.read_hook_log(env["state"])[-1]["result"] == "region-ok; initrd-ok"
    original.write_bytes(original.read_bytes() + b"\0\0\0\0")   # a new initrd
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 0
    assert state.read_hook_log(env["state"])[-1]["result"].startswith(
        "region-ok; initrd-rebuilt: ")
    assert store.initrd_path(env["state"], UUID).read_bytes() == \
        original.read_bytes() + overlay
    capsys.readouterr()
    for bad in (_switched_xml(env, original, initrd="/tmp/elsewhere/initrd.img"),
                xml.replace(b"boot/", b"boot/../boot/")):
        assert handler.run(["h", "prepare", "begin", "-"], bad) == 1
    (store.domain_dir(env["state"], UUID) / store.RECORD).unlink()
    assert handler.run(["h", "prepare", "begin", "-"], xml) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("libshare: h: ") for e in err), err
    assert "record" in err[-1] and "is missing" in err[-1]
