"""Surveying several domains (:func:`libshare.introspect.session.each_domain`): a domain
that fails does not stop the others; a single one's error is raised unless told not to.
(The look itself needs a running guest: tests/integration.)"""

from __future__ import annotations

import pytest

from libshare.errors import LibshareError
from libshare.introspect.session import each_domain


def survey(name: str) -> str:
    if name.startswith("bad"):
        raise LibshareError("no BTF")
    return name.upper()


def test_failures_are_collected_and_the_others_surveyed() -> None:
    assert each_domain(["a", "bad1", "b"], survey) == (["A", "B"], ["bad1: no BTF"])


def test_a_single_domain_raises_unless_told_not_to() -> None:
    with pytest.raises(LibshareError, match="no BTF"):
        each_domain(["bad"], survey)
    assert each_domain(["bad"], survey, single_raises=False) == ([], ["bad: no BTF"])
