"""Enrolled documents as libvirt 9.0 itself reads them (issue 10, section 2).

Every document of the tests (the 120 virt-manager domains in ../shared and the cases
below) whose input libvirt turns into a QEMU command line
(``virConnectDomainXMLToNative('qemu-argv')``) must still turn into one once enrolled,
and in that command line the region's backend and device are what sharing needs:
nvdimm: ``memory-backend-file`` of the region, ``share`` false, ``pmem`` true, no
``prealloc`` (nor ``-mem-prealloc``, nor ``mem-lock=on``), an ``nvdimm`` device with
``unarmed`` on; virtio-pmem and ivshmem: a shared file backend, never preallocated.

domainXMLToNative takes milliseconds: it checks the emulator binary, machine type,
CPU model, TPM, hugetlbfs mounts and PCI addresses, but not that disks, kernels or the
region file exist. A few cases are also really defined (``lstest-`` names, undefined
afterwards) and disabled again from what libvirt wrote back.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libshare import domxml
from libshare.errors import RefusedError
from tests.support.domains import composed, full_pc_devices

MiB = 1 << 20
REGION = "/var/lib/libshare/regions/images/" + "ab" * 32 + ".img"
GROUP = "web"
MODELS = ("nvdimm", "virtio-pmem", "ivshmem")
#: refusals allowed for documents libvirt runs: what would copy the region into every
#: guest, and 32-bit guests (libshare supports x86_64 only)
ALLOWED_REFUSALS = ("<memoryBacking>", "architecture i686")


def find_corpus() -> Path:
    """Return shared/corpus/virt-manager beside the nearest ancestor that has it."""
    for base in Path(__file__).resolve().parents:
        found = base / "shared" / "corpus" / "virt-manager"
        if found.is_dir():
            return found
    return Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "virt-manager"


CORPUS = sorted(find_corpus().glob("*.xml"))


def spec(model: str) -> domxml.RegionSpec:
    return domxml.RegionSpec(REGION, 64 * MiB, GROUP, model=model, digest="ab" * 32,
                             state_dir="/var/lib/libshare")


def domain(name: str = "lsxml", extra: str = "",
           memory: str = "<memory unit='MiB'>512</memory>", devices: str = "",
           machine: str = "pc") -> str:
    """Return :func:`tests.support.domains.composed` named ``name`` (default lsxml)."""
    return composed(name, extra, memory, devices, machine)


TWO_CELLS = """<cpu><numa>
    <cell id='0' cpus='0' memory='512' unit='MiB'/>
    <cell id='1' cpus='1' memory='1' unit='GiB'/>
  </numa></cpu>"""


def full_pc(name: str = "lsxml", bridges: int = 1, usb_set: bool = True) -> str:
    """A pc domain whose PCI slots are all taken by explicit addresses (virt-manager's
    USB controller set in slot 0x1e when ``usb_set``)."""
    return domain(name, devices=full_pc_devices(bridges, usb_set))


#: own cases: (id, document builder taking a name); libvirt runs every one of them
CASES: dict[str, Callable[[str], str]] = {
    "plain-pc": lambda n: domain(n),
    "plain-q35": lambda n: domain(n, machine="q35"),
    "numa-cells-above-memory": lambda n: domain(n, TWO_CELLS),
    "numa-cells-no-memory": lambda n: domain(n, TWO_CELLS, memory=""),
    "numa-shared-access": lambda n: domain(n, "<cpu><numa><cell id='0' cpus='0-1' "
                                              "memory='512' unit='MiB' memAccess='shared' "
                                              "discard='yes'/></numa></cpu>"),
    "numatune": lambda n: domain(n, "<numatune><memory mode='strict' nodeset='0'/>"
                                    "<memnode cellid='0' mode='strict' nodeset='0'/>"
                                    "</numatune><cpu><numa><cell id='0' cpus='0-1' "
                                    "memory='512' unit='MiB'/></numa></cpu>"),
    "immediate": lambda n: domain(n, "<memoryBacking><allocation mode='immediate'/>"
                                     "</memoryBacking>"),
    "immediate-threads": lambda n: domain(n, "<memoryBacking><allocation mode='immediate' "
                                             "threads='2'/></memoryBacking>"),
    "locked": lambda n: domain(n, "<memoryBacking><locked/></memoryBacking>"),
    "memfd-shared": lambda n: domain(n, "<memoryBacking><source type='memfd'/>"
                                        "<access mode='shared'/></memoryBacking>"),
    "file-shared-discard": lambda n: domain(n, "<memoryBacking><source type='file'/>"
                                               "<access mode='shared'/><discard/>"
                                               "</memoryBacking>"),
    "nosharepages": lambda n: domain(n, "<memoryBacking><nosharepages/></memoryBacking>"),
    "existing-dimm": lambda n: domain(
        n, "<maxMemory slots='2' unit='MiB'>1792</maxMemory>" + TWO_CELLS,
        devices="<memory model='dimm'><target><size unit='MiB'>256</size><node>0</node>"
                "</target></memory>"),
    "pci-full-usb-set": lambda n: full_pc(n, 1),
    "pci-full-chain": lambda n: full_pc(n, 3),
    "pci-bridge-chain-free": lambda n: domain(n, devices="".join(
        f"<controller type='pci' index='{i}' model='pci-bridge'><address type='pci' "
        f"domain='0x0000' bus='0x{i - 1:02x}' slot='0x05' function='0x0'/></controller>"
        for i in range(1, 4)) + "<interface type='user'><model type='virtio'/><address "
        "type='pci' domain='0x0000' bus='0x03' slot='0x02' function='0x0'/></interface>"),
}


def native(conn: Any, xml: str) -> str | None:
    """Return libvirt's QEMU command line for ``xml``, or None when libvirt refuses it."""
    import libvirt

    try:
        return str(conn.domainXMLToNative("qemu-argv", xml, 0))
    except libvirt.libvirtError:
        return None


