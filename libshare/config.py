"""libshare configuration: ``/etc/libshare/libshare.toml`` plus overrides.

Every key has a default, so a missing file is fine. Precedence, lowest first: built-in
defaults, the file (``--config PATH`` or ``$LIBSHARE_CONFIG`` or the system path),
environment (``$LIBSHARE_STATE_DIR``), command-line options (``--state-dir``). Every
state directory is absolute once loaded: a relative ``--state-dir`` or
``$LIBSHARE_STATE_DIR`` is taken from the working directory, a relative ``state_dir``
or ``state_dirs`` entry in the file from the file's folder (enrolment writes the state
directory into domain metadata, where the hook, run by libvirt elsewhere, reads it).

``state_dirs`` lists further state directories (other libshare installations on this
host) whose enrolments the hook serves; the hook serves an enrolment only from
``state_dir``, one of ``state_dirs`` or a directory inside one of them
(:meth:`Config.trusted_state_dir`), because a domain definition names its state
directory and libvirt runs the hook as root.

The state directory holds everything libshare writes on a host::

    STATE/store/              content-addressed library objects (sharing engine)
    STATE/regions/images/     region images named by their SHA-256 (DIGEST.img)
    STATE/regions/groups/     GROUP.img: symlink to the group's current image
    STATE/running/            one JSON record per running enrolled domain (hook)
    STATE/requests/           automatic redirect requests left by the hook (daemon)
    STATE/redirects/          the daemon's last automatic redirect outcome per domain
    STATE/boot/UUID/          libshare's initrd of a domain with direct kernel boot
    STATE/digests.json        cache of region digests keyed by inode/size/mtime
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from libshare.domxml.devices import MODELS
from libshare.domxml.metadata import REDIRECT_MODES, check_group
from libshare.errors import LibshareError
from libshare.hook.ops import MAX_SECONDS
from libshare.util import files

#: bytes of a configuration file read at most
MAX_CONFIG = 1024 * 1024

SYSTEM_CONFIG = Path("/etc/libshare/libshare.toml")
DEFAULT_STATE_DIR = Path("/var/lib/libshare")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: libvirt waits for the hook synchronously: it must give up within this many seconds
MAX_HOOK_TIMEOUT = MAX_SECONDS
MIN_HOOK_TIMEOUT = 0.5


@dataclass(frozen=True)
class Config:
    """Resolved settings; ``source`` names the file they came from (or None)."""

    state_dir: Path = DEFAULT_STATE_DIR
    default_model: str = "nvdimm"
    default_group: str = "default"
    log_level: str = "info"
    libvirt_uri: str = "qemu:///system"
    hook_timeout: float = MAX_HOOK_TIMEOUT
    redirect: str = "off"
    redirect_wait: float = 900.0
    state_dirs: tuple[Path, ...] = ()
    source: Path | None = field(default=None, compare=False)

    @property
    def regions_dir(self) -> Path:
        """Return the folder holding region images and per-group links."""
        return self.state_dir / "regions"

    @property
    def store_dir(self) -> Path:
        """Return the folder of the content-addressed library store."""
        return self.state_dir / "store"

    @property
    def running_dir(self) -> Path:
        """Return the folder of running-domain records written by the hook."""
        return self.state_dir / "running"

    def group_region_link(self, group: str) -> Path:
        """Return the stable path (a symlink) that points at ``group``'s current image;
        raise RefusedError when ``group`` is not a valid group name."""
        return self.regions_dir / "groups" / f"{check_group(group)}.img"

    def region_image(self, digest: str) -> Path:
        """Return where the region image whose SHA-256 is ``digest`` lives on this host."""
        return self.regions_dir / "images" / f"{digest}.img"

    @property
    def digest_cache(self) -> Path:
        """Return the file caching SHA-256 digests of region images by inode/size/mtime."""
        return self.state_dir / "digests.json"

    def trusted_state_dir(self, path: str | os.PathLike[str] | None) -> Path | None:
        """Return the real path of state directory ``path`` (None: ``state_dir``) when
        it is ``state_dir``, one of ``state_dirs`` or a directory inside one of them,
        symbolic links resolved; None when it is anywhere else or not absolute."""
        if path is None:
            path = self.state_dir
        if not os.path.isabs(path):
            return None
        real = Path(os.path.realpath(path))
        for root in (self.state_dir, *self.state_dirs):
            top = Path(os.path.realpath(root))
            if real == top or top in real.parents:
                return real
        return None


_KEYS: dict[str, type] = {
    "state_dir": str,
    "default_model": str,
    "default_group": str,
    "log_level": str,
    "libvirt_uri": str,
    "hook_timeout": float,
    "redirect": str,
    "redirect_wait": float,
    "state_dirs": list,
}


def _check(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Return ``values`` converted to Config field types; raise on unknown or bad keys."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _KEYS:
            raise LibshareError(f"{where}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        want = _KEYS[key]
        if want is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want):
            raise LibshareError(f"{where}: {key} must be a {want.__name__}")
        out[key] = value
    base = Path(os.path.abspath(where)).parent
    if "state_dir" in out:
        out["state_dir"] = _absolute(out["state_dir"], base)
    if "state_dirs" in out:
        if not all(isinstance(d, str) and d for d in out["state_dirs"]):
            raise LibshareError(f"{where}: state_dirs must be a list of folder paths")
        out["state_dirs"] = tuple(_absolute(d, base) for d in out["state_dirs"])
    if "default_group" in out:
        check_group(out["default_group"], f"default_group in {where}", LibshareError)
    if out.get("default_model", "nvdimm") not in MODELS:
        raise LibshareError(f"{where}: default_model must be one of {', '.join(MODELS)}")
    if out.get("log_level", "info") not in LOG_LEVELS:
        raise LibshareError(f"{where}: log_level must be one of {', '.join(LOG_LEVELS)}")
    if out.get("redirect", "off") not in REDIRECT_MODES:
        raise LibshareError(f"{where}: redirect must be one of {', '.join(REDIRECT_MODES)}")
    if not MIN_HOOK_TIMEOUT <= out.get("hook_timeout", MAX_HOOK_TIMEOUT) <= MAX_HOOK_TIMEOUT:
        raise LibshareError(f"{where}: hook_timeout must be between {MIN_HOOK_TIMEOUT:g} and "
                            f"{MAX_HOOK_TIMEOUT:g} seconds (libvirt waits for the hook), "
                            f"not {out['hook_timeout']:g}")
    if out.get("redirect_wait", 1.0) <= 0:
        raise LibshareError(f"{where}: redirect_wait must be a positive number of seconds")
    return out


def _absolute(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """Return ``path`` made absolute against ``base`` (default: the working directory),
    normalised; symbolic links are kept."""
    return Path(os.path.normpath(os.path.join(base or os.getcwd(), path)))


def load(path: str | os.PathLike[str] | None = None, state_dir: str | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Return the effective Config.

    ``path`` is an explicit config file (it must exist); otherwise ``$LIBSHARE_CONFIG``
    (must exist) or the system file (optional). ``state_dir`` overrides everything.
    Only a regular file is read, without blocking (a FIFO is refused, not waited on).
    """
    env = os.environ if environ is None else environ
    explicit = path or env.get("LIBSHARE_CONFIG")
    cfg_path = Path(explicit) if explicit else SYSTEM_CONFIG
    values: dict[str, Any] = {}
    source: Path | None = None
    if cfg_path.exists():
        try:  # a regular file only: a FIFO or device is refused, never waited on
            raw = tomllib.loads(files.read_regular(cfg_path, MAX_CONFIG).decode())
        except OSError as exc:
            raise LibshareError(f"cannot read config {cfg_path}: "
                                f"{files.os_error(exc, path=False)}") from exc
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise LibshareError(f"cannot read config {cfg_path}: {exc}") from exc
        if not isinstance(raw.get("libshare", raw), dict):
            raise LibshareError(f"cannot read config {cfg_path}: [libshare] is not a table")
        values = _check(raw.get("libshare", raw), str(cfg_path))
        source = cfg_path
    elif explicit:
        raise LibshareError(f"config file {cfg_path} does not exist")
    cfg = replace(Config(), **values, source=source)
    override = state_dir or env.get("LIBSHARE_STATE_DIR")
    if override:
        cfg = replace(cfg, state_dir=_absolute(override))
    return cfg
