"""The host's apt, as the guest kit uses it: the host's suite and mirror, a private apt
tree for another suite (so the host's apt state is never changed), apt's proxy, and
running the tools the kit needs with a one-line error.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from libshare.demo.lifecycle import GuestError

DEBIAN_MIRROR = "http://deb.debian.org/debian"


DEBIAN_SECURITY = "http://deb.debian.org/debian-security"


def host_suite() -> str:
    """Return the host's Debian codename (``VERSION_CODENAME`` of /etc/os-release)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return m.group(1) if m else ""


def private_apt_options(suite: str, cache: Path) -> list[str]:
    """Return apt ``-o`` options for a private apt tree of ``suite`` under ``cache``
    (created and updated if needed); the host's apt state is not touched."""
    base = cache / "apt" / suite
    lists = base / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (base / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = base / "sources.list"
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    sec = f"{suite}-security" if suite not in ("buster", "stretch") else f"{suite}/updates"
    sources.write_text(
        f"deb [signed-by={keyring}] {DEBIAN_MIRROR} {suite} main\n"
        f"deb [signed-by={keyring}] {DEBIAN_MIRROR} {suite}-updates main\n"
        f"deb [signed-by={keyring}] {DEBIAN_SECURITY} {sec} main\n"
    )
    opts = [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={lists}",
        "-o", f"Dir::Cache::Archives={base / 'archives'}",
        "-o", f"Dir::Cache={base}",
        "-o", "APT::Get::List-Cleanup=0",
    ]
    if not any(lists.glob("*Packages*")):
        run(["apt-get", *opts, "-qq", "update"])
    return opts


def apt_options(suite: str, cache: Path, refresh: bool = False) -> list[str]:
    """Return apt options for ``suite``: none for the host's own suite (refreshed with
    ``apt-get update`` if ``refresh``), else those of a private apt tree."""
    if suite == host_suite():
        if refresh:
            run(["apt-get", "-qq", "update"])
        return []
    if refresh:
        for f in (cache / "apt" / suite / "lists").glob("*Packages*"):
            f.unlink()
    return private_apt_options(suite, cache)





def parse_sources_list(text: str) -> list[tuple[str, list[str], list[str]]]:
    """Return ``(uri, suites, components)`` of each ``deb`` line in one-line-format
    sources.list ``text`` (``deb-src`` and comments skipped, ``[options]`` dropped)."""
    out = []
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            out.append((words[1], [words[2]], list(words[3:])))
    return out


def parse_deb822_sources(text: str) -> list[tuple[str, list[str], list[str]]]:
    """Return ``(uri, suites, components)`` for each URI of each enabled ``Types: deb``
    stanza of deb822 ``.sources`` ``text``."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append((uri, fields.get("suites", "").split(),
                        fields.get("components", "").split()))
    return out


def pick_mirror(entries: Sequence[tuple[str, list[str], list[str]]], suite: str) -> str | None:
    """Return the URI of the first entry serving ``suite`` (exactly, not ``-security``
    or ``-updates``) with component ``main``; None if there is none."""
    for uri, suites, components in entries:
        if suite in suites and "main" in components:
            return uri.rstrip("/")
    return None


def host_mirror(suite: str, etc: Path = Path("/etc/apt")) -> str:
    """Return the Debian mirror URL the host's apt sources use for ``suite`` (falling
    back to any host mirror of the host's own suite, then to deb.debian.org)."""
    entries: list[tuple[str, list[str], list[str]]] = []
    with contextlib.suppress(OSError):
        entries += parse_sources_list((etc / "sources.list").read_text())
    for p in sorted((etc / "sources.list.d").glob("*")) if (etc / "sources.list.d").is_dir() else []:
        with contextlib.suppress(OSError):
            if p.suffix == ".list":
                entries += parse_sources_list(p.read_text())
            elif p.suffix == ".sources":
                entries += parse_deb822_sources(p.read_text())
    return pick_mirror(entries, suite) or pick_mirror(entries, host_suite()) or DEBIAN_MIRROR


def apt_proxy_env() -> dict[str, str]:
    """Return ``http_proxy``/``https_proxy`` taken from apt's own proxy settings
    (``Acquire::http::Proxy``, ``Acquire::https::Proxy``), empty if none are set."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True,
                              check=False).stdout
    except FileNotFoundError:
        return {}
    env = {}
    for scheme in ("http", "https"):
        m = re.search(rf'^Acquire::{scheme}::Proxy "([^"]+)";', dump, re.M | re.I)
        if m and m.group(1).upper() not in ("DIRECT", "FALSE"):
            env[f"{scheme}_proxy"] = m.group(1)
    return env


def run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        stdin: str | None = None, timeout: float | None = None,
        error: type[GuestError] = GuestError) -> str:
    """Run ``cmd`` with ``LC_ALL=C`` (feeding ``stdin``); return its stdout, raising
    ``error`` with the tail of its output when it is missing, fails or times out."""
    try:
        res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False,
                             input=stdin, env=dict(os.environ, LC_ALL="C", **(env or {})),
                             timeout=timeout)
    except FileNotFoundError as exc:
        raise error(f"{cmd[0]} not found (scripts/setup-host installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{cmd[0]} did not finish within {timeout:.0f}s") from exc
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip())[-600:]
        raise error(f"{' '.join(cmd[:3])}... failed ({res.returncode}): {tail}")
    return res.stdout