def objects(argv: str, option: str) -> list[dict[str, Any]]:
    """Return the JSON arguments of every ``option`` (``-object``/``-device``)."""
    words = shlex.split(argv)
    return [json.loads(words[i + 1]) for i, w in enumerate(words[:-1])
            if w == option and words[i + 1].startswith("{")]


def check_region(argv: str, model: str) -> list[str]:
    """Return what is wrong with the region's backend and device in ``argv``."""
    problems = []
    words = shlex.split(argv)
    if "-mem-prealloc" in words:
        problems.append("-mem-prealloc preallocates every backend")
    backends = [o for o in objects(argv, "-object")
                if o.get("qom-type") == "memory-backend-file" and o.get("mem-path") ==
                (f"/dev/shm/libshare-{GROUP}" if model == "ivshmem" else REGION)]
    if len(backends) != 1:
        return [*problems, f"{len(backends)} region backends"]
    b = backends[0]
    if b.get("prealloc") or "prealloc-context" in b:
        problems.append(f"region backend preallocated: {b}")
    devices = [d for d in objects(argv, "-device") if d.get("memdev") == b["id"]]
    if len(devices) != 1:
        return [*problems, f"{len(devices)} devices on the region backend"]
    d = devices[0]
    if model == "nvdimm":
        if b.get("share") is not False or b.get("pmem") is not True:
            problems.append(f"nvdimm backend not share=false pmem=true: {b}")
        if d.get("driver") != "nvdimm" or d.get("unarmed") is not True:
            problems.append(f"not an unarmed nvdimm: {d}")
        if "mem-lock=on" in words:
            problems.append("mem-lock=on copies the private region")
    else:
        want = "virtio-pmem-pci" if model == "virtio-pmem" else "ivshmem-plain"
        if b.get("share") is not True or d.get("driver") != want:
            problems.append(f"not a shared {want}: {b} {d}")
    return problems


def enrol_and_check(conn: Any, xml: str, model: str) -> str:
    """Enrol ``xml`` (whose input libvirt accepts) and check libvirt's command line;
    return "refused: REASON" or "ok"; fail the test on anything else."""
    try:
        enrolled = domxml.serialize(domxml.enable(domxml.parse(xml), spec(model)))
    except RefusedError as exc:
        assert any(r in str(exc) for r in ALLOWED_REFUSALS), str(exc)
        return f"refused: {exc}"
    argv = native(conn, enrolled)
    if argv is None:
        import libvirt

        try:
            conn.domainXMLToNative("qemu-argv", enrolled, 0)
        except libvirt.libvirtError as exc:
            pytest.fail(f"libvirt refuses the enrolled document: {exc}")
    assert argv is not None
    problems = check_region(argv, model)
    assert not problems, problems
    return "ok"


