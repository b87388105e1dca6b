"""What each policy of ``region build --policy`` puts in a region."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from libshare.errors import LibshareError, UsageError
from libshare.sharing.region import policy
from libshare.sharing.store import import_tree, load_index
from tests.support.images import make_guest_tree


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, str]:
    sdir = tmp_path / "store"
    digest = import_tree(sdir, [make_guest_tree(tmp_path)]).trees[0]
    return sdir, digest


def _paths(plan: policy.Plan) -> set[str]:
    return {p for e in plan.entries for p in e.paths}


def test_libraries_elf_and_usr(store: tuple[Path, str]) -> None:
    sdir, digest = store
    index = load_index(sdir)
    libs = policy.plan_region(sdir, index, "libraries")
    assert _paths(libs) == {"/usr/lib/x86_64-linux-gnu/libz.so.1",
                            "/usr/lib/x86_64-linux-gnu/libz.so",
                            "/usr/lib/x86_64-linux-gnu/libacl.so.1"}
    assert [r.digest for r in libs.records] == [digest]
    elf = _paths(policy.plan_region(sdir, index, "elf"))
    assert "/usr/bin/prog" in elf and "/usr/lib/modules/6.1.0/kernel/foo.ko" in elf
    assert "/usr/bin/hello" not in elf and _paths(libs) < elf
    usr = policy.plan_region(sdir, index, "usr")
    # every file under /usr, each object once; never a path outside /usr (the document
    # /etc/copyright has the same bytes as one of /usr/share)
    assert "/usr/bin/hello" in _paths(usr) and "/usr/share/doc/pkg/empty" in _paths(usr)
    assert not any(p.startswith("/etc/") for p in _paths(usr))
    shas = [e.sha256 for e in usr.entries]
    assert len(shas) == len(set(shas))
    assert policy.plan_region(sdir, index, "usr", trees=[digest[:10]]).entries == usr.entries


def test_observed_takes_what_guests_cache(store: tuple[Path, str]) -> None:
    sdir, _digest = store
    index = load_index(sdir)
    cached = [SimpleNamespace(path="/usr/bin/hello", mounted=True),
              SimpleNamespace(path="/usr/share/doc/pkg/copyright (deleted)", mounted=True),
              SimpleNamespace(path="/memfd:x", mounted=False),
              SimpleNamespace(path=None, mounted=True)]
    paths = policy.observed_paths([SimpleNamespace(files=cached)])
    assert paths == {"/usr/bin/hello"}
    plan = policy.plan_region(sdir, index, "observed", observed=paths)
    assert _paths(plan) == {"/usr/bin/hello"}
    assert plan.chosen(next(e for e in plan.records[0].entries if e.path == "/usr/bin/hello"))
    with pytest.raises(UsageError, match="page cache"):
        policy.plan_region(sdir, index, "observed")
    with pytest.raises(UsageError, match="unknown policy"):
        policy.plan_region(sdir, index, "everything")
    with pytest.raises(LibshareError, match="no tree"):
        policy.plan_region(sdir, index, "usr", trees=["ffffffffff"])
