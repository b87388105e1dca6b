"""``libshare report``: what libshare saves on this host now, per domain, per trust group
and for the host, beside KSM, and with ``--forecast GROUP`` what each region policy
would save (gathered by :mod:`libshare.report`), as tables, ``--json``,
a picture (``--png``, matplotlib) and node_exporter textfile-collector metrics
(``--prometheus``, written atomically)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from libshare import report
from libshare.cli.commands.survey import print_forecast
from libshare.cli.options import add_json, add_trees, libvirt_uri
from libshare.cli.output import print_json, print_table
from libshare.config import Config
from libshare.domxml.metadata import check_group
from libshare.errors import EXIT_FAILED, EXIT_OK, LibshareError, UsageError
from libshare.util.files import atomic_write
from libshare.util.units import human
from libshare.virt import api

MATPLOTLIB_MISSING = ("--png needs matplotlib, which is not installed "
                      "(pip install 'libshare[bench]' or apt-get install python3-matplotlib)")


def _size(value: Any) -> str:
    """Return a byte count for a table cell ('-' when unknown)."""
    return human(value) if isinstance(value, int) else "-"


# ------------------------------------------------------------------ Prometheus

def _label(value: str) -> str:
    """Return ``value`` escaped for a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metrics:
    """Prometheus text exposition, one family (HELP, TYPE) at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, text: str,
               samples: list[tuple[dict[str, str], float | int | None]]) -> None:
        """Add gauge ``libshare_<name>`` with ``samples`` (labels, value; None skipped)."""
        kept = [(labels, v) for labels, v in samples if v is not None]
        if not kept:
            return
        full = f"libshare_{name}"
        self.lines += [f"# HELP {full} {text}", f"# TYPE {full} gauge"]
        for labels, value in kept:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{full}{{{inner}}} {value}" if inner else f"{full} {value}")

    def text(self) -> str:
        """Return the exposition text (ends with a newline)."""
        return "\n".join(self.lines) + "\n"


def prometheus_text(rep: dict[str, Any]) -> str:
    """Return the report as Prometheus text-format metrics (gauges, bytes) for
    node_exporter's textfile collector."""
    m = _Metrics()
    groups, host = rep["groups"], rep["host"]
    doms = rep["domains"]
    enrolled = [d for d in doms if d["region"] is not None]

    def dom_labels(d: dict[str, Any]) -> dict[str, str]:
        return {"domain": d["name"], "group": d["group"] or ""}

    m.family("region_saved_bytes", "Host memory the group's region saves: sum of Rss minus "
             "sum of Pss of its guests' region mappings.",
             [({"group": g["group"]}, g["saved_bytes"]) for g in groups])
    m.family("region_copied_bytes", "Copy-on-write copies of region pages held by one "
             "guest (anonymous pages in its region mapping); should be 0.",
             [(dom_labels(d), d["region"]["copied_bytes"]) for d in enrolled])
    m.family("region_domain_saved_bytes", "Rss minus Pss of one guest's region mapping.",
             [(dom_labels(d), d["region"]["saved_bytes"]) for d in enrolled])
    m.family("region_mapped_bytes", "Region pages one guest maps (Rss of its region mapping).",
             [(dom_labels(d), d["region"]["mapped_bytes"]) for d in enrolled])
    m.family("region_pss_bytes", "Proportional share (Pss) of one guest's region mapping.",
             [(dom_labels(d), d["region"]["pss_bytes"]) for d in enrolled])
    m.family("region_page_cache_bytes", "Host page cache of the group's region files, "
             "counted once.",
             [({"group": g["group"]}, g["region_page_cache_bytes"]) for g in groups])
    surveyed = [d for d in enrolled if d.get("page_cache") and "error" not in d["page_cache"]]
    m.family("guest_private_servable_bytes", "File pages a guest holds in its own page "
             "cache that its group's region could serve (read by introspection).",
             [(dom_labels(d), d["page_cache"]["servable_bytes"]) for d in surveyed])
    m.family("guest_private_file_cache_bytes", "File pages a guest holds in its own page "
             "cache (regular files, read by introspection).",
             [(dom_labels(d), d["page_cache"]["private_bytes"]) for d in surveyed])
    m.family("guest_ram_resident_bytes", "Resident guest RAM of one domain (its guest-RAM "
             "mapping: Rss plus hugetlbfs pages).",
             [(dom_labels(d), d["guest_ram"]["resident_bytes"]) for d in doms])
    m.family("guest_ksm_saved_bytes", "Rss minus Pss of one guest's RAM mapping: what KSM "
             "merged of it.", [(dom_labels(d), d["guest_ram"]["ksm_saved_bytes"]) for d in doms])
    ksm = host["ksm"]
    m.family("host_region_saved_bytes", "Host memory all regions save.",
             [({}, host["region_saved_bytes"])])
    m.family("host_region_copied_bytes", "Copy-on-write copies of region pages, all guests.",
             [({}, host["region_copied_bytes"])])
    m.family("ksm_running", "1 when KSM runs (/sys/kernel/mm/ksm/run is 1).",
             [({}, int(ksm["running"]))] if ksm["available"] else [])
    m.family("ksm_saved_bytes", "Host memory KSM saves: (pages_sharing + ksm_zero_pages) "
             "times the page size, every process it merges.",
             [({}, ksm["saved_bytes"])] if ksm["available"] else [])
    m.family("ksm_pages", "KSM's page counters (/sys/kernel/mm/ksm).",
             [({"counter": k}, v) for k, v in sorted(ksm["counters"].items())
              if k.startswith("pages_")])
    m.family("ksmd_cpu_seconds", "CPU seconds ksmd has used since boot.",
             [({}, ksm["ksmd_cpu_seconds"])])
    fc = rep.get("forecast") or {}
    m.family("forecast_saved_bytes", "Host memory a region of this policy would save for "
             "the group, forecast from its guests' page cache (their cached bytes the "
             "region would serve, minus the one copy the host would hold).",
             [({"group": fc["group"], "policy": p["policy"]}, p["host_saves"])
              for p in fc.get("policies", []) if not p["error"]])
    m.family("report_domains", "Running domains the report covers.", [({}, host["domains"])])
    m.family("report_cpu_seconds", "CPU seconds the report took to gather.",
             [({}, rep["cost"]["cpu_seconds"])])
    m.family("report_timestamp_seconds", "When the report was gathered (Unix time).",
             [({}, round(rep["time"], 3))])
    return m.text()


