"""Boot-time redirect for every boot path: what ``libshare guest install`` does so that
the guest's next boot binds the region's copies in its initramfs, by how the domain
boots (:func:`setup`), and what ``unredirect`` undoes (:func:`teardown`).

- **GRUB from the guest disk** (or another boot loader reading the guest's /boot): the
  guest's own initramfs-tools initramfs, rebuilt in the guest with libshare's hook
  (``update-initramfs -u``).
- **Direct kernel boot** (``<os><kernel>``/``<initrd>`` host files): the guest's
  initramfs is never booted. libshare builds an initrd of its own on the host (the
  domain's initrd, read and checked here, with libshare's overlay appended: the
  init-bottom script and the guest's own tools, libraries and modules, read out through
  the agent; :mod:`libshare.boot`) and switches the definition to it from the next boot
  (recorded in the enrolment: ``disable`` restores the domain's own).
- **Unknown** (no ``<kernel>``, no ``BOOT_IMAGE=`` in the guest's command line): the
  guest's initramfs is rebuilt as for GRUB, and automatic runtime redirect is switched
  on as well, since nothing says that initramfs is booted.
- Where boot-time mode cannot be done (a dracut initramfs, which is issue 13's; no
  initramfs generator; direct kernel boot without an initrd, or with one libshare cannot
  read or extend; no kernel modules for the running kernel; update-initramfs failing),
  the domain falls back to the earliest mode that still reaches every process:
  automatic runtime redirect after each start (``--redirect runtime``: the hook asks,
  ``libshare daemon`` serves), and the report says why. Never a silent no-op.

The guest answers through ``libshare/data/guest/boot-files`` (run from stdin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare import domxml
from libshare.boot import initrd as initrd_mod
from libshare.boot import overlay, store
from libshare.data import guest_bytes
from libshare.errors import LibshareError
from libshare.redirect import actions
from libshare.redirect.agent import AgentError, GuestAgent
from libshare.util.units import human
from libshare.virt import api, enrol

GRUB, DIRECT, UNKNOWN = "grub", "direct-kernel", "unknown"
#: how each boot path is named in reports
PATH_TEXT = {GRUB: "GRUB from the guest disk", DIRECT: "direct kernel boot",
             UNKNOWN: "unknown"}
#: bytes one guest file read for libshare's initrd may have
MAX_FILE = 64 << 20


def hook_lists(text: str | None = None) -> tuple[list[str], list[str]]:
    """Return the ``TOOLS`` and ``MODULES`` lists of the packaged initramfs-tools hook
    (``text``: its contents, default the shipped file): what boot-time redirect needs in
    any initrd. Raises LibshareError if the hook lacks them."""
    text = text if text is not None else guest_bytes("initramfs-hook").decode()
    out = []
    for var in ("TOOLS", "MODULES"):
        m = re.search(rf'^{var}="([^"]*)"$', text, re.M)
        if not m or not m.group(1).split():
            raise LibshareError(f"the initramfs hook has no {var} list")
        out.append(m.group(1).split())
    return out[0], out[1]


@dataclass
class BootReport:
    """What :func:`setup` found and did for one domain: ``path`` (grub, direct-kernel,
    unknown) and ``found`` (what was seen, one line), ``mode`` (boot: boot-time redirect
    from the next boot; runtime: automatic runtime redirect after each start instead;
    boot+runtime: both), ``done`` (one line per action), ``reason`` (why not, or not
    certainly, boot-time; None when it is), ``initrd``/``original_initrd`` (libshare's
    initrd and the domain's own, direct kernel boot)."""

    path: str
    found: str
    mode: str = "none"
    done: list[str] = field(default_factory=list)
    reason: str | None = None
    initrd: str | None = None
    original_initrd: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (``path_text`` added)."""
        return {**self.__dict__, "path_text": PATH_TEXT[self.path]}


def guest_facts(agent: GuestAgent, steps: actions.Steps) -> dict[str, Any]:
    """Return ``boot-files facts`` of the guest (boot_image, grub, release, modules,
    generator)."""
    res = steps.run("boot path", agent, ["/bin/sh", "-s", "--", "facts"],
                    stdin=guest_bytes("boot-files"), timeout=60)
    return actions.parse_kv(res.out)


def _fallback(dom: Any, rep: BootReport, reason: str, keep_mode: bool = False) -> BootReport:
    """Switch ``dom`` to automatic runtime redirect after each start, with ``reason``;
    return ``rep`` saying so (``keep_mode``: boot-time stays set up too)."""
    changed = enrol.set_redirect(dom.connect(), dom.name(), "runtime")
    rep.reason = reason
    rep.mode = "boot+runtime" if keep_mode else "runtime"
    rep.done.append(("automatic runtime redirect switched on" if changed else
                     "automatic runtime redirect was on already")
                    + ": after each start the hook asks and 'libshare daemon' redirects "
                    f"the guest; 'libshare redirect {dom.name()}' does it now")
    return rep


def _disk(dom: Any, agent: GuestAgent, facts: dict[str, Any], path: str,
          report: actions.InstallReport, steps: actions.Steps) -> BootReport:
    """Boot-time mode through the guest's own initramfs (GRUB, unknown)."""
    image = facts.get("boot_image") or ""
    found = (f"{PATH_TEXT[path]} (BOOT_IMAGE={image}, initramfs by "
             f"{facts.get('generator', 'none')})" if path == GRUB else
             f"{PATH_TEXT[path]}: no <kernel> in the definition and no BOOT_IMAGE= on the "
             f"guest's kernel command line (initramfs by {facts.get('generator', 'none')})")
    rep = BootReport(path, found)
    generator = facts.get("generator")
    if generator == "dracut":
        return _fallback(dom, rep, "the guest's initramfs is made by dracut, which "
                         "libshare's boot-time hook does not support yet")
    if generator != "initramfs-tools":
        return _fallback(dom, rep, "the guest has no initramfs generator "
                         "(update-initramfs) for libshare's boot-time hook")
    res = steps.run("update-initramfs", agent, ["/bin/sh", "-c", "update-initramfs -u 2>&1"],
                    timeout=actions.INITRAMFS_TIMEOUT)
    report.initramfs = "updated" if res.ok else f"failed: {actions.tail(res)}"
    if not res.ok:
        return _fallback(dom, rep, f"update-initramfs failed in the guest: "
                         f"{actions.tail(res)}")
    report.initramfs_entries = actions.initramfs_entries(agent, steps)
    rep.mode = "boot"
    rep.done.append(f"the guest's initramfs rebuilt with libshare's hook "
                    f"({report.initramfs_entries} libshare files in it): boot-time "
                    "redirect from the next boot")
    if path == UNKNOWN:
        return _fallback(dom, rep, "unknown boot path: nothing says the boot loader "
                         "boots the guest's /boot/initrd.img; runtime redirect covers "
                         "the case where it does not", keep_mode=True)
    return rep


def _read_files(agent: GuestAgent, listing: overlay.Listing,
                steps: actions.Steps) -> dict[str, bytes]:
    """Return the guest files ``listing`` names, read through the agent."""
    files: dict[str, bytes] = {}
    paths = list(overlay.listed_paths(listing))
    steps.count("read boot files", 0, len(paths), "files")
    for path in paths:
        try:
            files[path] = agent.read_file(path, max_bytes=MAX_FILE)
        except AgentError as exc:
            raise LibshareError(f"cannot read guest file {path}: {exc}") from exc
        steps.count("read boot files", len(files), len(paths), "files")
    return files


def _direct(dom: Any, agent: GuestAgent, facts: dict[str, Any], boot: dict[str, Any],
            state_dir: Path, report: actions.InstallReport,
            steps: actions.Steps) -> BootReport:
    """Boot-time mode for direct kernel boot: libshare's initrd on the host."""
    name = dom.name()
    original = boot["original_initrd"] or boot["initrd"]
    rep = BootReport(DIRECT, f"{PATH_TEXT[DIRECT]} (kernel {boot['kernel']}, initrd "
                     f"{original or 'none'})", original_initrd=original)
    report.initramfs = "not rebuilt: a domain with direct kernel boot never boots it"
    if not original:
        return _fallback(dom, rep, "direct kernel boot without an initrd: there is no "
                         "initramfs for libshare to extend")
    try:
        info = initrd_mod.inspect(original)
    except initrd_mod.InitrdError as exc:
        return _fallback(dom, rep, f"libshare cannot read the domain's initrd: {exc}")
    rep.found += f": {info.kind}, {'+'.join(info.archives)}, {human(info.size)}"
    if info.kind == initrd_mod.DRACUT:
        return _fallback(dom, rep, f"the domain's initrd {original} was made by dracut, "
                         "which libshare cannot extend yet")
    if info.kind != initrd_mod.INITRAMFS_TOOLS:
        return _fallback(dom, rep, f"the domain's initrd {original} was not made by "
                         "initramfs-tools: libshare cannot extend it")
    release = str(facts.get("release") or "")
    if not release:
        return _fallback(dom, rep, "the guest did not say which kernel it runs")
    tools, modules = hook_lists()
    res = steps.run("list boot files", agent, ["/bin/sh", "-s", "--", "files", *tools,
                                                "--", *modules],
                    stdin=guest_bytes("boot-files"), timeout=300)
    listing = overlay.parse_listing(res.out)
    gone = [m for m in listing.missing if m.startswith(("tool ", "lib "))]
    if gone:
        return _fallback(dom, rep, f"the guest lacks what libshare's initrd needs: "
                         f"{', '.join(gone)}")
    if not listing.modules and not listing.builtin:
        return _fallback(dom, rep, f"the guest has no kernel modules of its running "
                         f"kernel {release} for the region (nfit, nd_pmem, erofs)")
    files = _read_files(agent, listing, steps)
    blob = overlay.build(listing, files, release, script=actions.script_bytes(),
                         init_bottom=guest_bytes("init-bottom"),
                         conf=guest_bytes("initrd-conf"))
    uuid = dom.UUIDString()
    rec = store.build(state_dir, uuid, name, Path(original), info.sha256, blob,
                      release=release, kernel=boot["kernel"], generator=info.kind,
                      built_by="guest install")
    path = str(store.initrd_path(state_dir, uuid))
    enrol.switch_initrd(dom.connect(), name, path)
    rep.mode, rep.initrd = "boot", path
    rep.done.append(f"libshare's initrd built: {path} (the domain's {original}, "
                    f"{human(rec.original_size)}, and libshare's "
                    f"{human(len(blob))}: {len(listing.exes)} tools, "
                    f"{len(listing.libs)} libraries, {len(set(listing.modules))} modules "
                    f"of kernel {release})")
    rep.done.append(f"the definition boots it from the next start (was {original}; "
                    f"'libshare disable {name}' restores it)")
    running = domxml.boot_of(domxml.parse(str(dom.XMLDesc(0))))["kernel"]
    if running != boot["kernel"]:
        rep.reason = (f"the definition's kernel {boot['kernel']} is not the running one "
                      f"({running}): libshare's modules are those of {release}; for "
                      "another kernel the boot loads the guest root's own")
    return rep


def boot_state_dir(root: Any, default: Path | None) -> Path | None:
    """Return where libshare's initrd of the domain defined as ``root`` lives: under the
    state directory its enrolment records (the one the hook serves it from), else
    ``default``."""
    enr = domxml.enrolment(root)
    return Path(enr.state_dir) if enr is not None and enr.state_dir else default


def setup(dom: Any, agent: GuestAgent, state_dir: Path, report: actions.InstallReport,
          steps: actions.Steps) -> BootReport:
    """Set up boot-time redirect for running domain ``dom`` (libshare's guest files
    installed already), by the boot path its persistent definition and the guest show;
    return the :class:`BootReport` (``report``'s initramfs fields are filled in too).
    libshare's initrd goes under :func:`boot_state_dir` (``state_dir`` by default). A
    fallback to automatic runtime redirect redefines the domain's redirect mode."""
    facts = guest_facts(agent, steps)
    root = domxml.parse(api.inactive_xml(dom))
    boot = domxml.boot_of(root)
    if boot["direct_kernel"]:
        where = boot_state_dir(root, state_dir)
        assert where is not None
        return _direct(dom, agent, facts, boot, where, report, steps)
    path = GRUB if facts.get("boot_image") and facts.get("grub") == "1" else UNKNOWN
    rep = _disk(dom, agent, facts, path, report, steps)
    _grub_cmdline(agent, rep, steps)
    return rep


#: seconds update-grub may take in a guest (it probes every disk; TCG guests are slow)
GRUB_TIMEOUT = 300.0


def _grub_cmdline(agent: GuestAgent, rep: BootReport, steps: actions.Steps) -> None:
    """Regenerate the guest's GRUB configuration (``libshare-redirect grub``) so that
    its kernel command line gets libshare's drop-in (``swiotlb=noforce`` while all its
    RAM lies below 4 GiB: no 64 MiB of bounce buffers, see
    :data:`libshare.domxml.transform.NO_BOUNCE_BUFFERS`); add what was done, or why not, to
    ``rep.done``. Returns nothing."""
    res = steps.run("update-grub", agent, [actions.SCRIPT, "grub"], timeout=GRUB_TIMEOUT)
    kv = actions.parse_kv(res.out)
    state = kv.get("grub")
    spare = ("; add swiotlb=noforce to its kernel command line by hand to spare the 64 "
             "MiB of bounce buffers its kernel reserves (all RAM below 4 GiB)")
    saved = (f" (its grub.cfg, not made by grub-mkconfig, kept as {kv['grub_saved']})"
             if kv.get("grub_saved") else "")
    if state == "updated":
        rep.done.append(("update-grub: the kernel command line has swiotlb=noforce from "
                         "the next boot (no bounce buffers)" if kv.get("noforce") == "1" else
                         "update-grub: the kernel command line left as it was (RAM at or "
                         "above 4 GiB: the kernel may need its bounce buffers)") + saved)
    elif state == "none":
        rep.done.append("no update-grub in the guest" + spare)
    else:
        rep.done.append(f"update-grub failed in the guest ({actions.tail(res)})" + spare)


def teardown(dom: Any, state_dir: Path | None) -> str | None:
    """Make ``dom`` boot its own initrd again when it boots libshare's (``unredirect``),
    removing libshare's (under :func:`boot_state_dir`); return what was done, or None."""
    root = domxml.parse(api.inactive_xml(dom))
    boot = domxml.boot_of(root)
    if not boot["libshare_initrd"]:
        return None
    enrol.restore_initrd(dom.connect(), dom.name(), boot_state_dir(root, state_dir))
    return f"boots its own initrd {boot['original_initrd']} again from the next start"
