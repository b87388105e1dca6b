"""The manifests inside a region filesystem: ``/.libshare/manifest.json`` (for the
host) and ``/.libshare/manifest.tsv`` (for the guests' POSIX sh), see
:mod:`libshare.sharing.region.layout`."""


from __future__ import annotations

import json
from typing import Any

from libshare.sharing.formats.erofs import (
    Erofs,
    ErofsError,
)
from libshare.sharing.region.layout import fs_path
from libshare.sharing.store import (
    StoreEntry,
    path_problem,
)

MANIFEST_PATH = "/.libshare/manifest.json"


TSV_MANIFEST_PATH = "/.libshare/manifest.tsv"


MANIFEST_VERSION = 1


def manifest_bytes(entries: list[StoreEntry], group: str, mkfs_version: str) -> bytes:
    """Return the canonical manifest (JSON, sorted, no timestamps) for ``entries``,
    recording the erofs-utils version ``mkfs_version`` that formats the image."""
    doc = {
        "version": MANIFEST_VERSION,
        "group": group,
        "mkfs_erofs": mkfs_version,
        "files": [{"path": fs_path(e), "sha256": e.sha256, "build_id": e.build_id,
                   "soname": e.soname, "size": e.size, "guest_paths": sorted(e.paths)}
                  for e in sorted(entries, key=lambda x: x.sha256)],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def tsv_manifest_bytes(entries: list[StoreEntry]) -> bytes:
    """Return the text manifest for guests' POSIX sh: one ``sha256\\tsize\\tpath\\t
    guest_path`` line per guest path of each entry, sorted; guest paths a shell ``read``
    could mangle (control characters such as tab and newline, backslash) or that are not
    UTF-8 (:func:`libshare.sharing.store.path_problem`; an index written before names
    were checked may hold them) are left out."""
    lines = []
    for e in entries:
        for guest in e.paths:
            if path_problem(guest) or "\\" in guest or not guest.startswith("/"):
                continue
            lines.append(f"{e.sha256}\t{e.size}\t{fs_path(e)}\t{guest}\n")
    return "".join(sorted(lines)).encode()


def read_manifest(fs: Erofs) -> dict[str, Any]:
    """Return the parsed manifest of the region filesystem ``fs``; ErofsError if unusable."""
    ino = fs.lookup(MANIFEST_PATH)
    try:
        doc = json.loads(fs.read_inode(ino))
    except ValueError as exc:
        raise ErofsError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION \
            or not isinstance(doc.get("files"), list):
        raise ErofsError("manifest has an unsupported format")
    return doc
