"""Unit tests of the pure parts of libshare.demo.debian.guest: apt sources parsing and mirror
choice, the cache key, boot markers on the console, and the domain XML (validated against
libvirt's RelaxNG schema)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from libshare.demo.apt import host_mirror, parse_deb822_sources, parse_sources_list, pick_mirror
from libshare.demo.debian.domain import debian_domain_tree, debian_domain_xml
from libshare.demo.debian.guest import console_boots
from libshare.demo.debian.image import BASE_PACKAGES, BOOTED_MARKER, packages_key
from libshare.demo.domain import add_numa_nvdimm_support, nvdimm_device_xml

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")

DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
"""


def test_parse_deb822_and_pick() -> None:
    entries = parse_deb822_sources(DEB822)
    assert entries[0] == ("http://mirror.example/debian/", ["bookworm", "bookworm-updates"],
                          ["main", "contrib"])
    assert len(entries) == 2  # deb-src skipped
    assert pick_mirror(entries, "bookworm") == "http://mirror.example/debian"
    assert pick_mirror(entries, "bullseye") is None


def test_parse_one_line_sources() -> None:
    text = ("# comment\ndeb-src http://x/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://y/debian bookworm main # tail\n"
            "deb http://z/debian-security bookworm-security main\n")
    entries = parse_sources_list(text)
    assert entries == [("http://y/debian", ["bookworm"], ["main"]),
                       ("http://z/debian-security", ["bookworm-security"], ["main"])]
    assert pick_mirror(entries, "bookworm") == "http://y/debian"


def test_host_mirror_reads_both_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text("deb http://old/debian bullseye main\n")
    assert host_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    assert host_mirror("bullseye", tmp_path) == "http://old/debian"


def test_packages_key_ignores_order_and_duplicates() -> None:
    a = packages_key("bookworm", BASE_PACKAGES)
    assert a == packages_key("bookworm", [*reversed(BASE_PACKAGES), "kmod"])
    assert a.startswith("bookworm-")
    assert a != packages_key("bookworm", [*BASE_PACKAGES, "dbus"])
    assert a != packages_key("bullseye", BASE_PACKAGES)


def test_console_boots() -> None:
    a, b, c = ("79a21ebf-94d6-4498-a78e-d4230a79593b", "65518841-043c-473b-811d-241307d491b8",
               "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6")
    text = ("noise\r\n"
            f"{BOOTED_MARKER} boot_id={a} uptime=17.25 release=6.1.0-50-amd64\r\n"
            "[  OK  ] more\n"
            # getty's prompt raced the marker (seen in CI)
            f"lsguest login: {BOOTED_MARKER} boot_id={b} uptime=150.76 release=6.1.0-50-amd64\n"
            # a kernel message glued to the end of the line
            f"{BOOTED_MARKER} boot_id={c} uptime=9.00 release=6.1.0-50-amd64[  151.02] usb\n"
            f"echo {BOOTED_MARKER} boot_id=$(cat ...)\n")
    assert console_boots(text) == [(a, 17.25, "6.1.0-50-amd64"),
                                   (b, 150.76, "6.1.0-50-amd64"),
                                   (c, 9.0, "6.1.0-50-amd64")]
    assert console_boots("") == []


def test_domain_shape() -> None:
    dom = debian_domain_tree("lstest-d", "/run/d/disk.qcow2", "/run/d/console.log")
    assert dom.get("type") == "qemu"
    assert dom.findtext("memory") == str(512 * 1024) and dom.findtext("vcpu") == "1"
    assert dom.find("os/kernel") is None and dom.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    assert dom.findtext("on_poweroff") == "destroy" and dom.findtext("on_crash") == "destroy"
    assert dom.findtext("on_reboot") == "restart"
    disk = dom.find("devices/disk")
    assert disk is not None
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source").get("file") == "/run/d/disk.qcow2"  # type: ignore[union-attr]
    assert disk.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    ch = dom.find("devices/channel")
    assert ch is not None and ch.get("type") == "unix"
    assert ch.find("target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]
    assert [b.get("model") for b in dom.findall("devices/memballoon")] == ["virtio"]
    assert dom.find("devices/interface") is None
    assert dom.find("devices/serial/source").get("path") == "/run/d/console.log"  # type: ignore[union-attr]


def test_domain_with_direct_kernel_boot() -> None:
    dom = debian_domain_tree("lstest-d", "/d.qcow2", "/c.log",
                             kernel=("/k/vmlinuz", "/k/initrd.img", "root=UUID=x ro"))
    assert dom.find("os/boot") is None
    assert [(e.tag, e.text) for e in dom.find("os")][1:] == [  # type: ignore[union-attr]
        ("kernel", "/k/vmlinuz"), ("initrd", "/k/initrd.img"), ("cmdline", "root=UUID=x ro")]
    assert dom.find("devices/disk/source").get("file") == "/d.qcow2"  # type: ignore[union-attr]


def test_domain_devices_replace_balloon_and_kvm() -> None:
    dom = debian_domain_tree(
        "lstest-d", "/d.qcow2", "/c.log", domain_type="kvm", memory_mib=1024,
        devices=["<memballoon model='virtio' freePageReporting='on'/>"])
    balloons = dom.findall("devices/memballoon")
    assert len(balloons) == 1 and balloons[0].get("freePageReporting") == "on"
    assert dom.get("type") == "kvm" and dom.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert dom.findtext("memory") == str(1024 * 1024)


@pytest.mark.skipif(not SCHEMA.exists(), reason="libvirt schemas not installed")
def test_valid_against_libvirt_schema() -> None:
    rng = etree.RelaxNG(file=str(SCHEMA))
    plain = etree.fromstring(debian_domain_xml("lstest-d", "/d.qcow2", "/c.log"))
    assert rng.validate(plain), rng.error_log
    enrolled = debian_domain_tree(
        "lstest-d", "/d.qcow2", "/c.log",
        devices=[nvdimm_device_xml("/r.img", 64 * 1024)], customize=add_numa_nvdimm_support)
    assert rng.validate(enrolled), rng.error_log
