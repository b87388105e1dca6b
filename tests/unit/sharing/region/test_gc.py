"""Region images on this host: ls, gc (keeping current, referenced and mapped images)
and the region paths a domain refers to."""


from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from libshare import domxml
from libshare.domxml.devices import region_paths
from libshare.errors import LibshareError
from libshare.sharing.region import build, gc
from tests.support.images import (
    LIBS,
    MiB,
    make_cfg,
    needs_mkfs,
)

pytestmark = needs_mkfs


def test_ls_and_gc(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    old = build.build_region(cfg, "web")
    new = build.build_region(cfg, "web", size=16 * MiB)
    kept = build.build_region(cfg, "db")
    assert new.digest != old.digest
    infos = {i.digest: i for i in gc.list_images(cfg)}
    assert infos[new.digest].groups == ["web"] and infos[old.digest].groups == []
    assert infos[kept.digest].files == len(LIBS)
    (cfg.regions_dir / ".build-dead").mkdir()        # leftover of a killed build
    dry = gc.gc(cfg, set(), dry_run=True)
    assert dry.removed == [old.path] and Path(old.path).exists()
    # a domain still referencing the old image by path keeps it
    res = gc.gc(cfg, {old.path})
    assert res.removed == [] and "referenced" in res.kept[old.path]
    assert old.path in json.loads(cfg.digest_cache.read_text())
    res = gc.gc(cfg, {str(cfg.group_region_link("web"))})
    assert res.removed == [old.path] and not Path(old.path).exists()
    assert res.freed == old.size
    assert Path(new.path).exists() and Path(kept.path).exists()
    assert not (cfg.regions_dir / ".build-dead").exists()
    cached = json.loads(cfg.digest_cache.read_text())
    assert old.path not in cached and new.path in cached     # gc pruned the digest cache


def fake_proc(base: Path, maps: dict[str, str | None]) -> Path:
    """A /proc with one QEMU per pid: maps text, or None for maps it cannot read."""
    proc = base / "proc"
    for pid, text in maps.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "comm").write_text("qemu-system-x86\n")
        if text is None:
            (proc / pid / "maps").mkdir()           # reading it fails like EACCES would
        else:
            (proc / pid / "maps").write_text(text)
    return proc


def test_gc_keeps_mapped_images_and_refuses_blind(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path)
    old = build.build_region(cfg, "web")
    build.build_region(cfg, "web", size=16 * MiB)
    line = f"7f00-7f10 r--p 00000000 08:01 12 {old.path}\n"
    res = gc.gc(cfg, set(), proc=str(fake_proc(tmp_path / "a", {"42": line})))
    assert res.removed == [] and "mapped" in res.kept[old.path]
    blind = str(fake_proc(tmp_path / "b", {"43": None}))
    with pytest.raises(LibshareError, match="QEMU process 43"):
        gc.gc(cfg, set(), proc=blind)
    assert Path(old.path).exists()
    dry = gc.gc(cfg, set(), dry_run=True, proc=blind)
    assert dry.unreadable == [43] and dry.removed == [old.path]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LibshareError, match="must run as root"):
        gc.gc(cfg, set(), proc=str(fake_proc(tmp_path / "c", {})))
    assert Path(old.path).exists()
    assert gc.gc(cfg, set(), dry_run=True, proc=blind).removed == [old.path]


def test_region_paths_in_xml() -> None:
    xml = """<domain type='qemu'><name>lstest-x</name><devices>
      <memory model='nvdimm' access='private'><source><path>/r/a.img</path><pmem/></source>
        <target><size unit='KiB'>4096</size><node>0</node><readonly/></target></memory>
      <memory model='dimm'><target><size unit='KiB'>4096</size><node>0</node></target></memory>
      <memory model='virtio-pmem'><source><path>/r/b.img</path></source></memory>
      <shmem name='libshare-web'><model type='ivshmem-plain'/></shmem>
    </devices></domain>"""
    assert region_paths(domxml.parse(xml)) == {"/r/a.img", "/r/b.img",
                                               "/dev/shm/libshare-web"}


def test_gc_during_a_build_keeps_the_image_the_build_makes_current(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc started while a build writes its image waits for the build (regions lock),
    then sees the group link the build switched: the new image stays."""
    cfg = make_cfg(tmp_path)
    old = build.build_region(cfg, "web")
    real = build._write_stream
    writing = threading.Event()

    def slow_write(*args: Any, **kw: Any) -> str:
        writing.set()
        time.sleep(0.5)          # gc starts meanwhile
        return real(*args, **kw)

    monkeypatch.setattr(build, "_write_stream", slow_write)
    built: list[build.BuildResult] = []
    b = threading.Thread(target=lambda: built.append(
        build.build_region(cfg, "web", size=16 * MiB)))
    b.start()
    assert writing.wait(30)
    collected: list[gc.GcResult] = []
    proc = tmp_path / "p" / "proc"
    proc.mkdir(parents=True)                         # no process maps anything
    g = threading.Thread(target=lambda: collected.append(gc.gc(cfg, set(), proc=str(proc))))
    g.start()
    b.join(60)
    g.join(60)
    new = built[0]
    assert os.path.realpath(cfg.group_region_link("web")) == new.path
    assert Path(new.path).exists(), "gc removed the image the build made current"
    assert collected[0].removed == [old.path]
    assert "current image of group web" in collected[0].kept[new.path]
