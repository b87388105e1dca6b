"""Validation of domain XML against the host libvirt's RelaxNG schema.

The only I/O in ``libshare.domxml``: it reads the schema file once (about 15 ms).
"""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")


@functools.cache
def _schema(path: str) -> etree.RelaxNG:
    return etree.RelaxNG(file=path)


def available(path: Path = DOMAIN_RNG) -> bool:
    """Return True when the libvirt domain schema is installed at ``path``."""
    return path.is_file()


def errors(root: etree._Element, path: Path = DOMAIN_RNG) -> list[str]:
    """Return the schema violations of domain ``root`` (empty when it validates)."""
    schema = _schema(str(path))
    if schema.validate(root):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]
