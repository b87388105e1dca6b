"""``libshare xml enable|disable|show``: enrolment as a filter on domain XML text.

These compose with virsh, e.g. ``virsh dumpxml vm | libshare xml enable - > new.xml``.
The input is never modified; the result goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from libshare import domxml
from libshare.cli.output import print_json
from libshare.config import Config
from libshare.domxml.devices import MODELS
from libshare.domxml.metadata import REDIRECT_MODES, check_group
from libshare.errors import LibshareError, UsageError
from libshare.util.files import os_error, read_bounded, read_regular
from libshare.util.units import parse_size
from libshare.virt import enrol

MODEL_HELP = ("region device model: nvdimm (default; copy-on-write, read-only to the "
              "guest, one host copy in the page cache); virtio-pmem (libvirt requires "
              "access='shared': guest writes reach the host file, trusted groups only; "
              "libvirt 9.0 with QEMU 7.2 cannot start it, 'libshare enable' then falls "
              "back to nvdimm); ivshmem (ivshmem-plain: guest writes are SHARED with every "
              "guest of the group, trusted groups only)")


REDIRECT_HELP = ("automatic redirect: runtime (after each start, 'libshare daemon' "
                 "redirects the guest once its agent answers) or off; default: the "
                 "domain's recorded mode, else the config's 'redirect' (off)")


#: bytes of domain XML read at most (libvirt's own tools stop at 10 MiB)
MAX_XML = 10 * 1024 * 1024


def _read(source: str) -> bytes:
    """Return the bytes of the regular file ``source`` or of stdin for ``-`` (a pipe:
    ``virsh dumpxml vm | libshare xml enable -``), at most MAX_XML of them. A FIFO or a
    device given by name is refused without being opened for reading."""
    try:
        if source == "-":
            return read_bounded(sys.stdin.buffer, MAX_XML, "the XML on stdin")
        return read_regular(source, MAX_XML)
    except OSError as exc:
        raise LibshareError(f"cannot read {source}: {os_error(exc, path=False)}") from exc


def _enable(args: argparse.Namespace, cfg: Config) -> int:
    root = domxml.parse(_read(args.file))
    group = cfg.default_group if args.group is None else \
        check_group(args.group, "--group", UsageError)  # "" is refused, not the default
    spec = enrol.resolve_region(cfg, group,
                                args.model or cfg.default_model, args.region,
                                parse_size(args.size) if args.size else None)
    spec = replace(spec, redirect=args.redirect)
    sys.stdout.write(domxml.serialize(domxml.enable(root, spec, cfg.redirect)))
    return 0


def _disable(args: argparse.Namespace, cfg: Config) -> int:
    root = domxml.parse(_read(args.file))
    sys.stdout.write(domxml.serialize(domxml.disable(root)))
    return 0


def _show(args: argparse.Namespace, cfg: Config) -> int:
    print_json(domxml.describe(domxml.parse(_read(args.file))))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``xml`` command group to the ``libshare`` parser."""
    p = sub.add_parser("xml", help="enrol domain XML text (a filter for virsh dumpxml)",
                       description="Transform libvirt domain XML without touching libvirt.")
    xs = p.add_subparsers(dest="xml_command", metavar="ACTION", required=True)
    e = xs.add_parser("enable", help="print the XML enrolled into a library region",
                      description="Print FILE's domain XML with the library region device "
                      "and what it needs added (ACPI, a NUMA cell, memory slots, a "
                      "guest-agent channel, free page reporting), every change recorded "
                      "in libshare's <metadata> so that 'xml disable' undoes it exactly.")
    e.add_argument("file", metavar="FILE|-",
                   help="domain XML file (a regular file), or - for stdin")
    e.add_argument("--region", metavar="PATH",
                   help="region image (default: the group's current image)")
    e.add_argument("--size", metavar="SIZE",
                   help="device size when the image does not exist yet (e.g. 64M)")
    e.add_argument("--model", choices=MODELS, help=MODEL_HELP)
    e.add_argument("--group", metavar="NAME", help="trust group (default from config)")
    e.add_argument("--redirect", choices=REDIRECT_MODES, help=REDIRECT_HELP)
    e.set_defaults(func=_enable)
    d = xs.add_parser("disable", help="print the XML with libshare's enrolment undone",
                      description="Print FILE's domain XML with exactly what 'enable' "
                      "added removed and what it changed restored.")
    d.add_argument("file", metavar="FILE|-")
    d.set_defaults(func=_disable)
    s = xs.add_parser("show", help="print libshare's state in the XML as JSON",
                      description="Print a JSON object: enrolled, group, model, region, "
                      "size, digest, state_dir, redirect, device_present, agent_channel, "
                      "free_page_reporting.")
    s.add_argument("file", metavar="FILE|-")
    s.set_defaults(func=_show)
