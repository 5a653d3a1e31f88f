"""The figures of `clusmar report`, each returned as a PNG `data:` URI to embed in the page.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so building a
report never switches the process's backend or leaves figures open.
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

DPI = 100
STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#dddddd", "grid.linewidth": 0.7, "axes.axisbelow": True,
    "figure.facecolor": "white", "axes.facecolor": "white",
}
STRATEGY_COLORS = {"cluster-margin": "#d62728", "margin": "#1f77b4", "random": "#7f7f7f", "k-center": "#2ca02c"}
STAGE_COLORS = {"score": "#9467bd", "cluster": "#ff7f0e", "exclude": "#8c564b", "select": "#1f77b4",
                "train": "#bcbd22", "other": "#c7c7c7"}
_EXTRA = ["#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def strategy_color(name: str, index: int = 0) -> str:
    return STRATEGY_COLORS.get(name, _EXTRA[index % len(_EXTRA)])


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def to_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15,
                metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thousands(value, _pos=None) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:g}K"
    return f"{value:,.0f}"


# ---------------------------------------------------------------- simulation

def learning_curves(panels: list[tuple[str, list[dict]]]) -> str:
    """One panel per setting: mean test accuracy vs labels with a ±std band, one line per strategy.

    panels: (title, [{"strategy", "labels", "mean", "std"}]); panels share the y axis
    so a setting's curves can be compared with its neighbours'.
    """
    with rc_context(STYLE):
        n = max(len(panels), 1)
        ncols = 1 if n == 1 else (2 if n in (2, 4) else 3)
        nrows = math.ceil(n / ncols)
        width = 7.5 if n == 1 else 11.0
        fig = _figure(width, (4.2 if n == 1 else 3.3) * nrows + 0.6)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        values = [v for _, series in panels for s in series
                  for v in np.asarray(s["mean"], float) - np.nan_to_num(np.asarray(s["std"], float))]
        values += [v for _, series in panels for s in series
                   for v in np.asarray(s["mean"], float) + np.nan_to_num(np.asarray(s["std"], float))]
        values = [v for v in values if np.isfinite(v)]
        handles = {}
        for index, (title, series) in enumerate(panels):
            ax = axes[index // ncols][index % ncols]
            for order, s in enumerate(series):
                labels = np.asarray(s["labels"], float)
                mean = np.asarray(s["mean"], float)
                std = np.nan_to_num(np.asarray(s["std"], float))
                color = strategy_color(s["strategy"], order)
                line, = ax.plot(labels, mean, marker="o", markersize=3.5, linewidth=1.8, color=color,
                                label=s["strategy"], zorder=4 if s["strategy"] == "cluster-margin" else 3)
                ax.fill_between(labels, mean - std, mean + std, color=color, alpha=0.15, linewidth=0, zorder=2)
                handles.setdefault(s["strategy"], line)
            ax.set_title(title)
            ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
            ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(7, steps=[1, 2, 5, 10]))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0 if _span(values) > 0.035 else 1))
            if index % ncols == 0:
                ax.set_ylabel("test accuracy")
            if index // ncols == nrows - 1 or index + ncols >= n:
                ax.set_xlabel("labels")
        for index in range(len(panels), nrows * ncols):
            axes[index // ncols][index % ncols].set_visible(False)
        if values:
            low, high = min(values), max(values)
            pad = max((high - low) * 0.08, 0.005)
            axes[0][0].set_ylim(low - pad, high + pad)
        fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.32 / fig.get_figheight()))
        return to_data_uri(fig)


def _span(values) -> float:
    return (max(values) - min(values)) if values else 1.0


def savings_heatmaps(maps: list[dict]) -> str:
    """Cluster-margin's label savings vs margin over the sweep, one heatmap per target accuracy.

    maps: {"title", "rows" (row labels), "columns" (column labels), "row_title", "column_title",
    "values" (2-D, nan = never reached / not run), "text" (2-D cell annotations)}.
    Green is fewer labels than margin needed, red more; grey cells never reached the target.
    """
    with rc_context({**STYLE, "axes.grid": False}):
        n = len(maps)
        cols = max(len(m["columns"]) for m in maps)
        rows = max(len(m["rows"]) for m in maps)
        cell_w, cell_h = 1.35, 0.62
        fig = _figure(max(4.8, min(15.0, n * (cols * cell_w + 1.8))), rows * cell_h + 1.7)
        axes = fig.subplots(1, n, squeeze=False)[0]
        finite = np.concatenate([np.asarray(m["values"], float).ravel() for m in maps])
        finite = finite[np.isfinite(finite)]
        bound = float(np.max(np.abs(finite))) if finite.size else 1.0
        bound = bound or 1.0
        norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
        image = None
        for index, (ax, m) in enumerate(zip(axes, maps)):
            values = np.asarray(m["values"], float)
            masked = np.ma.masked_invalid(values)
            ax.set_facecolor("#e6e6e6")
            image = ax.imshow(masked, cmap="RdYlGn", norm=norm, aspect="auto")
            ax.set_xticks(range(len(m["columns"])), m["columns"])
            ax.set_yticks(range(len(m["rows"])), m["rows"] if index == 0 else [])
            ax.set_xlabel(m["column_title"])
            if index == 0:
                ax.set_ylabel(m["row_title"])
            else:
                ax.tick_params(left=False)
            ax.set_title(m["title"])
            for spine in ax.spines.values():
                spine.set_visible(False)
            for i in range(values.shape[0]):
                for j in range(values.shape[1]):
                    value = values[i, j]
                    dark = np.isfinite(value) and abs(value) > 0.6 * bound
                    ax.text(j, i, m["text"][i][j], ha="center", va="center", fontsize=9,
                            color="white" if dark else "#222222")
        if image is not None:
            bar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.03)
            bar.ax.yaxis.set_major_locator(MaxNLocator(7, steps=[1, 2, 5, 10]))
            bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
            bar.set_label("labels saved (share of the baseline's)")
        return to_data_uri(fig)


def class_balance_rows(rows: list[tuple[str, np.ndarray]], class_names: list[str], title: str) -> str:
    """Horizontal 100 % bars: the share of each class among a row's picks (all rounds and repetitions)."""
    with rc_context({**STYLE, "axes.grid": False}):
        fig = _figure(9.5, 0.42 * len(rows) + 1.5)
        ax = fig.add_subplot()
        colors = _class_colors(len(class_names))
        y = np.arange(len(rows))[::-1]
        for c, name in enumerate(class_names):
            left = np.array([np.sum(counts[:c]) / max(np.sum(counts), 1) for _, counts in rows])
            share = np.array([(counts[c] if c < len(counts) else 0) / max(np.sum(counts), 1) for _, counts in rows])
            ax.barh(y, share, left=left, color=colors[c], edgecolor="white", linewidth=0.5, label=name, height=0.7)
        ax.set_yticks(y, [label for label, _ in rows])
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("share of picks")
        ax.set_title(title)
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  ncol=1 if len(class_names) <= 12 else 2)
        return to_data_uri(fig)


