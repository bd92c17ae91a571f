"""Figures of the data randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency
Maps", arXiv 1810.03292, §5, Figures 5 and 6): bars of the similarity of each method's map of
the random-label model to its map of the true-label model, and the maps of both models side by
side. Drawn from a :class:`harness.base.context.FigureData`; no file I/O.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from checks.plotting import (
    GridLayout,
    curve_table,
    draw_method_bars,
    method_order,
    metric_title,
    ordered,
    paper_style,
    show_image,
    show_map,
    similarity_range,
)
from harness.base.context import FigureData
from metrics import METRICS

ACCURACY_METRICS = ("train_accuracy", "test_accuracy")
LABEL_STAGES = {"true_labels": "true labels", "random_labels": "random labels"}


def bar_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """The similarity bars with both models' accuracies (Figure 5's numbers)."""
    if len(data.rows):
        yield f"{data.check}_similarity", random_label_bars(data.rows, data.title)


def grid_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """True-label versus random-label maps of the saved samples (Figure 6)."""
    if len(data.samples):
        captions = [f"sample {s}{label}" for s, label in zip(data.samples, data.labels)]
        yield f"{data.check}_grid", random_label_grid(data.images, captions, data.stage_names,
                                                      data.maps, data.heading,
                                                      data.normalization)


def random_label_bars(rows: pd.DataFrame, title: str = "") -> Figure:
    """Data randomization test (arXiv 1810.03292, §5): similarity of each method's map of the
    random-label model to its map of the true-label model, one panel per metric, one bar per
    method (mean over samples, 95 % bootstrap interval). The subtitle gives the accuracies of
    both models (``train_accuracy`` / ``test_accuracy`` rows)."""
    similarity = rows[~rows["metric"].isin(ACCURACY_METRICS) & rows["stage_index"].eq(1)]
    table = curve_table(similarity)
    metrics = ordered(table["metric"].unique(), list(METRICS))
    methods = method_order(table["method"].unique())
    ncols = 2 if len(metrics) == 4 else max(1, min(len(metrics), 3))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    with paper_style():
        fig = Figure(figsize=(ncols * max(3.2, 0.38 * len(methods) + 1.0) + 0.4, nrows * 3.3 + 0.9),
                     layout="constrained")  # fmt: skip
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            _draw_bars(ax, table[table["metric"] == metric], methods)
            ax.set_title(metric_title(metric))
        for ax in axes[len(metrics):]:
            ax.set_axis_off()
        for ax in axes[::ncols]:
            ax.set_ylabel("similarity: random- vs true-label map")
        fig.suptitle("\n".join(t for t in (title, accuracy_caption(rows)) if t))
    return fig


def _draw_bars(ax, table: pd.DataFrame, methods: list[str]) -> None:
    draw_method_bars(ax, table, methods)
    ax.set_ylim(*similarity_range(table))  # a similarity: the [-1, 1] frame of Figure 4
    ax.set_yticks([-1.0, -0.5, 0.0, 0.5, 1.0])


def accuracy_caption(rows: pd.DataFrame) -> str:
    """'true labels: train 99.5%, test 98.1% | random labels: train 97.0%, test 9.8%'."""
    acc = rows[rows["metric"].isin(ACCURACY_METRICS)]
    parts = []
    for stage, label in LABEL_STAGES.items():
        values = acc[acc["stage"] == stage].groupby("metric")["value"].mean()
        if len(values):
            shown = [f"{m.split('_')[0]} {values[m]:.1%}" for m in ACCURACY_METRICS if m in values]
            parts.append(f"{label}: {', '.join(shown)}")
    return " | ".join(parts)


def random_label_grid(images: list[np.ndarray | None], captions: list[str],
                      stage_names: list[str], maps: Mapping[str, np.ndarray], title: str = "",
                      normalization: str = "absolute") -> Figure:
    """Figures 5 and 6 of arXiv 1810.03292: maps of the true-label model versus the
    random-label model, for a few inputs (two rows each: one per model) and every method
    (columns, after the input).

    images: per input, (H, W[, C]) in [0, 1] or None; captions: per input, a row label prefix.
    stage_names: the models in ``stage_index`` order (``true_labels``, ``random_labels``).
    maps: method -> (len(images), len(stage_names), H, W).
    """
    methods = method_order(maps)
    nrows, ncols = len(images) * len(stage_names), len(methods) + 1
    layout = GridLayout(nrows, ["input", *methods], [*captions, "random labels"])
    with paper_style():
        fig = Figure(figsize=layout.figsize)
        fig.subplots_adjust(**layout.margins)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for k, (image, caption) in enumerate(zip(images, captions)):
            for s, stage in enumerate(stage_names):
                row = axes[k * len(stage_names) + s]
                if image is not None:
                    show_image(row[0], image)
                row[0].set_axis_off()
                for ax, method in zip(row[1:], methods):
                    show_map(ax, maps[method][k, s], normalization)
                row[0].text(-0.08, 0.5, f"{caption}\n{LABEL_STAGES.get(stage, stage)}",
                            transform=row[0].transAxes, ha="right", va="center", fontsize=8)
        for ax, name in zip(axes[0], ["input", *methods]):
            layout.column_title(ax, name)
        if title:
            fig.suptitle(title, y=1.0 - 0.08 / layout.figsize[1], va="top")
    return fig
