"""Paper figures of a run directory, regenerated from its tables and maps (no model needed).

Two figures of Adebayo et al. 2018, "Sanity Checks for Saliency Maps" (arXiv 1810.03292), and
those of the input-bias probe (Brocki & Chung 2020, arXiv 2011.05002):

* :func:`randomization_grid` -- Figure 2: the maps of every method (rows) for one input as the
  model is randomized stage by stage (columns).
* :func:`similarity_curves` -- Figure 4: similarity of each randomized map to the original map,
  per metric, mean over samples with a 95 % interval.
* :func:`input_bias_bars` -- the input bias of each method: ``dark_mass_ratio`` per input
  encoding and ``mass_in_object`` for dark and bright objects (check ``input_bias``); its map
  grids are the Figure 2 grids with the shifts and rescalings as columns.

:func:`make_figures` reads ``<run_dir>/rows/`` and ``<run_dir>/maps/`` and writes PNG and PDF
files into ``<run_dir>/figures/``. Figures are built on :class:`matplotlib.figure.Figure`
directly, not through ``pyplot``: nothing opens a window and no global backend is chosen (PNG is
drawn by Agg, PDF by the pdf backend). A run directory holds one model and one dataset.
"""
from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.special import stdtrit

# Methods in the order DESIGN.md lists them; each keeps one style in every figure of every run.
KNOWN_METHODS = (
    "gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad",
    "guided_backprop", "gradcam", "guided_gradcam", "cgi", "rectgrad", "nobias_rectgrad",
    "lrp_epsilon", "lrp_alpha_beta", "lrp_epsilon_plus", "guided_ig", "igos_pp",
    "random_uniform", "sobel",
)  # fmt: skip
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # matplotlib tab10  # fmt: skip
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_HATCHES = ("", "///", "...", "xxx", "\\\\\\")

# Metric panels in this order, titled as in the paper's Figure 4 where it has them.
METRIC_TITLES = {
    "spearman_abs": "Rank correlation (abs)",
    "spearman": "Rank correlation (no abs)",
    "hog": "HOGs similarity",
    "ssim": "SSIM",
    "pearson": "Pearson correlation",
}
CHECK_TITLES = {"cascading": "Cascading randomization", "independent": "Independent randomization",
                "random_labels": "Data randomization (random labels)",
                "input_bias": "Input bias (compensated shift / rescaling)"}
RANDOM_LABELS = "random_labels"
INPUT_BIAS = "input_bias"
# rows of the input_bias check that are not similarities of two maps
INPUT_BIAS_METRICS = ("intensity_correlation", "zero_point_correlation", "dark_mass_ratio",
                      "mass_in_object", "max_logit_change")
ACCURACY_METRICS = ("train_accuracy", "test_accuracy")
LABEL_STAGES = {"true_labels": "true labels", "random_labels": "random labels"}
# How a map normalization is shown: colormap, vmin, vmax.
MAP_DISPLAY = {"absolute": ("gray", 0.0, 1.0), "signed": ("bwr", -1.0, 1.0)}

_STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.titlesize": 11,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # TrueType text in PDFs: editable, accepted by journals
}  # fmt: skip
PNG_DPI = 150
GRID_SAMPLES = 3


# --------------------------------------------------------------------------- entry point


