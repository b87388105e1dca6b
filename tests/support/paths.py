"""Where the tests find the project and the shared inputs beside it."""

from pathlib import Path

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