@pytest.mark.parametrize("model", MODELS)
def test_corpus_enrolled_documents_run(libvirt_conn: Any, model: str) -> None:
    assert len(CORPUS) == 120, "the virt-manager corpus is missing"
    results = {}
    for doc in CORPUS:
        xml = doc.read_text()
        if native(libvirt_conn, xml) is None:
            continue  # libvirt cannot run the input on this host either
        try:
            results[doc.name] = enrol_and_check(libvirt_conn, xml, model)
        except AssertionError as exc:
            raise AssertionError(f"{doc.name}: {exc}") from exc
    # 11 documents of the corpus run here and are x86_64 qemu/kvm
    assert sum(r == "ok" for r in results.values()) >= 10, results


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_own_cases_run_once_enrolled(libvirt_conn: Any, case: str, model: str) -> None:
    xml = CASES[case]("lsxml")
    assert native(libvirt_conn, xml) is not None, f"libvirt does not run the input {case}"
    outcome = enrol_and_check(libvirt_conn, xml, model)
    expected_refusal = (case.startswith("immediate") and model != "ivshmem") or \
        (case == "locked" and model == "nvdimm")
    assert outcome.startswith("refused") == expected_refusal, outcome


def test_immediate_allocation_preallocates_the_region(libvirt_conn: Any) -> None:
    """Why enrolment refuses it: libvirt's own command line for the enrolment that
    libshare would have written (region preallocated)."""
    root = domxml.parse(CASES["immediate"]("lsxml"))
    plain = domxml.enable(domxml.parse(CASES["plain-pc"]("lsxml")), spec("nvdimm"))
    backing = root.find("memoryBacking")
    assert backing is not None
    plain.insert(3, backing)
    argv = native(libvirt_conn, domxml.serialize(plain))
    assert argv is not None
    assert any("region backend preallocated" in p for p in check_region(argv, "nvdimm"))


@pytest.mark.parametrize("case,model", [("numa-cells-above-memory", "nvdimm"),
                                        ("numa-cells-no-memory", "nvdimm"),
                                        ("pci-full-usb-set", "nvdimm"),
                                        ("pci-full-usb-set", "ivshmem")])
def test_define_enrolled_then_disable(libvirt_conn: Any, domain_name: Callable[[], str],
                                      case: str, model: str) -> None:
    """Define the enrolled document for real, disable what libvirt wrote back, and
    define that again: both definitions are accepted and the region is gone."""
    import libvirt

    name = domain_name()
    enrolled = domxml.serialize(domxml.enable(domxml.parse(CASES[case](name)), spec(model)))
    dom = libvirt_conn.defineXML(enrolled)
    try:
        written = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert domxml.describe(written)["device_present"] is True
        if model == "nvdimm":
            assert check_region(str(libvirt_conn.domainXMLToNative(
                "qemu-argv", domxml.serialize(written), 0)), model) == []
        back = domxml.disable(written)
        dom = libvirt_conn.defineXML(domxml.serialize(back))
        again = domxml.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert domxml.describe(again)["enrolled"] is False
        assert again.find("devices/memory[@model='nvdimm']") is None
        assert again.find("devices/shmem") is None
        assert again.find("devices/controller[@type='virtio-serial']") is None
    finally:
        dom.undefine()


def _region_smaps(pid: int, path: str) -> dict[str, int]:
    """Return the kB fields of QEMU ``pid``'s mapping of ``path`` (the region)."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            inside = line.endswith(" " + path)
            continue
        if inside and len(head) == 3 and head[2] == "kB":
            fields[head[0].rstrip(":")] = int(head[1])
    return fields


def test_immediate_allocation_copies_the_region_into_qemu(libvirt_conn: Any,
                                                          domain_name: Callable[[], str],
                                                          scratch_dir: Path) -> None:
    """Ground truth for the refusal, from the kernel: a paused QEMU started from the
    enrolment libshare would write for ``<allocation mode='immediate'/>`` holds the
    whole region as anonymous (copied) pages; without it, none."""
    import libvirt

    image = scratch_dir / "region.img"
    image.write_bytes(os.urandom(MiB) * 32)
    image.chmod(0o644)
    seen = {}
    for label in ("immediate", "plain"):
        name = domain_name()
        root = domxml.enable(domxml.parse(domain(name, memory="<memory unit='MiB'>64"
                                                 "</memory>")),
                             domxml.RegionSpec(str(image), 32 * MiB, GROUP))
        rec = root.find(f"metadata/{{{domxml.NS}}}enrolment")
        assert rec is not None
        rec.getparent().remove(rec)  # the installed hook then leaves the domain alone
        if label == "immediate":
            backing = domxml.parse(CASES["immediate"]("x")).find("memoryBacking")
            assert backing is not None
            root.insert(3, backing)
        dom = libvirt_conn.createXML(domxml.serialize(root), libvirt.VIR_DOMAIN_START_PAUSED)
        try:
            pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
            seen[label] = _region_smaps(pid, str(image))
        finally:
            dom.destroy()
    assert seen["immediate"]["Anonymous"] == 32 * 1024, seen
    assert seen["plain"]["Anonymous"] == 0, seen
