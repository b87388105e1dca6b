"""Enrolment of domains libvirt 9.0 runs: the rules libvirt applies that enrolment must
follow (issue 10, section 2). tests/integration/test_domxml_libvirt.py asks libvirt
itself about the same documents.

- preallocation: a preallocated copy-on-write region is a full private copy per
  guest, so what makes libvirt 9.0 preallocate (or lock) the region is refused;
- memory: libvirt takes a domain's memory from its NUMA cells, and runs domains that
  have cells and no ``<memory>``;
- PCI: on i440fx, libvirt cannot add a device once every slot is taken by explicit
  addresses; enrolment then uses free functions of multifunction slots.
"""

from __future__ import annotations

import pytest
from lxml import etree

from libshare import domxml
from libshare.domxml import pci, schema
from libshare.domxml.tree import scaled_bytes
from libshare.errors import RefusedError
from tests.support.domains import composed, full_pc_devices

MiB = 1 << 20
KiB_PER_GiB = 1 << 20
MODELS = ("nvdimm", "virtio-pmem", "ivshmem")


def domain(extra: str = "", memory: str = "<memory unit='MiB'>512</memory>",
           devices: str = "", machine: str = "pc") -> str:
    """Return :func:`tests.support.domains.composed` named r."""
    return composed("r", extra, memory, devices, machine)


def spec(model: str = "nvdimm", size: int = 64 * MiB) -> domxml.RegionSpec:
    return domxml.RegionSpec("/r/a.img", size, "g", model=model, digest="d" * 64)


def c14n(root: etree._Element) -> bytes:
    return etree.tostring(root.getroottree(), method="c14n", with_comments=True)


def enrol(text: str, model: str = "nvdimm") -> etree._Element:
    root = domxml.parse(text)
    out = domxml.enable(root, spec(model))
    assert c14n(domxml.disable(out)) == c14n(root)
    assert c14n(domxml.enable(out, spec(model))) == c14n(out)
    if schema.available():
        assert schema.errors(out) == [], schema.errors(out)
    return out


def kib(elem: etree._Element | None) -> int:
    assert elem is not None
    return scaled_bytes(elem) // 1024


# -- preallocation ----------------------------------------------------------------------

IMMEDIATE = "<memoryBacking><allocation mode='immediate'/></memoryBacking>"
IMMEDIATE_THREADS = "<memoryBacking><allocation mode='immediate' threads='4'/></memoryBacking>"
LOCKED = "<memoryBacking><locked/></memoryBacking>"


@pytest.mark.parametrize("backing", [IMMEDIATE, IMMEDIATE_THREADS])
@pytest.mark.parametrize("model", ["nvdimm", "virtio-pmem"])
def test_immediate_allocation_is_refused(backing: str, model: str) -> None:
    root = domxml.parse(domain(backing))
    before = c14n(root)
    with pytest.raises(RefusedError, match="allocation mode='immediate'") as exc:
        domxml.enable(root, spec(model))
    assert "\n" not in str(exc.value) and str(exc.value).startswith("r: ")
    assert c14n(root) == before


def test_immediate_allocation_is_fine_for_ivshmem() -> None:
    # libvirt builds the shmem backend apart and never preallocates it
    out = enrol(domain(IMMEDIATE), "ivshmem")
    assert out.find("devices/shmem") is not None


def test_locked_memory_is_refused_for_the_copy_on_write_nvdimm() -> None:
    with pytest.raises(RefusedError, match="locked"):
        domxml.enable(domxml.parse(domain(LOCKED)), spec("nvdimm"))


@pytest.mark.parametrize("model", ["virtio-pmem", "ivshmem"])
def test_locked_memory_is_fine_for_shared_regions(model: str) -> None:
    enrol(domain(LOCKED), model)


@pytest.mark.parametrize("backing", [
    "<memoryBacking><allocation mode='ondemand'/></memoryBacking>",
    "<memoryBacking><hugepages/></memoryBacking>",
    "<memoryBacking><hugepages><page size='2048' unit='KiB' nodeset='0'/></hugepages>"
    "</memoryBacking>",
    "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
    "<memoryBacking><source type='file'/><access mode='shared'/><discard/></memoryBacking>",
    "<memoryBacking><nosharepages/></memoryBacking>",
], ids=["ondemand", "hugepages", "hugepages-node", "memfd-shared", "file-shared-discard",
        "nosharepages"])
def test_other_backings_keep_the_region_private_and_unpreallocated(backing: str) -> None:
    out = enrol(domain(backing))
    mem = out.find("devices/memory")
    assert mem is not None and mem.get("access") == "private"
    assert mem.find("source/pmem") is not None and mem.find("target/readonly") is not None


# -- memory taken from NUMA cells -------------------------------------------------------

TWO_CELLS = """<cpu>
    <numa>
      <cell id='0' cpus='0' memory='512' unit='MiB'/>
      <cell id='1' cpus='1' memory='1' unit='GiB'/>
    </numa>
  </cpu>"""


