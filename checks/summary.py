"""End-of-run summaries: the text the CLI prints after a run, from the run's rows (pandas only).

A check declares its own (``CheckFacts.summary``); :func:`similarity_summary` is the default.
"""
from __future__ import annotations

import pandas as pd

from metrics import METRICS

DROP_BELOW = 0.5  # "where does it drop?": the first stage whose mean similarity is below this


def similarity_summary(rows: pd.DataFrame) -> str:
    """Mean similarity per method and metric at every stage, one line each with the stage
    values in order, and the first stage where the mean falls below 0.5 (for a randomization
    check: where the method's maps stop resembling the original model's). A header names the
    stages. Rows of registered metrics only (a check's own measurements have their own)."""
    table = similarity_table(rows)
    if table.empty:
        return ""
    stages = ", ".join(table.attrs["stages"])
    text = table.map(lambda v: v if isinstance(v, str) else f"{v:.3f}").to_string(index=False)
    return f"mean similarity per stage ({stages}):\n{text}"


def similarity_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method and metric: its mean similarity at each stage (columns named by the
    stage index, in order) and ``first < 0.5``; ``attrs["stages"]``: "index name" of each."""
    rows = rows[rows["metric"].isin(list(METRICS))]
    if rows.empty:
        return pd.DataFrame()
    names = rows.groupby("stage_index", sort=True)["stage"].first()
    means = rows.pivot_table(index=["method", "metric"], columns="stage_index", values="value",
                             aggfunc="mean", sort=False).reindex(columns=names.index)
    drops = [first_below(line, names) for _, line in means.iterrows()]
    table = means.rename(columns=str).rename_axis(columns=None).reset_index()
    table[f"first < {DROP_BELOW}"] = drops
    table.attrs["stages"] = [f"{i} {name}" for i, name in names.items()]
    return table


def first_below(means: pd.Series, names: pd.Series, threshold: float = DROP_BELOW) -> str:
    """``"2 conv1"``: the first stage (index and name) whose mean is below ``threshold``."""
    below = means[means < threshold]
    return f"{below.index[0]} {names[below.index[0]]}" if len(below) else "never"


def measurement_summary(rows: pd.DataFrame, metrics: tuple[str, ...], index: str = "method",
                        digits: int = 3) -> str:
    """Mean of a check's own measurements (``metrics``) per ``index`` and metric."""
    rows = rows[rows["metric"].isin(metrics)]
    if rows.empty:
        return ""
    table = rows.pivot_table(index=index, columns="metric", values="value", aggfunc="mean",
                             sort=False)
    return table.round(digits).to_string()
