"""The tiny guest runner's console markers, read while the guest is still writing."""

from libshare.demo.tiny.initramfs import END_MARKER, READY_MARKER
from libshare.demo.tiny.runner import END_LINE, READY_LINE


def test_ready_marker_needs_its_whole_line() -> None:
    # what a busy host's console file can hold mid-line, then the whole line
    assert READY_LINE.search(f"boot\n{READY_MARKER} r") is None
    m = READY_LINE.search(f"boot\r\n{READY_MARKER} read\r\n")
    assert m and m.group(1) == "read"


def test_ready_marker_without_text() -> None:
    m = READY_LINE.search(f"{READY_MARKER}\n")
    assert m and (m.group(1) or "") == ""
    assert READY_LINE.search(f"{READY_MARKER}") is None


def test_end_marker_needs_its_whole_line() -> None:
    assert END_LINE.search(f"out\n{END_MARKER} rc=1") is None      # "rc=12" half written
    m = END_LINE.search(f"out\r\n{END_MARKER} rc=12\r\n")
    assert m and m.group(1) == "12"
