"""enable/disable on hand-written domains that exercise each rule."""

from __future__ import annotations

import pytest
from lxml import etree

from libshare import domxml
from libshare.domxml import devices as dev
from libshare.domxml import schema
from libshare.errors import RefusedError

MiB = 1 << 20

BASE = """<domain type='{type}'>
  <name>t</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
  </os>
{extra}</domain>
"""


def dom(extra: str = "", type: str = "kvm", machine: str = "pc") -> etree._Element:
    return domxml.parse(BASE.format(type=type, machine=machine, extra=extra))


def spec(model: str = "nvdimm", size: int = 64 * MiB, path: str = "/r/a.img",
         group: str = "g") -> domxml.RegionSpec:
    return domxml.RegionSpec(path, size, group, model=model, digest="d" * 64)


def c14n(root: etree._Element) -> bytes:
    return etree.tostring(root, method="c14n")


def roundtrip(root: etree._Element, s: domxml.RegionSpec) -> etree._Element:
    out = domxml.enable(root, s)
    assert c14n(domxml.disable(out)) == c14n(root)
    assert c14n(domxml.enable(out, s)) == c14n(out)
    if schema.available():
        assert schema.errors(out) == [], schema.errors(out)
    return out


def test_no_devices_gets_everything() -> None:
    out = roundtrip(dom(), spec())
    mem = out.find("devices/memory")
    assert mem is not None and mem.get("model") == "nvdimm" and mem.get("access") == "private"
    assert mem.find("source/pmem") is not None
    assert mem.findtext("source/path") == "/r/a.img"
    assert mem.findtext("target/size") == str(64 * 1024)
    assert mem.findtext("target/node") == "0"
    assert mem.find("target/readonly") is not None
    assert mem.find("target/label") is None
    assert out.find("features/acpi") is not None
    cell = out.find("cpu/numa/cell")
    assert cell is not None and cell.get("cpus") == "0-1" and cell.get("memory") == str(512 * 1024)
    mm = out.find("maxMemory")
    assert mm is not None and mm.get("slots") == "1"
    assert int(mm.text or 0) >= 512 * 1024 + 64 * 1024
    chan = out.find("devices/channel/target")
    assert chan is not None and chan.get("name") == "org.qemu.guest_agent.0"


def test_existing_numa_is_used_not_replaced() -> None:
    extra = """  <cpu>
    <numa>
      <cell id='3' cpus='0-1' memory='524288' unit='KiB'/>
    </numa>
  </cpu>
"""
    out = roundtrip(dom(extra), spec())
    assert len(out.findall("cpu/numa/cell")) == 1
    assert out.findtext("devices/memory/target/node") == "3"


def test_existing_nvdimm_gets_one_more_slot_and_keeps_its_place() -> None:
    extra = """  <maxMemory slots='1' unit='KiB'>2097152</maxMemory>
  <cpu><numa><cell id='0' cpus='0-1' memory='524288' unit='KiB'/></numa></cpu>
  <devices>
    <memory model='nvdimm'>
      <source><path>/other.img</path></source>
      <target><size unit='KiB'>131072</size><node>0</node></target>
    </memory>
  </devices>
"""
    root = dom(extra)
    out = roundtrip(root, spec())
    mems = out.findall("devices/memory")
    assert [m.findtext("source/path") for m in mems] == ["/other.img", "/r/a.img"]
    assert out.find("maxMemory").get("slots") == "2"  # type: ignore[union-attr]
    restored = domxml.disable(out).find("maxMemory")
    assert restored is not None and restored.get("slots") == "1"


def test_large_enough_maxmemory_is_left_alone() -> None:
    extra = "  <maxMemory slots='16' unit='GiB'>64</maxMemory>\n"
    out = roundtrip(dom(extra), spec())
    assert out.find("maxMemory").get("unit") == "GiB"  # type: ignore[union-attr]


