"""Debian 12 test guests: a cached bootable debootstrap image with its own boot loader
and initramfs (``image``), their domain XML (``domain``) and their life cycle with a
qemu-guest-agent channel (``guest``: boot, reboot, power-cycle, always cleaned up).
"""
