"""Drawing shared by the checks' figures (Adebayo et al. 2018, arXiv 1810.03292, Figures 2 and
4): the similarity curves of a randomization test, the map grids, and one style per method.

Figures are built on :class:`matplotlib.figure.Figure` directly, not through ``pyplot``: nothing
opens a window and no global backend is chosen. Nothing here reads or writes files: a check's
figure functions get a :class:`harness.base.context.FigureData` and return figures; the runner
(:mod:`harness.figures`) reads the run dir and saves them.
"""
from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from checks.uncertainty import LEVEL, interval_table
from harness.base.context import FigureData
from methods import METHODS
from metrics import METRICS

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # matplotlib tab10  # fmt: skip
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# How a map normalization is shown: colormap, vmin, vmax.
MAP_DISPLAY = {"absolute": ("gray", 0.0, 1.0), "signed": ("bwr", -1.0, 1.0)}
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # TrueType text in PDFs: editable, accepted by journals
}  # fmt: skip


# --------------------------------------------------------------------------- a check's figures


def similarity_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """Figure 4 from a check's similarity rows: one line per method over the stages, one panel
    per metric (rows of other metrics, e.g. a check's own measurements, are left out)."""
    similarity = data.rows[data.rows["metric"].isin(list(METRICS))]
    if len(similarity):
        yield f"{data.check}_similarity", similarity_curves(curve_table(similarity), data.title,
                                                            similarity)


