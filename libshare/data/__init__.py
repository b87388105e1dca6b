"""The files libshare ships, read through :mod:`importlib.resources` so that an installed
wheel works like the source tree: ``host/`` (the qemu hook, a link to the project's
``hooks/qemu``, and the daemon's systemd unit template) and ``guest/`` (everything
installed into guests: the ``libshare-redirect`` script, its initramfs and dpkg hooks,
its unit).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def host_text(name: str) -> str:
    """Return the text of the host-side data file ``host/NAME``."""
    return resources.files(__name__).joinpath("host", name).read_text()


def guest_bytes(name: str) -> bytes:
    """Return the bytes of the guest-side file ``guest/NAME``."""
    return resources.files(__name__).joinpath("guest", name).read_bytes()


def guest_path(name: str) -> Path:
    """Return the path of the guest-side file ``guest/NAME`` in this installation (for
    running the guest script on the host, as tests and image preparation do)."""
    return Path(str(resources.files(__name__).joinpath("guest", name)))
