"""Where the tests find the project and the shared inputs beside it."""

from pathlib import Path

#: the project's root folder (holds pyproject.toml, hooks/, libshare/)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: real libvirt domain XML documents kept beside the project (../shared), never copied in
CORPUS = PROJECT_ROOT.parent / "shared" / "corpus" / "virt-manager"
