"""libvirt's qemu hook: ``ops`` (which operations are handled and which refuse on
failure; imported by the shim ``hooks/qemu`` too), ``handler`` (what each operation
does, bounded in time), ``state`` (running records, redirect requests and outcomes,
logs under the state directory) and ``install`` (putting the shim into libvirt's
hooks directory). Light on purpose: the shim imports this package first."""
