"""Figures of the faithfulness checks, drawn from their rows alone (the curves are in the
table): the mean curve per method with its 95 % bootstrap interval over samples (Khorram et
al. 2021, arXiv 2012.15783, Fig. 5; Kapishnikov et al. 2021, arXiv 2106.09788, Fig. 6; Rong et
al. 2022, arXiv 2202.00449, Fig. 4), and the AUCs as bars with the ``random_uniform`` control's level.
No file I/O: :mod:`harness.figures` saves what these return.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from checks.plotting import curve_table, method_order, method_style, paper_style
from harness.base.context import FigureData

CONTROL = "random_uniform"
# check -> (curve metrics in panel order, x column, x label, y label)
CURVES = {
    "deletion_insertion": (("deletion_score", "insertion_score"), "fraction",
                           "fraction of cells perturbed", "softmax probability of the class"),
    "pic": (("sic_curve", "aic_curve"), "information",
            "normalized information (WebP size)", "normalized score"),
    "road": (("morf_accuracy", "lerf_accuracy"), "fraction",
             "fraction of pixels imputed", "accuracy (explained class kept)"),
}
AUCS = {"deletion_insertion": ("deletion_auc", "insertion_auc"),
        "pic": ("sic_auc", "aic_auc"),
        "road": ("morf_auc", "lerf_auc", "road_gap")}


def curves_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """One panel per curve kind: the mean curve of each method over samples."""
    metrics, x, xlabel, ylabel = CURVES[data.check]
    rows = data.rows[data.rows["metric"].isin(metrics) & (data.rows["sample"] >= 0)]
    if len(rows):
        yield f"{data.check}_curves", curve_panels(rows, metrics, x, xlabel, ylabel, data.title)


def auc_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """The AUCs per method: bars with their 95 % bootstrap interval, the control's mean dashed."""
    metrics = AUCS[data.check]
    rows = data.rows[data.rows["metric"].isin(metrics) & (data.rows["sample"] >= 0)]
    if len(rows):
        yield f"{data.check}_auc", auc_bars(rows, metrics, data.title)


def curve_panels(rows: pd.DataFrame, metrics: tuple[str, ...], x: str, xlabel: str,
                 ylabel: str, title: str = "") -> Figure:
    """Mean y over samples at each ``x`` per method, shaded bootstrap interval; a panel per
    metric."""
    table = curve_table(rows.assign(stage_index=rows[x], stage=rows[x].astype(str)))
    present = [m for m in metrics if m in set(table["metric"])]
    with paper_style():
        fig = Figure(figsize=(3.4 * len(present) + 1.8, 3.4), layout="constrained")
        axes = fig.subplots(1, len(present), squeeze=False).ravel()
        for ax, metric in zip(axes, present):
            part = table[table["metric"] == metric]
            for method in method_order(part["method"].unique()):
                line = part[part["method"] == method].sort_values("stage_index")
                style = method_style(method)
                ax.fill_between(line["stage_index"], line["low"], line["high"],
                                color=style["color"], alpha=0.15, linewidth=0)
                ax.plot(line["stage_index"], line["mean"], label=method, linewidth=1.3,
                        color=style["color"], linestyle=style["linestyle"])
            ax.set_title(metric.replace("_", " "))
            ax.set_ylim(-0.05, 1.05)  # every curve is a probability, a share or normalized
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].set_ylabel(ylabel)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", frameon=False, title="method")
        if title:
            fig.suptitle(title)
    return fig


def auc_bars(rows: pd.DataFrame, metrics: tuple[str, ...], title: str = "") -> Figure:
    """A panel per AUC metric: one bar per method, mean over samples and 95 % bootstrap interval."""
    table = curve_table(rows.assign(stage_index=0, stage="original"))
    present = [m for m in metrics if m in set(table["metric"])]
    methods = method_order(table["method"].unique())
    with paper_style():
        fig = Figure(figsize=(len(present) * max(3.0, 0.45 * len(methods) + 1.0) + 0.4, 3.6),
                     layout="constrained")
        axes = fig.subplots(1, len(present), squeeze=False).ravel()
        for ax, metric in zip(axes, present):
            part = pd.DataFrame({"method": methods}).merge(
                table[table["metric"] == metric], how="left")
            mean = part["mean"].to_numpy(float)
            error = np.vstack([mean - part["low"].to_numpy(float),
                               part["high"].to_numpy(float) - mean])
            ax.bar(np.arange(len(methods)), np.nan_to_num(mean),
                   color=[method_style(m)["color"] for m in methods],
                   yerr=np.where(np.isfinite(error), error, 0.0), capsize=2,
                   error_kw={"linewidth": 0.7})
            if CONTROL in methods and np.isfinite(mean[methods.index(CONTROL)]):
                ax.axhline(mean[methods.index(CONTROL)], color="0.3", linewidth=0.8,
                           linestyle="--", zorder=0)
            ax.set_xticks(np.arange(len(methods)), labels=methods, rotation=45, ha="right",
                          rotation_mode="anchor")
            ax.set_title(metric.replace("_", " "))
            ax.grid(axis="y", alpha=0.3, linewidth=0.5)
        if title:
            fig.suptitle(title)
    return fig
