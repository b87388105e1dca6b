"""Debian kernels for small guests: fetch, extract and cache a ``linux-image-*`` package,
and compute which modules to load, in which order.

Owns the kernel cache (``<cache>/kernels/<package>_<version>/``, holding the package's
``boot/vmlinuz-*`` and ``lib/modules/<release>/`` with a ``modules.dep`` made by
``depmod -b``), and the module dependency closure (``modules.dep`` plus the ``pre:``
soft dependencies of ``modules.softdep``, modules built in per ``modules.builtin`` left
out). Kernels come from Debian's archive only: the host's own apt configuration for the
host's suite, or a private apt directory (own sources list, lists and cache) for another
suite such as ``bullseye``, so the host's apt state is never changed.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from libshare.demo.apt import apt_options, host_suite, run
from libshare.demo.cache import cache_subdir
from libshare.demo.lifecycle import GuestError
from libshare.util.files import locked

#: Modules a test guest loads by default: NVDIMM (ACPI NFIT, pmem, btt, devdax),
#: EROFS and ext4, virtio PCI transport, console and balloon.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_console", "virtio_balloon",
    "libnvdimm", "nfit", "nd_btt", "nd_pmem", "dax_pmem",
    "erofs", "ext4",
)

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class KernelPackageError(GuestError):
    """A kernel package could not be found, fetched or unpacked."""


@dataclass(frozen=True)
class KernelPackage:
    """An unpacked Debian kernel: ``package`` name, Debian ``version`` (as in
    ``/proc/version``, e.g. ``6.1.192-2``), ``release`` (``uname -r``), the ``vmlinuz``
    path and ``modules_dir`` (``.../lib/modules/<release>``)."""

    package: str
    version: str
    release: str
    vmlinuz: Path
    modules_dir: Path

    @property
    def root(self) -> Path:
        """Return the directory the package was unpacked into."""
        return self.vmlinuz.parent.parent


def module_name(path: str) -> str:
    """Return the module name for a path in ``modules.dep`` (basename without ``.ko*``,
    dashes as underscores), e.g. ``kernel/fs/ext4/ext4.ko`` -> ``ext4``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Return ``{name: (relative path, [dependency names])}`` parsed from ``modules.dep`` text."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        out[module_name(path.strip())] = (path.strip(), [module_name(d) for d in deps.split()])
    return out


def parse_builtin(text: str) -> set[str]:
    """Return the set of module names listed in ``modules.builtin`` text."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def parse_softdeps(text: str) -> dict[str, list[str]]:
    """Return ``{module: [pre: soft dependencies]}`` from ``modules.softdep`` text
    (names may be aliases; ``post:`` dependencies are ignored)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        pre: list[str] = []
        mode = ""
        for w in words[2:]:
            if w.endswith(":"):
                mode = w
            elif mode == "pre:":
                pre.append(w)
        out[module_name(words[1])] = pre
    return out


