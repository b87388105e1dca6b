"""The hook's contract with libvirt, stated once for the shim (``hooks/qemu``) and the
handler: which ``(operation, sub-operation)`` pairs libshare handles, which operations
refuse on failure (libvirt then refuses the start, migration or restore), and the time
budget libvirt's synchronous call allows.

Light on purpose (standard library only): the shim imports it before it knows whether
the domain is enrolled at all.
"""

from __future__ import annotations

#: operations whose failure must refuse what libvirt is doing (exit 1, one line)
STRICT = frozenset({"prepare", "migrate", "restore"})
#: what libshare handles; every other call exits 0 at once
HANDLED = frozenset({
    ("prepare", "begin"), ("started", "begin"), ("reconnect", "begin"),
    ("stopped", "end"), ("release", "end"), ("migrate", "begin"), ("restore", "begin"),
})
#: libvirt waits for the hook synchronously: all of its work must end within this many
#: seconds, counted from the hook process's start
MAX_SECONDS = 5.0


def is_strict(op: str, sub: str) -> bool:
    """Return True when a failure of ``op``/``sub`` must refuse the operation."""
    return op in STRICT and sub == "begin"
