"""End-of-run summaries: the text the CLI prints after a run, from the run's rows (pandas only).

A check declares its own (``CheckFacts.summary``); :func:`similarity_summary` is the default.
"""
from __future__ import annotations

import pandas as pd

from checks.uncertainty import ALPHA, CONTROL, summary_table
from methods import METHODS
from metrics import METRICS

DROP_BELOW = 0.5  # "where does it drop?": the first stage whose mean similarity is below this
# the fewest samples with which a two-sided signed-rank test can reach p < 0.05 (2 / 2^6)
MIN_TESTABLE = 6


def similarity_summary(rows: pd.DataFrame) -> str:
    """Mean similarity per method and metric at every stage with its 95 % bootstrap interval,
    one line each with the stage values in order; ``~`` marks a stage where the method is not
    distinguishable from the ``random_uniform`` control (paired test over samples,
    :mod:`checks.uncertainty`); then the first stage where the mean falls below 0.5 and the
    first where the method is no longer distinguishable from the control. A header names the
    stages. Rows of registered metrics only (a check's own measurements have their own)."""
    table = similarity_table(rows)
    if table.empty:
        return ""
    stages = ", ".join(table.attrs["stages"])
    text = table.to_string(index=False)
    legend = "mean [95% bootstrap interval] over samples; "
    if table.attrs["control"]:
        legend += f"~: not distinguishable from {CONTROL} (paired Wilcoxon p >= {ALPHA})"
    elif table.attrs["testable"]:
        legend += f"add {CONTROL} to method= to test each stage against the random control"
    else:  # a mark on every cell would say nothing
        legend += (f"with n = {table.attrs['max_n']} inputs no stage can be told from "
                   f"{CONTROL} (p < {ALPHA} needs 6 or more: dataset.n)")
    return f"similarity per stage ({stages}):\n{legend}\n{text}"


def similarity_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per method and metric: "mean [low, high]" at each stage (columns named by the
    stage index, in order; ``~`` appended where not distinguishable from the control),
    ``first < 0.5`` and ``~random from``; ``attrs["stages"]``: "index name" of each,
    ``attrs["control"]``: whether the control ran."""
    rows = rows[rows["metric"].isin(list(METRICS))]
    if rows.empty:
        return pd.DataFrame()
    seed = int(rows["seed"].iloc[0]) if "seed" in rows else 0
    stats = summary_table(rows.drop(columns=["check"], errors="ignore"), seed)
    # a group of fewer samples cannot reach p < ALPHA: it gets no flag (rather than "~")
    few = stats["n"] < MIN_TESTABLE
    stats["distinguishable"] = stats["distinguishable"].astype("boolean").mask(few, pd.NA)
    testable = bool((~few).any())
    names = stats.groupby("stage_index", sort=True)["stage"].first()
    stats["cell"] = [_cell(r) for r in stats.itertuples()]
    cells = stats.pivot(index=["method", "metric"], columns="stage_index", values="cell")
    means = stats.pivot(index=["method", "metric"], columns="stage_index", values="mean")
    rank = {m: i for i, m in enumerate(METHODS)}  # registry order, then a user's own
    order = sorted(rows[["method", "metric"]].drop_duplicates().itertuples(index=False, name=None),
                   key=lambda key: (rank.get(key[0], len(rank)), key[0]))
    cells, means = cells.reindex(index=order, columns=names.index), means.reindex(index=order)
    table = cells.rename(columns=str).rename_axis(columns=None).reset_index()
    table[f"first < {DROP_BELOW}"] = [first_below(line, names) for _, line in means.iterrows()]
    control = stats["distinguishable"].notna().any()
    if control:
        flags = stats.pivot(index=["method", "metric"], columns="stage_index",
                            values="distinguishable").reindex(index=order, columns=names.index)
        table["~random from"] = [first_indistinguishable(line, names)
                                 for _, line in flags.iterrows()]
    table.attrs["stages"] = [f"{i} {name}" for i, name in names.items()]
    table.attrs["control"] = bool(control)
    table.attrs["testable"] = testable
    table.attrs["max_n"] = int(stats["n"].max())
    return table


def _cell(r) -> str:
    """ "0.981 [0.95,1.00]", with "~" when not distinguishable from the control."""
    if r.mean != r.mean:
        return "nan"
    band = f" [{r.low:.2f},{r.high:.2f}]" if r.low == r.low else ""
    flag = r.distinguishable
    mark = "~" if flag is not pd.NA and flag == flag and not flag else ""  # NaN: no control
    return f"{r.mean:.3f}{band}{mark}"


def first_indistinguishable(flags: pd.Series, names: pd.Series) -> str:
    """``"3 conv2"``: the first stage where the method is not distinguishable from the
    control ("never"; "-" for the control itself, which has no flag)."""
    if flags.isna().all():
        return "-"
    below = flags[flags == False]  # noqa: E712 (a nullable boolean)
    return f"{below.index[0]} {names[below.index[0]]}" if len(below) else "never"


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
