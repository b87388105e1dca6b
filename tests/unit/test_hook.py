"""The hook's logic, run directly and through the shim script, without libvirt."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libshare import domxml, hook, state
from libshare.digest import sha256_file

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
PLAIN = """<domain type='qemu'><name>h</name><uuid>0d4c2cf5-1b5e-4b53-9d7f-1f9b3c7b9a11</uuid>
<memory unit='MiB'>256</memory><os><type arch='x86_64'>hvm</type></os><devices/></domain>"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    state_dir = tmp_path / "state"
    image = tmp_path / "img" / "region.img"
    image.parent.mkdir()
    image.write_bytes(b"\x01" * (2 * MiB))
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "libshare.toml"))
    (tmp_path / "libshare.toml").write_text(f'state_dir = "{state_dir}"\n')
    return {"state": state_dir, "image": image, "tmp": tmp_path}


def enrolled_xml(image: Path, state_dir: Path, model: str = "nvdimm") -> bytes:
    spec = domxml.RegionSpec(str(image), image.stat().st_size, "g", model=model,
                             digest=sha256_file(image), state_dir=str(state_dir))
    return domxml.serialize(domxml.enable(domxml.parse(PLAIN), spec)).encode()


def test_prepare_accepts_intact_region(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    assert hook.run(["h", "prepare", "begin", "-"], xml) == 0
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
    assert hook.run(["h", "prepare", "begin", "-"], xml) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("libshare: h: region image")


def test_started_and_stopped_manage_record(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    assert hook.run(["h", "started", "begin", "-"], xml) == 0
    recs = state.read_running(env["state"])
    assert [r["name"] for r in recs] == ["h"] and recs[0]["region"] == str(env["image"])
    assert hook.run(["h", "reconnect", "begin", "-"], xml) == 0
    assert hook.run(["h", "stopped", "end", "-"], xml) == 0
    assert state.read_running(env["state"]) == []
    assert hook.run(["h", "release", "end", "-"], xml) == 0


def test_safe_ops_exit_zero_on_garbage_state(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    env["state"].mkdir(exist_ok=True)
    (env["state"] / "running").write_text("not a dir")  # makes recording fail
    assert hook.run(["h", "reconnect", "begin", "-"], xml) == 0
    assert hook.run(["h", "started", "begin", "-"], xml) == 0


def test_migrate_maps_to_local_image(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    digest = sha256_file(env["image"])
    local = env["state"] / "regions" / "images" / f"{digest}.img"
    local.parent.mkdir(parents=True)
    os.rename(env["image"], local)  # the source host's path does not exist here
    out = io.StringIO()
    assert hook.run(["h", "migrate", "begin", "-"], xml, out=out) == 0
    mapped = domxml.parse(out.getvalue())
    assert mapped.findtext("devices/memory/source/path") == str(local)
    assert domxml.describe(mapped)["region"] == str(local)
    assert len(mapped.findall("devices/*")) == len(domxml.parse(xml).findall("devices/*"))
    # same path on this host: nothing printed
    out = io.StringIO()
    assert hook.run(["h", "restore", "begin", "-"], mapped_bytes := out.getvalue().encode()
                    or domxml.serialize(mapped).encode(), out=out) == 0
    assert out.getvalue() == "" and mapped_bytes


def test_migrate_refused_without_image(env: dict[str, Path]) -> None:
    xml = enrolled_xml(env["image"], env["state"])
    env["image"].unlink()
    assert hook.run(["h", "migrate", "begin", "-"], xml, out=io.StringIO()) == 1


def test_unenrolled_domain_is_ignored(env: dict[str, Path]) -> None:
    assert hook.run(["h", "prepare", "begin", "-"], PLAIN.encode()) == 0


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
    hook.run(["h", "prepare", "begin", "-"], xml)
    lines = state.hook_log_path(env["state"]).read_text().splitlines()
    assert json.loads(lines[-1])["op"] == "prepare"
