"""libshare: one canonical copy of shared libraries per trust group of libvirt guests.

The package owns everything but the thin libvirt hook script (``hooks/qemu``):
``domxml`` (pure domain-XML transforms), ``sharing`` (library store and region
images), ``introspect`` (reading guest kernels from the host), plus the command line,
configuration, the hook logic and enrolment through the libvirt API.
"""

__version__ = "0.1.0"
