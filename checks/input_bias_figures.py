"""Figures of the input-bias probe (Brocki & Chung 2020, "Input Bias in Rectified Gradients and
Modified Saliency Maps", arXiv 2011.05002): the bias of each method as bars; its similarity
curves and map grids are those of the randomization test with the shifts and rescalings as
stages. Drawn from a :class:`harness.base.context.FigureData`; no file I/O.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from checks.plotting import curve_table, method_order, method_style, paper_style
from harness.base.context import FigureData

HATCHES = ("", "///", "...", "xxx", "\\\\\\")


def bias_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """``dark_mass_ratio`` per input encoding and ``mass_in_object`` per object polarity."""
    bias = data.rows[data.rows["metric"].isin(("dark_mass_ratio", "mass_in_object"))]
    if len(bias):
        yield f"{data.check}_bias", input_bias_bars(bias, data.title)


def input_bias_bars(rows: pd.DataFrame, title: str = "") -> Figure:
    """The input bias of each method (Brocki & Chung 2020, arXiv 2011.05002): grouped bars,
    mean over samples with a 95 % bootstrap interval.

    * ``dark_mass_ratio`` (attribution mass in the darkest pixels / their share; 1 = no bias),
      one bar per input encoding the model was given: the original and every ``scale=``
      stage (the blind spot moves with the encoding's zero);
    * ``mass_in_object`` (attribution mass inside the object), when present: one bar for dark
      objects on bright backgrounds and one for bright objects on dark ones, original input.
    """
    panels = []
    ratio = rows[(rows["metric"] == "dark_mass_ratio")
                 & ((rows["stage_index"] == 0) | rows["stage"].str.startswith("scale="))]
    if len(ratio):
        ratio = ratio.assign(stage=ratio["stage"].replace("original", "model's own encoding"))
        panels.append(("dark mass ratio (1 = no bias)", ratio, "stage", 1.0))
    inside = rows[(rows["metric"] == "mass_in_object") & (rows["stage_index"] == 0)]
    if len(inside):
        inside = inside.assign(objects=inside["polarity"].astype(str) + " objects")
        panels.append(("attribution mass in the object", inside, "objects", None))
    methods = method_order(rows["method"].unique())
    with paper_style():
        fig = Figure(figsize=(len(panels) * max(3.4, 0.55 * len(methods) + 1.2) + 0.4, 3.8),
                     layout="constrained")
        axes = fig.subplots(1, max(1, len(panels)), squeeze=False).ravel()
        for ax, (label, table, group, reference) in zip(axes, panels):
            _grouped_bars(ax, table, group, methods)
            ax.set_title(label)
            if reference is not None:
                ax.axhline(reference, color="0.3", linewidth=0.8, linestyle="--", zorder=0)
        if title:
            fig.suptitle(title)
    return fig


def _grouped_bars(ax, table: pd.DataFrame, group: str, methods: list[str]) -> None:
    """Bars per method (x) and per value of ``group`` (hatched shades), mean and bootstrap
    interval."""
    groups = list(dict.fromkeys(table.sort_values("stage_index")[group].astype(str)))
    stats = curve_table(table.assign(stage=table[group].astype(str), stage_index=0))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(methods))
    colors = [method_style(m)["color"] for m in methods]
    handles = []
    for j, name in enumerate(groups):
        part = pd.DataFrame({"method": methods}).merge(stats[stats["stage"] == name], how="left")
        mean = part["mean"].to_numpy(float)
        error = np.vstack([mean - part["low"].to_numpy(float), part["high"].to_numpy(float) - mean])
        hatch = HATCHES[j % len(HATCHES)]
        ax.bar(x - 0.4 + width * (j + 0.5), np.nan_to_num(mean), width, color=colors,
               hatch=hatch, edgecolor="0.25", linewidth=0.4, capsize=1.5,
               yerr=np.where(np.isfinite(error), error, 0.0), error_kw={"linewidth": 0.6})
        handles.append(Patch(facecolor="white", edgecolor="0.25", hatch=hatch, label=name))
    ax.set_xticks(x, labels=methods, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax.legend(handles=handles, frameon=False, fontsize=7)
