"""The systemd unit of ``libshare daemon``: rendering ``libshare-daemon.service`` from
its template (``libshare/data/host``) for this interpreter and state directory,
installing it (never over a unit libshare did not write) and removing it, with
``systemctl daemon-reload`` when systemd runs.

The unit is hardened (``systemd-analyze security`` exposure at most EXPOSURE_GOAL): no
capabilities, no network but AF_UNIX sockets (libvirt's local socket; guest agents
are reached through libvirt), the whole file system read-only but the state directory
(``ReadWritePaths``), and home directories hidden, or read-only when the interpreter,
the package or the state directory lives in one (a venv over pyenv in /root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libshare.data import host_text
from libshare.errors import LibshareError
from libshare.util.files import open_regular, write_owned

UNIT_NAME = "libshare-daemon.service"


DEFAULT_UNIT_DIR = Path("/etc/systemd/system")


UNIT_MARKER = "libshare-daemon"
#: the exposure ``systemd-analyze security --offline=true`` may give the unit at most
EXPOSURE_GOAL = 4.5
#: what ``ProtectHome=yes`` hides
HOME_DIRS = ("/home", "/root", "/run/user")


def unit_template() -> str:
    """Return the unit file's Jinja2 template shipped with the package (variables:
    ``exec_start``, the ExecStart command line; ``state_dir``, the one writable path;
    ``protect_home``, yes or read-only)."""
    return host_text(UNIT_NAME)


def _in_home(path: str) -> bool:
    """Return True when ``path`` (symbolic links resolved) lies in a home directory."""
    real = os.path.realpath(path)
    return any(real == h or real.startswith(h + "/") for h in HOME_DIRS)


def render_unit(python: str | None = None, extra_args: list[str] | None = None,
                state_dir: str | os.PathLike[str] = "/var/lib/libshare") -> str:
    """Return the unit file with ExecStart running ``python -m libshare`` (default: this
    interpreter's absolute path) with global options ``extra_args`` and ``daemon``,
    writing only ``state_dir``."""
    import jinja2  # only 'daemon install' renders a unit: keep it off the serving path

    import libshare

    python = os.path.abspath(python or sys.executable)
    argv = [python, "-m", "libshare", *(extra_args or []), "daemon"]
    state = os.path.abspath(state_dir)
    homes = any(_in_home(p) for p in (python, os.path.dirname(libshare.__file__), state))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True)
    return env.from_string(unit_template()).render(
        exec_start=" ".join(_quote(a) for a in argv), state_dir=_quote(state),
        protect_home="read-only" if homes else "yes")


def _quote(arg: str) -> str:
    """Return ``arg`` quoted for a systemd command line when it needs it."""
    if arg and all(c.isalnum() or c in "/._-=:+,@" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_running() -> bool:
    """Return True when systemd is this machine's init (``/run/systemd/system``)."""
    return Path("/run/systemd/system").is_dir()


@dataclass
class UnitResult:
    """What :func:`install_unit`/:func:`uninstall_unit` did: the unit ``path``,
    ``action`` (installed/updated/unchanged/removed/absent) and ``systemd`` (what was
    asked of systemd, or why nothing was)."""

    path: Path
    action: str
    systemd: str

    def as_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return {"path": str(self.path), "action": self.action, "systemd": self.systemd}


Runner = Callable[[list[str]], int]


def _run(argv: list[str]) -> int:
    """Run ``argv`` (bounded to 60 s); return its exit status (127 if it cannot run)."""
    try:
        return subprocess.run(argv, check=False, timeout=60,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    except (OSError, subprocess.TimeoutExpired):
        return 127


def _reload(runner: Runner, systemd: bool | None) -> str:
    """Run ``systemctl daemon-reload`` when systemd runs; return what happened."""
    if not (systemd_running() if systemd is None else systemd):
        return "systemd is not running here: nothing reloaded"
    rc = runner(["systemctl", "daemon-reload"])
    return "daemon-reload done" if rc == 0 else f"systemctl daemon-reload failed (exit {rc})"


def install_unit(unit_dir: Path = DEFAULT_UNIT_DIR, python: str | None = None,
                 extra_args: list[str] | None = None, runner: Runner = _run,
                 systemd: bool | None = None,
                 state_dir: Path = Path("/var/lib/libshare")) -> UnitResult:
    """Write ``UNIT_DIR/libshare-daemon.service`` for this interpreter and state
    directory (created if missing: the unit's ReadWritePaths needs it) and reload
    systemd when it runs (``systemd`` None: detect); return what was done. Refuses to
    overwrite a unit that libshare did not write."""
    path = unit_dir / UNIT_NAME
    try:
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise LibshareError(f"cannot create the state directory {state_dir}: "
                            f"{exc.strerror}") from exc
    action = write_owned(path, render_unit(python, extra_args, state_dir).encode(), 0o644,
                         _unit_is_ours, "exists and was not written by libshare")
    if action == "unchanged":
        return UnitResult(path, action, "nothing to reload")
    return UnitResult(path, action, _reload(runner, systemd))


def _unit_is_ours(path: Path) -> bool:
    """Return True when the unit file ``path`` was written by libshare (a regular file
    only: a FIFO there is never opened for reading)."""
    try:
        with open_regular(path) as fh:
            return UNIT_MARKER in fh.read(64 * 1024).decode(errors="replace")
    except OSError:
        return False


def uninstall_unit(unit_dir: Path = DEFAULT_UNIT_DIR, runner: Runner = _run,
                   systemd: bool | None = None) -> UnitResult:
    """Stop and disable the service when systemd runs, remove the unit libshare wrote
    and reload systemd; return what was done."""
    path = unit_dir / UNIT_NAME
    if not path.exists():
        return UnitResult(path, "absent", "nothing to do")
    if not _unit_is_ours(path):
        raise LibshareError(f"{path} was not written by libshare; not touching it")
    running = systemd_running() if systemd is None else systemd
    if running:
        runner(["systemctl", "disable", "--now", UNIT_NAME])
    try:
        path.unlink()
    except OSError as exc:
        raise LibshareError(f"cannot remove {path}: {exc.strerror}") from exc
    return UnitResult(path, "removed", ("stopped and disabled; " if running else "")
                      + _reload(runner, running))