def test_hugepages_q35_and_balloon() -> None:
    extra = """  <memoryBacking>
    <hugepages/>
  </memoryBacking>
  <devices>
    <memballoon model='virtio' freePageReporting='off'/>
  </devices>
"""
    out = roundtrip(dom(extra, machine="q35"), spec())
    assert out.find("devices/memballoon").get("freePageReporting") == "on"  # type: ignore
    back = domxml.disable(out).find("devices/memballoon")
    assert back is not None and back.get("freePageReporting") == "off"


def test_existing_agent_channel_is_kept() -> None:
    extra = """  <devices>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind' path='/x.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
"""
    out = roundtrip(dom(extra), spec())
    assert len(out.findall("devices/channel")) == 1
    assert out.find("devices/channel/source").get("path") == "/x.sock"  # type: ignore


def test_ivshmem_model_adds_only_shmem() -> None:
    out = roundtrip(dom(), spec(model="ivshmem", group="trusted"))
    shmem = out.find("devices/shmem")
    assert shmem is not None and shmem.get("name") == "libshare-trusted"
    assert shmem.find("model").get("type") == "ivshmem-plain"  # type: ignore[union-attr]
    assert out.find("maxMemory") is None and out.find("cpu") is None


@pytest.mark.parametrize("size,device", [(2 * MiB, 2 * MiB), (6 * MiB, 8 * MiB),
                                         (56 * MiB, 64 * MiB), (64 * MiB, 64 * MiB)])
