"""The figure driver: every figure of a run directory, regenerated from its tables and maps
(no model needed).

:func:`make_figures` reads ``<run_dir>/rows/`` and ``<run_dir>/maps/``, gives each check's rows
and maps (a :class:`harness.base.context.FigureData`) to the figure functions the check declared
at registration (``CheckFacts.figures``), and writes what they draw as PNG and PDF files into
``<run_dir>/figures/``. It names no check: a new check brings its own figures. A run directory
holds one model and one dataset.

:func:`make_sweep_figures` draws across the jobs of a sweep, into ``<sweep_dir>/figures/``: for
every two checks of the sweep that declare headline metrics (``CheckFacts.headline``), on the
same model and dataset, one check's headline scores against the other's, a point per method;
and every check's similarity curves with the jobs together: seeds as a band over seeds, other
swept keys as panels.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from checks import CHECKS
from checks.plotting import (
    curve_table,
    grid_figures,
    headline_scatter,
    metric_title,
    paper_style,
    similarity_curves,
    similarity_figure,
)
from harness.base.context import CheckFacts, FigureData
from harness.manifest import read_rows
from metrics import METRICS

PNG_DPI = 150
GRID_SAMPLES = 3
# the figures of a check this process does not know (e.g. a user's, registered elsewhere)
GENERIC = CheckFacts(figures=(similarity_figure, grid_figures))


def make_figures(
    run_dir: Path | str, *, max_samples: int = GRID_SAMPLES, normalization: str = "absolute"
) -> list[Path]:
    """Write every figure the run's data allows into ``<run_dir>/figures/``; return the paths.

    For each check in ``rows/`` or ``maps/``, the figures its registration declares, from its
    rows and the maps of its first ``max_samples`` saved samples. A figure whose data is absent
    is skipped without error.
    """
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    written = []
    for check in checks_of(run_dir, rows):
        facts = CHECKS.facts(check) if check in CHECKS else GENERIC
        data = figure_data(run_dir, check, rows, facts, max_samples, normalization)
        for figure_fn in facts.figures:
            for stem, fig in figure_fn(data):
                written += save_figure(fig, run_dir / "figures" / stem)
    return written


def make_sweep_figures(sweep_dir: Path | str, jobs: list[Path]) -> list[Path]:
    """Write the figures across the sweep's ``jobs`` into ``<sweep_dir>/figures/``: per model
    and dataset, ``<check a>_vs_<check b>`` for every two checks with headline scores (in order
    of first appearance). Returns the paths; none when fewer than two such checks ran."""
    tables = [t for t in (load_rows(job) for job in jobs) if t is not None]
    if not tables:
        return []
    rows = pd.concat(tables, ignore_index=True)
    groups = list(rows.groupby(["model", "dataset"], sort=False))
    written = []
    for (model, dataset), part in groups:
        headline = headline_tables(part)
        suffix = f"_{model}_{dataset}" if len(groups) > 1 else ""
        for a, b in itertools.combinations(headline, 2):
            fig = headline_scatter(headline[b], headline[a], _title(b, headline),
                                   _title(a, headline), f"{model} on {dataset}")
            written += save_figure(fig, Path(sweep_dir) / "figures" / f"{a}_vs_{b}{suffix}")
    for stem, fig in sweep_similarity_figures(rows, swept_settings(jobs)):
        written += save_figure(fig, Path(sweep_dir) / "figures" / stem)
    return written


NOT_SWEPT = ("seed", "dataset.shard")  # seeds are drawn as bands; shards are one run's samples


def swept_settings(jobs: list[Path]) -> dict[str, str]:
    """run_id -> "key=value, ..." of the config keys that differ between the finished jobs
    (except the seed and the shard); "" when only those differ."""
    configs = {}
    for job in jobs:
        record = job / "run.json"
        if record.is_file():
            payload = json.loads(record.read_text())
            configs[payload["run_id"]] = _flatten(payload.get("config", {}))
    keys = sorted({k for c in configs.values() for k in c} - set(NOT_SWEPT))
    varying = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
    return {run_id: ", ".join(f"{k}={c.get(k)}" for k in varying)
            for run_id, c in configs.items()}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sweep_similarity_figures(rows: pd.DataFrame, settings: dict[str, str]
                             ) -> Iterator[tuple[str, Figure]]:
    """The jobs of a sweep together, per check with similarity rows: the mean over samples of
    each seed, averaged over the seeds with a bootstrap band over seeds (a thin line per seed).
    Without other swept keys, a panel per metric (``<check>_similarity_seeds``); with them, a
    figure per metric with a panel per setting (``<check>_<metric>_sweep``)."""
    rows = rows[rows["metric"].isin(list(METRICS)) & (rows["sample"] >= 0)]
    if rows.empty or rows["seed"].nunique() < 2 and len(set(settings.values())) < 2:
        return
    rows = rows.assign(setting=rows["run_id"].map(settings).fillna(""))
    keys = ["check", "setting", "method", "metric", "stage_index", "stage", "seed"]
    per_seed = rows.groupby(keys, sort=False, observed=True)["value"].mean().reset_index()
    per_seed = per_seed.rename(columns={"seed": "sample"})  # the unit the band is over
    for check, own in per_seed.groupby("check", sort=False):
        if own["sample"].nunique() < 2 and own["setting"].nunique() < 2:
            continue  # one job of this check (the sweep varied another check): its own figures
        title = CHECKS.facts(check).title if check in CHECKS else str(check)
        if own["setting"].nunique() == 1:
            table = curve_table(own.drop(columns=["check", "setting"]), seed=0)
            yield f"{check}_similarity_seeds", similarity_curves(
                table, f"{title}: {own['sample'].nunique()} seeds", own, unit="seeds")
            continue
        for metric, part in own.groupby("metric", sort=False):
            panels = part.assign(metric=part["setting"])  # a panel per swept setting
            table = curve_table(panels.drop(columns=["check", "setting"]), seed=0)
            yield f"{check}_{metric}_sweep", similarity_curves(
                table, f"{title}: {metric_title(str(metric))} per setting", panels, unit="seeds")


def headline_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """check -> mean and bootstrap interval per method and headline metric at the check's last stage
    (:func:`checks.plotting.curve_table`), for the checks of ``rows`` (one model and dataset)
    that declare headline metrics and have rows of them."""
    tables = {}
    for check in dict.fromkeys(rows["check"]):
        metrics = CHECKS.facts(check).headline if check in CHECKS else ()
        own = rows[(rows["check"] == check) & rows["metric"].isin(metrics)
                   & (rows["sample"] >= 0)]
        if own.empty:
            continue
        own = own[own["stage_index"] == own["stage_index"].max()]
        tables[check] = curve_table(own[["method", "metric", "stage_index", "stage", "value"]])
    return tables


def _title(check: str, tables: dict[str, pd.DataFrame]) -> str:
    """The check's title and the stage its scores are read at."""
    stage = tables[check]["stage"].iloc[0]
    return f"{CHECKS.facts(check).title or check} ({stage})"


