"""The faithfulness checks on models whose evidence is known.

``RegionModel``: the softmax probability of class 0 is exactly the mean of the pixels in the
top-left quadrant R (class 1 gets the rest), so with the zero baseline removing a pixel of R
lowers it by the pixel's share and no other pixel matters. Then

* a map of R has a lower deletion AUC and a higher insertion AUC than a map of its complement;
* every curve is monotone (deletion never rises, insertion never falls), whatever the map;
* a random order of the cells removes, in expectation, the share f of R at fraction f: the
  curve is p0 (1 - f) (deletion) or p0 f (insertion), its AUC p0 / 2 (the trapezoid rule is
  exact on a line), and the ``random_uniform`` control's mean AUC / p0 sits at 1/2 within its
  interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import stdtrit
from test_resume import run_in_process
from torch import Tensor, nn

from checks import CHECKS
from harness.base.context import CheckContext, Dataset
from methods import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE, HALF = 16, 8


class RegionModel(nn.Module):
    """logits (log p, log(1 - p)) with p the mean of x over R = [:HALF, :HALF]: softmax p."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(len(x))
        p = x[:, :, :HALF, :HALF].mean(dim=(1, 2, 3)).double().clamp(1e-12, 1 - 1e-12)
        return torch.stack([p.log(), (1 - p).log()], dim=1).float()


