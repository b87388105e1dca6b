"""The bash completion and the man page generated from the parser: valid bash that
completes what the parser accepts, a man page groff renders without warnings that names
every command and option, and their installation."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from libshare.cli import docs
from libshare.cli.app import build_parser
from libshare.errors import LibshareError


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "libshare"
    path.write_text(docs.bash_completion())
    return path


def complete(script: Path, line: str, tmp: Path | None = None) -> list[str]:
    """Return what bash completes for ``line`` (the last word is the one completed;
    a trailing space completes a new word)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    arr = " ".join(shlex.quote(w) for w in words)
    code = (f"source {shlex.quote(str(script))}; COMP_WORDS=({arr}); "
            f"COMP_CWORD={len(words) - 1}; _libshare; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    env = {"PATH": f"{tmp}:/usr/bin:/bin" if tmp else "/usr/bin:/bin", "LC_ALL": "C"}
    res = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env,
                         timeout=30, cwd=tmp)
    assert res.returncode == 0, res.stderr
    return [x for x in res.stdout.splitlines() if x]


def test_completion_is_valid_bash(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0


@pytest.mark.parametrize("line,expected", [
    ("libshare reg", ["region"]),
    ("libshare region b", ["build"]),
    ("libshare region ", ["build", "verify", "ls", "gc"]),
    ("libshare region build --gr", ["--group"]),
    ("libshare --state-dir /tmp region v", ["verify"]),
    ("libshare -c qemu:///system hook l", ["log"]),
    ("libshare enable --model ", ["nvdimm", "virtio-pmem", "ivshmem"]),
    ("libshare xml enable --redirect r", ["runtime"]),
    ("libshare daemon --u", ["--until-idle"]),
    ("libshare --ver", ["--verbose", "--version"]),
])
def test_completion_offers_what_the_parser_takes(script: Path, line: str,
                                                 expected: list[str]) -> None:
    assert sorted(complete(script, line)) == sorted(expected)


def test_completion_of_paths_and_domains(script: Path, tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_text("")
    (tmp_path / "dir-a").mkdir()
    assert complete(script, "libshare --config con", tmp_path) == ["conf.toml"]
    assert complete(script, "libshare store import di", tmp_path) == ["dir-a"]
    virsh = tmp_path / "virsh"  # libvirt's own list, on the connection -c names
    virsh.write_text('#!/bin/sh\n[ "$2 $3" = "-c test:///default" ] && echo web1 && echo '
                     'web2 && echo db1\n')
    virsh.chmod(0o755)
    assert complete(script, "libshare -c test:///default enable we", tmp_path) == \
        ["web1", "web2"]
    assert complete(script, "libshare -c test:///default guest install ", tmp_path) == \
        ["web1", "web2", "db1"]


def test_every_option_is_in_the_completion_and_the_man_page(script: Path) -> None:
    man = docs.man_page()
    text = script.read_text()
    parser = build_parser()
    for path, p in docs._commands(parser):
        if path:
            assert f'.SS "{docs._roff(" ".join(path))}"' in man
        for a in p._actions:
            for o in a.option_strings:
                assert f" {o}" in text or f'"{o}' in text, (path, o)
                if o not in ("-h", "--help"):
                    assert docs._roff(o) in man, (path, o)
            if isinstance(a, argparse._SubParsersAction):
                for name in a.choices:
                    assert name in text


def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is missing (Debian package groff-base)")
    page = tmp_path / "libshare.1"
    page.write_text(docs.man_page())
    res = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                         capture_output=True, text=True, timeout=60,
                         env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    out = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", str(page)], capture_output=True,
                         text=True, timeout=60, env={"LC_ALL": "C.UTF-8",
                                                     "PATH": "/usr/bin:/bin"}).stdout
    assert "region build" in out and "EXIT STATUS" in out and "journalctl" in out


def test_install_is_idempotent_and_never_overwrites_others(tmp_path: Path) -> None:
    done = docs.install(tmp_path)
    files = docs.targets(tmp_path)
    assert set(done.values()) == {"installed"}
    assert files["bash"].read_text() == docs.bash_completion()
    assert set(docs.install(tmp_path).values()) == {"unchanged"}
    assert docs.main(["install", "--prefix", str(tmp_path), "--json"]) == 0
    files["man"].write_text("someone else's page\n")
    with pytest.raises(LibshareError, match="not written by libshare"):
        docs.install(tmp_path)
