"""Unit tests of the kernel module closure (modules.dep, builtin, softdep, aliases)."""

from __future__ import annotations

import pytest

from libshare.demo.tiny.kernel import (
    KernelPackageError,
    module_closure,
    module_name,
    parse_aliases,
    parse_builtin,
    parse_modules_dep,
    parse_softdeps,
)

DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/acpi/nfit/nfit.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/libnvdimm.ko:
kernel/drivers/nvdimm/nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_btt.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/compressed/zz.ko.xz: kernel/drivers/virtio/virtio.ko
"""
BUILTIN = "kernel/drivers/dax/dax.ko\nkernel/drivers/tty/serial/8250/8250.ko\n"
SOFTDEP = "# comment\nsoftdep libcrc32c pre: crc32c\nsoftdep ext4 pre: crypto-crc32c post: foo\n"
ALIAS = ("alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n"
         "alias cpu:type:x86,ven*fam*mod*:feature:*0094* crc32c_intel\n")


def closure(wanted: list[str], optional: set[str] | None = None) -> list[str]:
    return module_closure(wanted, parse_modules_dep(DEP), parse_builtin(BUILTIN),
                          parse_softdeps(SOFTDEP), parse_aliases(ALIAS), optional)


def names(paths: list[str]) -> list[str]:
    return [module_name(p) for p in paths]


def test_module_name() -> None:
    assert module_name("kernel/fs/ext4/ext4.ko") == "ext4"
    assert module_name("kernel/arch/x86/crypto/crc32c-intel.ko") == "crc32c_intel"
    assert module_name("kernel/x/zz.ko.xz") == "zz"
    assert module_name("kernel/x/zz.ko.zst") == "zz"


def test_dependencies_come_first() -> None:
    order = names(closure(["nd_pmem", "nfit"]))
    assert order == ["libnvdimm", "nd_btt", "nd_pmem", "nfit"]
    assert len(order) == len(set(order))


def test_every_module_after_its_dependencies() -> None:
    deps = parse_modules_dep(DEP)
    order = names(closure(["ext4", "erofs", "virtio_pci", "nfit", "nd_pmem", "zz"]))
    for i, mod in enumerate(order):
        for dep in deps[mod][1]:
            assert dep in order[:i], (mod, dep)


def test_builtin_is_skipped_and_unknown_raises() -> None:
    assert closure(["dax", "8250"]) == []
    with pytest.raises(KernelPackageError, match="nosuchmod"):
        closure(["nosuchmod"])


def test_softdeps_via_aliases_are_loaded_before_and_optional() -> None:
    optional: set[str] = set()
    order = names(closure(["erofs"], optional))
    assert order.index("crc32c_generic") < order.index("libcrc32c") < order.index("erofs")
    assert "crc32c_intel" in order
    assert {module_name(p) for p in optional} == {"crc32c_intel", "crc32c_generic"}


def test_a_module_wanted_outright_is_not_optional() -> None:
    optional: set[str] = set()
    closure(["erofs", "crc32c_generic"], optional)
    assert {module_name(p) for p in optional} == {"crc32c_intel"}


def test_compressed_paths_are_kept() -> None:
    assert closure(["zz"])[-1] == "kernel/drivers/compressed/zz.ko.xz"


def test_cycle_is_reported() -> None:
    deps = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(KernelPackageError, match="cycle"):
        module_closure(["a"], deps)


def test_default_modules_resolve_on_a_cached_kernel() -> None:
    """On a machine that already has a kernel in the guest cache, the default module
    set resolves (nothing fetched here)."""
    import os
    from pathlib import Path

    from libshare.demo.cache import CACHE_ENV, DEFAULT_CACHE
    from libshare.demo.tiny.kernel import DEFAULT_MODULES, _cached_kernels, kernel_modules_order

    kdir = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE) / "kernels"
    kernels = _cached_kernels(kdir) if kdir.is_dir() else []
    if not kernels:
        pytest.skip("no kernel in the guest cache")
    order = names(kernel_modules_order(kernels[-1], DEFAULT_MODULES))
    assert {"nfit", "nd_pmem", "libnvdimm", "erofs"} <= set(order)
    assert order.index("libnvdimm") < order.index("nfit")