def parse_aliases(text: str) -> dict[str, list[str]]:
    """Return ``{alias: [module names]}`` for the wildcard-free lines of ``modules.alias``."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            out.setdefault(words[1], []).append(module_name(words[2]))
    return out


def module_closure(
    wanted: Iterable[str],
    deps: dict[str, tuple[str, list[str]]],
    builtin: set[str] | frozenset[str] = frozenset(),
    softdeps: dict[str, list[str]] | None = None,
    aliases: dict[str, list[str]] | None = None,
    optional: set[str] | None = None,
) -> list[str]:
    """Return the relative paths (as in ``modules.dep``) of ``wanted`` modules and all
    their hard and ``pre:`` soft dependencies, in a valid load order (dependencies first).

    Built-in modules are skipped silently; a wanted module that is neither loadable nor
    built in raises KernelPackageError. Soft dependencies that cannot be resolved are skipped;
    the paths of modules reached only through soft dependencies (which may fail to load,
    e.g. CPU-specific crypto) are added to ``optional`` if given.
    """
    softdeps = softdeps or {}
    aliases = aliases or {}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def resolve(name: str) -> list[str]:
        name = name.replace("-", "_")
        if name in deps or name in builtin:
            return [name]
        return aliases.get(name, [])

    hard: set[str] = set()

    def visit(name: str, soft: bool = False) -> None:
        if not soft:
            hard.add(name)
        if name in done or name in builtin:
            return
        if name in visiting:
            raise KernelPackageError(f"module dependency cycle through {name}")
        visiting.add(name)
        for softname in softdeps.get(name, []):
            for target in resolve(softname):
                if target in deps:
                    visit(target, soft=True)
        for dep in deps[name][1]:
            visit(dep, soft)
        visiting.discard(name)
        done.add(name)
        order.append(deps[name][0])

    for want in wanted:
        targets = [t for t in resolve(want) if t in deps or t in builtin]
        if not targets:
            raise KernelPackageError(f"kernel module {want!r} is neither a module nor built in")
        for target in targets:
            visit(target)
    stack = [n for n in hard if n in deps]
    while stack:  # a module needed hard makes its own dependencies hard too
        for dep in deps[stack.pop()][1]:
            if dep not in hard and dep in deps:
                hard.add(dep)
                stack.append(dep)
    if optional is not None:
        optional.update(deps[n][0] for n in done - hard)
    return order


def kernel_modules_order(kernel: KernelPackage, wanted: Sequence[str] = DEFAULT_MODULES,
                         optional: set[str] | None = None) -> list[str]:
    """Return the load order (paths relative to ``kernel.modules_dir``) for ``wanted``
    modules of ``kernel`` and their dependencies, built-ins left out; soft-dependency-only
    paths are added to ``optional`` if given."""
    d = kernel.modules_dir

    def read(name: str) -> str:
        p = d / name
        return p.read_text() if p.exists() else ""

    return module_closure(
        wanted,
        parse_modules_dep(read("modules.dep")),
        parse_builtin(read("modules.builtin")),
        parse_softdeps(read("modules.softdep")),
        parse_aliases(read("modules.alias")),
        optional,
    )


# ---------------------------------------------------------------- apt access




def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run ``cmd``; return its stdout, raising KernelPackageError on failure."""
    return run(cmd, cwd=cwd, error=KernelPackageError)


def resolve_kernel_package(suite: str | None = None, cache: Path | None = None) -> tuple[str, str]:
    """Return ``(package, version)`` of the kernel that ``linux-image-amd64`` depends on
    in Debian ``suite`` (None: the host's own release, through the host's apt sources)."""
    return _resolve(suite or host_suite(), None, None, cache or cache_subdir(""), False)


def _find_unpacked(root: Path, package: str, version: str) -> KernelPackage:
    """Return the KernelPackage found in an unpacked package tree ``root``."""
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    moddirs = sorted(p for p in (root / "lib" / "modules").glob("*") if p.is_dir())
    if not vmlinuz or not moddirs:
        raise KernelPackageError(f"{root} holds no vmlinuz or lib/modules")
    return KernelPackage(package, version, moddirs[0].name, vmlinuz[0], moddirs[0])


def _cached_kernels(kdir: Path) -> list[KernelPackage]:
    """Return every complete kernel already in the cache directory ``kdir``."""
    found = []
    for d in sorted(kdir.iterdir()):
        if d.is_dir() and (d / ".complete").exists() and "_" in d.name:
            package, _, version = d.name.partition("_")
            with contextlib.suppress(KernelPackageError):
                found.append(_find_unpacked(d, package, version))
    return found


