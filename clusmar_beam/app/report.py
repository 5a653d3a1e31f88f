"""`clusmar report --input DIR [--output FILE.html] [--overwrite]`: one offline HTML page.

DIR is either a `clusmar simulate` output (simulation.json: learning curves, label
savings over the sweep, selection diagnostics, timing) or a `clusmar round` work
directory (state.json: the pool's clustering, every round's selection, the classes
of the picks whose labels came back). The page is a single file with its plots
embedded as PNG data, no script and no external resource, so it can be mailed,
archived next to the run, or opened on a machine without network.
"""
from __future__ import annotations

import datetime
import html
import logging
import math
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from clusmar_beam.app import report_plots as plots
from clusmar_beam.app.rounds.stages import STAGES, clusters_dir, manifest_dir
from clusmar_beam.app.rounds.state import load_state
from clusmar_beam.app.simulate import SIMULATION_FORMAT, SIMULATION_VERSION
from clusmar_beam.core.errors import InputError
from clusmar_beam.pipelines.options import SubcommandOptions, parse_options, require
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")

MAX_BYTES = 5 * 1024 * 1024
# Picks-by-cluster-size is recomputed from the clusters files only for manifests written before
# select recorded it, and only while the cluster ids fit comfortably in memory.
MAX_POINTS_FOR_SIZE_FALLBACK = 20_000_000
# Per-round plots show the latest rounds only, so a long-running work directory still gives readable bars;
# the tables list every round.
MAX_ROUNDS_PLOTTED = 24


class ReportOptions(SubcommandOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", help="a `clusmar simulate` output directory (simulation.json) or a "
                                            "`clusmar round` work directory (state.json)")
        parser.add_argument("--output", help="the HTML file to write (default: report.html inside --input)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing report")


def run(argv=None) -> dict:
    _, opts = parse_options(ReportOptions, argv)
    source = require(opts.input, "--input").rstrip("/") or "/"
    kind = detect_input(source)
    output = opts.output or FileSystems.join(source, "report.html")
    if not output.lower().endswith((".html", ".htm")):
        # also keeps a slip of the flag from replacing simulation.json, state.json or a directory
        raise InputError(f"--output {output!r}: must name an .html file")
    if FileSystems.exists(output) and not opts.overwrite:
        raise InputError(f"--output {output!r}: the file exists; pass --overwrite to replace it")
    page = simulation_page(source) if kind == "simulation" else workdir_page(source)
    payload = page.html.encode("utf-8")
    if len(payload) > MAX_BYTES:
        LOG.warning("report: the page is %.1f MB, more than the %.0f MB a mailed report should be",
                    len(payload) / 2**20, MAX_BYTES / 2**20)
    storage.write_bytes_atomic(output, payload)
    print(f"clusmar report: {kind} report with {page.figures} plots ({len(payload) / 2**20:.2f} MB) -> {output}")
    return {"output": output, "kind": kind, "plots": page.figures, "bytes": len(payload),
            "warnings": page.warnings}


def detect_input(source: str) -> str:
    """'simulation' or 'workdir', from the file that marks each kind of directory."""
    if FileSystems.exists(FileSystems.join(source, "simulation.json")):
        return "simulation"
    if FileSystems.exists(FileSystems.join(source, "state.json")):
        return "workdir"
    if not FileSystems.exists(source):
        raise InputError(f"--input {source!r}: no such directory (expected a `clusmar simulate` output with "
                         "simulation.json or a `clusmar round` work directory with state.json)")
    raise InputError(f"--input {source!r}: neither simulation.json (from `clusmar simulate`) nor state.json "
                     "(from `clusmar round`) is in this directory")


# ---------------------------------------------------------------- formatting

class Raw(str):
    """Cell or text that is already HTML."""


def esc(value) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value))


def fmt_int(value) -> str:
    return "—" if value is None else f"{int(round(value)):,}"


def fmt_pct(value, digits: int = 1) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value * 100:.{digits}f}%"


def fmt_num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def fmt_seconds(value) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value == 0:
        return "0 s"
    if value < 0.1:
        return f"{value * 1000:.1f} ms"
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def fmt_value(value) -> str:
    """A parameter's value for a key/value table."""
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt_value(v)}" for k, v in value.items()) or "—"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def _mean(values):
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- the page

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --bg: #f4f6f9; --accent: #2b5797; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 "Segoe UI", "Helvetica Neue", Helvetica, Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header.top { background: var(--accent); color: white; padding: 22px 28px; }
header.top .inner { max-width: 1180px; margin: 0 auto; padding: 0 28px; }
header.top h1 { margin: 0 0 4px; font-size: 26px; font-weight: 600; }
header.top p { margin: 0; opacity: .88; font-size: 14px; word-break: break-all; }
nav.toc { margin: 0 0 18px; font-size: 14px; color: var(--muted); }
nav.toc a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
section { background: white; border: 1px solid var(--line); border-radius: 8px; padding: 18px 24px 20px;
          margin: 0 0 20px; }
