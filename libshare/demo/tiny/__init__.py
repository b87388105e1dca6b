"""Tiny test guests: a Debian kernel package and busybox in an initramfs, booted
directly by libvirt in seconds under TCG; they run a shell script, print results on the
serial console and power off.

``kernel`` (fetch and cache Debian kernel packages, module closure), ``initramfs``
(base and per-test images), ``domain`` (direct-kernel-boot domain XML) and ``runner``
(boot, wait for markers, results).
"""
