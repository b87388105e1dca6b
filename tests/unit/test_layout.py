"""The layout's rules, checked on the code itself: the product never imports the demo
kit or the tests, only libshare/virt opens libvirt, and the hook's shim path stays
light (no libvirt, no lxml before it knows the domain is enrolled)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.support.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "libshare"


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(PROJECT_ROOT).with_suffix("").parts)
                  .removesuffix(".__init__") for p in PACKAGE.rglob("*.py"))


def test_product_modules_never_import_the_demo_kit_or_the_tests() -> None:
    product = [m for m in _modules()
               if not m.startswith("libshare.demo") and m != "libshare.__main__"]
    code = ("import importlib, sys\n"
            f"for m in {product!r}:\n"
            "    importlib.import_module(m)\n"
            "from libshare.cli.app import build_parser\n"
            "build_parser()\n"
            "print(sorted(m for m in sys.modules if m.startswith(('libshare.demo', 'tests'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_only_the_virt_package_opens_libvirt() -> None:
    opens = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PROJECT_ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in (
                    "open", "openReadOnly", "openAuth") \
                    and isinstance(node.value, ast.Name) and node.value.id == "libvirt":
                opens.append(str(rel))
    assert opens and all(p.startswith("libshare/virt/") or p.startswith("libshare/demo/")
                         for p in opens), opens


def test_the_shim_path_loads_neither_libvirt_nor_lxml() -> None:
    code = ("import sys\nfrom libshare import XMLNS\nfrom libshare.hook import ops\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('libvirt', 'lxml', 'jinja2', 'elftools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