def test_ivshmem_size_is_rounded_to_a_power_of_two(size: int, device: int) -> None:
    # libvirt refuses a shmem size that is not a power of two; the record keeps the
    # image's own size (the hook checks the image against it and pads the shm copy)
    out = roundtrip(dom(), spec(model="ivshmem", size=size))
    assert out.findtext("devices/shmem/size") == str(device // 1024)
    assert out.find("devices/shmem/size").get("unit") == "KiB"  # type: ignore[union-attr]
    assert domxml.describe(out)["size"] == size
    assert dev.shmem_size(size) == device


def test_corrupt_size_in_record_is_named() -> None:
    out = domxml.enable(dom(), spec())
    rec = out.find(f"metadata/{{{domxml.NS}}}enrolment")
    assert rec is not None
    rec.set("size", "12x")
    enr = domxml.enrolment(out)
    assert enr is not None
    with pytest.raises(RefusedError, match="size='12x'"):
        enr.checked_size()


def test_virtio_pmem_model() -> None:
    out = roundtrip(dom(), spec(model="virtio-pmem"))
    mem = out.find("devices/memory")
    assert mem is not None and mem.get("model") == "virtio-pmem"


def test_re_enrol_with_new_region_replaces_old_device() -> None:
    first = domxml.enable(dom(), spec(path="/r/old.img"))
    second = domxml.enable(first, spec(path="/r/new.img", size=128 * MiB))
    paths = [m.findtext("source/path") for m in second.findall("devices/memory")]
    assert paths == ["/r/new.img"]
    assert c14n(domxml.disable(second)) == c14n(dom())


def test_implicit_virtio_serial_controller_removed_on_disable() -> None:
    out = domxml.enable(dom(), spec())
    # libvirt adds a virtio-serial controller for the new channel when defining it
    devices = out.find("devices")
    assert devices is not None
    devices.append(etree.fromstring("<controller type='virtio-serial' index='0'/>"))
    back = domxml.disable(out)
    assert back.find("devices/controller") is None


def test_libvirt_recomputed_memory_is_restored() -> None:
    out = domxml.enable(dom(), spec())
    mem = out.find("memory")
    assert mem is not None
    mem.set("unit", "KiB")
    mem.text = str(512 * 1024 + 64 * 1024)  # what libvirt reports: RAM + memory devices
    back = domxml.disable(out).find("memory")
    assert back is not None and back.text == str(512 * 1024)


@pytest.mark.parametrize("xml,reason", [
    (BASE.format(type="xen", machine="pc", extra=""), "domain type"),
    (BASE.format(type="kvm", machine="pc", extra="").replace("x86_64", "aarch64"),
     "architecture"),
    (BASE.format(type="kvm", machine="pc", extra="").replace(">hvm<", ">linux<"), "hvm"),
    (BASE.format(type="kvm", machine="microvm", extra=""), "microvm"),
    (BASE.format(type="kvm", machine="pc", extra="""  <devices>
    <memory model='nvdimm'><source><path>/r/a.img</path></source>
      <target><size unit='KiB'>65536</size><node>0</node></target></memory>
  </devices>
"""), "not added by libshare"),
])
def test_refusals(xml: str, reason: str) -> None:
    root = domxml.parse(xml)
    before = c14n(root)
    with pytest.raises(RefusedError, match=reason):
        domxml.enable(root, spec())
    assert c14n(root) == before


@pytest.mark.parametrize("size", [0, 3 * MiB, 2 * 1024 * 1024 * MiB])
def test_bad_sizes_refused(size: int) -> None:
    with pytest.raises(RefusedError, match=r"2 MiB|1 TiB"):
        domxml.enable(dom(), spec(size=size))


def test_not_xml_and_not_domain() -> None:
    with pytest.raises(RefusedError, match="not well-formed"):
        domxml.parse(b"<domain>")
    with pytest.raises(RefusedError, match="not a libvirt domain"):
        domxml.parse(b"<network/>")


def test_disable_of_unenrolled_is_identity() -> None:
    root = dom()
    assert c14n(domxml.disable(root)) == c14n(root)
    assert domxml.describe(root)["enrolled"] is False


def test_describe_enrolled() -> None:
    info = domxml.describe(domxml.enable(dom(), spec()))
    assert info["enrolled"] and info["group"] == "g" and info["model"] == "nvdimm"
    assert info["region"] == "/r/a.img" and info["size"] == 64 * MiB
    assert info["agent_channel"] is True


# ---------------------------------------------------------------- libshare's initrd

DKB = """  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/srv/boot/vmlinuz</kernel>
    <initrd>/srv/boot/initrd.img</initrd>
    <cmdline>root=/dev/vda ro</cmdline>
  </os>
"""
OURS = "/var/lib/libshare/boot/U/initrd.img"


def dkb() -> etree._Element:
    """A domain with direct kernel boot (kernel, initrd and command line)."""
    return domxml.parse(BASE.format(type="qemu", machine="pc", extra="").replace(
        "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n", DKB))


def test_initrd_switch_is_recorded_and_undone_exactly() -> None:
    """enable, switch to libshare's initrd, disable: the document again, C14N-equal;
    restore_initrd undoes only the switch."""
    root = dkb()
    enrolled = domxml.enable(root, spec())
    switched = domxml.switch_initrd(enrolled, OURS)
    assert switched.findtext("os/initrd") == OURS
    assert switched.findtext("os/kernel") == "/srv/boot/vmlinuz"
    boot = domxml.describe(switched)["boot"]
    assert boot == {"direct_kernel": True, "kernel": "/srv/boot/vmlinuz", "initrd": OURS,
                    "libshare_initrd": OURS, "original_initrd": "/srv/boot/initrd.img"}
    assert c14n(domxml.disable(switched)) == c14n(root)
    assert c14n(domxml.restore_initrd(switched)) == c14n(enrolled)
    # switching twice keeps the first original; the same switch again changes nothing
    again = domxml.switch_initrd(domxml.switch_initrd(switched, "/x/initrd.img"), OURS)
    assert c14n(again) == c14n(switched)
    assert domxml.serialize(domxml.switch_initrd(switched, OURS)) == domxml.serialize(switched)


def test_initrd_switch_survives_a_re_enrolment() -> None:
    """A new region image (enable with another spec undoes and redoes the enrolment):
    the domain keeps booting libshare's initrd, and disable still gives the original."""
    root = dkb()
    switched = domxml.switch_initrd(domxml.enable(root, spec()), OURS)
    moved = domxml.enable(switched, spec(path="/r/b.img"))
    assert moved.findtext("os/initrd") == OURS
    assert domxml.describe(moved)["region"] == "/r/b.img"
    assert domxml.describe(moved)["boot"]["original_initrd"] == "/srv/boot/initrd.img"
    assert c14n(domxml.disable(moved)) == c14n(root)


def test_an_initrd_changed_by_someone_else_is_theirs() -> None:
    """Someone points <initrd> elsewhere after the switch: disable leaves their value,
    and a new switch records theirs as the original."""
    switched = domxml.switch_initrd(domxml.enable(dkb(), spec()), OURS)
    theirs = domxml.parse(domxml.serialize(switched).replace(
        f"<initrd>{OURS}</initrd>", "<initrd>/srv/boot/initrd-new.img</initrd>"))
    assert domxml.describe(theirs)["boot"]["libshare_initrd"] is None
    assert domxml.disable(theirs).findtext("os/initrd") == "/srv/boot/initrd-new.img"
    assert domxml.enable(theirs, spec(path="/r/c.img")).findtext("os/initrd") == \
        "/srv/boot/initrd-new.img"
    again = domxml.switch_initrd(theirs, OURS)
    assert domxml.describe(again)["boot"]["original_initrd"] == "/srv/boot/initrd-new.img"


@pytest.mark.parametrize("extra,enrol", [("", True), ("", False)])
def test_initrd_switch_refusals(extra: str, enrol: bool) -> None:
    root = dom(extra, type="qemu") if enrol else dkb()
    if enrol:
        root = domxml.enable(root, spec())
    with pytest.raises(RefusedError, match="no direct kernel boot" if enrol
                       else "not enrolled"):
        domxml.switch_initrd(root, OURS)
    assert c14n(domxml.restore_initrd(root)) == c14n(root)


# ---------------------------------------------------------------- bounce buffers

def test_direct_kernel_boot_gets_no_bounce_buffers_and_disable_undoes_it() -> None:
    """maxMemory makes the guest kernel reserve 64 MiB of bounce buffers; a
    direct-kernel-boot domain with all its RAM below 4 GiB gets swiotlb=noforce on its
    command line (added when it had none), and disable restores it exactly."""
    root = dkb()
    on = domxml.enable(root, spec())
    assert on.findtext("os/cmdline") == "root=/dev/vda ro swiotlb=noforce"
    assert c14n(domxml.disable(on)) == c14n(root)
    bare = domxml.parse(domxml.serialize(root).replace(
        "    <cmdline>root=/dev/vda ro</cmdline>\n", ""))
    assert bare.find("os/cmdline") is None
    on = domxml.enable(bare, spec())
    assert on.findtext("os/cmdline") == "swiotlb=noforce"
    assert [c.tag for c in on.find("os")] == ["type", "kernel", "initrd", "cmdline"]
    assert c14n(domxml.disable(on)) == c14n(bare)
    # re-enrolment keeps one copy of the option
    again = domxml.enable(on, spec(path="/r/b.img"))
    assert again.findtext("os/cmdline") == "swiotlb=noforce"
    assert c14n(domxml.disable(again)) == c14n(bare)


def test_bounce_buffers_left_alone_when_ram_reaches_above_4g_or_no_kernel() -> None:
    """With RAM above 4 GiB the kernel needs its bounce buffers anyway (32-bit devices);
    a domain booted by its own boot loader gets the option from guest install."""
    big = domxml.parse(domxml.serialize(dkb()).replace(">512</memory>", ">4096</memory>"))
    assert big.findtext("memory") == "4096"
    assert "swiotlb" not in (domxml.enable(big, spec()).findtext("os/cmdline") or "")
    assert domxml.enable(dom(), spec()).find("os/cmdline") is None


def test_a_command_line_changed_since_is_theirs() -> None:
    """Someone edits the command line after enrolment: disable leaves their value."""
    on = domxml.enable(dkb(), spec())
    theirs = domxml.parse(domxml.serialize(on))
    theirs.find("os/cmdline").text = "root=/dev/vda ro quiet"
    assert domxml.disable(theirs).findtext("os/cmdline") == "root=/dev/vda ro quiet"