def checks_of(run_dir: Path, rows: pd.DataFrame | None) -> list[str]:
    """The checks with rows or maps in the run dir, in order of first appearance."""
    names = [] if rows is None or "check" not in rows else list(rows["check"].unique())
    maps_dir = run_dir / "maps"
    if maps_dir.is_dir():
        names += sorted(d.name for d in maps_dir.iterdir() if d.is_dir())
    return list(dict.fromkeys(str(n) for n in names))


def figure_data(run_dir: Path, check: str, rows: pd.DataFrame | None, facts: CheckFacts,
                max_samples: int, normalization: str) -> FigureData:
    """A check's rows and the maps of its first ``max_samples`` saved samples."""
    own = rows[rows["check"] == check] if rows is not None and "check" in rows else \
        pd.DataFrame(columns=["check", "method", "metric", "stage", "stage_index", "value"])
    heading = facts.title or check
    data = FigureData(check=check, title=_with_model(heading, rows), heading=heading,
                      rows=own, normalization=normalization)
    check_dir = run_dir / "maps" / check
    samples = _first_samples(check_dir, max_samples) if check_dir.is_dir() else data.samples
    if samples.size:
        data.stage_names, data.maps = load_check_maps(check_dir, samples, normalization)
        inputs = _load_inputs(run_dir / "maps" / "inputs.npz")
        shown = [_input_of(inputs, sample) for sample in samples]
        data.samples = samples
        data.images, data.labels = [i for i, _ in shown], [label for _, label in shown]
    return data


def _with_model(heading: str, rows: pd.DataFrame | None) -> str:
    if rows is None:
        return heading
    columns = [c for c in ("model", "dataset") if c in rows and rows[c].nunique() == 1]
    about = [str(rows[c].iloc[0]) for c in columns]
    return f"{heading}: {' on '.join(about)}" if about else heading


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (dpi 150) and ``<stem>.pdf``, each written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{ext}" for ext in ("png", "pdf")]
    with paper_style():
        for path in paths:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fig.savefig(tmp, format=path.suffix[1:], dpi=PNG_DPI, bbox_inches="tight",
                        pad_inches=0.05)  # fmt: skip
            os.replace(tmp, path)
    return paths


