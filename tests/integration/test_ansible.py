"""The Ansible role (``ansible/roles/libshare``) against this host and the real libvirtd.

The role is run with ``ansible-playbook`` over a local connection, with every path it
writes moved under test folders (virtualenv, configuration, state, hooks directory) and
one persistent test domain that is never started. Ground truth is what the host holds
afterwards: libvirt's own persistent definition of the domain, the files on disk, and
the virtualenv's ``libshare`` command; idempotence and check mode are read from
Ansible's recap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
LIBS = ("libz.so.1", "libm.so.6")
RECAP = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""

PLAY = """- hosts: localhost
  gather_facts: false
  roles:
    - role: libshare
"""


@pytest.fixture
def work(scratch_dir: Path) -> Path:
    """Return a fresh folder for everything the role writes (removed afterwards)."""
    return scratch_dir


def playbook(work: Path, variables: dict[str, Any], *extra: str,
             fails: bool = False) -> tuple[dict[str, int], str]:
    """Run the role with ``variables``; return the recap counts and the whole output
    (the run must succeed, or with ``fails`` fail)."""
    (work / "vars.json").write_text(json.dumps(variables))
    (work / "play.yml").write_text(PLAY)
    (work / "inventory").write_text(
        "localhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ROOT / "ansible" / "roles"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
               ANSIBLE_REMOTE_TEMP=str(work / "tmp"))
    proc = subprocess.run([str(PLAYBOOK), "-i", str(work / "inventory"),
                           "-e", f"@{work / 'vars.json'}", *extra, str(work / "play.yml")],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    m = RECAP.search(proc.stdout)
    assert (proc.returncode != 0) == fails and m, out[-4000:]
    counts = dict(zip(("ok", "changed", "unreachable", "failed"),
                      (int(g) for g in m.groups()), strict=True))
    return counts, out


def region_sources(xml: str) -> list[str]:
    """Return the source paths of the nvdimm devices in domain ``xml``."""
    tree = etree.fromstring(xml.encode())
    return [str(p) for p in tree.xpath("/domain/devices/memory[@model='nvdimm']/source/path/text()")]


def c14n(xml: str) -> bytes:
    """Return ``xml`` in canonical form, whitespace between elements ignored."""
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(xml.encode(), parser), method="c14n")


def test_role_installs_enrols_is_idempotent_and_undoes(
        libvirt_conn: Any, domain_name: Callable[[], str], work: Path) -> None:
    name = domain_name()
    dom = libvirt_conn.defineXML(DOMAIN_XML.format(name=name))
    original = dom.XMLDesc(INACTIVE)
    libs = work / "golden" / "usr" / "lib"
    libs.mkdir(parents=True)
    for lib in LIBS:
        shutil.copy2(Path("/usr/lib/x86_64-linux-gnu") / lib, libs / lib)
    source = work / "src"  # a snapshot: the wheel is built from it, twice identically
    shutil.copytree(ROOT / "libshare", source / "libshare",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / f, source / f)
    state_dir = work / "state"
    venv = work / "prefix" / "venv"
    hooks = work / "hooks"
    variables: dict[str, Any] = {
        "libshare_source": str(source),
        "libshare_prefix": str(work / "prefix"),
        "libshare_docs_prefix": str(work / "prefix"),
        "libshare_config_path": str(work / "etc" / "libshare.toml"),
        "libshare_state_dir": str(state_dir),
        "libshare_hooks_dir": str(hooks),
        "libshare_groups": [{"name": "lstest", "import": [str(work / "golden")]}],
        "libshare_domains": [{"name": name, "group": "lstest"}],
        "libshare_daemon": True,
        "libshare_unit_dir": str(work / "units"),
    }
    (work / "units").mkdir()

    # check mode on a host that has nothing yet: runs through, changes nothing
    counts, out = playbook(work, variables, "--check")
    assert not venv.exists() and not (work / "etc").exists(), out[-4000:]
    assert not (hooks / "qemu").exists() and not state_dir.exists()
    assert dom.XMLDesc(INACTIVE) == original

    # first run: everything is done
    counts, out = playbook(work, variables)
    assert counts["changed"] >= 6, out[-4000:]
    version = subprocess.run([str(venv / "bin" / "libshare"), "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("libshare "), version
    hook = (hooks / "qemu").read_text()
    assert hook.startswith(f"#!{venv}/bin/python"), hook[:200]
    assert f'state_dir = "{state_dir}"' in (work / "etc" / "libshare.toml").read_text()
    enrolled = dom.XMLDesc(INACTIVE)
    sources = region_sources(enrolled)
    assert len(sources) == 1, enrolled
    image = Path(sources[0])
    assert image.parent == state_dir / "regions" / "images" and image.is_file(), sources
    data = image.read_bytes()
    for lib in LIBS:  # the libraries are in the region, byte for byte
        assert (libs / lib).read_bytes()[:4096] in data, lib
    assert "org.qemu.guest_agent.0" in enrolled
    unit = (work / "units" / "libshare-daemon.service").read_text()
    assert f"ExecStart={venv}/bin/python" in unit and str(work / "etc") in unit, unit

    # second run: nothing changes
    counts, out = playbook(work, variables)
    assert counts["changed"] == 0, out[-4000:]
    assert dom.XMLDesc(INACTIVE) == enrolled

    # a new library in the group's tree: a new region, and the domain moves to it
    shutil.copy2(Path("/usr/lib/x86_64-linux-gnu/libacl.so.1"), libs / "libacl.so.1")
    counts, out = playbook(work, variables)
    assert counts["changed"] == 3, out[-4000:]  # import, build, enable
    enrolled = dom.XMLDesc(INACTIVE)
    moved = region_sources(enrolled)
    assert len(moved) == 1 and moved[0] != str(image) and Path(moved[0]).is_file(), moved
    assert (libs / "libacl.so.1").read_bytes()[:4096] in Path(moved[0]).read_bytes()
    # enabling again without --group keeps the domain in its group (not the default one)
    again = subprocess.run([str(venv / "bin" / "libshare"), "--config",
                            str(work / "etc" / "libshare.toml"), "enable", "--json", name],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["domains"][0]["action"] == "unchanged", again.stdout
    assert dom.XMLDesc(INACTIVE) == enrolled

    # check mode on an undo: nothing is changed
    undo = dict(variables, libshare_hook="absent",
                libshare_domains=[{"name": name, "state": "disabled"}])
    counts, out = playbook(work, undo, "--check")
    assert dom.XMLDesc(INACTIVE) == enrolled
    assert (hooks / "qemu").is_file()

    # the undo itself: the definition is the original again, the hook is gone
    counts, out = playbook(work, undo)
    assert counts["changed"] >= 2, out[-4000:]
    assert c14n(dom.XMLDesc(INACTIVE)) == c14n(original)
    assert not (hooks / "qemu").exists()
    counts, out = playbook(work, undo)
    assert counts["changed"] == 0, out[-4000:]

    # a domain libvirt does not know: the run fails with libshare's own line
    missing = dict(variables, libshare_domains=[{"name": f"{name}-nosuch", "group": "lstest"}])
    counts, out = playbook(work, missing, fails=True)
    assert f"{name}-nosuch" in out and "libshare:" in out, out[-4000:]