# ------------------------------------------------------------------ the picture

def _pyplot() -> Any:
    """Return matplotlib's pyplot on the Agg backend; LibshareError when missing."""
    try:
        import matplotlib
    except ImportError:
        raise LibshareError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_figure(rep: dict[str, Any]) -> Any:
    """Return the matplotlib Figure of the report: per domain, bars of the memory its
    region saves, the file pages it still holds privately that the region could serve,
    its copies and what KSM merged of its RAM; beside them the host totals, libshare's
    and KSM's."""
    plt = _pyplot()
    MiB = 1024 * 1024
    doms = rep["domains"]
    host = rep["host"]
    names = [d["name"] for d in doms] or ["(no running domain)"]

    def col(part: str, key: str) -> list[float]:
        return [((d.get(part) or {}).get(key) or 0) / MiB for d in doms] or [0.0]

    saved = col("region", "saved_bytes")
    servable = col("page_cache", "servable_bytes")
    copied = col("region", "copied_bytes")
    ksm_dom = col("guest_ram", "ksm_saved_bytes")
    fig, (ax, axh) = plt.subplots(1, 2, figsize=(11, 0.5 * max(len(names), 4) + 2.6),
                                  gridspec_kw={"width_ratios": [3, 1.3]})
    y = list(range(len(names)))
    h = 0.38
    ax.barh([v - h / 2 for v in y], saved, h, color="#2a9d8f", label="saved by the region")
    ax.barh([v - h / 2 for v in y], servable, h, left=saved, color="#e9c46a",
            label="still private, the region could serve" if rep.get("page_cache_surveyed")
            else "still private (not surveyed: --page-cache)")
    ax.barh([v - h / 2 for v in y], copied, h, left=[a + b for a, b in zip(saved, servable,
                                                                          strict=True)],
            color="#e63946", label="copy-on-write copies (must be 0)")
    ax.barh([v + h / 2 for v in y], ksm_dom, h, color="#8d99ae", label="merged by KSM")
    for v, a, b, c in zip(y, saved, servable, copied, strict=True):
        ax.annotate(f" {human(int(a * MiB))} saved"
                    + (f", {human(int(b * MiB))} private" if b else "")
                    + (f", {human(int(c * MiB))} copied" if c else ""), (a + b + c, v - h / 2),
                    va="center", fontsize="small")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_xlim(0, max([a + b + c for a, b, c in zip(saved, servable, copied, strict=True)]
                       + ksm_dom + [0.1]) * 1.35)
    ax.set_title("per domain")
    ksm = host["ksm"]
    ksm_label = "KSM" + ("" if ksm["running"] else " (off)")
    totals = [("libshare", host["region_saved_bytes"] / MiB, "#2a9d8f"),
              (ksm_label, ksm["saved_bytes"] / MiB, "#8d99ae")]
    bars = axh.bar([t[0] for t in totals], [t[1] for t in totals],
                   color=[t[2] for t in totals])
    for bar, (_, value, _) in zip(bars, totals, strict=True):
        axh.annotate(f"{value:.1f} MiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize="small")
    axh.set_ylabel("MiB saved")
    axh.set_title(f"host: {host['domains']} domains")
    fig.suptitle("libshare report: host memory saved")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4,
               fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def write_png(rep: dict[str, Any], path: Path) -> None:
    """Write the report's picture (:func:`report_figure`) to ``path`` atomically, with
    the domains and groups named in its PNG text chunks."""
    plt = _pyplot()
    fig = report_figure(rep)
    buf = io.BytesIO()
    meta = {"Title": "libshare report", "Software": "libshare",
            "Description": "domains: " + ", ".join(d["name"] for d in rep["domains"])
            + "; groups: " + ", ".join(g["group"] for g in rep["groups"])}
    fig.savefig(buf, format="png", dpi=100, metadata=meta)
    plt.close(fig)
    atomic_write(path, buf.getvalue(), durable=False)


# ------------------------------------------------------------------ tables

def print_report(rep: dict[str, Any]) -> None:
    """Print the report as tables: per domain, per group, and the host line."""
    doms = rep["domains"]
    surveyed = rep.get("page_cache_surveyed")
    head = ["DOMAIN", "GROUP", "REGION MAPPED", "REGION PSS", "SAVED", "COPIES"]
    if surveyed:
        head += ["PRIVATE FILE CACHE", "REGION COULD SERVE"]
    head += ["GUEST RAM", "KSM MERGED"]
    rows = []
    for d in doms:
        r = d["region"] or {}
        cells = [d["name"], d["group"] or "-", _size(r.get("mapped_bytes")),
                 _size(r.get("pss_bytes")), _size(r.get("saved_bytes")),
                 _size(r.get("copied_bytes"))]
        if surveyed:
            pc = d.get("page_cache") or {}
            cells += [_size(pc.get("private_bytes")), _size(pc.get("servable_bytes"))]
        cells += [_size(d["guest_ram"]["resident_bytes"]),
                  _size(d["guest_ram"]["ksm_saved_bytes"])]
        rows.append(cells)
    if rows:
        print_table(head, rows)
    else:
        print("no running domain")
    if rep["groups"]:
        print()
        print_table(["GROUP", "DOMAINS", "SAVED", "COPIES", "REGION PAGE CACHE",
                     "REGION COULD SERVE"],
                    [[g["group"], len(g["domains"]), _size(g["saved_bytes"]),
                      _size(g["copied_bytes"]), _size(g["region_page_cache_bytes"]),
                      _size(g["servable_bytes"])] for g in rep["groups"]])
    host = rep["host"]
    ksm = host["ksm"]
    print()
    print(f"host: the regions save {human(host['region_saved_bytes'])} over "
          f"{host['enrolled']} enrolled of {host['domains']} running domains "
          f"(copies {human(host['region_copied_bytes'])})")
    if not ksm["available"]:
        print("KSM: not available on this kernel")
    else:
        c = ksm["counters"]
        cpu = ksm["ksmd_cpu_seconds"]
        print(f"KSM: {'on' if ksm['running'] else 'off'}, saves {human(ksm['saved_bytes'])} "
              f"(pages_shared {c.get('pages_shared', 0)}, pages_sharing "
              f"{c.get('pages_sharing', 0)}, every process it merges)"
              + (f", ksmd {cpu:.1f} s CPU since boot" if cpu is not None else ""))
    print(f"gathered in {rep['cost']['cpu_seconds']:.3f} s CPU")


def output_path(text: str, option: str) -> Path:
    """Return ``text`` as the path of a file to replace; UsageError when something other
    than a regular file is there (a folder, a FIFO, a device is never replaced)."""
    import os
    import stat

    from libshare.errors import UsageError

    path = Path(text)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise UsageError(f"{option} {text}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option} {text}: not a regular file; not replacing it")
    return path


def _report(args: argparse.Namespace, cfg: Config) -> int:
    if args.trees and not args.forecast:
        raise UsageError("--tree goes with --forecast")
    if args.forecast is not None:
        check_group(args.forecast, "--forecast", UsageError)
    png = output_path(args.png, "--png") if args.png else None
    prom = output_path(args.prometheus, "--prometheus") if args.prometheus else None
    if png:
        _pyplot()  # fail before gathering anything when matplotlib is missing
    with api.connect(libvirt_uri(args, cfg)) as conn:
        rep = report.gather(conn, cfg, args.domains or None, page_cache=args.page_cache,
                            forecast=args.forecast, trees=args.trees)
    if prom:
        atomic_write(prom, prometheus_text(rep).encode())
    if png:
        write_png(rep, png)
    if args.json:
        print_json(rep)
    else:
        print_report(rep)
        if rep["forecast"]:
            print_forecast(rep["forecast"])
        for name in rep["skipped"]:
            print(f"{name}: not running: nothing to report", file=sys.stderr)
    for d in rep["domains"]:
        if d["region"] and d["region"]["copied_bytes"]:
            print(f"{d['name']}: {human(d['region']['copied_bytes'])} of region pages "
                  "copied (written by the guest): those are private copies", file=sys.stderr)
        pc = d.get("page_cache") or {}
        if "error" in pc:
            print(f"{d['name']}: no page-cache survey: {pc['error']}", file=sys.stderr)
    fc = rep["forecast"] or {}
    for problem in fc.get("errors", []) + fc.get("failed", []):
        print(f"libshare: forecast: {problem}", file=sys.stderr)
    return EXIT_FAILED if fc.get("partial") else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``libshare`` parser."""
    s = sub.add_parser("report", help="what libshare saves on this host now, beside KSM",
                       description="Show, for the running domains (or those named), the "
                       "host memory each trust group's region saves (from each QEMU's "
                       "region mapping: sum of Rss minus sum of Pss), the copy-on-write "
                       "copies of region pages (anonymous pages in the region mapping: "
                       "should be 0), with --page-cache the file pages guests still hold "
                       "privately that their region could serve (introspection), and "
                       "what KSM saves, per domain, per group and for the host. Reads "
                       "smaps and /sys/kernel/mm/ksm (with --page-cache, guest memory "
                       "too): no guest agent, no pause. Not counted: what the region "
                       "costs inside each guest (its struct pages, 1.56% of the region, "
                       "in guest RAM).")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--page-cache", action="store_true",
                   help="also read each enrolled guest's page cache from its memory "
                   "(introspection, no pause) to count the file pages it still holds "
                   "that its region could serve (costs more CPU: not for every minute)")
    s.add_argument("--png", metavar="OUT",
                   help="also draw the report as a PNG picture (needs matplotlib)")
    s.add_argument("--prometheus", metavar="OUT",
                   help="also write node_exporter textfile-collector metrics to OUT "
                   "(atomically; e.g. /var/lib/prometheus/node-exporter/libshare.prom)")
    s.add_argument("--forecast", metavar="NAME",
                   help="also forecast, before enrolment, what a region of each policy "
                   "(built from the store's trees) would serve of trust group NAME: per "
                   "guest the file pages it would stop caching, for the host what it "
                   "would hold once and save; the guests are the DOMAINs, else the "
                   "running domains enrolled in NAME (their page cache read from their "
                   "memory, as --page-cache). Exit status 1 when a guest's survey fails "
                   "or is partial (the forecast says partial)")
    add_trees(s, "for --forecast to plan from")
    add_json(s)
    s.set_defaults(func=_report)