def make_figures(
    run_dir: Path | str, *, max_samples: int = GRID_SAMPLES, normalization: str = "absolute"
) -> list[Path]:
    """Write every figure the run's data allows into ``<run_dir>/figures/``; return the paths.

    * ``<check>_similarity.{png,pdf}`` per check in ``rows/`` (Figure 4 of arXiv 1810.03292);
    * ``<check>_grid_sample<k>.{png,pdf}`` per check in ``maps/`` for its first ``max_samples``
      samples, ``k`` being the dataset index of the sample (Figure 2);
    * for the input-bias probe (check ``input_bias``), also ``input_bias_bias`` (bars of
      ``dark_mass_ratio`` and ``mass_in_object`` per method, :func:`input_bias_bars`);
    * for the data randomization test (check ``random_labels``), instead:
      ``random_labels_similarity`` (bars per method and metric) and ``random_labels_grid``
      (true-label versus random-label maps, Figures 5 and 6).

    A figure whose data is absent (no ``rows/``, no ``maps/``) is skipped without error.
    """
    run_dir = Path(run_dir)
    out = run_dir / "figures"
    written = []
    rows = load_rows(run_dir)
    if rows is not None and len(rows):
        random_labels = (rows["check"] if "check" in rows else pd.Series("", rows.index)).eq(
            RANDOM_LABELS)
        similarity = ~random_labels & ~rows["metric"].isin(INPUT_BIAS_METRICS)
        if similarity.any():
            for check, table in curve_table(rows[similarity]).groupby(
                    "check", sort=False, observed=True):
                fig = similarity_curves(table, title=_curve_title(str(check), rows))
                written += save_figure(fig, out / f"{check}_similarity")
        if random_labels.any():
            fig = random_label_bars(rows[random_labels], title=_curve_title(RANDOM_LABELS, rows))
            written += save_figure(fig, out / f"{RANDOM_LABELS}_similarity")
        bias = rows["metric"].isin(("dark_mass_ratio", "mass_in_object"))
        if bias.any():
            fig = input_bias_bars(rows[bias], title=_curve_title(INPUT_BIAS, rows))
            written += save_figure(fig, out / f"{INPUT_BIAS}_bias")
    for check_dir in _check_dirs(run_dir / "maps"):
        if check_dir.name == RANDOM_LABELS:
            written += _write_random_label_grid(check_dir, out, max_samples, normalization)
        else:
            written += _write_grids(check_dir, out, max_samples, normalization)
    return written


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (dpi 150) and ``<stem>.pdf``, each written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{ext}" for ext in ("png", "pdf")]
    with _style():
        for path in paths:
            tmp = path.with_name(f".{path.name}.tmp")
            fig.savefig(tmp, format=path.suffix[1:], dpi=PNG_DPI, bbox_inches="tight",
                        pad_inches=0.05)  # fmt: skip
            os.replace(tmp, path)
    return paths


# --------------------------------------------------------------------------- Figure 4: curves


def load_rows(run_dir: Path | str) -> pd.DataFrame | None:
    """The run's tidy table (``<run_dir>/rows/``), or None when there is none."""
    rows_dir = Path(run_dir) / "rows"
    if not rows_dir.is_dir() or not any(rows_dir.rglob("*.parquet")):
        return None
    return pd.read_parquet(rows_dir)