def _class_colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def seconds_per_round(rows: list[tuple[str, dict]], stages: list[str], xlabel: str, title: str,
                      annotate: list[str] | None = None) -> str:
    """Horizontal stacked bars: seconds of each stage, one bar per row (a strategy, or a round)."""
    with rc_context(STYLE):
        fig = _figure(9.5, 0.45 * len(rows) + 1.6)
        ax = fig.add_subplot()
        y = np.arange(len(rows))[::-1]
        left = np.zeros(len(rows))
        longest = max((sum(float(parts.get(s) or 0.0) for s in stages) for _, parts in rows), default=0.0)
        scale = 1000.0 if longest < 1.0 else 1.0   # milliseconds, so short runs do not read 0.000
        if scale != 1.0:
            xlabel = xlabel.replace("seconds", "milliseconds")
        for stage in stages:
            values = np.array([float(parts.get(stage) or 0.0) * scale for _, parts in rows])
            ax.barh(y, values, left=left, color=STAGE_COLORS.get(stage, "#aaaaaa"), edgecolor="white",
                    linewidth=0.5, label=stage, height=0.65)
            left += values
        for yi, total, note in zip(y, left, annotate or [""] * len(rows)):
            if note:
                ax.text(total, yi, "  " + note, va="center", fontsize=9, color="#333333")
        ax.set_yticks(y, [label for label, _ in rows])
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.set_xlim(0, max(float(left.max()) if len(left) else 1.0, 1e-3) * 1.25)
        ax.grid(axis="y", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return to_data_uri(fig)


# ---------------------------------------------------------------- round work directory

def size_bars(histogram: dict, ylabel: str, title: str, color: str = "#1f77b4", log: bool = False) -> str:
    """Bars over the size bins "1", "2-3", "4-7", ... in size order, each annotated with its count."""
    histogram = _fill_size_bins(histogram)
    keys = sorted(histogram, key=_bin_low)
    values = [int(histogram[k]) for k in keys]
    with rc_context(STYLE):
        fig = _figure(7.5, 3.4)
        ax = fig.add_subplot()
        bars = ax.bar(range(len(keys)), values, color=color, width=0.75)
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8, padding=2)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_xlabel("cluster size (points)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="x", visible=False)
        if log and values and max(values) > 50 * max(min(v for v in values if v > 0), 1):
            ax.set_yscale("log")
            ax.set_ylim(0.7, max(values) * 3)
        else:
            ax.set_ylim(0, max(values + [1]) * 1.15)
            ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
        return to_data_uri(fig)


def _size_bin(power: int) -> str:
    low, high = 2 ** power, 2 ** (power + 1) - 1
    return str(low) if low == high else f"{low}-{high}"


def _fill_size_bins(histogram: dict) -> dict:
    """Empty doubling bins between the smallest and the largest shown as zero, so the x axis stays even."""
    powers = {}
    for key in histogram:
        low = _bin_low(key)
        power = low.bit_length() - 1 if 0 < low < 1 << 62 else None
        if power is None or _size_bin(power) != str(key):
            return dict(histogram)   # not the 1, 2-3, 4-7, ... bins: leave as given
        powers[power] = histogram[key]
    if not powers:
        return {}
    return {_size_bin(p): powers.get(p, 0) for p in range(min(powers), max(powers) + 1)}


def _bin_low(key: str) -> int:
    try:
        return int(str(key).split("-")[0].rstrip("+"))
    except ValueError:
        return 1 << 62


def margin_distributions(edges, histograms: dict[str, list], title: str) -> str:
    """Each group's margins as a share of its own rows per bin, so a pool of millions and a batch of
    thousands sit on one scale; lower margin = more uncertain."""
    edges = np.asarray(edges, float)
    colors = {"pool": "#7f7f7f", "candidates": "#ff7f0e", "picks": "#d62728"}
    with rc_context(STYLE):
        fig = _figure(7.5, 3.6)
        ax = fig.add_subplot()
        for name, counts in histograms.items():
            counts = np.asarray(counts, float)
            total = counts.sum()
            if not total:
                continue
            share = counts / total
            shown = "unlabeled pool" if name == "pool" else name
            ax.stairs(share, edges, color=colors.get(name, "#1f77b4"), linewidth=1.8,
                      label=f"{shown} ({int(total):,})", fill=name == "pool", alpha=0.35 if name == "pool" else 1.0)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("margin (top-1 minus top-2 probability; lower = more uncertain)")
        ax.set_ylabel("share of the group's rows")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title(title)
        ax.legend(frameon=False)
        return to_data_uri(fig)


def class_balance_rounds(rounds: list[int], counts: np.ndarray, class_names: list[str], labeled: list[int],
                         selected: list[int]) -> str:
    """Stacked 100 % bars per round: the classes of the picks whose labels came back."""
    with rc_context({**STYLE, "axes.grid": False}):
        fig = _figure(max(6.0, min(12.0, 2.2 + 0.6 * len(rounds))), 3.8)
        ax = fig.add_subplot()
        colors = _class_colors(len(class_names))
        totals = counts.sum(axis=1).astype(float)
        totals[totals == 0] = 1
        bottom = np.zeros(len(rounds))
        x = np.arange(len(rounds))
        for c, name in enumerate(class_names):
            share = counts[:, c] / totals
            ax.bar(x, share, bottom=bottom, color=colors[c], edgecolor="white", linewidth=0.5, label=name,
                   width=0.7)
            bottom += share
        if len(rounds) <= 10:
            ax.set_xticks(x, [f"round {r}\n{n:,} of {s:,}" for r, n, s in zip(rounds, labeled, selected)])
        else:   # too many for the counts: round numbers only (the table beside the plot has the counts)
            ax.set_xticks(x, [str(r) for r in rounds])
            ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("share of labeled picks")
        ax.set_title("Classes of each round's labeled picks")
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  ncol=1 if len(class_names) <= 12 else 2)
        return to_data_uri(fig)
