"""Where the tests find the project, the shared inputs beside it, and where the
integration tests keep their state directories and images."""

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: the project's root folder (holds pyproject.toml, hooks/, libshare/)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _corpus() -> Path:
    """Return shared/corpus/virt-manager beside the nearest folder above the project
    that has it (a clone's parent; for a git worktree deeper down, further up)."""
    for base in PROJECT_ROOT.parents:
        found = base / "shared" / "corpus" / "virt-manager"
        if found.is_dir():
            return found
    return PROJECT_ROOT.parent / "shared" / "corpus" / "virt-manager"


#: real libvirt domain XML documents kept beside the project (../shared), never copied in
CORPUS = _corpus()


def _test_root() -> Path:
    """Return ``tests`` inside this host's configured state directory (the system
    config's ``state_dir``, default /var/lib/libshare): the hook libvirt runs serves
    enrolments only from state directories inside the configured ones, so test state
    directories live there (QEMU traverses it: 0755)."""
    from libshare import config
    from libshare.errors import LibshareError

    try:
        base = config.load(environ={}).state_dir
    except LibshareError:
        base = config.DEFAULT_STATE_DIR
    return base / "tests"


#: the integration tests' scratch folders, state directories and images live below this
TEST_ROOT = _test_root()


def make_test_dir(prefix: str) -> Path:
    """Return a new folder under :data:`TEST_ROOT` (where the hook trusts state
    directories) named ``prefix`` and a random tail, which QEMU can traverse (0755); the
    caller removes it."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    TEST_ROOT.chmod(0o755)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=TEST_ROOT))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def state_base(prefix: str) -> Iterator[Path]:
    """Yield a fresh folder from :func:`make_test_dir` for a module's state directory
    and images; removed afterwards."""
    base = make_test_dir(prefix)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def open_to_qemu(base: Path, cfg: Any) -> None:
    """Make ``base`` and the folders from it down to the region images of ``cfg`` (a
    Config whose state directory is inside ``base``) traversable for QEMU (0755)."""
    for d in (base, cfg.state_dir, cfg.regions_dir, cfg.regions_dir / "images",
              cfg.regions_dir / "groups"):
        d.chmod(0o755)
