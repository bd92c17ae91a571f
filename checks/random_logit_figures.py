"""Figures of the random logit test (Sixt et al. 2020, "When Explanations Lie", arXiv
1912.09818): per metric, one bar per method, the similarity of its map for a random other class
to its map for the explained class (mean over samples, 95 % bootstrap interval). Lower is
better. :func:`method_bars` also draws the bars of ``efficient_mprt``. No file I/O.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import pandas as pd
from matplotlib.figure import Figure

from checks.plotting import (
    curve_table,
    draw_method_bars,
    method_order,
    metric_title,
    ordered,
    paper_style,
    similarity_range,
)
from harness.base.context import FigureData
from metrics import METRICS


def bar_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """The off-class similarity bars (stage 1), one panel per metric."""
    rows = data.rows[data.rows["metric"].isin(list(METRICS)) & data.rows["stage_index"].eq(1)]
    if len(rows):
        yield f"{data.check}_similarity", method_bars(
            rows, "similarity: off-class vs explained-class map", data.title)


def method_bars(rows: pd.DataFrame, ylabel: str, title: str = "",
                ylim: tuple[float, float] | None = None) -> Figure:
    """One panel per metric of ``rows``, one bar per method: the mean over samples with its
    95 % bootstrap interval (:func:`checks.plotting.curve_table`). ``ylim`` None: the
    similarity range [-1, 1], widened if a mean leaves it."""
    table = curve_table(rows)
    metrics = ordered(table["metric"].unique(), list(METRICS))
    methods = method_order(table["method"].unique())
    ncols = 2 if len(metrics) == 4 else max(1, min(len(metrics), 3))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    with paper_style():
        fig = Figure(figsize=(ncols * max(3.2, 0.38 * len(methods) + 1.0) + 0.4,
                              nrows * 3.3 + 0.9), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            part = table[table["metric"] == metric]
            draw_method_bars(ax, part, methods)
            ax.set_ylim(*(ylim or similarity_range(part)))
            ax.set_title(metric_title(metric))
        for ax in axes[len(metrics):]:
            ax.set_axis_off()
        for ax in axes[::ncols]:
            ax.set_ylabel(ylabel)
        if title:
            fig.suptitle(title)
    return fig
