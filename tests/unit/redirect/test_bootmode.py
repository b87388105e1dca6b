"""guest install's boot-time setup by boot path, against fake domains and a scripted
guest agent: direct kernel boot gets libshare's initrd (built from the domain's own and
the guest's files) and a switched definition; GRUB gets the guest's initramfs rebuilt;
what cannot boot libshare's hook falls back to automatic runtime redirect, saying why;
unredirect gives the domain its own initrd back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare import domxml
from libshare.boot import store
from libshare.redirect import actions, bootmode
from libshare.redirect.agent import ExecResult
from libshare.util import cpio
from tests.support.domains import UUID, direct_kernel, region_spec
from tests.support.fakes import FakeAgent, FakeConnection, FakeDomain
from tests.support.initrds import dracut_initrd, initramfs_tools_initrd

REL = "6.1.0-50-amd64"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LD = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
NFIT = f"/lib/modules/{REL}/kernel/drivers/acpi/nfit/nfit.ko"


def facts(image: str = "", generator: str = "initramfs-tools") -> str:
    grub = "1" if image else "0"
    return (f"boot_image={image}\ngrub={grub}\nrelease={REL}\nmodules=1\n"
            f"generator={generator}\n")


def listing(tools: list[str], modules: bool = True, lack: str | None = None) -> str:
    lines = []
    for t in tools:
        if t == lack:
            lines.append(f"missing tool {t}")
            continue
        lines += [f"exe {t} /usr/bin/{t}", f"lib libc.so.6 {LIBC}",
                  f"interp ld-linux-x86-64.so.2 {LD}"]
    if modules:
        lines.append(f"module nfit.ko {NFIT}")
    return "\n".join(lines) + "\n"


def agent_for(fact_text: str, files_text: str = "", initramfs_ok: bool = True,
              grub: str = "grub=updated\nnoforce=1\n") -> FakeAgent:
    def handle(argv: list[str], stdin: bytes | None) -> ExecResult:
        if argv == [actions.SCRIPT, "grub"]:
            return ExecResult(0, grub.encode(), b"")
        if argv[:4] == ["/bin/sh", "-s", "--", "probe"]:
            return ExecResult(0, b"region_device=/dev/pmem0\ndax=1\n", b"")
        if argv[:4] == ["/bin/sh", "-s", "--", "facts"]:
            return ExecResult(0, fact_text.encode(), b"")
        if argv[:4] == ["/bin/sh", "-s", "--", "files"]:
            assert stdin is not None and b"boot-files" in stdin
            return ExecResult(0, files_text.encode(), b"")
        if "update-initramfs" in " ".join(argv):
            return ExecResult(0 if initramfs_ok else 1, b"" if initramfs_ok else
                              b"E: mkinitramfs failure cpio 141\n", b"")
        if "lsinitramfs" in " ".join(argv):
            return ExecResult(0, b"7\n", b"")
        return ExecResult(0, b"", b"")
    tools, _modules = bootmode.hook_lists()
    files = {f"/usr/bin/{t}": b"\x7fELF " + t.encode() for t in tools}
    files.update({LIBC: b"libc", LD: b"ld.so", NFIT: b"\x7fELF nfit"})
    return FakeAgent(handle, files=files)


def enrolled_dkb(tmp_path: Path, initrd_kind: str | None = "initramfs-tools") -> FakeDomain:
    original: Path | None = None
    if initrd_kind == "initramfs-tools":
        original = initramfs_tools_initrd(tmp_path / "initrd.img", "gzip")
    elif initrd_kind == "dracut":
        original = dracut_initrd(tmp_path / "initrd.img")
    xml = domxml.serialize(domxml.enable(domxml.parse(direct_kernel(
        "g1", initrd=None if original is None else str(original))),
        region_spec(state_dir=str(tmp_path / "state"))))
    dom = FakeDomain("g1", xml)
    FakeConnection(dom)
    return dom


def install(dom: FakeDomain, agent: FakeAgent, state: Path) -> actions.InstallReport:
    factory: Callable[[Any], Any] = lambda _d: agent  # noqa: E731
    return actions.install(dom, agent_factory=factory, state_dir=state)


def test_direct_kernel_boot_gets_libshares_initrd(tmp_path: Path) -> None:
    tools, _ = bootmode.hook_lists()
    dom = enrolled_dkb(tmp_path)
    agent = agent_for(facts(), listing(tools))
    rep = install(dom, agent, tmp_path / "elsewhere")   # the enrolment's state dir wins
    boot = rep.boot
    assert boot is not None and boot["path"] == "direct-kernel" and boot["mode"] == "boot"
    assert boot["reason"] is None
    assert "initramfs-tools, gzip" in boot["found"]
    ours = str(store.initrd_path(tmp_path / "state", UUID))
    assert boot["initrd"] == ours and boot["original_initrd"] == str(tmp_path / "initrd.img")
    assert rep.initramfs.startswith("not rebuilt")
    assert not any("update-initramfs" in " ".join(a) for k, a in agent.calls if k == "exec")
    # the definition boots libshare's initrd from the next start; the rest is as before
    after = domxml.parse(dom.xml)
    assert domxml.boot_of(after)["libshare_initrd"] == ours
    assert domxml.describe(after)["redirect"] == "off"
    # the built file is the domain's initrd, then libshare's archive with the guest's files
    data = Path(ours).read_bytes()
    assert data.startswith((tmp_path / "initrd.img").read_bytes())
    names = {e.name: e for e in cpio.read_archive(
        data[(tmp_path / "initrd.img").stat().st_size:].lstrip(b"\0"))}
    assert names["usr/lib/libshare/exe/mount"].data == b"\x7fELF mount"
    assert names[f"usr/lib/libshare/modules/{REL}/nfit.ko"].data == b"\x7fELF nfit"
    assert names["usr/lib/libshare/libshare-redirect"].data == actions.script_bytes()
    # disable gives the domain its own initrd back and removes libshare's
    from libshare.virt import enrol
    out = enrol.disable_domain(dom.connect(), "g1", tmp_path / "elsewhere")  # type: ignore[arg-type]
    assert "boots its own initrd" in out.message
    assert domxml.parse(dom.xml).findtext("os/initrd") == str(tmp_path / "initrd.img")
    assert not store.domain_dir(tmp_path / "state", UUID).exists()


@pytest.mark.parametrize("case,reason", [
    ("dracut initrd", "was made by dracut"),
    ("no initrd", "without an initrd"),
    ("guest lacks a tool", "lacks what libshare's initrd needs: tool blkid"),
    ("no modules", "no kernel modules of its running kernel"),
])
def test_direct_kernel_boot_falls_back_to_runtime(tmp_path: Path, case: str,
                                                  reason: str) -> None:
    tools, _ = bootmode.hook_lists()
    dom = enrolled_dkb(tmp_path, {"dracut initrd": "dracut", "no initrd": None}.get(
        case, "initramfs-tools"))
    agent = agent_for(facts(), listing(tools, modules=case != "no modules",
                                       lack="blkid" if case == "guest lacks a tool" else None))
    rep = install(dom, agent, tmp_path / "state")
    boot = rep.boot
    assert boot is not None and boot["path"] == "direct-kernel"
    assert boot["mode"] == "runtime" and reason in boot["reason"]
    assert any("automatic runtime redirect switched on" in d for d in boot["done"])
    after = domxml.parse(dom.xml)
    assert domxml.describe(after)["redirect"] == "runtime"
    assert domxml.boot_of(after)["libshare_initrd"] is None
    assert not (tmp_path / "state" / "boot").exists()


def test_grub_rebuilds_the_guests_initramfs(tmp_path: Path) -> None:
    xml = domxml.serialize(domxml.enable(domxml.parse(
        "<domain type='qemu'><name>g1</name><uuid>" + UUID + "</uuid><memory unit='MiB'>"
        "512</memory><os><type arch='x86_64'>hvm</type><boot dev='hd'/></os><devices/>"
        "</domain>"), region_spec()))
    dom = FakeDomain("g1", xml)
    rep = install(dom, agent_for(facts("/vmlinuz")), tmp_path)
    assert rep.boot is not None and rep.boot["path"] == "grub" and rep.boot["mode"] == "boot"
    assert "BOOT_IMAGE=/vmlinuz" in rep.boot["found"]
    assert rep.initramfs == "updated" and rep.initramfs_entries == 7
    assert domxml.parse(dom.xml).findtext("os/initrd") is None
    # unknown boot path: the initramfs rebuilt, and runtime redirect as well
    rep = install(dom, agent_for(facts("")), tmp_path)
    assert rep.boot is not None and rep.boot["path"] == "unknown"
    assert rep.boot["mode"] == "boot+runtime" and "unknown boot path" in rep.boot["reason"]
    assert domxml.describe(domxml.parse(dom.xml))["redirect"] == "runtime"


@pytest.mark.parametrize("generator,ok,reason", [
    ("dracut", True, "made by dracut"),
    ("none", True, "no initramfs generator"),
    ("initramfs-tools", False, "update-initramfs failed in the guest: E: mkinitramfs"),
])
def test_grub_fallbacks(tmp_path: Path, generator: str, ok: bool, reason: str) -> None:
    xml = domxml.serialize(domxml.enable(domxml.parse(
        "<domain type='qemu'><name>g1</name><uuid>" + UUID + "</uuid><memory unit='MiB'>"
        "512</memory><os><type arch='x86_64'>hvm</type></os><devices/></domain>"),
        region_spec()))
    dom = FakeDomain("g1", xml)
    rep = install(dom, agent_for(facts("/vmlinuz", generator), initramfs_ok=ok), tmp_path)
    assert rep.boot is not None and rep.boot["mode"] == "runtime"
    assert reason in rep.boot["reason"]
    assert rep.initramfs.startswith("failed") == (not ok)


def test_unredirect_gives_the_domain_its_own_initrd(tmp_path: Path) -> None:
    tools, _ = bootmode.hook_lists()
    dom = enrolled_dkb(tmp_path)
    agent = agent_for(facts(), listing(tools))
    install(dom, agent, tmp_path / "state")
    rep = actions.unredirect(dom, agent_factory=lambda _d: agent,
                             state_dir=tmp_path / "elsewhere")
    assert rep.boot and "boots its own initrd" in rep.boot
    assert domxml.parse(dom.xml).findtext("os/initrd") == str(tmp_path / "initrd.img")
    assert not store.domain_dir(tmp_path / "state", UUID).exists()


def test_hook_lists_are_read_from_the_hook() -> None:
    tools, modules = bootmode.hook_lists()
    assert "mount" in tools and "blkid" in tools and "nfit" in modules
    with pytest.raises(Exception, match="no TOOLS list"):
        bootmode.hook_lists("#!/bin/sh\n")


@pytest.mark.parametrize("grub,says", [
    ("grub=updated\nnoforce=1\n", "swiotlb=noforce from the next boot"),
    ("grub=updated\nnoforce=0\n", "left as it was (RAM at or above 4 GiB"),
    ("grub_saved=/boot/grub/grub.cfg.before-libshare\ngrub=updated\nnoforce=1\n",
     "(its grub.cfg, not made by grub-mkconfig, kept as /boot/grub/grub.cfg.before-libshare)"),
    ("grub=none\n", "no update-grub in the guest; add swiotlb=noforce"),
    ("grub=failed\n", "update-grub failed in the guest"),
])
def test_disk_boot_gets_the_grub_dropin_applied(tmp_path: Path, grub: str, says: str) -> None:
    """A guest booted from its disk (GRUB, unknown, fallbacks too) has update-grub run
    for libshare's drop-in; the report says what came of it; direct kernel boot gets
    the option on the domain's own command line instead (no update-grub)."""
    xml = domxml.serialize(domxml.enable(domxml.parse(
        "<domain type='qemu'><name>g1</name><uuid>" + UUID + "</uuid><memory unit='MiB'>"
        "512</memory><os><type arch='x86_64'>hvm</type></os><devices/></domain>"),
        region_spec()))
    for generator in ("initramfs-tools", "none"):
        agent = agent_for(facts("/vmlinuz", generator), grub=grub)
        rep = install(FakeDomain("g1", xml), agent, tmp_path)
        assert rep.boot is not None and any(says in d for d in rep.boot["done"]), rep.boot
        assert ("exec", [actions.SCRIPT, "grub"]) in agent.calls
    tools, _ = bootmode.hook_lists()
    agent = agent_for(facts(), listing(tools), grub=grub)
    install(enrolled_dkb(tmp_path), agent, tmp_path / "state")
    assert ("exec", [actions.SCRIPT, "grub"]) not in agent.calls
