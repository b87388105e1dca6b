"""Tree records: every entry of an imported tree, one record per distinct tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from libshare.errors import LibshareError
from libshare.sharing import trees
from libshare.sharing.store import import_tree, load_index
from libshare.util.digest import sha256_file
from tests.support.images import make_guest_tree


def test_import_records_the_tree_entry_by_entry(tmp_path: Path) -> None:
    root = make_guest_tree(tmp_path)
    sdir = tmp_path / "store"
    r = import_tree(sdir, [root])
    assert len(r.trees) == 1
    rec = trees.load_tree(sdir, r.trees[0])
    by = {e.path: e for e in rec.entries}
    assert [e.path for e in rec.entries] == sorted(by) and by["/"].kind == "d"
    su = by["/usr/bin/suprog"]
    assert su.kind == "f" and su.mode == 0o4755 and su.payload == sha256_file(
        root / "usr/bin/suprog")
    assert by["/usr/bin/prog2"].kind == "l" and by["/usr/bin/prog2"].payload == "prog"
    assert by["/usr/share/empty"].kind == "d" and by["/usr/local/bin"].kind == "d"
    assert rec.roots == [os.path.realpath(root)]
    # every regular file of the tree is an object of the store, plain or ELF
    index = load_index(sdir)
    assert {e.payload for e in rec.entries if e.kind == "f"} <= set(index.entries)
    ko = index.entries[by["/usr/lib/modules/6.1.0/kernel/foo.ko"].payload or ""]
    assert ko.elf_type == "ET_REL"


def test_same_tree_same_record_and_roots_accumulate(tmp_path: Path) -> None:
    root = make_guest_tree(tmp_path)
    sdir = tmp_path / "store"
    first = import_tree(sdir, [root]).trees[0]
    path = trees.record_path(sdir, first)
    before = path.stat().st_mtime_ns
    assert import_tree(sdir, [root]).trees == [first]
    assert path.stat().st_mtime_ns == before                # unchanged: not rewritten
    copy = tmp_path / "copy"
    os.system(f"cp -a {root} {copy}")
    assert import_tree(sdir, [copy]).trees == [first]       # the same tree elsewhere
    assert sorted(trees.load_tree(sdir, first).roots) == sorted(
        [os.path.realpath(root), os.path.realpath(copy)])
    assert trees.resolve_trees(sdir, [first[:8]]) == [first]
    assert trees.resolve_trees(sdir, [str(copy)]) == [first]
    assert trees.resolve_trees(sdir, None) == [first]
    (copy / "usr/bin/prog").chmod(0o700)                    # another tree now
    second = import_tree(sdir, [copy]).trees[0]
    assert second != first and trees.tree_digests(sdir) == sorted([first, second])
    with pytest.raises(LibshareError, match="no tree"):
        trees.resolve_trees(sdir, ["0000000000"])


def test_damaged_record_is_refused(tmp_path: Path) -> None:
    root = make_guest_tree(tmp_path)
    sdir = tmp_path / "store"
    digest = import_tree(sdir, [root]).trees[0]
    path = trees.record_path(sdir, digest)
    doc = json.loads(path.read_text())
    doc["entries"][1][2] = 0o777
    path.write_text(json.dumps(doc))
    with pytest.raises(LibshareError, match="does not match its digest"):
        trees.load_tree(sdir, digest)
