"""Pure transforms of libvirt domain XML (lxml trees in, lxml trees out, no I/O).

``enable``/``disable``/``describe`` enrol a domain into a library region and back;
``parse``/``serialize`` convert text; ``schema`` validates against libvirt's RelaxNG.
"""

from libshare.domxml.metadata import NS
from libshare.domxml.transform import (
    RegionSpec,
    boot_of,
    describe,
    disable,
    enable,
    enrolment,
    is_enrolled,
    parse,
    restore_initrd,
    serialize,
    switch_initrd,
)

__all__ = ["NS", "RegionSpec", "boot_of", "describe", "disable", "enable", "enrolment",
           "is_enrolled", "parse", "restore_initrd", "serialize", "switch_initrd"]
