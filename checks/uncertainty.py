"""How sure a mean over samples is: bootstrap intervals, and whether a method is still
distinguishable from the model-independent ``random_uniform`` control (pandas, numpy, scipy;
no file I/O).

A randomization curve read by eye ("it drops") is a claim about a mean over a handful of
inputs. Here every mean over samples gets a 95 % percentile bootstrap interval (Efron &
Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13; ``scipy.stats.bootstrap``), seeded
from the run's seed and the group's name, so that a rerun prints the same interval. And per
stage a paired test over samples (Wilcoxon signed-rank, two-sided) says whether a method's
similarity differs from the similarity the ``random_uniform`` control gets at the same stage on
the same inputs (Binder et al. 2023, arXiv 2211.12486, use that control as the floor of a
randomization test): "distinguishable" at the last stage means the method's maps still carry
the original model's structure; a method whose similarity has fallen to the control's is not.
"""
from __future__ import annotations

import warnings
import zlib

import numpy as np
import pandas as pd

LEVEL = 0.95
# resamples: the Monte Carlo error of each end is ~1.5 % of the interval's width (the standard
# error of a 2.5 % quantile of 2,000 draws, 0.06 sd, against a width of 3.92 sd)
RESAMPLES = 2000
ALPHA = 0.05  # the paired test's level
CONTROL = "random_uniform"
KEYS = ("check", "method", "metric", "stage_index", "stage")


def group_seed(seed: int, key: tuple) -> np.random.Generator:
    """A generator for one group: the same interval for the same group in every run with
    ``seed``, whatever other groups the table holds and in whatever order."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(key).encode())])


def bootstrap_interval(values: np.ndarray, seed: int = 0, key: tuple = (), level: float = LEVEL,
                       resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap ``level`` interval of the mean of ``values`` (n,), NaN ignored.

    NaN for fewer than two finite values (no spread to resample: the figures draw the sample
    itself). A group whose values are all equal gets the degenerate interval [v, v].
    """
    finite = np.asarray(values, dtype=float)
    finite = np.sort(finite[np.isfinite(finite)])  # sorted: the same interval in any row order
    if finite.size < 2:
        return float("nan"), float("nan")
    if np.all(finite == finite[0]):
        return float(finite[0]), float(finite[0])
    from scipy import stats  # here: scipy.stats costs a failing command line ~0.5 s

    result = stats.bootstrap((finite,), np.mean, confidence_level=level, n_resamples=resamples,
                             method="percentile", vectorized=True, rng=group_seed(seed, key))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def interval_table(rows: pd.DataFrame, seed: int = 0, level: float = LEVEL,
                   keys: tuple[str, ...] = KEYS) -> pd.DataFrame:
    """Mean over samples with its bootstrap interval per group of ``keys`` present in ``rows``.

    rows: tidy rows with ``value`` (NaN values, rows with a ``reason``, are left out).
    Returns the key columns and ``mean, low, high, n`` (n: finite values), sorted by the keys
    (stages in ``stage_index`` order).
    """
    keys = [k for k in keys if k in rows]
    values = rows["value"].astype(float).replace([np.inf, -np.inf], np.nan)
    records = []
    for key, group in values.groupby([rows[k] for k in keys], sort=True, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        finite = group.to_numpy()[np.isfinite(group.to_numpy())]
        low, high = bootstrap_interval(finite, seed, key, level)
        mean = float(finite.mean()) if finite.size else float("nan")
        records.append((*key, mean, low, high, int(finite.size)))
    return pd.DataFrame(records, columns=[*keys, "mean", "low", "high", "n"])


def paired_test(values: np.ndarray, control: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``values - control`` (n,) paired by sample.

    1.0 when every difference is zero (nothing to tell apart); NaN with no finite pair. With
    n < 6 non-zero differences no p-value reaches 0.05: few inputs cannot show a difference.
    """
    difference = np.asarray(values, float) - np.asarray(control, float)
    difference = difference[np.isfinite(difference)]
    if difference.size == 0:
        return float("nan")
    if not np.any(difference != 0):
        return 1.0
    from scipy import stats

    with warnings.catch_warnings():  # scipy warns that small samples have coarse p-values
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(difference, zero_method="wilcox").pvalue)


def control_table(rows: pd.DataFrame, control: str = CONTROL, alpha: float = ALPHA
                  ) -> pd.DataFrame:
    """Per check, method, metric and stage: ``p_vs_control`` (:func:`paired_test` of the
    method's values against ``control``'s on the same samples) and ``distinguishable``
    (p < ``alpha``). Empty when ``control`` did not run."""
    keys = [k for k in KEYS if k in rows and k != "method"]
    own = rows[rows["method"] != control]
    reference = rows[rows["method"] == control]
    columns = [*keys, "method", "p_vs_control", "distinguishable"]
    if reference.empty or own.empty:
        return pd.DataFrame(columns=columns)
    paired = own.merge(reference[[*keys, "sample", "value"]], on=[*keys, "sample"],
                       suffixes=("", "_control"))
    records = [(*key, paired_test(g["value"].to_numpy(), g["value_control"].to_numpy()))
               for key, g in paired.groupby([*keys, "method"], sort=True, observed=True)]
    table = pd.DataFrame(records, columns=[*keys, "method", "p_vs_control"])
    table["distinguishable"] = table["p_vs_control"] < alpha
    return table[columns]


def summary_table(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The run's summary file: :func:`interval_table` joined with :func:`control_table`
    (``p_vs_control`` and ``distinguishable`` NaN / missing where the control did not run)."""
    intervals = interval_table(rows, seed)
    tests = control_table(rows)
    keys = [k for k in KEYS if k in intervals]
    table = intervals.merge(tests, on=keys, how="left") if len(tests) else intervals.assign(
        p_vs_control=np.nan, distinguishable=pd.NA)
    table["distinguishable"] = table["distinguishable"].astype("boolean")
    table["level"] = LEVEL
    return table
