"""The devices libshare adds to a domain, one builder and one matcher per device.

- the library region, in one of three models: ``nvdimm`` (default: copy-on-write,
  read-only to the guest, no preallocation), ``virtio-pmem`` (libvirt insists on
  ``access='shared'`` for it, so guest writes reach the host file) and ``ivshmem``
  (plain ivshmem shares guest writes too): the last two are for trusted groups only;
- the qemu-guest-agent channel used by redirect.

libvirt refuses an ivshmem ``<size>`` that is not a power of two, so the shmem device
is sized ``shmem_size(region size)`` (the next power of two) and the hook pads the
``/dev/shm`` copy of the image with zeros to that size; the metadata keeps the image's
own size, from which the device size always follows.
"""

from __future__ import annotations

from libshare.domxml.metadata import check_group
from libshare.domxml.tree import Element, make

AGENT_CHANNEL = "org.qemu.guest_agent.0"
MODELS = ("nvdimm", "virtio-pmem", "ivshmem")
SHMEM_PREFIX = "libshare-"


def shmem_name(group: str) -> str:
    """Return the ivshmem object name (and /dev/shm file name) for a trust group;
    raise RefusedError when ``group`` is not a valid group name (it becomes a path)."""
    return SHMEM_PREFIX + check_group(group)


def shmem_size(size: int) -> int:
    """Return the ivshmem device size for a region of ``size`` bytes: the smallest power
    of two that is at least ``size`` (libvirt accepts nothing else)."""
    if size <= 0:
        raise ValueError(f"region size {size} is not positive")
    return 1 << (size - 1).bit_length()


def region_device(model: str, path: str, size: int, group: str, node: int | None) -> Element:
    """Return the region device element for ``model`` backed by ``path`` of ``size`` bytes.

    ``node`` is the guest NUMA node the nvdimm is attached to. An ivshmem device gets
    ``shmem_size(size)`` (a power of two), the others ``size`` itself.
    """
    kib = str(size // 1024)
    if model == "nvdimm":
        target = [make("size", {"unit": "KiB"}, kib)]
        if node is not None:
            target.append(make("node", text=str(node)))
        target.append(make("readonly"))
        return make("memory", {"model": "nvdimm", "access": "private"}, children=[
            make("source", children=[make("path", text=path), make("pmem")]),
            make("target", children=target),
        ])
    if model == "virtio-pmem":
        return make("memory", {"model": "virtio-pmem", "access": "shared"}, children=[
            make("source", children=[make("path", text=path)]),
            make("target", children=[make("size", {"unit": "KiB"}, kib)]),
        ])
    if model == "ivshmem":
        return make("shmem", {"name": shmem_name(group)}, children=[
            make("model", {"type": "ivshmem-plain"}),
            make("size", {"unit": "KiB"}, str(shmem_size(size) // 1024)),
        ])
    raise ValueError(f"unknown region model {model!r}")


def region_path_of(dev: Element) -> str | None:
    """Return the host path backing a memory/shmem device element, or None."""
    if dev.tag == "memory":
        path = dev.findtext("source/path")
        return path.strip() if path else None
    if dev.tag == "shmem" and dev.get("name"):
        return f"/dev/shm/{dev.get('name')}"
    return None


def find_region_device(devices: Element | None, model: str, path: str,
                       group: str) -> Element | None:
    """Return the region device in ``devices`` that libshare added, or None."""
    if devices is None:
        return None
    for dev in devices:
        if model == "ivshmem":
            # compared, not built: a record with a bad group can still be undone
            if dev.tag == "shmem" and dev.get("name") == SHMEM_PREFIX + group:
                return dev
        elif (dev.tag == "memory" and dev.get("model") == model
              and region_path_of(dev) == path):
            return dev
    return None


def agent_channel() -> Element:
    """Return a qemu-guest-agent virtio channel element."""
    return make("channel", {"type": "unix"}, children=[
        make("target", {"type": "virtio", "name": AGENT_CHANNEL}),
    ])


def find_agent_channel(devices: Element | None) -> Element | None:
    """Return the domain's qemu-guest-agent channel element, or None."""
    if devices is None:
        return None
    for dev in devices.findall("channel"):
        target = dev.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return dev
    return None


def virtio_serial_users(devices: Element | None) -> int:
    """Return how many devices need a virtio-serial controller (virtio channels/consoles)."""
    if devices is None:
        return 0
    count = 0
    for dev in devices:
        if dev.tag in ("channel", "console"):
            target = dev.find("target")
            if target is not None and target.get("type") == "virtio":
                count += 1
    return count


def disk_files(root: Element) -> set[str]:
    """Return the files the disks of domain ``root`` name: each ``<disk type='file'>``
    source and, in a live definition, every file of its ``<backingStore>`` chain."""
    out: set[str] = set()
    for disk in root.iterfind("./devices/disk"):
        for src in disk.iter("source"):
            path = src.get("file")
            if path:
                out.add(path)
    return out


def region_paths(root: Element) -> set[str]:
    """Return the region backing paths the domain ``root`` refers to: the
    ``<source><path>`` of nvdimm and virtio-pmem ``<memory>`` devices and ``/dev/shm/N``
    of ``<shmem name=N>`` (see :func:`region_path_of`)."""
    out: set[str] = set()
    for dev in root.iterfind("./devices/*"):
        if dev.tag == "memory" and dev.get("model") not in ("nvdimm", "virtio-pmem"):
            continue
        if dev.tag in ("memory", "shmem"):
            path = region_path_of(dev)
            if path:
                out.add(path)
    return out
