"""Domain XML documents the unit tests enrol: a small x86-64 domain by name, and the
same enrolled into a region with libshare's own transform."""

from __future__ import annotations

from libshare import domxml

MiB = 1 << 20
UUID = "0d4c2cf5-1b5e-4b53-9d7f-1f9b3c7b9a11"


def plain(name: str = "g1", domain_type: str = "qemu", uuid: str = UUID,
          memory_mib: int = 256, machine: str | None = None) -> str:
    """Return a minimal x86-64 hvm domain ``name`` without devices (the shape a fresh
    ``virsh define`` of a small guest has, less its disks)."""
    mach = f" machine='{machine}'" if machine else ""
    return (f"<domain type='{domain_type}'><name>{name}</name><uuid>{uuid}</uuid>\n"
            f"<memory unit='MiB'>{memory_mib}</memory>"
            f"<os><type arch='x86_64'{mach}>hvm</type></os><devices/></domain>")


def region_spec(region: str = "/r/a.img", size: int = 8 * MiB, group: str = "g",
                digest: str | None = "ab" * 32, state_dir: str | None = "/var/lib/libshare",
                model: str = "nvdimm", redirect: str | None = None) -> domxml.RegionSpec:
    """Return a region spec as enrolment would build it (defaults: an 8 MiB nvdimm
    region of group ``g`` with a recorded digest)."""
    return domxml.RegionSpec(region, size, group, model=model, digest=digest,
                             state_dir=state_dir, redirect=redirect)


def enrolled(name: str = "g1", base: str | None = None, **spec: object) -> str:
    """Return domain ``name`` (or the document ``base``) enrolled with
    :func:`region_spec` (``spec`` overrides its defaults)."""
    root = domxml.parse(base if base is not None else plain(name))
    return domxml.serialize(domxml.enable(root, region_spec(**spec)))  # type: ignore[arg-type]