def grid_figures(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """Figure 2 for each saved sample: every method's maps (rows) over the stages (columns)."""
    for k, sample in enumerate(data.samples):
        title = f"{data.heading}: sample {sample}{data.labels[k]}"
        maps = {method: m[k] for method, m in data.maps.items()}
        yield f"{data.check}_grid_sample{sample}", randomization_grid(
            data.images[k], data.stage_names, maps, title, data.normalization)


def headline_scatter(x_table: pd.DataFrame, y_table: pd.DataFrame, x_title: str,
                     y_title: str, title: str = "") -> Figure:
    """Two checks' headline scores per method, one against the other (Binder et al. 2023,
    arXiv 2211.12486, read a randomization test beside a faithfulness score): a panel per
    (y metric, x metric), a point per method at its means with both 95 % bootstrap intervals.
    Tables as :func:`curve_table` returns, one check's last stage each."""
    x_metrics = list(dict.fromkeys(x_table["metric"]))
    y_metrics = list(dict.fromkeys(y_table["metric"]))
    with paper_style():
        fig = Figure(figsize=(2.8 * len(x_metrics) + 1.8, 2.6 * len(y_metrics)),
                     layout="constrained")
        axes = fig.subplots(len(y_metrics), len(x_metrics), squeeze=False)
        for (r, y_metric), (c, x_metric) in itertools.product(enumerate(y_metrics),
                                                              enumerate(x_metrics)):
            _scatter_methods(axes[r, c], _of_metric(x_table, x_metric),
                             _of_metric(y_table, y_metric))
            axes[r, c].set_xlabel(metric_title(x_metric))
            axes[r, c].set_ylabel(metric_title(y_metric))
            axes[r, c].locator_params(nbins=4)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside right center", frameon=False)
        fig.suptitle(f"{title}\nx: {x_title}; y: {y_title}")
    return fig


def _scatter_methods(ax, x: pd.DataFrame, y: pd.DataFrame) -> None:
    for method in method_order(set(x.index) & set(y.index)):
        style = method_style(method)
        a, b = x.loc[method], y.loc[method]
        ax.errorbar(a["mean"], b["mean"], xerr=_half_widths(a), yerr=_half_widths(b),
                    color=style["color"], marker=style["marker"], linestyle="none",
                    capsize=2, label=method)


def _of_metric(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    return table[table["metric"] == metric].set_index("method")


def _half_widths(r: pd.Series) -> np.ndarray | None:
    """[[below], [above]] the mean for errorbar, or None without an interval (n < 2)."""
    if not np.isfinite([r["low"], r["high"]]).all():
        return None
    return np.array([[r["mean"] - r["low"]], [r["high"] - r["mean"]]])


def metric_title(metric: str) -> str:
    """A metric's panel title: its declared ``title`` (the paper's Figure 4 wording), or its
    name."""
    title = getattr(METRICS.facts(metric), "title", "") if metric in METRICS else ""
    return title or metric


def curve_table(rows: pd.DataFrame, level: float = LEVEL, seed: int | None = None
                ) -> pd.DataFrame:
    """Mean over samples per (check, method, metric, stage) with its ``level`` percentile
    bootstrap interval (:func:`checks.uncertainty.interval_table`), seeded by ``seed`` (by
    default the rows' own ``seed`` column, else 0): the same figure for the same run.

    NaN values (rows with a ``reason``) are ignored; with ``n < 2`` finite values the interval
    is NaN (the figures draw the samples themselves), with ``n == 0`` the mean too.

    Returns columns ``check, method, metric, stage_index, stage, mean, low, high, n`` (``check``
    only when ``rows`` has it), sorted by those keys, so stages come in ``stage_index`` order.
    """
    if seed is None:
        seed = int(rows["seed"].iloc[0]) if "seed" in rows and len(rows) else 0
    return interval_table(rows, seed, level)


def band_caption(table: pd.DataFrame, level: float = LEVEL, unit: str = "samples") -> str:
    """What a band is and over how many samples, for a legend title: "mean and 95 % bootstrap
    interval over n = 4 samples" (a range of n when groups differ; "no interval" when n < 2)."""
    n = table["n"].to_numpy()
    if n.size == 0:
        return "mean, n = 0"
    counts = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
    band = f"{level * 100:g} % bootstrap interval" if n.max() >= 2 else "no interval"
    return f"mean and {band} over n = {counts} {unit}"


def similarity_curves(table: pd.DataFrame, title: str = "",
                      samples: pd.DataFrame | None = None, unit: str = "samples") -> Figure:
    """Figure 4 of Adebayo et al. 2018 (arXiv 1810.03292): similarity to the original map.

    ``table`` is :func:`curve_table` output for one check. One panel per metric; x = stages in
    ``stage_index`` order (labelled with the stage names), y = similarity; one line per method
    (mean over samples) with its shaded 95 % bootstrap interval, which the legend names with n.
    ``samples`` (the tidy rows behind ``table``): with at most :data:`THIN_UP_TO` samples each
    sample's own curve is drawn as a thin line, so that a mean of two is seen as two; ``unit``
    names what a sample is in the caption (the seeds of a sweep). The y-range covers [-1, 1].
    """
    metrics = ordered(table["metric"].unique(), list(METRICS))
    stages = table[["stage_index", "stage"]].drop_duplicates("stage_index")
    stages = stages.sort_values("stage_index")
    thin = samples is not None and "sample" in samples and \
        samples["sample"].nunique() <= THIN_UP_TO
    ncols = 2 if len(metrics) == 4 else min(len(metrics), 3)  # 4 panels as 2 x 2: less squat
    nrows = math.ceil(len(metrics) / ncols)
    panel_width = max(3.2, 0.22 * len(stages) + 1.0)
    with paper_style():
        fig = Figure(figsize=(ncols * panel_width + 0.6, nrows * 3.4 + 1.0), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            if thin:
                _draw_samples(ax, samples[samples["metric"].astype(str) == metric], stages)
            _draw_metric(ax, table[table["metric"] == metric], stages)
            ax.set_title(metric_title(metric))
        for ax in axes[len(metrics):]:
            ax.set_axis_off()
        for ax in axes[::ncols]:
            ax.set_ylabel("similarity to original map")
        handles, labels = axes[0].get_legend_handles_labels()
        caption = band_caption(table, unit=unit) + (f" (thin lines: {unit})" if thin else "")
        # below the panels: a legend at the right collides with the title over one panel
        fig.legend(handles, labels, loc="outside lower center", frameon=False,
                   ncols=min(len(handles), 5), title=caption)
        if title:
            fig.suptitle(title)
    return fig


THIN_UP_TO = 10  # samples drawn one by one up to this many


def _draw_samples(ax, rows: pd.DataFrame, stages: pd.DataFrame) -> None:
    """One thin line per (method, sample), in the method's colour, no legend entry."""
    for (method, _), line in rows.groupby(["method", "sample"], sort=True):
        line = stages.merge(line[["stage_index", "value"]], how="left")
        ax.plot(line["stage_index"].to_numpy(float), line["value"].to_numpy(float),
                color=method_style(str(method))["color"], linewidth=0.5, alpha=0.35,
                label="_nolegend_")


def _draw_metric(ax, table: pd.DataFrame, stages: pd.DataFrame) -> None:
    for method in method_order(table["method"].unique()):
        line = stages.merge(table[table["method"] == method], how="left")  # NaN: missing stage
        style = method_style(method)
        x = line["stage_index"].to_numpy(float)
        ax.fill_between(x, line["low"], line["high"], color=style["color"], alpha=0.15, linewidth=0)
        ax.plot(x, line["mean"], label=method, linewidth=1.4, markersize=3.5, **style)
    small = len(stages) > 12
    ax.set_xticks(stages["stage_index"], labels=stages["stage"], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=7 if small else 8)  # fmt: skip
    ax.set_xlim(stages["stage_index"].min() - 0.4, stages["stage_index"].max() + 0.4)
    ax.set_ylim(*similarity_range(table))
    ax.set_yticks([-1.0, -0.5, 0.0, 0.5, 1.0])
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":", zorder=0)
    ax.grid(alpha=0.3, linewidth=0.5)


def draw_method_bars(ax, table: pd.DataFrame, methods: list[str]) -> None:
    """One bar per method (in ``methods`` order, its colour): the mean of a :func:`curve_table`
    with its interval as error bars; a method without a value is an empty slot."""
    bars = pd.DataFrame({"method": methods}).merge(table, how="left")  # NaN: method not scored
    x = np.arange(len(methods))
    mean = bars["mean"].to_numpy(float)
    error = np.vstack([mean - bars["low"].to_numpy(float), bars["high"].to_numpy(float) - mean])
    ax.bar(x, np.nan_to_num(mean), color=[method_style(m)["color"] for m in methods],
           yerr=np.where(np.isfinite(error), error, 0.0), capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(x, labels=methods, rotation=45, ha="right", rotation_mode="anchor")
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":", zorder=0)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)


def similarity_range(table: pd.DataFrame) -> tuple[float, float]:
    """[-1, 1] (the range of every similarity metric), widened only if a mean leaves it.

    Intervals of means near the bounds may reach past them; they are cut at the frame.
    """
    values = table["mean"].to_numpy(float)
    finite = values[np.isfinite(values)]
    low = min(-1.0, finite.min()) if finite.size else -1.0
    high = max(1.0, finite.max()) if finite.size else 1.0
    return low - 0.05, high + 0.05



# --------------------------------------------------------------------------- Figure 2: grids


def randomization_grid(
    image: np.ndarray | None,
    stage_names: list[str],
    maps: Mapping[str, np.ndarray],
    title: str = "",
    normalization: str = "absolute",
) -> Figure:
    """Figure 2 of Adebayo et al. 2018 (arXiv 1810.03292): maps under progressive randomization.

    image: (H, W, 3), (H, W, 1) or (H, W) in [0, 1], shown in a first "input" column of every
        row; None leaves the column out.
    stage_names: column titles in ``stage_index`` order, the first being the original model.
    maps: method -> (len(stage_names), H, W) maps of one sample; an all-NaN map is a missing
        stage (drawn as "n/a"). Shown with ``MAP_DISPLAY[normalization]`` (absolute: grayscale,
        0 = black, 1 = white).
    Rows are methods (in :func:`method_order`); with many columns the titles are rotated.
    """
    methods = method_order(maps)
    columns = (["input"] if image is not None else []) + list(stage_names)
    layout = GridLayout(len(methods), columns, methods)
    with paper_style():
        fig = Figure(figsize=layout.figsize)
        fig.subplots_adjust(**layout.margins)
        axes = fig.subplots(len(methods), len(columns), squeeze=False)
        for ax_row, method in zip(axes, methods):
            cells = ax_row[1:] if image is not None else ax_row
            if image is not None:
                show_image(ax_row[0], image)
            for ax, stage_map in zip(cells, maps[method]):
                show_map(ax, stage_map, normalization)
            ax_row[0].text(-0.08, 0.5, method, transform=ax_row[0].transAxes, ha="right",
                           va="center")  # fmt: skip
        for ax, name in zip(axes[0], columns):
            layout.column_title(ax, name)
        if title:
            fig.suptitle(title, y=1.0 - 0.08 / layout.figsize[1], va="top")
    return fig


class GridLayout:
    """Sizes of a :func:`randomization_grid` in inches: with many columns, smaller cells."""

    def __init__(self, nrows: int, columns: list[str], methods: list[str]):
        ncols = len(columns)
        longest_title = max(len(c) for c in columns)
        self.rotate = ncols > 8 or longest_title > 12
        cell = 1.0 if ncols <= 8 else 0.75
        left = 0.075 * max(len(m) for m in methods) + 0.25
        titles = 0.035 * longest_title + 0.2 if self.rotate else 0.3
        top = titles + 0.3  # column titles, then the suptitle
        right = 0.035 * longest_title if self.rotate else 0.1  # the last rotated title leans right
        width, height = left + ncols * cell * 1.05 + right, top + nrows * cell * 1.05 + 0.1
        self.figsize = (width, height)
        self.margins = dict(left=left / width, right=1 - right / width, top=1 - top / height,
                            bottom=0.1 / height, wspace=0.05, hspace=0.05)  # fmt: skip

    def column_title(self, ax, name: str) -> None:
        if self.rotate:
            ax.text(0.3, 1.04, name, transform=ax.transAxes, rotation=45, ha="left", va="bottom",
                    rotation_mode="anchor", fontsize=7)  # fmt: skip
        else:
            ax.text(0.5, 1.04, name, transform=ax.transAxes, ha="center", va="bottom", fontsize=8)


def show_image(ax, image: np.ndarray) -> None:
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    ax.set_axis_off()


def show_map(ax, stage_map: np.ndarray, normalization: str) -> None:
    stage_map = np.asarray(stage_map, dtype=np.float32)
    ax.set_axis_off()
    if np.isnan(stage_map).all():
        ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", color="0.5")
        return
    cmap, vmin, vmax = MAP_DISPLAY[normalization]
    ax.imshow(stage_map, cmap=cmap, vmin=vmin, vmax=vmax)


# --------------------------------------------------------------------------- shared style


def method_style(method: str) -> dict[str, str]:
    """Colour, line style and marker of a method: the same in every figure of every run.

    Registered methods have fixed, distinct styles, by their place in ``METHODS``; others (a
    user's own method) get one from a hash of their name (stable across runs, may repeat
    another method's).
    """
    known = list(METHODS)
    if method in known:
        i = known.index(method)
    else:
        i = len(known) + zlib.crc32(method.encode()) % 52
    return {"color": COLORS[i % 10], "linestyle": LINESTYLES[i // 10 % 4],
            "marker": MARKERS[i % 7]}  # fmt: skip


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in ``METHODS`` order (the order they are registered in), then others
    alphabetically."""
    return ordered(methods, list(METHODS))


def ordered(names: Iterable[str], preferred: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted({str(n) for n in names}, key=lambda n: (rank.get(n, len(rank)), n))


@contextmanager
def paper_style():
    """Paper style for figure building and saving, without touching the global rcParams."""
    with matplotlib.rc_context(STYLE):
        yield
