"""Performance Information Curves (Kapishnikov et al. 2019, XRAI, arXiv 1906.02825, §4.1; the
evaluation of Guided IG, Kapishnikov et al. 2021, arXiv 2106.09788), as PAIR's
``saliency.metrics.pic``.

Per image (uint8, the display image): a *fully blurred* start image is interpolated (scipy's
linear ``griddata``) from a random 1 % of its pixels (seeded per sample); at each saliency
threshold t the top-t fraction of the map's pixels (by ``np.quantile``) joins the known pixels
and the image is interpolated again. The information of an image is its lossless WebP size,
normalized between the start image and the original; the model's score on each image,
normalized likewise, is plotted against it, kept monotone, and interpolated onto 1001 points:

* SIC (Softmax Information Curve): the softmax probability of the class;
* AIC (Accuracy Information Curve): 1 if the class is still the argmax, else 0.

The class is the model's prediction on the original image. As PAIR, an image is skipped (NaN
with a ``reason``) if its score is below ``min_pred_value``, if the start image holds as much
information as the original, or if the model scores the start image as high. The AUC is the
trapezoid rule, per image (``sic_auc``, ``aic_auc``) and of the median curve over the images
that were not skipped (``sic_auc_aggregated``, ``aic_auc_aggregated``, sample -1), as PAIR's
``aggregate_individual_pic_results``.

Faster than PAIR, with the same images: the start image is interpolated once per input (not per
method), and each image once for all channels (one triangulation instead of one per channel).
The images of every threshold, method and input are scored in batches of
``ctx.internal_batch_size``.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from checks.faithfulness import (
    RANKING,
    chunked_outputs,
    faithfulness_summary,
    ranking_maps,
    scoring_model,
)
from checks.faithfulness_figures import auc_figure, curves_figure
from checks.registry import CHECKS
from checks.scoring import map_record, method_hparams, predict
from harness.base.context import CheckContext, MapRecord, StageDone

# the saliency thresholds of PAIR's pic_metrics notebook
THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.21, 0.34, 0.5, 0.75)
KINDS = ("sic", "aic")
AUCS = ("sic_auc", "aic_auc")
COLUMNS = {"information": math.nan, "min_pred_value": math.nan, "random_fraction": math.nan}


def summary(rows) -> str:
    """SIC and AIC AUC per method (higher is better), with intervals over images."""
    return faithfulness_summary(rows, AUCS)


@CHECKS.register(title="Performance information curves (SIC / AIC)", columns=COLUMNS,
                 summary=summary, figures=(curves_figure, auc_figure), headline=AUCS)
def pic(ctx: CheckContext, thresholds: list[float] | tuple[float, ...] = THRESHOLDS,
        random_fraction: float = 0.01, min_pred_value: float = 0.8,
        keep_monotonous: bool = True, num_data_points: int = 1000, curve_points: int = 100,
        saliency: str = "absolute", **_) -> Iterator[dict | MapRecord]:
    """SIC and AIC of every method's maps of ctx.data.inputs (N, C, H, W)."""
    todo = ctx.pending(0)
    if not todo.methods:
        return
    x = ctx.data.inputs
    target = predict(ctx.model, x, ctx.batch_size)
    images = uint8_images(ctx)
    masks = [random_mask(*img.shape[:2], random_fraction, seed_of(ctx.seed, int(s)))
             for img, s in zip(images, ctx.data.samples)]
    starts = [blurred_image(img, mask) for img, mask in zip(images, masks)]
    maps = ranking_maps(todo, target, saliency)
    revealed = {m: [threshold_images(img, sal.numpy(), mask, thresholds)
                    for img, sal, mask in zip(images, maps[m][RANKING], masks)] for m in maps}
    flat = [*images, *starts, *(img for m in maps for per in revealed[m] for img in per)]
    probs, correct = score_images(replace(ctx, model=scoring_model(ctx.model)), flat,
                                  target, len(thresholds))
    n, steps = len(images), len(thresholds)
    sizes = [webp_size(img) for img in flat]
    knobs = {"check": "pic", "stage": "original", "stage_index": 0, "normalization": saliency,
             "min_pred_value": float(min_pred_value), "random_fraction": float(random_fraction)}
    settings = CurveSettings(min_pred_value, keep_monotonous, num_data_points, curve_points)
    for m, method in enumerate(maps):
        start = 2 * n + m * n * steps
        base = {**knobs, "method": method, "method_hparams": method_hparams(todo.methods[method])}
        per_image = [ImageScores(
            original=(sizes[i], float(probs[i]), float(correct[i])),
            start=(sizes[n + i], float(probs[n + i]), float(correct[n + i])),
            steps=[(sizes[j], float(probs[j]), float(correct[j]))
                   for j in range(start + i * steps, start + (i + 1) * steps)])
            for i in range(n)]
        yield from method_rows(ctx, base, per_image, target, settings)
        record = map_record(ctx, maps[method], "pic", method, "original", 0)
        if record is not None:
            yield record
    yield StageDone(0)


