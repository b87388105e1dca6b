"""Helpers every subsystem shares and none owns: ``units`` (sizes and libvirt's units,
ASCII digits only), ``files`` (atomic writes, owned installs, locks), ``digest``
(SHA-256 of files with a cache keyed by inode and times), ``cpio`` (newc archives)."""
