"""Unit tests of the test-guest domain XML (validated against libvirt's RelaxNG schema)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from libshare.demo.domain import add_numa_nvdimm_support, nvdimm_device_xml
from libshare.demo.tiny.domain import guest_domain_tree, guest_domain_xml

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def _tree(**kw: object) -> etree._Element:
    return guest_domain_tree("lstest-x", "/k/vmlinuz", "/k/initrd.img", "/run/x/console.log",
                             **kw)  # type: ignore[arg-type]


def test_shape() -> None:
    dom = _tree()
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == "lstest-x"
    assert dom.findtext("memory") == str(256 * 1024)
    assert dom.findtext("vcpu") == "1"
    assert dom.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    assert dom.findtext("os/kernel") == "/k/vmlinuz"
    assert dom.findtext("os/initrd") == "/k/initrd.img"
    assert "console=ttyS0" in (dom.findtext("os/cmdline") or "")
    assert dom.find("features/acpi") is not None
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert dom.findtext(event) == "destroy"
    assert dom.find("devices/serial/source").get("path") == "/run/x/console.log"  # type: ignore[union-attr]
    assert dom.find("devices/disk") is None and dom.find("devices/interface") is None


def test_devices_and_customize() -> None:
    dom = _tree(devices=["<memballoon model='virtio' freePageReporting='on'/>"],
                customize=[lambda d: d.set("type", "kvm")])
    balloons = dom.findall("devices/memballoon")
    assert [b.get("model") for b in balloons] == ["virtio"]
    assert dom.get("type") == "kvm"


def test_nvdimm_helpers() -> None:
    dom = _tree(devices=[nvdimm_device_xml("/var/lib/x/region.img", 8192)],
                customize=[add_numa_nvdimm_support])
    mem = dom.find("devices/memory")
    assert mem is not None and mem.get("model") == "nvdimm" and mem.get("access") == "private"
    assert mem.find("source/pmem") is not None and mem.find("target/readonly") is not None
    assert mem.findtext("target/size") == "8192" and mem.findtext("target/node") == "0"
    assert dom.find("maxMemory").get("slots") == "2"  # type: ignore[union-attr]
    cell = dom.find("cpu/numa/cell")
    assert cell is not None and cell.get("memory") == str(256 * 1024)


@pytest.mark.skipif(not SCHEMA.exists(), reason="libvirt schemas not installed")
def test_valid_against_libvirt_schema() -> None:
    rng = etree.RelaxNG(file=str(SCHEMA))
    xml = guest_domain_xml("lstest-x", "/k/vmlinuz", "/k/initrd.img", "/run/x/console.log",
                           devices=[nvdimm_device_xml("/r.img", 8192)],
                           customize=[add_numa_nvdimm_support])
    doc = etree.fromstring(xml)
    assert rng.validate(doc), rng.error_log
