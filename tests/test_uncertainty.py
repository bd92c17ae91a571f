"""Uncertainty of the summaries (issue #13, item 6; issue #18, item 6): bootstrap intervals
over samples, the paired test against the ``random_uniform`` control, the summary file, the
figures' captions and the sweep figures that draw seeds together."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from checks.plotting import curve_table, similarity_curves
from checks.summary import similarity_summary, similarity_table
from checks.uncertainty import (
    bootstrap_interval,
    control_table,
    interval_table,
    paired_test,
    summary_table,
)
from harness.figures import sweep_similarity_figures, swept_settings


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_bootstrap_interval_covers_a_known_mean_at_its_level(level):
    """Skewed data (exponential, mean 1), n = 40, 400 data sets: the share of intervals that
    contain the true mean is the level, within what 400 draws and the percentile bootstrap's
    known small undercoverage at n = 40 allow (binomial sd 0.011 at 0.95, 0.025 at 0.5)."""
    rng = np.random.default_rng(1)
    hits = []
    for k in range(400):
        low, high = bootstrap_interval(rng.exponential(1.0, 40), seed=k, level=level,
                                       resamples=1000)
        hits.append(low <= 1.0 <= high)
    coverage = np.mean(hits)
    assert level - 0.07 <= coverage <= level + 0.05, coverage


def test_bootstrap_interval_edge_cases_and_seeding():
    assert np.isnan(bootstrap_interval(np.array([0.3]))).all()  # n = 1: no band
    assert np.isnan(bootstrap_interval(np.array([np.nan, np.nan]))).all()
    assert bootstrap_interval(np.full(5, 0.7)) == (0.7, 0.7)  # no spread: degenerate
    values = np.random.default_rng(0).normal(size=30)
    assert bootstrap_interval(values, 3, ("a",)) == bootstrap_interval(values, 3, ("a",))
    assert bootstrap_interval(values, 3, ("a",)) != bootstrap_interval(values, 4, ("a",))
    wide, narrow = bootstrap_interval(values, level=0.99), bootstrap_interval(values, level=0.5)
    assert wide[0] < narrow[0] < values.mean() < narrow[1] < wide[1]


def _stage_rows(seed: int = 0, n: int = 12) -> pd.DataFrame:
    """A cascade of 3 stages: ``gradient`` falls from 1 to the control's level at stage 2,
    ``sobel`` stays at 1, the control ``random_uniform`` is noise around 0."""
    rng = np.random.default_rng(seed)
    records = []
    for stage_index, stage in enumerate(["original", "fc", "conv1"]):
        for sample in range(n):
            noise = rng.normal(0, 0.05, 3)
            level = {0: 1.0, 1: 0.6}.get(stage_index)
            # at the last stage, the control's value -/+ 0.01 by turns: no difference to find
            gradient = level + noise[0] if level else noise[2] \
                + (0.01 if sample % 2 else -0.01)
            for method, value in [("gradient", gradient), ("sobel", 1.0),
                                  ("random_uniform", noise[2])]:
                records.append(dict(check="cascading", method=method, metric="ssim",
                                    stage_index=stage_index, stage=stage, sample=sample,
                                    value=value, seed=0))
    return pd.DataFrame(records)


def test_interval_table_is_independent_of_row_order_and_other_groups():
    rows = _stage_rows()
    table = interval_table(rows)
    shuffled = interval_table(rows.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(table, shuffled)
    alone = interval_table(rows[rows.method == "gradient"])
    pd.testing.assert_frame_equal(alone.reset_index(drop=True),
                                  table[table.method == "gradient"].reset_index(drop=True))


def test_paired_test_equals_scipy_and_flags_the_stage_that_reached_the_control():
    x, c = np.random.default_rng(0).normal(size=(2, 15))
    assert paired_test(x + 0.5, c) == pytest.approx(stats.wilcoxon(x + 0.5 - c).pvalue, rel=1e-12)
    assert paired_test(np.ones(8), np.ones(8)) == 1.0  # nothing to tell apart
    assert paired_test(np.ones(5), np.zeros(5)) > 0.05  # 5 inputs cannot reach p < 0.05
    rows = _stage_rows()
    tests = control_table(rows).set_index(["method", "stage_index"])
    assert tests.loc[("gradient", 0), "distinguishable"]
    assert tests.loc[("gradient", 1), "distinguishable"]
    assert not tests.loc[("gradient", 2), "distinguishable"]  # fell to the control's level
    assert tests.loc[("sobel", 2), "distinguishable"]  # model-independent: never falls
    assert "random_uniform" not in tests.index.get_level_values("method")
    # pairs by sample: shuffling the rows changes nothing
    again = control_table(rows.sample(frac=1.0, random_state=1)).set_index(
        ["method", "stage_index"])
    pd.testing.assert_series_equal(tests["p_vs_control"], again.loc[tests.index, "p_vs_control"])


def test_summary_text_and_table_give_intervals_and_the_control_flag():
    rows = _stage_rows()
    text = similarity_summary(rows)
    assert "95% bootstrap interval" in text and "not distinguishable from random_uniform" in text
    table = similarity_table(rows).set_index(["method", "metric"])
    assert table.loc[("gradient", "ssim"), "~random from"] == "2 conv1"
    assert table.loc[("sobel", "ssim"), "~random from"] == "never"
    assert table.loc[("gradient", "ssim"), "2"].endswith("~")
    assert table.loc[("sobel", "ssim"), "2"] == "1.000 [1.00,1.00]"
    without = similarity_summary(rows[rows.method != "random_uniform"])
    assert "add random_uniform to method=" in without and "~random from" not in without
    few = similarity_summary(rows[rows["sample"] < 4])  # 4 inputs: no test can reach p < 0.05
    assert "with n = 4 inputs no stage can be told from random_uniform" in few
    assert "~" not in few.split("\n", 2)[2]  # no marks, no "~random from" column
    summary = summary_table(rows, seed=0)
    assert {"mean", "low", "high", "n", "p_vs_control", "distinguishable", "level"} <= set(summary)


def test_run_writes_the_summary_file_and_figures_name_their_band(tmp_path):
    from harness.api import evaluate

    rows = evaluate("tiny_cnn", "digits", methods=["gradient", "random_uniform"],
                    metrics=["ssim"], run_dir=tmp_path, dataset_n=6, model_weights="random",
                    progress=False)
    summary = pd.read_parquet(tmp_path / "summary.parquet")
    stages = rows["stage_index"].nunique()
    assert len(summary) == 2 * stages and set(summary["n"]) == {6}
    expected = interval_table(rows, seed=0)
    pd.testing.assert_frame_equal(summary[expected.columns].reset_index(drop=True),
                                  expected.reset_index(drop=True))
    fig = similarity_curves(curve_table(rows), samples=rows)
    legend = fig.legends[0].get_title().get_text()
    assert "95 % bootstrap interval over n = 6 samples" in legend and "thin lines" in legend
    thin = [line for line in fig.axes[0].get_lines() if line.get_label() == "_nolegend_"]
    assert len(thin) == 2 * 6  # a line per method and sample


def test_sweep_figures_draw_seeds_as_bands_and_settings_as_panels(tmp_path):
    jobs = []
    for k, (seed, order) in enumerate([(0, "top_down"), (1, "top_down"), (0, "bottom_up"),
                                       (1, "bottom_up")]):
        job = tmp_path / str(k)
        job.mkdir()
        config = {"seed": seed, "check": {"order": order}, "dataset": {"shard": 0}}
        (job / "run.json").write_text(json.dumps({"run_id": f"r{k}", "config": config}))
        jobs.append(job)
    settings = swept_settings(jobs)
    assert settings == {"r0": "check.order=top_down", "r1": "check.order=top_down",
                        "r2": "check.order=bottom_up", "r3": "check.order=bottom_up"}
    parts = []
    for k in range(4):
        part = _stage_rows(seed=k).assign(seed=k % 2, run_id=f"r{k}")
        parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    figures = dict(sweep_similarity_figures(rows, settings))
    assert list(figures) == ["cascading_ssim_sweep"]
    fig = figures["cascading_ssim_sweep"]
    assert sorted(ax.get_title() for ax in fig.axes) == ["check.order=bottom_up",
                                                         "check.order=top_down"]
    assert "over n = 2 seeds" in fig.legends[0].get_title().get_text()
    only_seeds = dict(sweep_similarity_figures(rows, {f"r{k}": "" for k in range(4)}))
    assert list(only_seeds) == ["cascading_similarity_seeds"]
    assert list(sweep_similarity_figures(rows[rows.seed == 0].assign(run_id="r0"),
                                         {"r0": ""})) == []  # one job: nothing to draw together
    # a sweep over checks (binder2023): each check has one job, nothing to draw together
    other = rows[(rows.seed == 0) & (rows.run_id == "r0")].assign(check="deletion_insertion",
                                                                   run_id="r1")
    two_checks = pd.concat([rows[(rows.seed == 0) & (rows.run_id == "r0")], other])
    assert list(sweep_similarity_figures(two_checks, {"r0": "check=cascading",
                                                      "r1": "check=deletion_insertion"})) == []
