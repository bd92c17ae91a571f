"""Figures of a run directory (Adebayo et al. 2018, arXiv 1810.03292, Figures 2 and 4)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from checks.plotting import curve_table, method_style, randomization_grid, similarity_curves
from checks.uncertainty import bootstrap_interval
from harness.figures import make_figures

REPO = Path(__file__).resolve().parents[1]
METHODS = ["gradient", "smoothgrad"]
STAGES = ["original", "classifier", "conv_head", "blocks.6"]
SAMPLES = [7, 3, 11]  # dataset indices, deliberately not sorted
METRICS = ["ssim", "spearman_abs"]


def _rows(check: str, rng: np.random.Generator) -> pd.DataFrame:
    records = []
    for method in METHODS:
        for index, stage in enumerate(STAGES):
            for sample in SAMPLES:
                for metric in METRICS:
                    value = 1.0 if index == 0 else float(rng.uniform(-1, 1))
                    records.append(dict(run_id="r0", model="tiny_cnn", dataset="digits",
                                        method=method, check=check, stage=stage,
                                        stage_index=index, sample=sample, target=sample % 5,
                                        metric=metric, value=value, seed=0, reason=""))  # fmt: skip
    rows = pd.DataFrame(records)
    # one NaN value, and one (method, metric, stage) that is NaN for every sample
    rows.loc[7, ["value", "reason"]] = [np.nan, "constant map"]  # gradient, stage 1, n = 2
    whole = rows.method.eq("smoothgrad") & rows.metric.eq("spearman_abs") & rows.stage_index.eq(2)
    rows.loc[whole, ["value", "reason"]] = [np.nan, "constant map"]
    return rows


def _write_maps(maps_dir: Path, check: str, rng: np.random.Generator) -> None:
    for method in METHODS:
        for index, stage in enumerate(STAGES):
            path = maps_dir / check / method / f"stage_{index:03d}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            signed = rng.uniform(-1, 1, (len(SAMPLES), 16, 16))
            absolute = np.abs(signed) / np.abs(signed).max(axis=(1, 2), keepdims=True)
            np.savez_compressed(path, absolute=absolute.astype(np.float16),
                                signed=signed.astype(np.float16), stage=np.array(stage),
                                samples=np.array(SAMPLES, dtype=np.int64))  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with rows of two checks (one parquet part each) and maps of the cascading check."""
    rng = np.random.default_rng(0)
    (tmp_path / "rows").mkdir()
    for check in ("cascading", "independent"):
        _rows(check, rng).to_parquet(tmp_path / "rows" / f"part-{check}.parquet")
    _write_maps(tmp_path / "maps", "cascading", rng)
    np.savez_compressed(tmp_path / "maps" / "inputs.npz",
                        images=rng.uniform(0, 1, (len(SAMPLES), 16, 16, 3)).astype(np.float32),
                        samples=np.array(SAMPLES, dtype=np.int64), labels=np.array([1, 0, 4]),
                        class_names=np.array(["one", "zero", "four"]))  # fmt: skip
    return tmp_path


