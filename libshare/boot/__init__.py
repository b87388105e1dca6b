"""Boot paths of enrolled domains, host side: how a domain boots (its disk's own boot
loader, or direct kernel boot from host files named by ``<os><kernel>``/``<initrd>``),
and for direct kernel boot libshare's per-domain initrd, which boots the guest's
libshare hook although the guest's own initramfs is never booted.

- ``initrd``: reading a domain's initrd (its archives, compressed or not, bounded) and
  telling which generator made it (initramfs-tools, dracut, unknown);
- ``overlay``: the archive libshare appends to a domain's own initrd (the init-bottom
  script and the tools, libraries and kernel modules it runs, all under
  ``/usr/lib/libshare``), assembled from files read out of the guest;
- ``store``: ``STATE/boot/UUID/`` (the built ``initrd.img``, the appended
  ``overlay.cpio``, ``boot.json`` recording the original's path and digest), building
  it, and the check the hook makes at ``prepare`` (rebuilt when the domain's original
  initrd changed, e.g. a kernel update on the host).
"""