# --------------------------------------------------------------------------- images


def uint8_images(ctx: CheckContext) -> list[np.ndarray]:
    """The display images as PAIR takes them: (H, W, C) uint8, rounded (C = 1 kept as (H, W))."""
    display = np.round(ctx.data.display_images() * 255.0).astype(np.uint8)
    return [img[..., 0] if img.shape[-1] == 1 else img for img in display]


def seed_of(seed: int, sample: int) -> np.random.Generator:
    """The random pixels of an input depend on the run's seed and the input, not on the shard."""
    return np.random.default_rng([seed, sample])


def random_mask(height: int, width: int, fraction: float,
                rng: np.random.Generator) -> np.ndarray:
    """``int(H W fraction)`` distinct random pixels, (H, W) bool (PAIR's
    ``generate_random_mask`` with a seeded generator instead of numpy's global one)."""
    mask = np.zeros((height, width), dtype=bool)
    chosen = rng.choice(mask.size, replace=False, size=int(mask.size * fraction))
    mask[np.unravel_index(chosen, mask.shape)] = True
    return mask


def blurred_image(img: np.ndarray, known: np.ndarray) -> np.ndarray:
    """PAIR's ``create_blurred_image(img, known)`` (linear): the pixels outside ``known`` (and
    the four corners) interpolated linearly from those inside, over one Delaunay triangulation
    for all channels. (H, W[, C]) uint8 -> the same shape, uint8, equal to PAIR's."""
    known = known.copy()
    h, w = known.shape
    known[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]] = True  # PAIR always includes the corners
    if known.all():
        return img
    pixels = img if img.ndim == 3 else img[..., None]
    blurred = pixels * known[..., None].astype(np.float32)
    points, unknown = np.argwhere(known), np.argwhere(~known)
    values = pixels[tuple(points.T)]  # (n, C)
    from scipy import interpolate  # imported where used: a failing command line skips it

    found = interpolate.LinearNDInterpolator(points, values, fill_value=np.nan)(unknown)
    mean = pixels.mean(axis=(0, 1))  # PAIR's fill value, for points outside the hull (none:
    found = np.where(np.isnan(found), mean, found)  # the corners make the hull the image)
    blurred[tuple(unknown.T)] = found
    blurred = np.round(blurred).astype(np.uint8)
    return blurred if img.ndim == 3 else blurred[..., 0]


def threshold_images(img: np.ndarray, saliency: np.ndarray, known: np.ndarray,
                     thresholds) -> list[np.ndarray]:
    """The image with the top ``t`` fraction of ``saliency`` (H, W) revealed, for each t."""
    out = []
    for threshold in thresholds:
        mask = saliency >= np.quantile(saliency, 1 - threshold)
        out.append(blurred_image(img, mask | known))
    return out


