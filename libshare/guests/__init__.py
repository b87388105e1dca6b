"""The small-guest kit: tiny Debian-kernel + busybox guests that boot in seconds under
TCG in the system libvirtd, run a shell script, print results on the serial console and
power off. Used by the integration tests, the demo and the benchmarks.

Owns nothing itself; it re-exports the public API of its modules: ``kernel`` (fetch and
cache Debian kernels, module closure), ``cpio`` (newc writer), ``initramfs`` (base and
per-test images), ``domain`` (domain XML) and ``runner`` (boot, wait, clean up), and
``debian`` (full Debian guests: a cached bootable disk image with its own boot loader and
initramfs, qcow2 overlays, a qemu-guest-agent channel, boot/reboot/always-clean-up).
"""

from libshare.guests.cache import cache_root
from libshare.guests.debian import (
    BASE_PACKAGES,
    Boot,
    DebianGuest,
    DebianGuestOptions,
    DebianImage,
    DebianImageError,
    DefinedDebianGuest,
    copy_image_libraries,
    create_overlay,
    debian_domain_tree,
    debian_domain_xml,
    debian_image,
    defined_debian_guest,
    image_root,
    running_debian_guest,
)
from libshare.guests.domain import (
    DEFAULT_CMDLINE,
    add_numa_nvdimm_support,
    guest_domain_tree,
    guest_domain_xml,
    nvdimm_device_xml,
)
from libshare.guests.initramfs import (
    BEGIN_MARKER,
    END_MARKER,
    READY_MARKER,
    base_initramfs,
    overlay_archive,
)
from libshare.guests.kernel import (
    DEFAULT_MODULES,
    Kernel,
    KernelError,
    fetch_kernel,
    kernel_modules_order,
    module_closure,
)
from libshare.guests.runner import (
    DefinedGuest,
    GuestError,
    GuestOptions,
    GuestResult,
    GuestTimeout,
    RunningGuest,
    cleanup_domain,
    cleanup_domains,
    defined_guest,
    prepare_guest,
    run_guest,
    running_guest,
)

__all__ = [
    "BASE_PACKAGES",
    "BEGIN_MARKER",
    "DEFAULT_CMDLINE",
    "DEFAULT_MODULES",
    "END_MARKER",
    "READY_MARKER",
    "Boot",
    "DebianGuest",
    "DebianGuestOptions",
    "DebianImage",
    "DebianImageError",
    "DefinedDebianGuest",
    "DefinedGuest",
    "GuestError",
    "GuestOptions",
    "GuestResult",
    "GuestTimeout",
    "Kernel",
    "KernelError",
    "RunningGuest",
    "add_numa_nvdimm_support",
    "base_initramfs",
    "cache_root",
    "cleanup_domain",
    "cleanup_domains",
    "copy_image_libraries",
    "create_overlay",
    "debian_domain_tree",
    "debian_domain_xml",
    "debian_image",
    "defined_debian_guest",
    "defined_guest",
    "fetch_kernel",
    "guest_domain_tree",
    "guest_domain_xml",
    "image_root",
    "kernel_modules_order",
    "module_closure",
    "nvdimm_device_xml",
    "overlay_archive",
    "prepare_guest",
    "run_guest",
    "running_debian_guest",
    "running_guest",
]