def region(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    m = torch.zeros_like(x)
    m[:, :, :HALF, :HALF] = 1.0
    return m


def complement(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return 1.0 - region(model, x, target)


def region_data(n: int, seed: int = 0) -> Dataset:
    """Pixels in [0, 1], R in [0.6, 1]: class 0 is predicted (p0 > 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIDE, SIDE, generator=g)
    x[:, :, :HALF, :HALF] = 0.6 + 0.4 * x[:, :, :HALF, :HALF]
    return Dataset(inputs=x, labels=torch.zeros(n, dtype=torch.long), samples=torch.arange(n),
                   mean=(0.0,), std=(1.0,))


def context(model: nn.Module, data: Dataset, methods: dict, batch: int = 7) -> CheckContext:
    return CheckContext(model=model, data=data, methods=methods, metrics=[], batch_size=8,
                        internal_batch_size=batch, n_maps=0, progress=False)


def table(check: str, ctx: CheckContext, **kwargs) -> pd.DataFrame:
    return pd.DataFrame([r for r in CHECKS[check](ctx, **kwargs) if isinstance(r, dict)])


@dataclass
class DeletionRun:
    rows: pd.DataFrame
    p0: pd.Series  # the model's score on each unperturbed input, by sample


@pytest.fixture(scope="module")
def deletion_run() -> DeletionRun:
    model = RegionModel()
    data = region_data(40)
    methods = {"region": region, "complement": complement,
               "random_uniform": partial(METHODS["random_uniform"], seed=0)}
    rows = table("deletion_insertion", context(model, data, methods), baseline="zero",
                 resolution=8, steps=16)
    p0 = data.inputs[:, 0, :HALF, :HALF].double().mean(dim=(1, 2))
    return DeletionRun(rows, pd.Series(p0.numpy(), index=data.samples.numpy()))


def aucs(run: DeletionRun, method: str, metric: str) -> pd.Series:
    part = run.rows[(run.rows["method"] == method) & (run.rows["metric"] == metric)]
    return part.set_index("sample")["value"] / run.p0


def test_the_evidence_region_beats_its_complement(deletion_run):
    for metric, better in (("deletion_auc", "lower"), ("insertion_auc", "higher")):
        inside, outside = aucs(deletion_run, "region", metric), aucs(deletion_run,
                                                                    "complement", metric)
        assert ((inside < outside) if better == "lower" else (inside > outside)).all()
    # R is a quarter of the cells, taken first: from fraction 1/4 on, deleted or inserted whole
    rows = deletion_run.rows
    late = rows[(rows["method"] == "region") & (rows["fraction"] >= 0.25)]
    p0 = deletion_run.p0[late["sample"]].to_numpy()
    deleted, inserted = (late["metric"] == "deletion_score"), (late["metric"] == "insertion_score")
    assert (late["value"][deleted] < 1e-9).all()
    # p of float32 logits: float32 rounding of log p (relative 2**-24, times a few ulps)
    assert abs(late["value"][inserted].to_numpy() / p0[inserted.to_numpy()] - 1).max() < 1e-6


def test_curves_are_monotone_and_their_trapezoid_is_the_auc(deletion_run):
    rows = deletion_run.rows
    curves = rows[rows["metric"].str.endswith("_score")].sort_values("fraction")
    for (method, sample, metric), curve in curves.groupby(["method", "sample", "metric"]):
        steps = curve["value"].diff().dropna()
        # float32 logits of a float64 p: p is recovered to float32 rounding (2**-24 relative)
        slack = 4 * 2.0**-24
        assert (steps <= slack).all() if metric == "deletion_score" else (steps >= -slack).all()
        assert curve["fraction"].iloc[0] == 0.0 and curve["fraction"].iloc[-1] == 1.0
        auc = rows[(rows["method"] == method) & (rows["sample"] == sample)
                   & (rows["metric"] == metric.replace("_score", "_auc"))]["value"].item()
        trapezoid = torch.trapezoid(torch.tensor(curve["value"].to_numpy()),
                                    torch.tensor(curve["fraction"].to_numpy()))
        assert auc == pytest.approx(float(trapezoid), abs=1e-12)


def test_random_control_sits_at_chance(deletion_run):
    for metric in ("deletion_auc", "insertion_auc"):
        values = aucs(deletion_run, "random_uniform", metric).to_numpy()
        n = len(values)
        half = stdtrit(n - 1, 0.9995) * values.std(ddof=1) / math.sqrt(n)  # 99.9 % interval
        assert abs(values.mean() - 0.5) < half, (metric, values.mean(), half)


def test_every_perturbed_image_is_batched():
    model = RegionModel()
    data = region_data(3)
    methods = {"region": region, "complement": complement}
    steps, batch = 10, 7
    table("deletion_insertion", context(model, data, methods, batch), baseline="zero",
          resolution=8, steps=steps)
    images = 2 * 3 + 2 * 3 * 2 * (steps - 1)  # the ends once per input, inner steps per method
    perturbed = model.calls[1:]  # the first call predicts the explained class
    assert sum(perturbed) == images and max(perturbed) <= batch
    assert len(perturbed) == math.ceil(6 / batch) + math.ceil((images - 6) / batch)


def run_as_cli(run_dir, *overrides: str):
    return run_in_process(["model=tiny_cnn", "dataset=digits", "dataset.n=2",
                           "metric=[spearman]", "progress=false", "n_maps=1", *overrides], run_dir)


@pytest.mark.parametrize("check, overrides", [
    ("deletion_insertion", ("check.steps=8",)),
    ("pic", ("check.min_pred_value=0.0",)),
    ("road", ("check.fractions=[0.2,0.5,0.8]",)),
])
def test_check_runs_through_the_cli_path(tmp_path, check, overrides):
    run_dir = run_as_cli(tmp_path / "run", f"check={check}", "method=[gradient,random_uniform]",
                         *overrides)
    rows = pd.read_parquet(run_dir / "rows")
    assert set(rows["method"]) == {"gradient", "random_uniform"}
    assert (rows["value"].notna() | (rows["reason"] != "")).all()  # NaN only with a reason
    assert rows[rows["metric"].str.endswith("_auc")]["value"].notna().any()
    stems = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert {f"{check}_curves", f"{check}_auc"} <= stems


# --------------------------------------------------------------------------- PIC vs PAIR


def held_out_images() -> list[np.ndarray]:
    """Photos the harness never ships as a dataset (scikit-image's), 40 x 48 uint8 RGB."""
    from skimage import data
    from skimage.transform import resize

    return [np.round(resize(getattr(data, name)(), (40, 48), anti_aliasing=True) * 255)
            .astype(np.uint8) for name in ("astronaut", "coffee", "chelsea")]


def detail(images: np.ndarray) -> np.ndarray:
    """A score that grows with the image's detail (mean |horizontal difference|), in (0, 1)."""
    diff = np.abs(np.diff(images.astype(np.float64), axis=2)).mean(axis=(1, 2, 3))
    return diff / (diff + 8.0)


@pytest.mark.parametrize("kind", ["sic", "aic"])
def test_pic_equals_pair(monkeypatch, kind):
    pair = pytest.importorskip("saliency.metrics.pic")
    # PAIR's AUC calls np.trapz, which numpy 2.4 removed: the same rule under its new name
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    from checks.pic import (
        THRESHOLDS,
        CurveSettings,
        aggregated_row,
        blurred_image,
        pic_curve,
        random_mask,
        threshold_images,
        webp_size,
    )

    settings = CurveSettings(min_pred_value=0.0)
    ours, theirs = [], []
    for k, img in enumerate(held_out_images()):
        rng = np.random.default_rng(k)
        saliency = rng.random(img.shape[:2]) + np.linspace(0, 1, img.shape[1])[None]
        known = random_mask(*img.shape[:2], 0.01, rng)
        # AIC: "correct" once the detail is halfway between the start image's and the photo's
        halfway = detail(np.stack([img, blurred_image(img, known)])).mean()

        def pred_func(images: np.ndarray, halfway=halfway) -> list[float]:
            score = detail(images)
            return list(score if kind == "sic" else (score > halfway).astype(float))

        try:
            reference = pair.compute_pic_metric(img, saliency, known, pred_func, THRESHOLDS,
                                                min_pred_value=0.0)
        except pair.ComputePicMetricError:
            reference = None
        start = blurred_image(img, known)
        steps = threshold_images(img, saliency, known, THRESHOLDS)
        score = [pred_func(im[None])[0] for im in (img, start, *steps)]
        curve_x, curve_y, auc, reason = pic_curve(
            (webp_size(img), score[0]), (webp_size(start), score[1]),
            [(webp_size(im), s) for im, s in zip(steps, score[2:])], settings)
        assert bool(reason) == (reference is None)
        if reference is None:
            continue
        for a, b in zip([start, *steps], reference.blurred_images[:-1]):
            assert np.array_equal(a, b)  # the same uint8 images
        np.testing.assert_allclose(curve_x, reference.curve_x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curve_y, reference.curve_y, rtol=0, atol=1e-6)
        assert auc == pytest.approx(reference.auc, abs=1e-6)
        ours.append(curve_y)
        theirs.append(reference)
    assert theirs, "every image was skipped: the test compares nothing"
    aggregated = pair.aggregate_individual_pic_results(theirs, method="median")
    assert aggregated_row({}, kind, ours, 1000)["value"] == pytest.approx(aggregated.auc,
                                                                         abs=1e-6)


# --------------------------------------------------------------------------- ROAD


def test_road_imputation_is_the_neighbours_weighted_mean():
    from checks.road import NEIGHBOURS, impute

    rng = np.random.default_rng(0)
    image = rng.random((2, 9, 11))
    removed = rng.random((9, 11)) < 0.4
    out = impute(image, removed, 0.0, rng)
    assert np.array_equal(out[:, ~removed], image[:, ~removed])  # known pixels untouched
    for i, j in np.argwhere(removed):  # each removed pixel: the mean of its neighbours
        total, weights = 0.0, 0.0
        for (di, dj), w in NEIGHBOURS:
            if 0 <= i + di < 9 and 0 <= j + dj < 11:
                total, weights = total + w * out[:, i + di, j + dj], weights + w
        np.testing.assert_allclose(out[:, i, j], total / weights, rtol=0, atol=1e-12)
    # a linear image is its own imputation away from the border (the stencil is symmetric)
    ramp = np.broadcast_to(np.arange(11.0), (1, 9, 11)).copy()
    inner = np.zeros((9, 11), dtype=bool)
    inner[3:6, 3:8] = True
    np.testing.assert_allclose(impute(ramp, inner, 0.0, rng), ramp, rtol=0, atol=1e-12)


def test_road_orders_on_the_region_model():
    model = RegionModel()
    data = region_data(6)
    methods = {"region": region, "complement": complement}
    rows = table("road", context(model, data, methods), fractions=[0.25, 0.5, 0.75], noise=0.0)
    gap = rows[rows["metric"] == "road_gap"].set_index(["method", "sample"])["value"]
    # removing R first (MoRF of the region map) hurts more than removing it last
    assert (gap["region"] > gap["complement"]).all()


def test_sweep_figure_sets_two_checks_headline_scores_against_each_other(tmp_path):
    from harness.figures import headline_tables, load_rows, main

    sweep = tmp_path / "sweep"
    for job, args in enumerate((["check=cascading"], ["check=deletion_insertion",
                                                      "check.steps=8"])):
        run_as_cli(sweep / str(job), *args, "method=[gradient,random_uniform]", "figures=false")
    assert main([str(sweep)]) == 0
    assert (sweep / "figures" / "cascading_vs_deletion_insertion.png").is_file()
    rows = load_rows(sweep / "0")
    last = rows[rows["stage_index"] == rows["stage_index"].max()]
    means = last[last["sample"] >= 0].groupby("method")["value"].mean()
    table = headline_tables(rows)["cascading"].set_index("method")
    assert table["stage_index"].eq(rows["stage_index"].max()).all()
    np.testing.assert_allclose(table.loc[means.index, "mean"], means, rtol=1e-12)