def webp_size(img: np.ndarray) -> int:
    """Bytes of the lossless WebP encoding: PAIR's ``estimate_image_entropy``."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="webp", lossless=True, quality=100)
    return buffer.tell()


def score_images(ctx: CheckContext, images: list[np.ndarray], target: Tensor,
                 steps: int) -> tuple[Tensor, Tensor]:
    """Softmax of the class and correctness of every image, in batches: ``images`` are the N
    originals, the N start images, then ``steps`` images per (method, input)."""
    n = len(ctx.data.inputs)
    owner = torch.tensor([i % n for i in range(2 * n)]
                         + [(j // steps) % n for j in range(len(images) - 2 * n)],
                         dtype=torch.long, device=target.device)
    mean = torch.tensor(ctx.data.mean).view(1, -1, 1, 1).to(ctx.data.inputs)
    std = torch.tensor(ctx.data.std).view(1, -1, 1, 1).to(ctx.data.inputs)

    def make(j: Tensor) -> Tensor:
        chunk = torch.from_numpy(np.stack([images[k] for k in j.tolist()]))
        chunk = chunk[..., None] if chunk.dim() == 3 else chunk
        pixels = chunk.permute(0, 3, 1, 2).to(ctx.data.inputs) / 255.0
        return (pixels - mean) / std

    return chunked_outputs(ctx.model, make, len(images), target[owner], ctx.internal_batch_size)


# --------------------------------------------------------------------------- curves


@dataclass
class CurveSettings:
    min_pred_value: float = 0.8
    keep_monotonous: bool = True
    num_data_points: int = 1000
    curve_points: int = 100  # points of each curve kept as rows (a subset of the grid)


@dataclass
class ImageScores:
    """(WebP size, softmax, correct) of the original, the start image and each threshold."""

    original: tuple[int, float, float]
    start: tuple[int, float, float]
    steps: list[tuple[int, float, float]]


def pic_curve(original: tuple[int, float], start: tuple[int, float],
              steps: list[tuple[int, float]], settings: CurveSettings
              ) -> tuple[np.ndarray, np.ndarray, float, str]:
    """PAIR's ``compute_pic_metric`` from the (information, prediction) pairs of the original,
    the start image and each threshold image: (curve_x, curve_y, auc, reason); reason is
    non-empty (and the curve empty) when PAIR would skip the image."""
    (info, pred), (start_info, start_pred) = original, start
    reason = skip_reason(info, pred, start_info, start_pred, settings.min_pred_value)
    if reason:
        return np.zeros(0), np.zeros(0), math.nan, reason
    points, best = [], 0.0
    for step_info, step_pred in steps:
        x = np.clip((step_info - start_info) / (info - start_info), 0.0, 1.0)
        y = np.clip((step_pred - start_pred) / (pred - start_pred), 0.0, 1.0)
        best = max(best, y)
        points.append((x, best if settings.keep_monotonous else y))
    points += [(0.0, 0.0), (1.0, 1.0)]
    xs, ys = zip(*points)
    curve_x = np.linspace(0.0, 1.0, num=settings.num_data_points, endpoint=False)
    from scipy import interpolate

    # one vectorized call: interp1d evaluates each point as PAIR's loop over them does
    curve_y = np.append(interpolate.interp1d(x=xs, y=ys)(curve_x), 1.0)
    curve_x = np.append(curve_x, 1.0)
    return curve_x, curve_y, float(np.trapezoid(curve_y, curve_x)), ""


def skip_reason(info: int, pred: float, start_info: int, start_pred: float,
                min_pred_value: float) -> str:
    """Why PAIR skips an image (its three ``ComputePicMetricError`` cases), in its order."""
    if pred < min_pred_value:
        return f"score {pred:.3g} on the original image < min_pred_value {min_pred_value:g}"
    if start_info >= info:
        return "the start image holds as much information as the original"
    if start_pred >= pred:
        return "the start image scores as high as the original"
    return ""


def method_rows(ctx: CheckContext, base: dict, per_image: list[ImageScores], target: Tensor,
                settings: CurveSettings) -> Iterator[dict]:
    """AUC and curve rows per image, then the aggregated (median curve) AUC per kind."""
    samples, targets = ctx.data.samples.tolist(), target.cpu().tolist()
    stride = max(1, settings.num_data_points // max(1, settings.curve_points))
    for k, kind in enumerate(KINDS):
        passed = []
        for i, scores in enumerate(per_image):
            pick = 1 + k  # softmax (SIC) or correctness (AIC)
            curve_x, curve_y, auc, reason = pic_curve(
                (scores.original[0], scores.original[pick]),
                (scores.start[0], scores.start[pick]),
                [(s[0], s[pick]) for s in scores.steps], settings)
            row = {**base, "sample": samples[i], "target": targets[i], "reason": reason}
            yield {**row, "metric": f"{kind}_auc", "value": auc}
            if reason:
                continue
            passed.append(curve_y)
            keep = sorted({*range(0, len(curve_x), stride), len(curve_x) - 1})
            for j in keep:
                yield {**row, "metric": f"{kind}_curve", "information": float(curve_x[j]),
                       "value": float(curve_y[j])}
        yield aggregated_row(base, kind, passed, settings.num_data_points)


def aggregated_row(base: dict, kind: str, curves: list[np.ndarray], points: int) -> dict:
    """PAIR's ``aggregate_individual_pic_results(method="median")``: the AUC of the median
    curve over the images not skipped (NaN when all were)."""
    row = {**base, "sample": -1, "target": -1, "metric": f"{kind}_auc_aggregated"}
    if not curves:
        return {**row, "value": math.nan, "reason": "every image skipped"}
    curve_x = np.append(np.linspace(0.0, 1.0, num=points, endpoint=False), 1.0)
    median = np.median(np.asarray(curves), axis=0)
    return {**row, "value": float(np.trapezoid(median, curve_x)), "reason": ""}