def load_rows(run_dir: Path | str) -> pd.DataFrame | None:
    """The run's tidy table (the parts of ``<run_dir>/rows/`` its manifest lists, other files
    ignored), or None when there is none."""
    rows = read_rows(run_dir)
    return None if rows.empty else rows


def load_check_maps(
    check_dir: Path, samples: np.ndarray, normalization: str = "absolute"
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Stage names and maps of one check (``maps/<check>/<method>/stage_<i>.npz``).

    Returns the stage names in ``stage_index`` order and, per method, an array
    (len(samples), n_stages, H, W) float32 of the ``normalization`` maps of the given dataset
    samples; NaN where a method lacks a stage or a sample.
    """
    files = {d.name: _stage_files(d) for d in sorted(check_dir.iterdir()) if d.is_dir()}
    names, loaded = {}, {}
    for method, by_index in files.items():
        for index, path in by_index.items():
            with np.load(path) as npz:
                names.setdefault(index, npz["stage"].item() if "stage" in npz else f"stage {index}")
                loaded[method, index] = _select(npz[normalization], npz["samples"], samples)
    indices = sorted(names)
    blank = np.full_like(next(iter(loaded.values())), np.nan)
    maps = {
        method: np.stack([loaded.get((method, i), blank) for i in indices], axis=1)
        for method in files
        if any((method, i) in loaded for i in indices)
    }
    return [names[i] for i in indices], maps


def _stage_files(method_dir: Path) -> dict[int, Path]:
    """stage_index -> file, from names ``stage_<index>.npz``."""
    return {int(p.stem.split("_", 1)[1]): p for p in sorted(method_dir.glob("stage_*.npz"))}


def _first_samples(check_dir: Path, count: int) -> np.ndarray:
    """The first ``count`` dataset indices saved for the original model (lowest stage file)."""
    for method_dir in sorted(d for d in check_dir.iterdir() if d.is_dir()):
        files = _stage_files(method_dir)
        if files:
            with np.load(files[min(files)]) as npz:
                return np.asarray(npz["samples"], dtype=np.int64)[:count]
    return np.zeros(0, dtype=np.int64)


def _select(values: np.ndarray, have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Rows of ``values`` (K, H, W) for the dataset indices ``want``; NaN rows where absent."""
    out = np.full((len(want),) + values.shape[1:], np.nan, dtype=np.float32)
    position = {int(s): i for i, s in enumerate(have)}
    for j, sample in enumerate(want):
        if int(sample) in position:
            out[j] = values[position[int(sample)]]
    return out


def _load_inputs(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def _input_of(inputs: dict[str, np.ndarray] | None, sample: int) -> tuple[np.ndarray | None, str]:
    """The display image of a dataset sample and a caption suffix naming its label."""
    if inputs is None or int(sample) not in inputs["samples"]:
        return None, ""
    i = int(np.flatnonzero(inputs["samples"] == sample)[0])
    if len(inputs.get("class_names", ())) > i:
        return inputs["images"][i], f" ({inputs['class_names'][i]})"
    if "labels" in inputs:
        return inputs["images"][i], f" (label {int(inputs['labels'][i])})"
    return inputs["images"][i], ""


# ------------------------------------------------------------------- Figures 5/6: random labels


def main(argv: list[str] | None = None) -> int:
    """``sanity figures RUN_DIR|SWEEP_DIR ...`` (also ``sanity-figures``, ``scripts/figures.py``):
    regenerate the figures of run dirs (a sweep dir stands for all its job dirs) and print the
    path of every file written. Exit status 1 when a given path is not a directory."""
    import argparse
    import sys

    from harness.collect import run_dirs

    parser = argparse.ArgumentParser(
        prog="sanity figures", description="Regenerate the paper figures of run directories "
        "from their tables and maps (no training).")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR|SWEEP_DIR")
    args = parser.parse_args(argv)
    status = 0
    for given in args.dirs:
        if not given.is_dir():
            print(f"error: {given} is not a directory", file=sys.stderr)
            status = 1
            continue
        jobs = run_dirs(given)
        for path in make_sweep_figures(given, jobs) if len(jobs) > 1 else []:
            print(path)
        for run_dir in jobs or [given]:
            paths = make_figures(run_dir)
            if not paths:
                print(f"{run_dir}: nothing to plot (no rows/ and no maps/)", file=sys.stderr)
            for path in paths:
                print(path)
    return status
