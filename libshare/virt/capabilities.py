"""What this host's libvirt and QEMU can actually run, found by probing and cached.

libvirt's schema accepts device models that the running libvirt/QEMU pair cannot start
(virtio-pmem on libvirt 9.0 with QEMU 7.2: "virtio-pmem memory device info is not
handled yet"). A probe starts a tiny transient, paused domain with the device and
destroys it at once; the verdict is cached in ``STATE/capabilities.json`` per libvirt
and QEMU version.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import libvirt

from libshare.util.files import atomic_write

PROBE_SIZE = 2 * 1024 * 1024


def _probe_xml(name: str, path: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <maxMemory slots='1' unit='KiB'>1048576</maxMemory>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <features><acpi/></features>
  <cpu><numa><cell id='0' cpus='0' memory='65536' unit='KiB'/></numa></cpu>
  <devices>
    <memballoon model='none'/>
    <memory model='virtio-pmem' access='shared'>
      <source><path>{path}</path></source>
      <target><size unit='KiB'>{PROBE_SIZE // 1024}</size></target>
    </memory>
  </devices>
</domain>"""


def _cache_key(conn: Any) -> str:
    return f"libvirt-{conn.getLibVersion()}-qemu-{conn.getVersion()}"


def virtio_pmem_works(conn: Any, state_dir: Path) -> tuple[bool, str]:
    """Return (True, "") when this host can start a virtio-pmem region device, else
    (False, libvirt's reason). Probes once per libvirt/QEMU version pair."""
    cache = state_dir / "capabilities.json"
    key = _cache_key(conn)
    entries: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        entries = json.loads(cache.read_text())
    hit = entries.get(key, {}).get("virtio-pmem")
    if isinstance(hit, dict):
        return bool(hit.get("works")), str(hit.get("reason", ""))
    workdir = Path(tempfile.mkdtemp(prefix="libshare-probe-", dir="/var/tmp"))
    workdir.chmod(0o755)
    image = workdir / "probe.img"
    name = f"libshare-probe-{secrets.token_hex(4)}"
    try:
        with open(image, "wb") as fh:
            fh.truncate(PROBE_SIZE)
        os.chmod(image, 0o644)
        dom = conn.createXML(_probe_xml(name, image), libvirt.VIR_DOMAIN_START_PAUSED)
        dom.destroy()
        works, reason = True, ""
    except libvirt.libvirtError as exc:
        works, reason = False, str(exc.get_error_message())
    finally:
        with contextlib.suppress(OSError):
            image.unlink()
            workdir.rmdir()
    entries.setdefault(key, {})["virtio-pmem"] = {"works": works, "reason": reason}
    with contextlib.suppress(OSError):
        atomic_write(cache, json.dumps(entries, indent=2, sort_keys=True).encode())
    return works, reason
