"""enable/disable over the 120 real domain documents of virt-manager's test data."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from libshare import domxml
from libshare.domxml import schema
from libshare.errors import RefusedError
from tests.support.paths import CORPUS

DOCS = sorted(CORPUS.glob("*.xml"))
MODELS = ("nvdimm", "virtio-pmem", "ivshmem")

pytestmark = pytest.mark.skipif(not DOCS, reason=f"corpus not found at {CORPUS}")


def c14n(root: etree._Element) -> bytes:
    return etree.tostring(root, method="c14n")


def spec(model: str) -> domxml.RegionSpec:
    return domxml.RegionSpec("/var/lib/libshare/regions/images/ab.img", 64 << 20, "web",
                             model=model, digest="ab" * 32, state_dir="/var/lib/libshare")


def test_corpus_is_complete() -> None:
    assert len(DOCS) == 120


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_round_trip_or_clean_refusal(doc: Path, model: str) -> None:
    original = doc.read_bytes()
    root = domxml.parse(original)
    before = c14n(root)
    valid = schema.available() and not schema.errors(root)
    try:
        enabled = domxml.enable(root, spec(model))
    except RefusedError as exc:
        assert "\n" not in str(exc) and str(exc)
        assert c14n(root) == before  # input untouched
        # Only domains that really cannot host a region are refused, and those where
        # libvirt would give each guest a full copy of the region (memoryBacking).
        ostype = root.find("os/type")
        assert root.get("type") not in ("qemu", "kvm") or ostype is None or \
            ostype.text != "hvm" or ostype.get("arch") not in (None, "x86_64") or \
            (model != "ivshmem" and "<memoryBacking>" in str(exc)), str(exc)
        return
    assert c14n(root) == before, "enable modified its input"
    assert domxml.describe(enabled)["enrolled"] is True
    assert domxml.describe(enabled)["device_present"] is True
    assert c14n(domxml.enable(enabled, spec(model))) == c14n(enabled), "not idempotent"
    assert c14n(domxml.disable(enabled)) == before, "disable(enable(x)) != x"
    if valid:
        assert schema.errors(enabled) == []


def test_some_documents_are_enrolled_and_valid() -> None:
    """Guard against refusing everything: most x86_64 qemu/kvm documents enrol."""
    enrolled = 0
    for doc in DOCS:
        root = domxml.parse(doc.read_bytes())
        try:
            domxml.enable(root, spec("nvdimm"))
            enrolled += 1
        except RefusedError:
            pass
    assert enrolled >= 30


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_document_round_trip_keeps_the_prolog(doc: Path) -> None:
    """Comments and processing instructions around the root survive enable/disable."""
    text = ("<!-- kept -->\n<?app before?>\n" + doc.read_text().strip() +
            "\n<!-- after -->\n<?app after?>\n")
    root = domxml.parse(text)
    whole = etree.tostring(root.getroottree(), method="c14n", with_comments=True)
    try:
        enabled = domxml.enable(root, spec("nvdimm"))
    except RefusedError:
        return
    out = domxml.serialize(enabled)
    assert out.startswith("<!-- kept -->\n<?app before?>\n")
    assert out.endswith("\n<!-- after -->\n<?app after?>\n")
    back = domxml.disable(domxml.parse(out))
    assert etree.tostring(back.getroottree(), method="c14n", with_comments=True) == whole
