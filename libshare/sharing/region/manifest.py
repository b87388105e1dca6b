"""The manifests inside a region filesystem: ``/.libshare/manifest.json`` (for the
host) and ``/.libshare/manifest.tsv`` (for the guests' POSIX sh), see
:mod:`libshare.sharing.region.layout`."""


from __future__ import annotations

import hashlib
import json
from typing import Any

from libshare.sharing.formats.erofs import (
    ErofsError,
    FsImage,
)
from libshare.sharing.region.layout import fs_path
from libshare.sharing.store import (
    StoreEntry,
    path_problem,
)

MANIFEST_PATH = "/.libshare/manifest.json"


TSV_MANIFEST_PATH = "/.libshare/manifest.tsv"


MANIFEST_VERSION = 1


def manifest_bytes(entries: list[StoreEntry], group: str, writer: str,
                   policy: str | None = None, trees: list[dict[str, Any]] | None = None,
                   tree_tsv: bytes | None = None, filesystem: str = "erofs",
                   rpaths: dict[str, str] | None = None) -> bytes:
    """Return the canonical manifest (JSON, sorted, no timestamps) for ``entries``,
    recording what wrote the filesystem (``writer``: "libshare-erofs N", :data:`libshare.
    sharing.formats.erofs_write.WRITER`, or "mke2fs VERSION" with ``filesystem`` ext4), the
    ``policy`` that chose them, and the guest ``trees`` laid out (their summaries) with
    the SHA-256 of ``/.libshare/tree.tsv`` (``tree_tsv``); ``rpaths``: sha256 -> region
    path of each entry where the caller has them (else :func:`fs_path`)."""
    rpaths = rpaths or {}
    doc: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "group": group,
        "writer": writer,
        "files": [{"path": rpaths.get(e.sha256) or fs_path(e), "sha256": e.sha256, "build_id": e.build_id,
                   "soname": e.soname, "size": e.size, "guest_paths": sorted(e.paths)}
                  for e in sorted(entries, key=lambda x: x.sha256)],
    }
    if filesystem != "erofs":
        doc["filesystem"] = filesystem
    if policy is not None:
        doc["policy"] = policy
    if trees:
        doc["trees"] = trees
        doc["tree_tsv_sha256"] = hashlib.sha256(tree_tsv or b"").hexdigest()
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def tsv_manifest_bytes(entries: list[StoreEntry], skip: frozenset[str] = frozenset(),
                       rpaths: dict[str, str] | None = None) -> bytes:
    """Return the text manifest for guests' POSIX sh: one ``sha256\\tsize\\tpath\\t
    guest_path`` line per guest path of each entry, sorted; guest paths a shell ``read``
    could mangle (control characters such as tab and newline, backslash) or that are not
    UTF-8 (:func:`libshare.sharing.store.path_problem`; an index written before names
    were checked may hold them) are left out, and so are those in ``skip`` (the regular
    files of the region's guest trees: guests take those from ``/.libshare/tree.tsv``,
    with their modes and owners); ``rpaths`` as for :func:`manifest_bytes`."""
    rpaths = rpaths or {}
    lines = []
    for e in entries:
        rpath = rpaths.get(e.sha256) or fs_path(e)
        for guest in e.paths:
            if path_problem(guest) or "\\" in guest or not guest.startswith("/") \
                    or guest in skip:
                continue
            lines.append(f"{e.sha256}\t{e.size}\t{rpath}\t{guest}\n")
    return "".join(sorted(lines)).encode()


def read_manifest(fs: FsImage) -> dict[str, Any]:
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
