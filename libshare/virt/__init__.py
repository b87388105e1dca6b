"""The libvirt side: ``api`` (the only module that opens libvirt: connect, look up,
define, monitor commands, the regions domains refer to), ``enrol`` (enable and disable
a domain's enrolment through the API), ``capabilities`` (what this host's libvirt and
QEMU can start) and ``process`` (a running domain's QEMU pid from libvirt's pid file;
no libvirt import, the hook uses it)."""
