"""Fixtures for the integration tests: a real system libvirtd, TCG guests.

Every test in this directory is marked ``integration`` and skipped, with the reason,
when not run as root or when ``qemu:///system`` cannot be reached. Test domains are
named ``lstest-p<PID>-<test>-<random>``; leftovers of earlier runs are destroyed and
undefined at setup and teardown (domains of other live pytest processes are left alone).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from libshare.demo.cache import CACHE_ENV, DEFAULT_CACHE
from libshare.demo.debian.image import DebianImage, debian_image
from libshare.demo.lifecycle import cleanup_domain
from libshare.demo.tiny.kernel import KernelPackage, fetch_kernel
from tests.support.paths import TEST_ROOT

URI = "qemu:///system"
PREFIX = "lstest-"
#: scratch folders of tests that QEMU (user libvirt-qemu) must be able to traverse, in
#: this host's configured state directory (the only place the hook serves from)
SCRATCH_ROOT = TEST_ROOT
_HERE = Path(__file__).parent
_TAGGED = re.compile(rf"^{PREFIX}p(\d+)-")
#: an untagged lstest-* domain is a leftover once it has run this long (or is shut off)
UNTAGGED_MAX_AGE = 600.0
#: the files that take longest (minutes of TCG guest time), run first: pytest-xdist
#: (``--dist loadfile``, scripts/test) hands the files out to its workers in this order,
#: and the unit tests fill the gaps; the rest follow in collection order
LONGEST_FIRST = ("test_demo.py", "test_usr_region.py", "test_redirect.py",
                 "test_ansible.py", "test_debian_guest.py", "test_image.py",
                 "test_pagecache.py", "test_survey_debian.py", "test_migration.py")


def _skip_reason() -> str | None:
    """Return why the integration tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "integration tests need root (system libvirtd, /var/cache, QEMU files)"
    try:
        import libvirt
    except ImportError:
        return "libvirt-python is not installed"
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return f"libvirtd unreachable at {URI} (start it: virtlogd -d; libvirtd -d): {exc}"
    conn.close()
    return None


def _rank(item: pytest.Item) -> int:
    """Return where test ``item`` goes in the run: its file's place in LONGEST_FIRST,
    then the other integration tests, then the unit tests."""
    name = Path(str(item.fspath)).name
    if _HERE not in Path(str(item.fspath)).parents:
        return len(LONGEST_FIRST) + 1
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of this directory ``integration`` and skip them if they cannot run;
    put them first, the longest files first (a stable sort: see LONGEST_FIRST)."""
    mine = [it for it in items if _HERE in Path(str(it.fspath)).parents]
    if not mine:
        return
    reason = _skip_reason()
    for item in mine:
        item.add_marker(pytest.mark.integration)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    items.sort(key=_rank)


def _is_leftover(conn: Any, dom: Any) -> bool:
    """Return True if test domain ``dom`` belongs to no live test run (see module doc)."""
    name = dom.name()
    m = _TAGGED.match(name)
    if m:
        pid = int(m.group(1))
        if pid == os.getpid():
            return True
        return not Path(f"/proc/{pid}").exists()
    if not dom.isActive():
        return True
    with contextlib.suppress(OSError):
        started = Path(f"/run/libvirt/qemu/{name}.pid").stat().st_mtime
        return time.time() - started > UNTAGGED_MAX_AGE
    return True


def cleanup_leftovers(conn: Any) -> list[str]:
    """Destroy and undefine leftover ``lstest-*`` domains, and remove guest run
    directories older than UNTAGGED_MAX_AGE that no domain uses; return the domain names."""
    gone = []
    for dom in conn.listAllDomains():
        if dom.name().startswith(PREFIX) and _is_leftover(conn, dom):
            cleanup_domain(conn, dom.name())
            gone.append(dom.name())
    live = {d.name() for d in conn.listAllDomains()}
    runs = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE) / "run"
    for d in runs.glob(f"{PREFIX}*") if runs.is_dir() else []:
        with contextlib.suppress(OSError):
            if d.name not in live and time.time() - d.stat().st_mtime > UNTAGGED_MAX_AGE:
                shutil.rmtree(d, ignore_errors=True)
    return gone


def fix_kvm_device_access(dev: Path = Path("/dev/kvm")) -> bool:
    """Give ``/dev/kvm`` Debian's udev ownership (root:kvm 0660) if it is root-only;
    return True if it changed anything.

    Without udev the node stays root 0600: QEMU probed as root sees KVM, but the
    ``libvirt-qemu`` user cannot open it, and libvirt 9.0 then judges its capability
    cache outdated and re-probes QEMU (~4 s, serialised) on every define/start.
    """
    import grp

    try:
        st = dev.stat()
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return False
    if st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060:
        return False
    os.chown(dev, 0, kvm_gid)
    dev.chmod(0o660)
    return True


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    """Yield a session-wide connection to ``qemu:///system``."""
    import libvirt

    fix_kvm_device_access()
    conn = libvirt.open(URI)
    cleanup_leftovers(conn)
    try:
        yield conn
    finally:
        cleanup_leftovers(conn)
        conn.close()


@pytest.fixture(scope="session")
def guest_kernel() -> KernelPackage:
    """Return the cached Debian kernel test guests boot (fetched on first use)."""
    return fetch_kernel()


@pytest.fixture(scope="session")
def debian_guest_image() -> DebianImage:
    """Return the cached Debian 12 test image (built on first use); skip the test when
    there is none and none can be built (no network and no cache)."""
    try:
        return debian_image()
    except Exception as exc:  # say so
        pytest.skip(f"no Debian guest image: {exc}")


@pytest.fixture
def domain_name(libvirt_conn: Any, request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Yield a factory of fresh test domain names ``lstest-p<PID>-<test>-<hex>``;
    leftovers are cleaned before the test and every name handed out is cleaned after."""
    cleanup_leftovers(libvirt_conn)
    handed: list[str] = []
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]

    def make() -> str:
        name = f"{PREFIX}p{os.getpid()}-{slug}-{secrets.token_hex(3)}"
        handed.append(name)
        return name

    try:
        yield make
    finally:
        for name in handed:
            cleanup_domain(libvirt_conn, name)
        cleanup_leftovers(libvirt_conn)


@pytest.fixture(name="libvirt", scope="session")
def _libvirt_alias(libvirt_conn: Any) -> Any:
    """Return the session connection to ``qemu:///system`` (same as ``libvirt_conn``)."""
    return libvirt_conn


@pytest.fixture
def scratch_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Yield a fresh folder under SCRATCH_ROOT that QEMU can traverse (region images,
    state directories), named by this process and test; removed afterwards."""
    SCRATCH_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    SCRATCH_ROOT.chmod(0o755)
    path = SCRATCH_ROOT / f"p{os.getpid()}-{request.node.name[:40]}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
