"""``libshare guest install`` through the real CLI entry point: it says which boot path
it found and what it did, per domain, with a fallback named (never a silent no-op)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from libshare import cli, domxml
from libshare.redirect import actions
from libshare.redirect.agent import ExecResult
from libshare.virt import api
from tests.support.domains import direct_kernel, region_spec
from tests.support.fakes import FakeAgent, FakeConnection, FakeDomain
from tests.support.initrds import dracut_initrd


def _guest(argv: list[str], stdin: bytes | None) -> ExecResult:
    if argv[:4] == ["/bin/sh", "-s", "--", "probe"]:
        return ExecResult(0, b"region_device=/dev/pmem0\ndax=1\n", b"")
    if argv[:4] == ["/bin/sh", "-s", "--", "facts"]:
        return ExecResult(0, b"boot_image=\ngrub=0\nrelease=6.1.0-50-amd64\nmodules=1\n"
                          b"generator=initramfs-tools\n", b"")
    return ExecResult(0, b"identical=3\n" if "prime" in argv else b"", b"")


@pytest.fixture
def dracut_dkb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDomain:
    """A running enrolled domain with direct kernel boot of a dracut initrd."""
    initrd = dracut_initrd(tmp_path / "initrd.img")
    dom = FakeDomain("web1", domxml.serialize(domxml.enable(domxml.parse(
        direct_kernel("web1", initrd=str(initrd))),
        region_spec(state_dir=str(tmp_path / "state")))))
    conn = FakeConnection(dom)

    @contextmanager
    def connect(uri: str) -> Iterator[FakeConnection]:
        yield conn

    monkeypatch.setattr(api, "connect", connect)
    monkeypatch.setattr(actions, "install", functools.partial(
        actions.install, agent_factory=lambda _d: FakeAgent(_guest)))
    monkeypatch.setenv("LIBSHARE_CONFIG", "")
    return dom


def test_install_says_the_boot_path_and_the_fallback(
        tmp_path: Path, dracut_dkb: FakeDomain, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--state-dir", str(tmp_path), "guest", "install", "web1"]) == 0
    out = capsys.readouterr().out
    assert "web1: boot path: direct kernel boot (kernel /srv/boot/vmlinuz, initrd " in out
    assert "dracut, gzip" in out
    assert "web1: guest initramfs not rebuilt: a domain with direct kernel boot" in out
    assert "web1: no boot-time redirect: the domain's initrd" in out and "dracut" in out
    assert "web1: automatic runtime redirect switched on" in out
    assert domxml.describe(domxml.parse(dracut_dkb.xml))["redirect"] == "runtime"
    assert cli.main(["--state-dir", str(tmp_path), "guest", "install", "web1",
                     "--json"]) == 0
    boot = json.loads(capsys.readouterr().out)["boot"]
    assert (boot["path"], boot["path_text"], boot["mode"]) == \
        ("direct-kernel", "direct kernel boot", "runtime")
    assert "automatic runtime redirect was on already" in boot["done"][-1]