h2 { font-size: 20px; margin: 0 0 10px; color: var(--ink); font-weight: 600; }
h3 { font-size: 16px; margin: 18px 0 8px; color: var(--ink); font-weight: 600; }
p { margin: 6px 0 10px; }
p.note, figcaption, .caption { color: var(--muted); font-size: 13.5px; }
figure { margin: 12px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { margin-top: 6px; max-width: 900px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; border-bottom: 2px solid #cfd5df; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table:not(.kv) td { white-space: nowrap; }
table.kv td { word-break: break-word; }
table.kv th { background: none; border-bottom: 1px solid var(--line); font-weight: 600; width: 15em; }
.tables { display: flex; flex-wrap: wrap; gap: 0 36px; }
.wide { overflow-x: auto; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 4px 0 6px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 108px; background: #fbfcfe; }
.card .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .k { font-size: 12.5px; color: var(--muted); }
.warnings { background: #fff6e0; border: 1px solid #f0c36d; border-left: 6px solid #e39b00; }
.warnings h2 { color: #8a5a00; }
.warnings li { margin: 4px 0; }
.ok { background: #eef8f0; border: 1px solid #b9e0c1; border-left: 6px solid #3c9a57; }
.key { background: #eef4fc; border-left: 4px solid var(--accent); padding: 8px 12px; border-radius: 0 4px 4px 0; }
.gain { color: #1c7a36; font-weight: 600; }
.loss { color: #b3261e; font-weight: 600; }
.never { color: #8a5a00; }
.best { font-weight: 700; }
code { background: #eef1f6; padding: 1px 4px; border-radius: 3px; font-size: 12.5px; }
footer { color: var(--muted); font-size: 12.5px; text-align: center; margin-top: 10px; }
"""


class Page:
    """Sections of HTML with a table of contents; counts the figures it embeds."""

    def __init__(self, title: str, subtitle: str):
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str, str]] = []
        self.figures = 0
        self.warnings: list[str] = []

    def section(self, anchor: str, heading: str, body: str, css_class: str = "") -> None:
        self.sections.append((anchor, heading, body, css_class))

    def figure(self, uri: str, alt: str, caption: str) -> str:
        self.figures += 1
        return (f'<figure><img src="{uri}" alt="{esc(alt)}">'
                f"<figcaption>{caption}</figcaption></figure>")

    @property
    def html(self) -> str:
        toc = " ".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _, _ in self.sections)
        body = "\n".join(f'<section id="{a}" class="{c}"><h2>{esc(h)}</h2>\n{b}\n</section>'
                         for a, h, b, c in self.sections)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head>\n<body>"
                f'<header class="top"><div class="inner"><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p>'
                f"</div></header>\n<main><nav class=\"toc\">Contents: {toc}</nav>\n{body}\n"
                f"<footer>Written by <code>clusmar report</code> on {stamp}.</footer></main></body></html>\n")


def table(headers, rows, numeric=(), css_class: str = "") -> str:
    """An HTML table; `numeric` are the indexes of right-aligned, tabular-figure columns."""
    numeric = set(numeric)
    head = "".join(f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return (f'<div class="wide"><table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def kv_table(pairs) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def cards(pairs) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
        for k, v in pairs) + "</div>"


def warnings_section(page: Page, warnings: list[str]) -> None:
    page.warnings = list(warnings)
    if warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
        page.section("warnings", f"Warnings ({len(warnings)})",
                     f"<p>Read these before trusting the numbers below.</p><ul>{items}</ul>", "warnings")
    else:
        page.section("warnings", "Warnings", "<p>None: no step of this run reported a problem.</p>", "ok")


# ---------------------------------------------------------------- simulation

def load_simulation(source: str) -> dict:
    path = FileSystems.join(source, "simulation.json")
    try:
        sim = storage.read_json(path)
    except Exception as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(sim, dict) or sim.get("format") != SIMULATION_FORMAT:
        found = sim.get("format") if isinstance(sim, dict) else type(sim).__name__
        raise InputError(f"{path}: not a clusmar simulation file (format {found!r}, expected {SIMULATION_FORMAT!r})")
    if sim.get("version") != SIMULATION_VERSION:
        raise InputError(f"{path}: simulation version {sim.get('version')!r}; this clusmar reads version "
                         f"{SIMULATION_VERSION}")
    return sim


def _strategy_order(sim: dict) -> list[str]:
    listed = list((sim.get("parameters") or {}).get("strategies") or [])
    seen = [r.get("strategy") for r in (sim.get("summary") or []) + (sim.get("runs") or [])]
    order = listed + [s for s in dict.fromkeys(seen) if s and s not in listed]
    return sorted(order, key=lambda s: (s != "cluster-margin", order.index(s)))


def _summary_rows(sim: dict) -> list[dict]:
    """simulation.json's summary, or the same means recomputed from its runs when it has none."""
    rows = [r for r in sim.get("summary") or [] if r.get("labels")]
    if rows:
        return rows
    groups: dict = {}
    for run_ in sim.get("runs") or []:
        key = (run_.get("strategy"), run_.get("setting"))
        for r in run_.get("rounds") or []:
            if r.get("accuracy") is not None and r.get("labels") is not None:
                groups.setdefault(key, {}).setdefault(r["labels"], []).append(r["accuracy"])
    out = []
    for (strategy, setting), by_labels in groups.items():
        labels = sorted(by_labels)
        out.append({"strategy": strategy, "setting": setting, "labels": labels,
                    "accuracy_mean": [float(np.mean(by_labels[n])) for n in labels],
                    "accuracy_std": [float(np.std(by_labels[n])) for n in labels]})
    return out


def _setting_names(sim: dict, summary: list[dict]) -> list[str]:
    """The settings some run used, in the order simulation.json lists them (a sweep without a
    setting-dependent strategy has none: its curves then go in one panel)."""
    used = [r.get("setting") for r in summary + (sim.get("runs") or []) if r.get("setting")]
    names = [s.get("name") for s in sim.get("settings") or [] if s.get("name") in used]
    return names + [n for n in dict.fromkeys(used) if n not in names]


def headline_saving(row: dict) -> float | None:
    """The saving read off the curves averaged over repetitions (robust to one noisy repetition),
    or, in a file without it, the per-repetition mean."""
    if "savings_of_mean_curves" in row:
        value = row["savings_of_mean_curves"]
        return None if value is None else float(value)
    return saving_fraction(row)


def saving_fraction(row: dict) -> float | None:
    """The share of the baseline's labels that the strategy saved (negative: it needed more)."""
    value = row.get("savings_mean")
    return None if value is None else float(value)


def simulation_page(source: str) -> Page:
    sim = load_simulation(source)
    params, data = sim.get("parameters") or {}, sim.get("data") or {}
    summary = _summary_rows(sim)
    settings = _setting_names(sim, summary)
    order = _strategy_order(sim)
    runs = sim.get("runs") or []
    page = Page("Cluster-Margin simulation", f"{source}  ·  pool {data.get('pool', '—')}")

    # header
    repetitions = params.get("repetitions") or len({r.get("repetition") for r in runs}) or None
    total = (sim.get("timing") or {}).get("total_seconds")
    body = cards([("pool examples", fmt_int(data.get("pool_count"))),
                  ("test examples", fmt_int(data.get("test_count"))), ("classes", fmt_value(data.get("num_classes")))]
                 + ([("cluster-margin settings", len(settings))] if settings else [])
                 + [("repetitions", fmt_value(repetitions)), ("rounds", fmt_value(params.get("rounds"))),
                    ("run time", fmt_seconds(total))])
    data_rows = [("pool", data.get("pool")), ("pool examples", fmt_int(data.get("pool_count"))),
                 ("test examples", fmt_int(data.get("test_count"))), ("test set", data.get("test_source")),
                 ("classes", data.get("num_classes")), ("feature dimensions", data.get("features_dim"))]
    data_rows += [(k, fmt_value(v)) for k, v in data.items()
                  if k not in ("pool", "pool_count", "test_count", "test_source", "num_classes", "features_dim")]
    body += ('<div class="tables"><div><h3>Data</h3>' + kv_table((k, fmt_value(v)) for k, v in data_rows)
             + "</div><div><h3>Parameters</h3>" + kv_table((k.replace("_", " "), fmt_value(v))
                                                            for k, v in params.items()) + "</div></div>")
    body += ("<p class=\"note\">Every strategy starts from the same random seed set (round 0) and adds "
             f"{fmt_value(params.get('batch_size'))} labels per round; each curve is the mean over the repetitions, "
             "which differ in their seed set and random choices.</p>")
    page.section("setup", "Data and parameters", body)
    warnings_section(page, [str(w) for w in sim.get("warnings") or []])

    _simulation_curves(page, sim, summary, settings, order)
    _simulation_savings(page, sim, settings)
    _simulation_diagnostics(page, sim, settings)
    _simulation_class_balance(page, sim, settings, order)
    _simulation_timing(page, sim, order)
    return page


def _series_for(summary: list[dict], setting: str | None, order: list[str]) -> list[dict]:
    rows = [r for r in summary if r.get("setting") is None or r.get("setting") == setting]
    rows.sort(key=lambda r: order.index(r["strategy"]) if r.get("strategy") in order else len(order))
    return [{"strategy": r.get("strategy") or "?", "labels": r["labels"], "mean": r.get("accuracy_mean") or [],
             "std": r.get("accuracy_std") or [0.0] * len(r["labels"])} for r in rows
            if len(r.get("accuracy_mean") or []) == len(r["labels"])]


def _simulation_curves(page: Page, sim, summary, settings, order) -> None:
    if not summary:
        page.section("curves", "Learning curves", "<p>No accuracy was recorded: the simulation has no rounds.</p>")
        return
    panels = [(name, _series_for(summary, name, order)) for name in settings] or \
             [("", _series_for(summary, None, order))]
    panels = [(title, series) for title, series in panels if series]
    body = page.figure(
        plots.learning_curves(panels), "test accuracy against labels per strategy",
        "Test accuracy (y) against the number of labels used so far (x); the line is the mean over repetitions "
        "and the shaded band ±1 standard deviation. "
        + ("One panel per cluster-margin setting; strategies that do not depend on the setting (margin, random, "
           "k-center) are drawn in every panel, so each panel compares one setting against the same baselines. "
           if len(panels) > 1 else "")
        + "Higher and further left is better: a curve above another reached that accuracy with fewer labels.")
    # accuracy table, a column per round (at most 8, always the last)
    all_labels = sorted({n for r in summary for n in r["labels"]})
    if len(all_labels) > 8:
        picks = np.unique(np.linspace(0, len(all_labels) - 1, 8).round().astype(int))
        all_labels = [all_labels[i] for i in picks]
    rows, cells = [], []
    independent = [r for r in summary if r.get("setting") is None]
    dependent = [r for r in summary if r.get("setting") is not None]
    key = (lambda r: (order.index(r["strategy"]) if r.get("strategy") in order else len(order),
                      settings.index(r["setting"]) if r.get("setting") in settings else 0))
    for r in sorted(independent, key=key) + sorted(dependent, key=key):
        by = dict(zip(r["labels"], zip(r.get("accuracy_mean") or [], r.get("accuracy_std") or [])))
        cells.append([by.get(n) for n in all_labels])
        rows.append([r.get("strategy"), r.get("setting") or "(any)"])
    best = []
    for j in range(len(all_labels)):
        column = [c[j][0] for c in cells if c[j] is not None]
        # the seed round is the same for every strategy: nothing to single out there
        best.append(max(column) if column and max(column) > min(column) else None)
    table_rows = []
    for head, row in zip(rows, cells):
        out = []
        for j, cell in enumerate(row):
            if cell is None:
                out.append("—")
                continue
            text = f"{fmt_pct(cell[0])} ± {cell[1] * 100:.1f}"
            out.append(Raw(f'<span class="best">{esc(text)}</span>') if cell[0] == best[j] else text)
        table_rows.append(head + out)
    body += "<h3>Mean test accuracy ± std (percentage points) by labels used</h3>"
    body += table(["strategy", "setting"] + [f"{n:,} labels" for n in all_labels], table_rows,
                  numeric=range(2, 2 + len(all_labels)))
    body += "<p class=\"note\">Bold: the best mean accuracy at that number of labels.</p>"
    page.section("curves", "Learning curves", body)


def _savings_cell(row: dict) -> Raw:
    value = saving_fraction(row)
    if value is None:
        return Raw(f'<span class="never">never reached the target (0 of {esc(fmt_value(row.get("repetitions")))} '
                   "repetitions)</span>")
    std = row.get("savings_std")
    text = f"{value * 100:+.1f}%" + (f" ± {std * 100:.1f}" if std is not None else "")
    if value < 0:
        return Raw(f'<span class="loss">{esc(text)} (loss)</span>')
    return Raw(f'<span class="gain">{esc(text)}</span>') if value > 0 else Raw(esc(text))


def _accuracy_delta_cell(row: dict):
    value = row.get("final_accuracy_delta_mean")
    if value is None:
        return "—"
    std = row.get("final_accuracy_delta_std")
    text = f"{value * 100:+.1f}" + (f" ± {std * 100:.1f}" if std is not None else "") + " pp"
    return Raw(f'<span class="{"loss" if value < -0.0005 else "gain" if value > 0.0005 else ""}">{esc(text)}</span>')


BASELINE_ORDER = ("margin", "random", "k-center")


def _baselines(savings) -> list[str]:
    found = list(dict.fromkeys(r.get("baseline") or "margin" for r in savings))
    return sorted(found, key=lambda b: (BASELINE_ORDER.index(b) if b in BASELINE_ORDER else len(BASELINE_ORDER), b))


def _simulation_savings(page: Page, sim, settings) -> None:
    savings = sim.get("savings") or []
    if not savings:
        page.section("savings", "Label savings",
                     "<p>No savings were computed: the simulation needs cluster-margin and at least one baseline "
                     "(margin, random or k-center) among its strategies.</p>")
        return
    order = {name: i for i, name in enumerate(settings)}
    strategy = savings[0].get("strategy") or "cluster-margin"
    body = (f"<p>For each baseline: the labels {esc(strategy)} needed to first reach the baseline's final accuracy "
            "(interpolated between rounds), against the labels the baseline used to get there, per repetition and "
            "then mean ± std over the repetitions that reached it. <b>Labels saved</b> is the share of the "
            "baseline's labels that were not needed: positive is a gain, negative a loss (more labels than the "
            "baseline). A setting that never reached the target in a repetition is counted in the last column and "
            "left out of the mean, which then flatters it; <b>labels saved (mean curves)</b> reads the same off the "
            "curves averaged over repetitions, without that bias. <b>Final accuracy</b> compares the last round's "
            "accuracies directly.</p>")
    body += _key_result(savings, len(settings))
    for baseline in _baselines(savings):
        rows = []
        for r in sorted((r for r in savings if (r.get("baseline") or "margin") == baseline),
                        key=lambda r: order.get(r.get("setting"), len(order))):
            needed = r.get("labels_strategy_mean")
            needed_text = ("never reached" if needed is None else
                           fmt_int(needed) + (f" ± {fmt_int(r['labels_strategy_std'])}"
                                              if r.get("labels_strategy_std") is not None else ""))
            reached, reps = r.get("reached"), r.get("repetitions")
            reached_text = f"{fmt_value(reached)} of {fmt_value(reps)}"
            if reached is not None and reps is not None and reached < reps:
                reached_text = Raw(f'<span class="never">{esc(reached_text)}</span>')
            of_means = r.get("savings_of_mean_curves")
            rows.append([r.get("setting") or "—", fmt_pct(r.get("target_accuracy")),
                         fmt_int(r.get("labels_baseline")), needed_text, _savings_cell(r),
                         "never reached" if of_means is None else f"{of_means * 100:+.1f}%",
                         _accuracy_delta_cell(r), reached_text])
        body += f"<h3>{esc(strategy)} vs {esc(baseline)}</h3>"
        body += table(["setting", f"target accuracy ({baseline}'s final)", f"{baseline} used (labels)",
                       f"{strategy} needs (labels, mean ± std)", "labels saved (mean ± std)",
                       "labels saved (mean curves)", "final accuracy vs baseline",
                       "repetitions reaching the target"], rows, numeric=(1, 2, 3, 4, 5, 6, 7))
    if len(settings) > 1:
        body += _savings_heatmap(page, sim, savings)
    page.section("savings", "Label savings", body)


def _key_result(savings, settings: int) -> str:
    """One sentence on the main comparison (against the first baseline, margin when it ran)."""
    baseline = _baselines(savings)[0]
    rows = [r for r in savings if (r.get("baseline") or "margin") == baseline]
    reached = [r for r in rows if headline_saving(r) is not None]
    strategy = esc(rows[0].get("strategy") or "cluster-margin")
    parts = []
    if reached:
        best = max(reached, key=headline_saving)
        value = headline_saving(best)
        where = f" with <b>{esc(best.get('setting'))}</b>" if settings > 1 else ""
        verb = ("saved" if value > 0 else "needed as many labels as" if value == 0 else "lost")
        amount = f"{abs(value) * 100:.1f}% of {esc(baseline)}'s labels" if value else esc(baseline)
        per_rep = saving_fraction(best)
        parts.append(f"{'At best, ' if settings > 1 else ''}{strategy}{where} {verb} {amount} to reach "
                     f"{esc(baseline)}'s final accuracy ({esc(fmt_pct(best.get('target_accuracy')))}) on the "
                     f"curves averaged over {esc(fmt_value(best.get('repetitions')))} repetitions; per repetition "
                     + (f"{per_rep * 100:+.1f}%" if per_rep is not None else "never")
                     + f", reached in {esc(fmt_value(best.get('reached')))} of "
                     f"{esc(fmt_value(best.get('repetitions')))}.")
    never = [r for r in rows if headline_saving(r) is None]
    if never:
        parts.append(f"{len(never)} of {len(rows)} setting{'s' if len(rows) > 1 else ''} never reached it "
                     "on the averaged curves.")
    return f'<p class="key">{" ".join(parts)}</p>' if parts else ""


def _clustering_key(setting: dict):
    if setting.get("target_mean_cluster_size") is not None:
        return ("target size", float(setting["target_mean_cluster_size"]))
    if setting.get("distance_threshold") is not None:
        return ("distance threshold", float(setting["distance_threshold"]))
    return ("clustering", 0.0, str(setting.get("name")))


def _savings_heatmap(page: Page, sim, savings) -> str:
    settings = {s.get("name"): s for s in sim.get("settings") or [] if s.get("name")}
    if len(settings) < 2:
        return ""
    multipliers = sorted({float(s["candidate_multiplier"]) for s in settings.values()
                          if s.get("candidate_multiplier") is not None}) or [None]
    columns = sorted({_clustering_key(s) for s in settings.values()})
    kinds = {key[0] for key in columns}
    column_title = ("target mean cluster size" if kinds == {"target size"} else
                    "distance threshold ε" if kinds == {"distance threshold"} else "clustering")
    column_labels = [key[2] if len(key) > 2 else (f"{key[1]:g}" if len(kinds) == 1 else f"{key[0]} {key[1]:g}")
                     for key in columns]
    maps = []
    for baseline in _baselines(savings)[:3]:
        values = np.full((len(multipliers), len(columns)), np.nan)
        text = [["not run"] * len(columns) for _ in multipliers]
        for r in savings:
            s = settings.get(r.get("setting"))
            if s is None or (r.get("baseline") or "margin") != baseline:
                continue
            i = multipliers.index(float(s["candidate_multiplier"])) if multipliers != [None] else 0
            j = columns.index(_clustering_key(s))
            value = headline_saving(r)
            partial = ("" if r.get("reached") == r.get("repetitions") else
                       f"\n({r.get('reached')} of {r.get('repetitions')})")
            if value is None:
                text[i][j] = "never"
            else:
                values[i, j] = value
                text[i][j] = f"{value * 100:+.1f}%{partial}"
        maps.append({"title": f"vs {baseline}",
                     "rows": [f"{m:g} × k_t" if m is not None else "—" for m in multipliers],
                     "columns": column_labels, "row_title": "candidates k_m", "column_title": column_title,
                     "values": values, "text": text})
    return "<h3>The sweep at a glance</h3>" + page.figure(
        plots.savings_heatmaps(maps), "heatmaps of label savings over the sweep",
        "Labels cluster-margin saved against each baseline (one panel per baseline, margin first), read off the "
        "curves averaged over repetitions, for every combination of candidate multiplier (rows: k_m as a multiple "
        "of the batch size k_t) and clustering (columns). Green cells needed fewer labels than the baseline, red "
        "cells more (a loss); grey cells never reached the target. \"(1 of 2)\" under a number: single "
        "repetitions reached the target in only that many.")


DIAGNOSTIC_COLUMNS = [
    ("k_m_share_of_unlabeled", "k_m share of unlabeled", "pct"),
    ("candidate_clusters_per_k_t", "candidate clusters per k_t", "num"),
    ("round_robin_passes_completed", "round-robin passes completed", "num"),
    ("ended_inside_first_pass", "rounds ending inside the first pass", "pct"),
    ("picks_from_singleton_clusters", "picks from singleton clusters", "pct"),
    ("picks_from_single_candidate_clusters", "picks alone among the candidates", "pct"),
]


def _simulation_diagnostics(page: Page, sim, settings) -> None:
    runs = [r for r in sim.get("runs") or [] if r.get("strategy") == "cluster-margin"]
    rows = []
    for name in settings or [None]:
        diags = [rd.get("diagnostics") for r in runs if r.get("setting") == name for rd in r.get("rounds") or []]
        diags = [d for d in diags if isinstance(d, dict)]
        if not diags:
            continue
        row = [name or "—", fmt_int(len(diags))]
        for key, _, kind in DIAGNOSTIC_COLUMNS:
            value = _mean(float(d[key]) for d in diags if d.get(key) is not None)
            row.append(fmt_pct(value) if kind == "pct" else fmt_num(value, 3))
        median = _mean((d.get("pick_margin_quantiles") or {}).get("p50") for d in diags)
        lowest = _mean((d.get("lowest_k_t_margin_quantiles") or {}).get("p50") for d in diags)
        row += [fmt_num(median, 3), fmt_num(lowest, 3)]
        rows.append(row)
    body = ""
    if rows:
        body += ("<p>What cluster-margin's selections looked like, averaged over its rounds and repetitions. "
                 "<b>k_m share of unlabeled</b>: a large share means many candidates are not uncertain. "
                 "<b>Candidate clusters per k_t</b> above 1 means there are more clusters than picks, so the batch "
                 "ends inside the first round-robin pass and samples only the smallest clusters (see <b>rounds "
                 "ending inside the first pass</b>). <b>Picks from singleton clusters</b>: picks whose cluster has "
                 "one point in the whole clustering. The last two columns compare the median margin of the picks "
                 "with that of the k_t lowest margins (what margin would have picked): the gap is the uncertainty "
                 "cluster-margin trades for diversity.</p>")
        body += table(["setting", "selections"] + [label for _, label, _ in DIAGNOSTIC_COLUMNS]
                      + ["median pick margin", "median of the k_t lowest margins"], rows,
                      numeric=range(1, 3 + len(DIAGNOSTIC_COLUMNS)))
    else:
        body += "<p>No selection diagnostics were recorded for cluster-margin.</p>"
    body += _clustering_table(sim)
    page.section("diagnostics", "Cluster-margin diagnostics", body)


def _clustering_table(sim) -> str:
    clusterings = sim.get("clusterings") or []
    if not clusterings:
        return "<h3>Clusterings</h3><p>No clustering was recorded.</p>"
    groups: dict = {}
    for c in clusterings:
        groups.setdefault(c.get("clustering") or "—", []).append(c)
    rows = []
    for name, items in groups.items():
        points, clusters = _mean(c.get("num_points") for c in items), _mean(c.get("num_clusters") for c in items)
        rows.append([name, fmt_int(len(items)), fmt_num(_mean(c.get("distance_threshold") for c in items), 3),
                     fmt_int(points), fmt_int(clusters),
                     fmt_num(points / clusters, 3) if points and clusters else "—",
                     fmt_pct(_mean(c.get("singleton_share_of_points") for c in items)),
                     fmt_pct(_mean(c.get("largest_cluster_share") for c in items), 2),
                     fmt_seconds(_mean(c.get("seconds") for c in items))])
    return ("<h3>Clusterings</h3><p class=\"note\">The pool's average-linkage clusterings, averaged over the "
            "repetitions that made them. A large singleton share means many points have no near neighbour at this "
            "threshold; a large largest-cluster share means the threshold merges too much.</p>"
            + table(["clustering", "times clustered", "distance threshold ε", "points", "clusters", "mean size",
                     "points in singletons", "largest cluster (share of points)", "time"], rows,
                    numeric=range(1, 9)))


def _simulation_class_balance(page: Page, sim, settings, order) -> None:
    sums: dict = {}
    for r in sim.get("runs") or []:
        for rd in r.get("rounds") or []:
            counts = rd.get("pick_class_counts")
            if counts:
                key = (r.get("strategy"), r.get("setting"))
                current = sums.get(key, np.zeros(0))
                width = max(len(current), len(counts))
                sums[key] = np.pad(current, (0, width - len(current))) + np.pad(np.asarray(counts, float),
                                                                                 (0, width - len(counts)))
    if not sums:
        return
    classes = max(len(v) for v in sums.values())
    rank = {name: i for i, name in enumerate(settings)}
    keys = sorted(sums, key=lambda k: (k[1] is not None, order.index(k[0]) if k[0] in order else len(order),
                                       rank.get(k[1], 0)))
    rows = [(f"{s}" + (f" · {t}" if t else ""), np.pad(sums[(s, t)], (0, classes - len(sums[(s, t)]))))
            for s, t in keys]
    names = [str(c) for c in range(classes)]
    body = page.figure(
        plots.class_balance_rows(rows, names, "Classes of the picks, all rounds and repetitions"),
        "share of each class among each strategy's picks",
        "Each bar splits one strategy's picks (summed over rounds and repetitions) by their true class. Random "
        "shows the pool's own class mix; a strategy whose bar is dominated by a few wide segments spends its labels "
        "on a few (often confusable) classes, while an even bar means diverse picks.")
    page.section("classes", "Class balance of the picks", body)


def _simulation_timing(page: Page, sim, order) -> None:
    timing = sim.get("timing") or {}
    shares = timing.get("selection_share") or {}
    stages = ["train", "score", "select"]
    per: dict = {}
    for r in sim.get("runs") or []:
        for rd in r.get("rounds") or []:
            if rd.get("round") == 0:   # the seed model: no selection, and the same for every strategy
                continue
            seconds = rd.get("seconds")
            if not seconds:
                continue
            bucket = per.setdefault(r.get("strategy"), {s: [] for s in stages})
            for s in stages:
                if seconds.get(s) is not None:
                    bucket[s].append(float(seconds[s]))
    names = [s for s in order if s in per or s in shares] + [s for s in per if s not in order]
    if not names:
        return
    rows, bars, notes = [], [], []
    for name in names:
        means = {s: _mean((per.get(name) or {}).get(s, [])) for s in stages}
        total = sum(v for v in means.values() if v is not None)
        share = shares.get(name)
        if share is None and total:
            share = (means["select"] or 0.0) / total
        rows.append([name] + [fmt_seconds(means[s]) for s in stages] + [fmt_seconds(total), fmt_pct(share)])
        bars.append((name, means))
        notes.append(f"select {fmt_pct(share, 0 if share >= 0.1 else 1)}" if share is not None else "")
    body = "" if not per else page.figure(
        plots.seconds_per_round(bars, stages, "mean seconds per round", "Where each round's time goes", notes),
        "seconds per round by stage for each strategy",
        "Mean time of one round per strategy (round 0, the seed model, left out), split into training the model, "
        "scoring the pool and selecting the batch; the label at the end of each bar is the share spent selecting. "
        "Cluster-margin's clustering is made once and is listed in the clusterings table, not here.")
    body += table(["strategy", "train (per round)", "score (per round)", "select (per round)", "round total",
                   "share selecting"], rows, numeric=range(1, 6))
    if timing.get("total_seconds") is not None:
        body += f"<p class=\"note\">The whole simulation took {esc(fmt_seconds(timing['total_seconds']))}.</p>"
    page.section("timing", "Timing", body)


# ---------------------------------------------------------------- round work directory

def _read_json_if_exists(path: str):
    if not FileSystems.exists(path):
        return None
    try:
        return storage.read_json(path)
    except Exception as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from exc


def read_manifest_records(directory: str) -> dict | None:
    """The manifest's id, rank, margin and cluster_id columns (TFRecord, parsed a batch at a time)."""
    try:
        files = storage.match_files(FileSystems.join(directory, "manifest-*.tfrecord"), "manifest")
    except InputError:
        return None
    import tensorflow as tf
    schema = {}
    for path in files:
        schema = storage.tfrecord_schema(path)
        if schema:
            break
    if "id" not in schema:
        return {"id": np.zeros(0, np.int64), "margin": np.zeros(0), "cluster_id": np.zeros(0, np.int64)}
    spec = {"id": tf.io.FixedLenFeature([], tf.int64 if schema["id"].kind == "int64" else tf.string)}
    for name, dtype in (("margin", tf.float32), ("cluster_id", tf.int64), ("rank", tf.int64)):
        if name in schema:
            spec[name] = tf.io.FixedLenFeature([], dtype)
    parts: dict = {name: [] for name in spec}
    for path in files:
        for parsed in storage.read_tfrecord_features(path, spec):
            for name in spec:
                parts[name].append(parsed[name])
    out = {name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()}
    if out["id"].dtype != np.int64:
        out["id"] = out["id"].astype(object)
    return out


def read_labels(pattern: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, labels) of every labels file with an `id` and a `label` column; None when there are none."""
    try:
        files = storage.match_files(pattern, "labels")
    except InputError:
        return None
    ids, labels = [], []
    parquet = [f for f in files if storage.detect_format([f], "labels") == "parquet"]
    for path in parquet:
        schema = storage.parquet_schema(path)
        if "id" not in schema or "label" not in schema:
            continue
        batch = storage.table_to_batch(storage.read_parquet_table(path, ["id", "label"]), path)
        ids.append(batch.ids)
        labels.append(np.asarray(batch.columns["label"]))
    records = [f for f in files if f not in parquet]
    if records:
        import tensorflow as tf
        for path in records:
            schema = storage.tfrecord_schema(path)
            if "id" not in schema or "label" not in schema:
                continue
            spec = {"id": tf.io.FixedLenFeature([], tf.int64 if schema["id"].kind == "int64" else tf.string),
                    "label": tf.io.FixedLenFeature([], tf.int64)}
            for parsed in storage.read_tfrecord_features(path, spec):
                ids.append(parsed["id"] if schema["id"].kind == "int64" else parsed["id"].astype(object))
                labels.append(parsed["label"])
    if not ids:
        return None
    all_ids = np.concatenate([i if i.dtype == np.int64 else i.astype(object) for i in ids])
    return all_ids, np.concatenate(labels)


def labels_of(picks: np.ndarray, labeled_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label of each pick that has one (picks without a label are left out)."""
    if not len(picks) or not len(labeled_ids):
        return np.zeros(0, labels.dtype)
    if picks.dtype == np.int64 and labeled_ids.dtype == np.int64:
        order = np.argsort(labeled_ids, kind="stable")
        sorted_ids = labeled_ids[order]
        where = np.clip(np.searchsorted(sorted_ids, picks), 0, len(sorted_ids) - 1)
        found = sorted_ids[where] == picks
        return labels[order[where[found]]]
    lookup = {(k.encode() if isinstance(k, str) else k): v for k, v in zip(labeled_ids.tolist(), labels.tolist())}
    out = [lookup.get(p.encode() if isinstance(p, str) else p) for p in picks.tolist()]
    return np.array([v for v in out if v is not None], dtype=np.int64)


def _round_manifest_dir(workdir: str, n: int, info: dict) -> str:
    local = manifest_dir(workdir, n)
    return local if FileSystems.exists(local) or not info.get("manifest") else info["manifest"]


def workdir_page(workdir: str) -> Page:
    state = load_state(workdir)
    rounds = {int(k): v for k, v in (state.get("rounds") or {}).items()}
    numbers = sorted(rounds)
    manifests = {n: _read_json_if_exists(FileSystems.join(_round_manifest_dir(workdir, n, rounds[n]),
                                                          "manifest.json")) for n in numbers}
    clustering = _read_json_if_exists(FileSystems.join(clusters_dir(workdir), "clustering.json"))
    completed = [n for n in numbers if rounds[n].get("status") == "completed"]
    latest = max((n for n in numbers if manifests.get(n)), default=None)
    page = Page("Active-learning rounds", f"work directory {workdir}")

    last_info = rounds[numbers[-1]] if numbers else {}
    params = last_info.get("parameters") or {}
    select_stage = (rounds.get(latest, {}).get("stages") or {}).get("select", {}) if latest else {}
    pool_count = (manifests.get(latest) or {}).get("pool_count") or select_stage.get("pool_count")
    total_selected = sum(int(rounds[n].get("selected") or 0) for n in completed)
    body = cards([("rounds completed", f"{len(completed)} of {len(numbers)}"), ("pool examples", fmt_int(pool_count)),
                  ("selected so far", fmt_int(total_selected)),
                  ("labeled (at the latest round's start)",
                   fmt_int(((last_info.get("stages") or {}).get("exclude") or {}).get("labeled"))),
                  ("clusters", fmt_int((clustering or {}).get("num_clusters")))])
    body += kv_table([("pool", last_info.get("pool") or params.get("pool") or "—"),
                      ("strategy", params.get("strategy") or (manifests.get(latest) or {}).get("strategy") or "—"),
                      ("batch size k_t", fmt_value(params.get("batch_size"))),
                      ("candidates k_m", "— (only cluster-margin uses candidates)"
                       if params.get("strategy") not in (None, "cluster-margin") else
                       fmt_value(params.get("candidates")) if params.get("candidates") is not None
                       else f"{fmt_value(params.get('candidate_multiplier') or 10)} × k_t"),
                      ("model", params.get("model") or "none (the pool carries its scores)"),
                      ("labels", params.get("labels") or "—"), ("seed", fmt_value(params.get("seed"))),
                      ("work directory created (UTC)", _when(state.get("created_at"))),
                      ("last updated (UTC)", _when(state.get("updated_at")))])
    page.section("overview", "Overview", body)

    warnings = [f"clustering: {w}" for w in (clustering or {}).get("warnings") or []]
    for n in numbers:
        info = rounds[n]
        # manifest.json's warnings; state.json keeps a copy for a manifest that has gone
        recorded = (info.get("stages") or {}).get("select") or {}
        for w in (manifests.get(n) or recorded).get("warnings") or []:
            warnings.append(f"round {n}: {w}")
        for stage, s in (info.get("stages") or {}).items():
            if s.get("status") == "failed":
                warnings.append(f"round {n}: stage {stage} failed at {s.get('failed_at', '?')}: {s.get('error', '')}")
        if info.get("status") != "completed" and not any(s.get("status") == "failed"
                                                         for s in (info.get("stages") or {}).values()):
            warnings.append(f"round {n} is not complete (status {info.get('status')}); `clusmar round` resumes it")
        not_in_pool = ((info.get("stages") or {}).get("select") or {}).get("not_in_pool")
        if not_in_pool:
            warnings.append(f"round {n}: {not_in_pool:,} labeled or sent ids are not in the pool (ignored)")
    warnings_section(page, warnings)

    _workdir_clustering(page, state, clustering, params.get("strategy"))
    _workdir_history(page, rounds, numbers, manifests)
    labels = read_labels(params.get("labels") or FileSystems.join(workdir, "labels", "*"))
    records = {}
    if latest is not None:
        records[latest] = read_manifest_records(_round_manifest_dir(workdir, latest, rounds[latest]))
        _workdir_latest(page, workdir, latest, manifests[latest], records[latest], clustering)
    _workdir_all_selections(page, numbers, manifests)
    _workdir_classes(page, workdir, rounds, numbers, manifests, records, labels)
    return page


def _workdir_clustering(page: Page, state, clustering, strategy) -> None:
    if not clustering:
        why = (f"the strategy, {strategy}, needs none" if strategy not in (None, "cluster-margin") else
               "the first round has not clustered the pool yet")
        page.section("clustering", "Pool and clustering", f"<p>No clustering: {esc(why)}.</p>")
        return
    params = clustering.get("parameters") or {}
    points, clusters = clustering.get("num_points"), clustering.get("num_clusters")
    singletons = clustering.get("singletons")
    singleton_points = clustering.get("singleton_share_of_points")
    if singleton_points is None and singletons is not None and points:
        singleton_points = singletons / points
    singleton_clusters = clustering.get("singleton_share_of_clusters")
    if singleton_clusters is None and singletons is not None and clusters:
        singleton_clusters = singletons / clusters
    made = state.get("clustering") or {}
    pairs = [("points", fmt_int(points)), ("clusters", fmt_int(clusters)),
             ("mean cluster size", fmt_num(points / clusters, 3) if points and clusters else "—"),
             ("distance threshold ε", fmt_num(params.get("distance_threshold"), 4)),
             ("chosen for target mean size", fmt_value(params.get("target_mean_cluster_size"))),
             ("metric", params.get("metric") or "—"), ("linkage", params.get("linkage") or "average"),
             ("largest cluster", f"{fmt_int(clustering.get('largest_cluster'))} points "
                                 f"({fmt_pct(clustering.get('largest_cluster_share'), 2)} of the pool)"),
             ("singleton clusters", f"{fmt_int(singletons)} ({fmt_pct(singleton_clusters)} of clusters, "
                                    f"{fmt_pct(singleton_points)} of points)"),
             ("clustered in round", fmt_value(made.get("round"))), ("embedding model", made.get("model") or "—")]
    body = kv_table(pairs)
    histogram = clustering.get("cluster_size_histogram") or {}
    if histogram:
        body += "<h3>Cluster sizes</h3>" + page.figure(
            plots.size_bars(histogram, "clusters", "Clusters by size", log=True),
            "number of clusters in each size range",
            "How many clusters have 1, 2–3, 4–7, … points (sizes double from bar to bar; the y axis is "
            "logarithmic when the counts span a wide range). Cluster-margin takes one pick per cluster per "
            "round-robin pass, so many singletons mean many picks that stand alone.")
    page.section("clustering", "Pool and clustering", body)


def _when(stamp) -> str:
    """2026-01-31T12:00:00Z as 2026-01-31 12:00 (UTC, as state.json records it)."""
    return str(stamp).replace("T", " ")[:16] if stamp else "—"


def _workdir_history(page: Page, rounds, numbers, manifests) -> None:
    if not numbers:
        page.section("rounds", "Rounds", "<p>No round has started yet.</p>")
        return
    rows, bars = [], []
    for n in numbers:
        info = rounds[n]
        stages = info.get("stages") or {}
        status = info.get("status") or "—"
        failed = [s for s in STAGES if (stages.get(s) or {}).get("status") == "failed"]
        if failed:
            status = f"failed in {failed[0]}"
        exclude, select = stages.get("exclude") or {}, stages.get("select") or {}
        seconds = {s: (stages.get(s) or {}).get("elapsed_s") for s in STAGES}
        total = sum(v for v in seconds.values() if v is not None)
        rows.append([str(n), status, _when(info.get("completed_at") or info.get("started_at")),
                     fmt_int(select.get("pool_count")), fmt_int(exclude.get("labeled")),
                     fmt_int(exclude.get("excluded")), fmt_int(select.get("unlabeled")), fmt_int(select.get("k_m")),
                     fmt_int(info.get("selected"))] + [fmt_seconds(seconds[s]) for s in STAGES]
                    + [fmt_seconds(total)])
        bars.append((f"round {n}", seconds))
    body = ("<p>Every round in state.json: when it ran, the pool and what was excluded from it (labels already "
            "back, ids sent out earlier), the candidates k_m and the picks, and the seconds of each stage.</p>")
    body += table(["round", "status", "completed (UTC; else started)", "pool", "labels back", "excluded",
                   "unlabeled", "candidates k_m", "selected"] + [f"{s} time" for s in STAGES] + ["total"], rows,
                  numeric=[0] + list(range(3, 14)))
    latest = f" (the latest {MAX_ROUNDS_PLOTTED} rounds)" if len(bars) > MAX_ROUNDS_PLOTTED else ""
    body += page.figure(
        plots.seconds_per_round(bars[-MAX_ROUNDS_PLOTTED:], list(STAGES), "seconds",
                                f"Time per stage in each round{latest}"),
        "seconds of each stage per round",
        "Seconds each stage of a round took. Clustering normally runs in the first round only and is reused; a "
        "stage that did nothing (scoring without a model, a reused clustering) takes almost no time.")
    page.section("rounds", "Rounds", body)


def _quantile_rows(diag: dict) -> list:
    rows = []
    for key, label in (("pick_margin_quantiles", "picks"), ("lowest_k_t_margin_quantiles", "k_t lowest margins")):
        q = diag.get(key)
        if q:
            rows.append([label] + [fmt_num(q.get(k), 3) for k in ("min", "p10", "p25", "p50", "p75", "p90", "max",
                                                                  "mean")])
    return rows


def _picks_by_size_fallback(workdir: str, records: dict | None, clustering: dict | None) -> dict | None:
    """Picks by the size of their cluster from the clusters files, for manifests that did not record it."""
    if not records or "cluster_id" not in records or not len(records["cluster_id"]) or not clustering:
        return None
    if (clustering.get("num_points") or 0) > MAX_POINTS_FOR_SIZE_FALLBACK:
        return None
    try:
        files = storage.match_files(FileSystems.join(clusters_dir(workdir), "clusters-*.parquet"), "clusters")
    except InputError:
        return None
    ids = []
    for path in files:
        ids.append(storage.read_parquet_table(path, ["cluster_id"]).column("cluster_id").to_numpy())
    cluster_ids, sizes = np.unique(np.concatenate(ids), return_counts=True)
    picks = records["cluster_id"].astype(np.int64)
    where = np.clip(np.searchsorted(cluster_ids, picks), 0, len(cluster_ids) - 1)
    known = cluster_ids[where] == picks
    pick_sizes = sizes[where[known]]
    histogram: dict = {}
    for power, count in zip(*np.unique(np.floor(np.log2(pick_sizes)).astype(int), return_counts=True)):
        low, high = 2 ** power, 2 ** (power + 1) - 1
        histogram[str(low) if low == high else f"{low}-{high}"] = int(count)
    return histogram


def _workdir_latest(page: Page, workdir, n, manifest, records, clustering) -> None:
    diag = manifest.get("diagnostics") or {}
    pairs = [("strategy", manifest.get("strategy") or "—"), ("batch size k_t", fmt_int(manifest.get("k_t"))),
             ("candidates k_m", fmt_int(manifest.get("k_m"))
              + (f" (requested {fmt_int(manifest['k_m_requested'])})"
                 if manifest.get("k_m_requested") not in (None, manifest.get("k_m")) else "")),
             ("pool", fmt_int(manifest.get("pool_count"))), ("unlabeled", fmt_int(manifest.get("unlabeled_count"))),
             ("selected", fmt_int(manifest.get("selected"))),
             ("clusters among the picks", fmt_int(manifest.get("clusters_selected"))),
             ("seed", fmt_value(manifest.get("seed")))]
    diag_pairs = [("k_m share of the unlabeled pool", fmt_pct(diag.get("k_m_share_of_unlabeled"))),
                  ("candidate clusters", fmt_int(diag.get("candidate_clusters"))),
                  ("candidate clusters per k_t", fmt_num(diag.get("candidate_clusters_per_k_t"), 3)),
                  ("round-robin passes completed", fmt_num(diag.get("round_robin_passes_completed"))),
                  ("ended inside the first pass", fmt_num(diag.get("ended_inside_first_pass"))),
                  ("picks from singleton clusters", fmt_pct(diag.get("picks_from_singleton_clusters"))),
                  ("picks alone among the candidates", fmt_pct(diag.get("picks_from_single_candidate_clusters")))]
    body = f"<p>What the selection of round {n} did."
    if manifest.get("strategy") in (None, "cluster-margin"):
        body += (" A k_m that is a large share of the unlabeled pool brings in candidates that are not uncertain; "
                 "more candidate clusters than k_t means the batch ends inside the first round-robin pass, sampling "
                 "only the smallest clusters.")
    body += "</p>"
    body += ('<div class="tables"><div><h3>Selection</h3>' + kv_table(pairs) + "</div>")
    diag_pairs = [(k, v) for k, v in diag_pairs if v != "—"]
    if diag_pairs:
        body += "<div><h3>Diagnostics</h3>" + kv_table(diag_pairs) + "</div>"
    body += "</div>"
    quantiles = _quantile_rows(diag)
    if quantiles:
        body += "<h3>Margins (lower = more uncertain)</h3>"
        body += table(["group", "min", "10%", "25%", "median", "75%", "90%", "max", "mean"], quantiles,
                      numeric=range(1, 9))
    by_size = diag.get("picks_by_cluster_size") or _picks_by_size_fallback(workdir, records, clustering)
    if by_size:
        body += page.figure(
            plots.size_bars(by_size, "picks", f"Round {n}: picks by the size of their cluster", color="#d62728"),
            "picks by cluster size",
            "How many of this round's picks come from clusters of each size (size in the whole clustering). Picks "
            "piled into size 1 mean the batch is mostly points without a near neighbour.")
    histograms = diag.get("margin_histograms") or {}
    edges = histograms.get("edges")
    groups = {k: histograms.get(k) for k in ("pool", "candidates", "picks") if histograms.get(k)}
    if edges and groups:
        body += page.figure(
            plots.margin_distributions(edges, groups, f"Round {n}: margins of the pool, the candidates and the picks"),
            "margin distributions",
            "Each group's margins as a share of its own rows (the legend gives the counts), so the unlabeled pool "
            "and the batch share one scale. The candidates are the k_m lowest margins of the unlabeled pool; the "
            "picks are the batch. Picks further right than the candidates' lowest margins are the price of diversity.")
    elif records is not None and "margin" in records and len(records["margin"]):
        edges = np.linspace(0, 1, 41)
        counts = np.histogram(np.clip(records["margin"], 0, 1), bins=edges)[0]
        body += page.figure(
            plots.margin_distributions(edges, {"picks": counts}, f"Round {n}: margins of the picks"),
            "margin distribution of the picks",
            "The margins of this round's picks, read from the manifest records (this manifest has no histograms "
            "of the pool and the candidates).")
    page.section("latest", f"Latest selection: round {n}", body)


def _workdir_all_selections(page: Page, numbers, manifests) -> None:
    rows = []
    for n in numbers:
        m = manifests.get(n)
        if not m:
            continue
        d = m.get("diagnostics") or {}
        rows.append([str(n), m.get("strategy") or "—", fmt_int(m.get("k_t")), fmt_int(m.get("k_m")),
                     fmt_pct(d.get("k_m_share_of_unlabeled")), fmt_num(d.get("candidate_clusters_per_k_t"), 3),
                     fmt_num(d.get("round_robin_passes_completed")), fmt_pct(d.get("picks_from_singleton_clusters")),
                     fmt_num((d.get("pick_margin_quantiles") or {}).get("p50"), 3),
                     fmt_int(len(m.get("warnings") or []))])
    if len(rows) < 2:
        return
    body = ("<p>The same diagnostics for every round with a manifest, to see how the selection changes as labels "
            "come back.</p>")
    body += table(["round", "strategy", "k_t", "k_m", "k_m share of unlabeled", "candidate clusters per k_t",
                   "passes completed", "picks from singleton clusters", "median pick margin", "warnings"], rows,
                  numeric=[0] + list(range(2, 10)))
    page.section("selections", "Every round's selection", body)


def _workdir_classes(page: Page, workdir, rounds, numbers, manifests, records, labels) -> None:
    if labels is None:
        page.section("classes", "Class balance of the picks",
                     "<p>No labels have come back yet (no labels file with <code>id</code> and <code>label</code> "
                     "columns), so the classes of the picks are unknown.</p>")
        return
    labeled_ids, label_values = labels
    per_round = []
    for n in numbers:
        if not manifests.get(n):
            continue
        rec = records.get(n) or read_manifest_records(_round_manifest_dir(workdir, n, rounds[n]))
        if not rec or not len(rec["id"]):
            continue
        found = labels_of(rec["id"], labeled_ids, label_values)
        per_round.append((n, found, len(rec["id"])))
    per_round = [r for r in per_round if len(r[1])]
    if not per_round:
        page.section("classes", "Class balance of the picks",
                     "<p>Labels exist, but none of them belongs to a pick yet.</p>")
        return
    classes = np.unique(np.concatenate([found for _, found, _ in per_round]))
    if len(classes) > 20:
        # the 19 most common classes, the rest as one "other"
        totals = np.array([sum(np.count_nonzero(found == c) for _, found, _ in per_round) for c in classes])
        keep = classes[np.argsort(-totals, kind="stable")[:19]]
        names = [str(c) for c in keep] + ["other"]
        counts = np.array([[np.count_nonzero(found == c) for c in keep] + [np.count_nonzero(~np.isin(found, keep))]
                           for _, found, _ in per_round])
    else:
        names = [str(c) for c in classes]
        counts = np.array([[np.count_nonzero(found == c) for c in classes] for _, found, _ in per_round])
    shown = per_round[-MAX_ROUNDS_PLOTTED:]
    body = page.figure(
        plots.class_balance_rounds([n for n, _, _ in shown], counts[-MAX_ROUNDS_PLOTTED:], names,
                                   [len(found) for _, found, _ in shown], [total for _, _, total in shown]),
        "class shares of each round's labeled picks",
        "For each round, the classes of the picks whose labels have come back (under each bar: labels back of "
        "picks). A batch dominated by one or two classes is a sign of sampling bias."
        + (f" The plot shows the latest {MAX_ROUNDS_PLOTTED} rounds; the table lists all."
           if len(per_round) > MAX_ROUNDS_PLOTTED else ""))
    rows = []
    for (n, found, total), row in zip(per_round, counts):
        top = int(np.argmax(row))
        rows.append([str(n), fmt_int(total), fmt_int(len(found)), str(int(np.count_nonzero(row))),
                     f"{names[top]} ({fmt_pct(row[top] / max(len(found), 1), 0)})"])
    body += table(["round", "picks", "labels back", "classes among them", "most common class"], rows,
                  numeric=range(0, 4))
    page.section("classes", "Class balance of the picks", body)


if __name__ == "__main__":
    from clusmar_beam.app.cli import main
    sys.exit(main(["report"] + sys.argv[1:]))