def test_cells_holding_more_than_memory_get_enough_max_memory() -> None:
    # libvirt takes the total from the cells (1.5 GiB), not from <memory> (512 MiB)
    out = enrol(domain(TWO_CELLS))
    need = 512 * 1024 + KiB_PER_GiB + 64 * 1024
    assert kib(out.find("maxMemory")) >= need
    assert out.find("maxMemory").get("slots") == "1"  # type: ignore[union-attr]
    assert out.findtext("devices/memory/target/node") == "0"


def test_cells_without_memory_element_are_enrolled() -> None:
    out = enrol(domain(TWO_CELLS, memory=""))
    assert out.find("memory") is None  # libvirt derives it
    assert kib(out.find("maxMemory")) >= 512 * 1024 + KiB_PER_GiB + 64 * 1024
    assert list(out).index(out.find("maxMemory")) > list(out).index(out.find("name"))
    enr = domxml.enrolment(out)
    assert enr is not None and enr.memory_kib is None


def test_existing_max_memory_below_the_cells_is_raised_and_restored() -> None:
    extra = "<maxMemory slots='2' unit='MiB'>1024</maxMemory>\n  " + TWO_CELLS
    root = domxml.parse(domain(extra))
    out = enrol(domain(extra))
    assert kib(out.find("maxMemory")) >= 512 * 1024 + KiB_PER_GiB + 64 * 1024
    assert domxml.disable(out).find("maxMemory").text == "1024"  # type: ignore[union-attr]
    assert c14n(domxml.disable(out)) == c14n(root)


def test_neither_memory_nor_cells_is_refused() -> None:
    with pytest.raises(RefusedError, match="neither <memory> nor NUMA cells"):
        domxml.enable(domxml.parse(domain(memory="")), spec())


def test_memory_devices_count_on_top_of_the_cells() -> None:
    dimm = """<memory model='dimm'><target><size unit='MiB'>256</size><node>0</node>
      </target></memory>"""
    extra = "<maxMemory slots='1' unit='MiB'>1792</maxMemory>\n  " + TWO_CELLS  # = cells + dimm
    out = enrol(domain(extra, devices=dimm))
    assert kib(out.find("maxMemory")) >= (512 + 1024 + 256 + 64) * 1024
    assert out.find("maxMemory").get("slots") == "2"  # type: ignore[union-attr]


# -- PCI: every slot taken --------------------------------------------------------------

def _full_pc(bridges: int = 1, usb_set: bool = False, free: tuple[int, int] | None = None,
             video: bool = True) -> str:
    """A pc domain whose conventional PCI slots are all taken (but ``free``)."""
    return domain(devices=full_pc_devices(bridges, usb_set, free, video))


@pytest.mark.parametrize("bridges", [0, 1, 3])
def test_full_pci_without_multifunction_slot_is_refused(bridges: int) -> None:
    root = domxml.parse(_full_pc(bridges))
    with pytest.raises(RefusedError, match="every PCI slot") as exc:
        domxml.enable(root, spec())
    assert "virtio-serial controller" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("model", MODELS)
def test_full_pci_uses_free_functions_of_a_multifunction_slot(model: str) -> None:
    out = enrol(_full_pc(1, usb_set=True), model)
    ctl = out.find("devices/controller[@type='virtio-serial']")
    assert ctl is not None
    addr = ctl.find("address")
    assert addr is not None and (addr.get("bus"), addr.get("slot")) == ("0x00", "0x1e")
    functions = {addr.get("function")}
    if model != "nvdimm":
        region = out.find("devices/memory" if model == "virtio-pmem" else "devices/shmem")
        assert region is not None and region.find("address") is not None
        functions.add(region.find("address").get("function"))  # type: ignore[union-attr]
    assert functions == ({"0x3", "0x4"} if model != "nvdimm" else {"0x3"})
    back = domxml.disable(out)
    assert back.find("devices/controller[@type='virtio-serial']") is None


def test_one_free_slot_leaves_placement_to_libvirt() -> None:
    out = enrol(_full_pc(1, free=(1, 5)))
    assert out.find("devices/controller[@type='virtio-serial']") is None  # libvirt adds it
    enr = domxml.enrolment(out)
    assert enr is not None and enr.has("implicit", "virtio-serial-controller")


def test_existing_virtio_serial_controller_needs_no_slot() -> None:
    text = _full_pc(0).replace("<memballoon", "<controller type='virtio-serial' index='0'>"
                               "<address type='pci' domain='0x0000' bus='0x00' slot='0x1e' "
                               "function='0x1'/></controller><memballoon")
    enrol(text)


def test_q35_is_left_to_libvirt() -> None:
    root = domxml.parse(domain(machine="q35"))
    assert not pci.is_i440fx(root)
    assert pci.addresses_for(root, 2, "x") == []


@pytest.mark.parametrize("machine,i440fx", [("pc", True), ("pc-i440fx-7.2", True),
                                            ("pc-1.2", True), ("q35", False),
                                            ("pc-q35-7.2", False)])
def test_machine_names(machine: str, i440fx: bool) -> None:
    assert pci.is_i440fx(domxml.parse(domain(machine=machine))) is i440fx


def test_unreadable_addresses_are_left_to_libvirt() -> None:
    text = _full_pc(0).replace("slot='0x05'", "slot='\u0665'", 1)
    assert pci.addresses_for(domxml.parse(text), 1, "x") == []
