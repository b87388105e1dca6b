"""``libshare enable|disable``: enrolment of libvirt domains through the API."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from libshare import domxml
from libshare.cli.commands.xml import MODEL_HELP, REDIRECT_HELP
from libshare.cli.options import add_json, libvirt_uri
from libshare.cli.output import print_json
from libshare.config import Config
from libshare.domxml.devices import MODELS
from libshare.domxml.metadata import REDIRECT_MODES, Enrolment, check_group
from libshare.errors import LibshareError, UsageError
from libshare.virt import api, capabilities, enrol


def _report(outcomes: list[enrol.Outcome], failures: list[dict[str, Any]],
            as_json: bool) -> int:
    if as_json:
        print_json({"domains": [o.as_dict() for o in outcomes], "errors": failures})
    else:
        for o in outcomes:
            print(f"{o.domain}: {o.message}")
    for f in failures:
        print(f"libshare: {f['domain']}: {f['error']}", file=sys.stderr)
    return 1 if failures else 0


def _recorded(conn: Any, name: str) -> Enrolment | None:
    """Return the enrolment recorded in domain ``name``'s definition, or None (also when
    the definition cannot be read: enabling it then reports why). Raises LibshareError
    if the domain does not exist, before anything is said about its group."""
    dom = api.lookup(conn, name)
    try:
        return domxml.enrolment(domxml.parse(api.inactive_xml(dom)))
    except LibshareError:
        return None


def _enable(args: argparse.Namespace, cfg: Config) -> int:
    outcomes, failures = [], []
    specs: dict[tuple[str, str], domxml.RegionSpec] = {}
    if args.group is not None:  # "" is refused, not the default
        check_group(args.group, "--group", UsageError)
    with api.connect(libvirt_uri(args, cfg)) as conn:
        for name in args.domains:
            try:
                # an enrolled domain keeps its group and model unless told otherwise
                old = _recorded(conn, name)
                group = args.group if args.group is not None else \
                    (old.group if old else cfg.default_group)
                model = args.model or (old.model if old else cfg.default_model)
                if (group, model) not in specs:
                    specs[(group, model)] = _spec(conn, cfg, args, group, model)
                outcomes.append(enrol.enable_domain(conn, name, specs[(group, model)],
                                                    cfg.redirect))
            except LibshareError as exc:
                failures.append({"domain": name, "error": str(exc)})
    return _report(outcomes, failures, args.json)


def _spec(conn: Any, cfg: Config, args: argparse.Namespace, group: str,
          model: str) -> domxml.RegionSpec:
    """Return the region spec for ``group`` and ``model`` (virtio-pmem falls back to
    nvdimm, with a warning, on hosts where it cannot start)."""
    if model == "virtio-pmem":
        works, reason = capabilities.virtio_pmem_works(conn, cfg.state_dir)
        if not works:
            print(f"libshare: virtio-pmem cannot start on this host ({reason}); "
                  "using nvdimm", file=sys.stderr)
            model = "nvdimm"
    return replace(enrol.resolve_region(cfg, group, model, args.region),
                   redirect=args.redirect)


def _disable(args: argparse.Namespace, cfg: Config) -> int:
    outcomes, failures = [], []
    with api.connect(libvirt_uri(args, cfg)) as conn:
        for name in args.domains:
            try:
                outcomes.append(enrol.disable_domain(conn, name, cfg.state_dir))
            except LibshareError as exc:
                failures.append({"domain": name, "error": str(exc)})
    return _report(outcomes, failures, args.json)






















def register(sub: argparse._SubParsersAction) -> None:
    """Add ``enable`` and ``disable`` to the ``libshare`` parser."""
    e = sub.add_parser("enable", help="enrol libvirt domains into their group's region",
                       description="Redefine each domain's persistent definition with the "
                       "library region device (see 'libshare xml enable'). A running "
                       "domain keeps running; the region is attached at its next boot. Run it "
                       "again after 'libshare region build' to move enrolled domains to "
                       "their group's new image (a running guest keeps the old one until "
                       "it stops).")
    e.add_argument("domains", nargs="+", metavar="DOMAIN")
    e.add_argument("--group", metavar="NAME",
                   help="trust group (default: an enrolled domain's recorded group, else "
                        "the config's default_group)")
    e.add_argument("--model", choices=MODELS,
                   help=MODEL_HELP + "; default: an enrolled domain's recorded model, else "
                        "the config's default_model")
    e.add_argument("--region", metavar="PATH",
                   help="region image (default: the group's current image)")
    e.add_argument("--redirect", choices=REDIRECT_MODES, help=REDIRECT_HELP)
    add_json(e)
    e.set_defaults(func=_enable)
    d = sub.add_parser("disable", help="undo the enrolment of libvirt domains",
                       description="Redefine each domain with exactly what enrolment "
                       "added removed and what it changed restored (a domain with direct "
                       "kernel boot boots its own initrd again; libshare's is removed).")
    d.add_argument("domains", nargs="+", metavar="DOMAIN")
    add_json(d)
    d.set_defaults(func=_disable)
