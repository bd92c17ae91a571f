"""Figure of the efficient MPRT (Hedström et al. 2024, arXiv 2401.06465): one bar per method,
the relative rise of its map's histogram entropy from the original to the fully randomized
model (mean over samples, 95 % bootstrap interval); the rise of the output's entropy in the
caption. Higher is better; model-independent maps score 0. No file I/O.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from matplotlib.figure import Figure

from checks.random_logit_figures import method_bars
from harness.base.context import FigureData

RISE_METRICS = ("complexity_rise", "output_entropy_rise")


def rise_figure(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """The complexity rise bars, with the mean output entropy rise in the title."""
    rows = data.rows
    rise = rows[rows["metric"].eq("complexity_rise")]
    if not len(rise):
        return
    values = rise["value"].to_numpy(float)
    finite = values[np.isfinite(values)]
    high = max(1.0, float(finite.max())) if finite.size else 1.0
    low = min(-0.2, float(finite.min())) if finite.size else -0.2
    output = rows.loc[rows["metric"].eq("output_entropy_rise"), "value"].astype(float)
    caption = f"output entropy rise {output.mean():.3f}" if output.notna().any() else ""
    title = "\n".join(t for t in (data.title, caption) if t)
    yield f"{data.check}_complexity_rise", method_bars(
        rise, "(H(e_rand) - H(e)) / H(e)", title, (low - 0.05, high + 0.05))