def curve_table(rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Mean similarity over samples per (check, method, metric, stage) with a t-interval.

    The interval is the Student t confidence interval of the mean,
    ``mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (ddof=1) of the ``n`` finite values. NaN values (rows with a ``reason``) are ignored; with
    ``n < 2`` the interval is NaN, with ``n == 0`` the mean too.

    Returns columns ``check, method, metric, stage_index, stage, mean, low, high, n`` (``check``
    only when ``rows`` has it), sorted by those keys, so stages come in ``stage_index`` order.
    """
    keys = [k for k in ("check", "method", "metric", "stage_index", "stage") if k in rows]
    values = rows["value"].astype(float).replace([np.inf, -np.inf], np.nan)
    grouped = values.groupby([rows[k] for k in keys], sort=True, observed=True)
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    n = table["count"].to_numpy()
    quantile = stdtrit(np.maximum(n - 1, 1), (1 + level) / 2)  # Student t quantile
    half = np.where(n >= 2, quantile * table["std"].to_numpy() / np.sqrt(np.maximum(n, 1)), np.nan)
    table["low"], table["high"] = table["mean"] - half, table["mean"] + half
    return table.rename(columns={"count": "n"})[keys + ["mean", "low", "high", "n"]]


def similarity_curves(table: pd.DataFrame, title: str = "") -> Figure:
    """Figure 4 of Adebayo et al. 2018 (arXiv 1810.03292): similarity to the original map.

    ``table`` is :func:`curve_table` output for one check. One panel per metric; x = stages in
    ``stage_index`` order (labelled with the stage names), y = similarity; one line per method
    (mean over samples) with its shaded 95 % Student t-interval. The y-range covers [-1, 1].
    """
    metrics = _ordered(table["metric"].unique(), list(METRIC_TITLES))
    stages = table[["stage_index", "stage"]].drop_duplicates("stage_index")
    stages = stages.sort_values("stage_index")
    ncols = 2 if len(metrics) == 4 else min(len(metrics), 3)  # 4 panels as 2 x 2: less squat
    nrows = math.ceil(len(metrics) / ncols)
    panel_width = max(3.2, 0.22 * len(stages) + 1.0)
    with _style():
        fig = Figure(figsize=(ncols * panel_width + 1.8, nrows * 3.4 + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            _draw_metric(ax, table[table["metric"] == metric], stages)
            ax.set_title(METRIC_TITLES.get(metric, metric))
        for ax in axes[len(metrics):]:
            ax.set_axis_off()
        for ax in axes[::ncols]:
            ax.set_ylabel("similarity to original map")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", frameon=False, title="method")
        if title:
            fig.suptitle(title)
    return fig


def _draw_metric(ax, table: pd.DataFrame, stages: pd.DataFrame) -> None:
    for method in method_order(table["method"].unique()):
        line = stages.merge(table[table["method"] == method], how="left")  # NaN: missing stage
        style = method_style(method)
        x = line["stage_index"].to_numpy(float)
        ax.fill_between(x, line["low"], line["high"], color=style["color"], alpha=0.15, linewidth=0)
        ax.plot(x, line["mean"], label=method, linewidth=1.4, markersize=3.5, **style)
    small = len(stages) > 12
    ax.set_xticks(stages["stage_index"], labels=stages["stage"], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=7 if small else 8)  # fmt: skip
    ax.set_xlim(stages["stage_index"].min() - 0.4, stages["stage_index"].max() + 0.4)
    ax.set_ylim(*_similarity_range(table))
    ax.set_yticks([-1.0, -0.5, 0.0, 0.5, 1.0])
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":", zorder=0)
    ax.grid(alpha=0.3, linewidth=0.5)


def _similarity_range(table: pd.DataFrame) -> tuple[float, float]:
    """[-1, 1] (the range of every similarity metric), widened only if a mean leaves it.

    Intervals of means near the bounds may reach past them; they are cut at the frame.
    """
    values = table["mean"].to_numpy(float)
    finite = values[np.isfinite(values)]
    low = min(-1.0, finite.min()) if finite.size else -1.0
    high = max(1.0, finite.max()) if finite.size else 1.0
    return low - 0.05, high + 0.05


def _curve_title(check: str, rows: pd.DataFrame) -> str:
    title = CHECK_TITLES.get(check, check)
    columns = [c for c in ("model", "dataset") if c in rows and rows[c].nunique() == 1]
    about = [str(rows[c].iloc[0]) for c in columns]
    return f"{title}: {' on '.join(about)}" if about else title


# --------------------------------------------------------------------------- Figure 2: grids


def randomization_grid(
    image: np.ndarray | None,
    stage_names: list[str],
    maps: Mapping[str, np.ndarray],
    title: str = "",
    normalization: str = "absolute",
) -> Figure:
    """Figure 2 of Adebayo et al. 2018 (arXiv 1810.03292): maps under progressive randomization.

    image: (H, W, 3), (H, W, 1) or (H, W) in [0, 1], shown in a first "input" column of every
        row; None leaves the column out.
    stage_names: column titles in ``stage_index`` order, the first being the original model.
    maps: method -> (len(stage_names), H, W) maps of one sample; an all-NaN map is a missing
        stage (drawn as "n/a"). Shown with ``MAP_DISPLAY[normalization]`` (absolute: grayscale,
        0 = black, 1 = white).
    Rows are methods (in :func:`method_order`); with many columns the titles are rotated.
    """
    methods = method_order(maps)
    columns = (["input"] if image is not None else []) + list(stage_names)
    layout = _GridLayout(len(methods), columns, methods)
    with _style():
        fig = Figure(figsize=layout.figsize)
        fig.subplots_adjust(**layout.margins)
        axes = fig.subplots(len(methods), len(columns), squeeze=False)
        for ax_row, method in zip(axes, methods):
            cells = ax_row[1:] if image is not None else ax_row
            if image is not None:
                _show_image(ax_row[0], image)
            for ax, stage_map in zip(cells, maps[method]):
                _show_map(ax, stage_map, normalization)
            ax_row[0].text(-0.08, 0.5, method, transform=ax_row[0].transAxes, ha="right",
                           va="center")  # fmt: skip
        for ax, name in zip(axes[0], columns):
            layout.column_title(ax, name)
        if title:
            fig.suptitle(title, y=1.0 - 0.08 / layout.figsize[1], va="top")
    return fig


class _GridLayout:
    """Sizes of a :func:`randomization_grid` in inches: with many columns, smaller cells."""

    def __init__(self, nrows: int, columns: list[str], methods: list[str]):
        ncols = len(columns)
        longest_title = max(len(c) for c in columns)
        self.rotate = ncols > 8 or longest_title > 12
        cell = 1.0 if ncols <= 8 else 0.75
        left = 0.075 * max(len(m) for m in methods) + 0.25
        titles = 0.035 * longest_title + 0.2 if self.rotate else 0.3
        top = titles + 0.3  # column titles, then the suptitle
        right = 0.035 * longest_title if self.rotate else 0.1  # the last rotated title leans right
        width, height = left + ncols * cell * 1.05 + right, top + nrows * cell * 1.05 + 0.1
        self.figsize = (width, height)
        self.margins = dict(left=left / width, right=1 - right / width, top=1 - top / height,
                            bottom=0.1 / height, wspace=0.05, hspace=0.05)  # fmt: skip

    def column_title(self, ax, name: str) -> None:
        if self.rotate:
            ax.text(0.3, 1.04, name, transform=ax.transAxes, rotation=45, ha="left", va="bottom",
                    rotation_mode="anchor", fontsize=7)  # fmt: skip
        else:
            ax.text(0.5, 1.04, name, transform=ax.transAxes, ha="center", va="bottom", fontsize=8)


def _show_image(ax, image: np.ndarray) -> None:
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    ax.set_axis_off()


def _show_map(ax, stage_map: np.ndarray, normalization: str) -> None:
    stage_map = np.asarray(stage_map, dtype=np.float32)
    ax.set_axis_off()
    if np.isnan(stage_map).all():
        ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center", color="0.5")
        return
    cmap, vmin, vmax = MAP_DISPLAY[normalization]
    ax.imshow(stage_map, cmap=cmap, vmin=vmin, vmax=vmax)


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


def _write_grids(check_dir: Path, out: Path, max_samples: int, normalization: str) -> list[Path]:
    samples = _first_samples(check_dir, max_samples)
    if samples.size == 0:
        return []
    stage_names, maps = load_check_maps(check_dir, samples, normalization)
    inputs = _load_inputs(check_dir.parent / "inputs.npz")
    written = []
    for k, sample in enumerate(samples):
        image, label = _input_of(inputs, sample)
        title = f"{CHECK_TITLES.get(check_dir.name, check_dir.name)}: sample {sample}{label}"
        sample_maps = {method: m[k] for method, m in maps.items()}
        fig = randomization_grid(image, stage_names, sample_maps, title, normalization)
        written += save_figure(fig, out / f"{check_dir.name}_grid_sample{sample}")
    return written


def _check_dirs(maps_dir: Path) -> list[Path]:
    return sorted(d for d in maps_dir.iterdir() if d.is_dir()) if maps_dir.is_dir() else []


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


def random_label_bars(rows: pd.DataFrame, title: str = "") -> Figure:
    """Data randomization test (arXiv 1810.03292, §5): similarity of each method's map of the
    random-label model to its map of the true-label model, one panel per metric, one bar per
    method (mean over samples, 95 % Student t-interval). The subtitle gives the accuracies of
    both models (``train_accuracy`` / ``test_accuracy`` rows)."""
    similarity = rows[~rows["metric"].isin(ACCURACY_METRICS) & rows["stage_index"].eq(1)]
    table = curve_table(similarity)
    metrics = _ordered(table["metric"].unique(), list(METRIC_TITLES))
    methods = method_order(table["method"].unique())
    ncols = 2 if len(metrics) == 4 else max(1, min(len(metrics), 3))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    with _style():
        fig = Figure(figsize=(ncols * max(3.2, 0.38 * len(methods) + 1.0) + 0.4, nrows * 3.3 + 0.9),
                     layout="constrained")  # fmt: skip
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            _draw_bars(ax, table[table["metric"] == metric], methods)
            ax.set_title(METRIC_TITLES.get(metric, metric))
        for ax in axes[len(metrics):]:
            ax.set_axis_off()
        for ax in axes[::ncols]:
            ax.set_ylabel("similarity: random- vs true-label map")
        fig.suptitle("\n".join(t for t in (title, accuracy_caption(rows)) if t))
    return fig


def _draw_bars(ax, table: pd.DataFrame, methods: list[str]) -> None:
    bars = pd.DataFrame({"method": methods}).merge(table, how="left")  # NaN: method not scored
    x = np.arange(len(methods))
    mean = bars["mean"].to_numpy(float)
    error = np.vstack([mean - bars["low"].to_numpy(float), bars["high"].to_numpy(float) - mean])
    ax.bar(x, np.nan_to_num(mean), color=[method_style(m)["color"] for m in methods],
           yerr=np.where(np.isfinite(error), error, 0.0), capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(x, labels=methods, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_ylim(*_similarity_range(table))
    ax.set_yticks([-1.0, -0.5, 0.0, 0.5, 1.0])
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":", zorder=0)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)


def accuracy_caption(rows: pd.DataFrame) -> str:
    """'true labels: train 99.5%, test 98.1% | random labels: train 97.0%, test 9.8%'."""
    acc = rows[rows["metric"].isin(ACCURACY_METRICS)]
    parts = []
    for stage, label in LABEL_STAGES.items():
        values = acc[acc["stage"] == stage].groupby("metric")["value"].mean()
        if len(values):
            shown = [f"{m.split('_')[0]} {values[m]:.1%}" for m in ACCURACY_METRICS if m in values]
            parts.append(f"{label}: {', '.join(shown)}")
    return " | ".join(parts)


def random_label_grid(images: list[np.ndarray | None], captions: list[str],
                      stage_names: list[str], maps: Mapping[str, np.ndarray], title: str = "",
                      normalization: str = "absolute") -> Figure:
    """Figures 5 and 6 of arXiv 1810.03292: maps of the true-label model versus the
    random-label model, for a few inputs (two rows each: one per model) and every method
    (columns, after the input).

    images: per input, (H, W[, C]) in [0, 1] or None; captions: per input, a row label prefix.
    stage_names: the models in ``stage_index`` order (``true_labels``, ``random_labels``).
    maps: method -> (len(images), len(stage_names), H, W).
    """
    methods = method_order(maps)
    nrows, ncols = len(images) * len(stage_names), len(methods) + 1
    layout = _GridLayout(nrows, ["input", *methods], [*captions, "random labels"])
    with _style():
        fig = Figure(figsize=layout.figsize)
        fig.subplots_adjust(**layout.margins)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for k, (image, caption) in enumerate(zip(images, captions)):
            for s, stage in enumerate(stage_names):
                row = axes[k * len(stage_names) + s]
                if image is not None:
                    _show_image(row[0], image)
                row[0].set_axis_off()
                for ax, method in zip(row[1:], methods):
                    _show_map(ax, maps[method][k, s], normalization)
                row[0].text(-0.08, 0.5, f"{caption}\n{LABEL_STAGES.get(stage, stage)}",
                            transform=row[0].transAxes, ha="right", va="center", fontsize=8)
        for ax, name in zip(axes[0], ["input", *methods]):
            layout.column_title(ax, name)
        if title:
            fig.suptitle(title, y=1.0 - 0.08 / layout.figsize[1], va="top")
    return fig


def _write_random_label_grid(check_dir: Path, out: Path, max_samples: int,
                             normalization: str) -> list[Path]:
    samples = _first_samples(check_dir, max_samples)
    if samples.size == 0:
        return []
    stage_names, maps = load_check_maps(check_dir, samples, normalization)
    inputs = _load_inputs(check_dir.parent / "inputs.npz")
    shown = [_input_of(inputs, sample) for sample in samples]
    captions = [f"sample {sample}{label}" for sample, (_, label) in zip(samples, shown)]
    fig = random_label_grid([image for image, _ in shown], captions, stage_names, maps,
                            CHECK_TITLES[RANDOM_LABELS], normalization)
    return save_figure(fig, out / f"{RANDOM_LABELS}_grid")


# --------------------------------------------------------------- input bias (arXiv 2011.05002)


def input_bias_bars(rows: pd.DataFrame, title: str = "") -> Figure:
    """The input bias of each method (Brocki & Chung 2020, arXiv 2011.05002): grouped bars,
    mean over samples with a 95 % Student t-interval.

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
    with _style():
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
    """Bars per method (x) and per value of ``group`` (hatched shades), mean and t-interval."""
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
        hatch = _HATCHES[j % len(_HATCHES)]
        ax.bar(x - 0.4 + width * (j + 0.5), np.nan_to_num(mean), width, color=colors,
               hatch=hatch, edgecolor="0.25", linewidth=0.4, capsize=1.5,
               yerr=np.where(np.isfinite(error), error, 0.0), error_kw={"linewidth": 0.6})
        handles.append(Patch(facecolor="white", edgecolor="0.25", hatch=hatch, label=name))
    ax.set_xticks(x, labels=methods, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)
    ax.legend(handles=handles, frameon=False, fontsize=7)


# --------------------------------------------------------------------------- shared style


def method_style(method: str) -> dict[str, str]:
    """Colour, line style and marker of a method: the same in every figure of every run.

    Known methods (``KNOWN_METHODS``) have fixed, distinct styles; others get one from a hash
    of their name (stable across runs, may repeat another method's).
    """
    if method in KNOWN_METHODS:
        i = KNOWN_METHODS.index(method)
    else:
        i = len(KNOWN_METHODS) + zlib.crc32(method.encode()) % 52
    return {"color": _COLORS[i % 10], "linestyle": _LINESTYLES[i // 10 % 4],
            "marker": _MARKERS[i % 7]}  # fmt: skip


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in ``KNOWN_METHODS`` order, then unknown ones alphabetically."""
    return _ordered(methods, list(KNOWN_METHODS))


def _ordered(names: Iterable[str], preferred: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted({str(n) for n in names}, key=lambda n: (rank.get(n, len(rank)), n))


@contextmanager
def _style():
    """Paper style for figure building and saving, without touching the global rcParams."""
    with matplotlib.rc_context(_STYLE):
        yield


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
        for run_dir in run_dirs(given) or [given]:
            paths = make_figures(run_dir)
            if not paths:
                print(f"{run_dir}: nothing to plot (no rows/ and no maps/)", file=sys.stderr)
            for path in paths:
                print(path)
    return status