_SUITE_OF_SERIES = {"4.19": "buster", "5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}




def kernel_suite(kernel_dir: Path) -> str:
    """Return the Debian suite recorded for an unpacked kernel (or guessed from its
    version series, e.g. ``5.10.x`` -> ``bullseye``); '' if unknown."""
    words = (kernel_dir / ".complete").read_text().split() if (kernel_dir / ".complete").exists() else []
    if len(words) >= 3:
        return words[2]
    version = kernel_dir.name.partition("_")[2]
    return _SUITE_OF_SERIES.get(".".join(version.split(".")[:2]), "")




def _resolve(suite: str, package: str | None, version: str | None, cache: Path,
             refresh: bool) -> tuple[str, str]:
    """Return ``(package, version)`` to fetch for ``suite`` (see :func:`fetch_kernel`)."""
    opts = apt_options(suite, cache, refresh)
    if package is None:
        deps = _run(["apt-cache", *opts, "depends", "linux-image-amd64"])
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", deps)
        if not m:
            raise KernelPackageError(f"cannot find the kernel package behind linux-image-amd64: {deps!r}")
        package = m.group(1)
    if version is None:
        v = re.search(r"Candidate:\s*(\S+)", _run(["apt-cache", *opts, "policy", package]))
        if not v or v.group(1) == "(none)":
            raise KernelPackageError(f"no candidate version for {package} in {suite}")
        version = v.group(1)
    return package, version


def _download_unpack(suite: str, package: str, version: str, kdir: Path, target: Path,
                     refresh: bool) -> None:
    """Download ``package=version`` and unpack it, with modules.dep, into ``target``."""
    with tempfile.TemporaryDirectory(dir=kdir, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        opts = apt_options(suite, kdir.parent, refresh=False)
        _run(["apt-get", *opts, "-qq", "download", f"{package}={version}"], cwd=tmpdir)
        debs = list(tmpdir.glob("*.deb"))
        if len(debs) != 1:
            raise KernelPackageError(f"apt-get download gave {debs}")
        unpack = tmpdir / "root"
        _run(["dpkg", "-x", str(debs[0]), str(unpack)])
        # Debian ships /lib/modules (or /usr/lib/modules on merged-/usr releases)
        usr_mods = unpack / "usr" / "lib" / "modules"
        if not (unpack / "lib" / "modules").exists() and usr_mods.exists():
            (unpack / "lib").mkdir(exist_ok=True)
            shutil.move(str(usr_mods), str(unpack / "lib" / "modules"))
        kernel = _find_unpacked(unpack, package, version)
        _run(["depmod", "-b", str(unpack), kernel.release])
        for p in [unpack, *unpack.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        unpack.rename(target)
        (target / ".complete").write_text(f"{package} {version} {suite}\n")


def fetch_kernel(
    suite: str | None = None,
    package: str | None = None,
    version: str | None = None,
    cache: Path | str | None = None,
) -> KernelPackage:
    """Return the unpacked kernel for Debian ``suite`` (None: the host's own release),
    downloading (``apt-get download``) and unpacking (``dpkg -x``) it once into
    ``<cache>/kernels/<package>_<version>/`` and running ``depmod -b`` on it.

    ``package``/``version`` pin an exact ``linux-image-*`` package; by default the one
    ``linux-image-amd64`` depends on. A suite other than the host's (e.g. ``bullseye``
    for Debian 11's 5.10) goes through a private apt tree in the cache. If apt cannot
    be asked (offline), the newest cached kernel of that suite is used; if the download
    fails (lists out of date), the lists are refreshed once and it is tried again.
    """
    suite = suite or host_suite()
    kdir = cache_subdir("kernels", cache)
    last_error: KernelPackageError | None = None
    for refresh in (False, True):
        try:
            pkg, ver = _resolve(suite, package, version, kdir.parent, refresh)
        except KernelPackageError as exc:
            last_error = exc
            continue
        target = kdir / f"{pkg}_{ver}"
        with locked(kdir / ".lock"):
            if (target / ".complete").exists():
                return _find_unpacked(target, pkg, ver)
            try:
                _download_unpack(suite, pkg, ver, kdir, target, refresh)
            except KernelPackageError as exc:
                last_error = exc
                continue
            return _find_unpacked(target, pkg, ver)
    fallback = [k for k in _cached_kernels(kdir)
                if kernel_suite(k.root) == suite and package in (None, k.package)]
    if fallback:
        return fallback[-1]
    raise last_error or KernelPackageError(f"no kernel for {suite}")
