"""End-of-run summaries: the text the CLI prints after a run, from the run's rows (pandas only).

A check declares its own (``CheckFacts.summary``); :func:`similarity_summary` is the default.
"""
from __future__ import annotations

import pandas as pd

from metrics import METRICS


def similarity_summary(rows: pd.DataFrame) -> str:
    """Mean similarity per method and metric at the original and the last stage (rows of
    registered metrics only; a check's own measurements have their own summary)."""
    rows = rows[rows["metric"].isin(list(METRICS))]
    if rows.empty:
        return ""
    last = rows["stage_index"].max()
    picked = rows[rows["stage_index"].isin([0, last])]
    table = picked.pivot_table(index="method", columns=["metric", "stage_index"], values="value",
                               aggfunc="mean")
    return table.round(3).to_string()


def measurement_summary(rows: pd.DataFrame, metrics: tuple[str, ...], index: str = "method",
                        digits: int = 3) -> str:
    """Mean of a check's own measurements (``metrics``) per ``index`` and metric."""
    rows = rows[rows["metric"].isin(metrics)]
    if rows.empty:
        return ""
    table = rows.pivot_table(index=index, columns="metric", values="value", aggfunc="mean",
                             sort=False)
    return table.round(digits).to_string()