def _assert_figure_files(paths: list[Path], stems: set[str]) -> None:
    assert {p.name for p in paths} == {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")}
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000, path
        if path.suffix == ".pdf":
            assert path.read_bytes().startswith(b"%PDF")
        else:
            height, width = imread(path).shape[:2]
            assert 200 < height < 4000 and 300 < width < 5000, (path, height, width)
    assert not list(paths[0].parent.glob(".*.tmp"))  # atomic writes left nothing behind


def test_make_figures_writes_curves_per_check_and_grids_per_sample(run_dir):
    paths = make_figures(run_dir)
    assert all(p.parent == run_dir / "figures" for p in paths)
    stems = {"cascading_similarity", "independent_similarity"}
    stems |= {f"cascading_grid_sample{s}" for s in SAMPLES}
    _assert_figure_files(paths, stems)


def test_without_maps_only_curves_are_written(run_dir):
    import shutil

    shutil.rmtree(run_dir / "maps")
    (run_dir / "rows" / "part-independent.parquet").unlink()
    paths = make_figures(run_dir)
    _assert_figure_files(paths, {"cascading_similarity"})


def test_without_rows_only_grids_and_empty_dir_gives_nothing(run_dir, tmp_path_factory):
    import shutil

    shutil.rmtree(run_dir / "rows")
    (run_dir / "maps" / "inputs.npz").unlink()  # grids without the input column
    paths = make_figures(run_dir, max_samples=1)
    _assert_figure_files(paths, {f"cascading_grid_sample{SAMPLES[0]}"})
    assert make_figures(tmp_path_factory.mktemp("empty")) == []


def test_curve_table_mean_and_bootstrap_interval(run_dir):
    rows = pd.read_parquet(run_dir / "rows")
    table = curve_table(rows)
    assert list(table.columns) == ["check", "method", "metric", "stage_index", "stage",
                                   "mean", "low", "high", "n"]  # fmt: skip
    assert len(table) == 2 * len(METHODS) * len(METRICS) * len(STAGES)
    for _, line in table.iterrows():
        values = rows.loc[(rows.check == line.check) & (rows.method == line.method)
                          & (rows.metric == line.metric) & (rows.stage_index == line.stage_index),
                          "value"].to_numpy()  # fmt: skip
        finite = values[~np.isnan(values)]
        assert line.stage == STAGES[line.stage_index] and line.n == finite.size
        if finite.size < 2:  # no spread to resample: no band (the figure draws the sample)
            assert np.isnan([line.low, line.high]).all()
            assert finite.size == 1 or np.isnan(line["mean"])
            continue
        np.testing.assert_allclose(line["mean"], finite.mean(), rtol=1e-12)
        # a mean of resamples lies between the smallest and the largest value
        assert finite.min() - 1e-12 <= line.low <= line["mean"] <= line.high <= finite.max() + 1e-12
        key = (line.check, line.method, line.metric, line.stage_index, line.stage)
        assert (line.low, line.high) == bootstrap_interval(finite, 0, key)  # seeded: repeatable
    assert set(table.n) == {0, 2, 3}
    groups = table.groupby(["check", "method", "metric"])
    assert all(g.stage_index.is_monotonic_increasing for _, g in groups)


def test_curve_table_interval_shrinks_with_level():
    rows = pd.DataFrame(dict(check="cascading", method="gradient", metric="ssim", stage_index=1,
                             stage="fc", value=[0.1, 0.5, 0.3, np.nan, 0.9]))  # fmt: skip
    wide, narrow = curve_table(rows, level=0.99).iloc[0], curve_table(rows, level=0.5).iloc[0]
    assert wide["mean"] == pytest.approx(0.45) and wide.n == 4
    assert wide.low < narrow.low < wide["mean"] < narrow.high < wide.high


def test_methods_keep_their_colour_across_figures(run_dir):
    table = curve_table(pd.read_parquet(run_dir / "rows"))
    colours = []
    for _, check_table in table.groupby("check"):
        fig = similarity_curves(check_table)
        assert len(fig.axes) == len(METRICS)
        assert all(ax.get_ylim()[0] <= -1 and ax.get_ylim()[1] >= 1 for ax in fig.axes)
        colours.append({line.get_label(): line.get_color() for line in fig.axes[0].get_lines()
                        if line.get_label() in METHODS})  # fmt: skip
    assert colours[0] == colours[1] == {m: method_style(m)["color"] for m in METHODS}
    assert method_style("gradient") != method_style("smoothgrad")
    assert method_style("my_new_method") == method_style("my_new_method")


def test_grid_has_a_row_per_method_and_a_column_per_stage():
    stages = ["original"] + [f"blocks.{i}.conv_pwl" for i in range(17)]
    methods = ["integrated_gradients", "sobel", "new_method"]
    maps = {m: np.random.default_rng(0).uniform(0, 1, (len(stages), 8, 8)) for m in methods}
    maps["sobel"][3] = np.nan  # a missing stage is drawn as "n/a"
    fig = randomization_grid(np.full((8, 8, 1), 0.5), stages, maps, title="t")
    assert len(fig.axes) == len(methods) * (len(stages) + 1)
    top_titles = [fig.axes[i].texts[-1].get_text() for i in range(len(stages) + 1)]
    assert top_titles == ["input"] + stages
    row_labels = [fig.axes[r * (len(stages) + 1)].texts[0].get_text() for r in range(len(methods))]
    assert row_labels == methods  # registered methods in registry order, unknown ones last
    sobel_row = fig.axes[1 * (len(stages) + 1):2 * (len(stages) + 1)]
    assert [t.get_text() for t in sobel_row[4].texts] == ["n/a"]
    assert sobel_row[5].images[0].get_clim() == (0.0, 1.0)
    assert sobel_row[5].images[0].get_cmap().name == "gray"


def test_script_prints_written_paths_from_repo_root(run_dir):
    import shutil

    shutil.rmtree(run_dir / "maps")  # one check's curves keep the subprocess short
    (run_dir / "rows" / "part-independent.parquet").unlink()
    done = subprocess.run([sys.executable, "scripts/figures.py", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = [Path(line) for line in done.stdout.splitlines()]
    assert [p.name for p in printed] == ["cascading_similarity.png", "cascading_similarity.pdf"]
    assert all(p.is_file() for p in printed)
