"""Deletion and insertion (Petsiuk et al. 2018, RISE, arXiv 1806.07421), with the protocol of
iGOS++ (Khorram et al. 2021, arXiv 2012.15783, §5) as the default.

The map orders the pixels; step k of ``steps`` perturbs the first round(k / steps * cells)
cells of that order:

* **deletion** starts from the image and replaces the most salient cells by the baseline: the
  softmax probability of the explained class should fall fast (low AUC is better);
* **insertion** starts from the baseline and reveals the most salient cells of the image: it
  should rise fast (high AUC is better).

The AUC is the trapezoid rule over the fraction of cells perturbed (0 .. 1). iGOS++ protocol:
the baseline is the image blurred by a Gaussian (kernel 51, sigma 50 at 224 px; both scaled
with the image's smaller side, kernel kept odd), the map is ranked at the mask resolution
(28 x 28 cells: the mean of the map over each cell's pixels) and the cell masks are upsampled
(nearest, so every pixel belongs to one cell). ``baseline=zero`` is the model input 0,
``baseline=mean`` each channel's mean of the image.

Every method is explained once per input. The unperturbed image and the baseline are scored
once per input (the ends of every curve); the inner steps of every curve of every method and
input are built chunk by chunk and scored in batches of ``ctx.internal_batch_size``.

Rows (stage ``original``, stage_index 0): ``deletion_auc`` and ``insertion_auc`` per method and
sample, and the curves: ``deletion_score`` / ``insertion_score`` at each ``fraction``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from checks.faithfulness import (
    RANKING,
    chunked_outputs,
    faithfulness_summary,
    ranking_maps,
    scoring_model,
    trapezoid,
)
from checks.faithfulness_figures import auc_figure, curves_figure
from checks.registry import CHECKS
from checks.scoring import map_record, method_hparams, predict
from harness.base.context import CheckContext, MapRecord, StageDone
from methods.igos import blurred_baseline

BASELINES = ("blur", "zero", "mean")
AUCS = ("deletion_auc", "insertion_auc")
CURVES = {"deletion": "deletion_score", "insertion": "insertion_score"}
COLUMNS = {"fraction": math.nan, "baseline": "", "resolution": 0, "steps": 0}
REFERENCE_SIDE = 224  # the image size the iGOS++ blur (kernel 51, sigma 50) is given for


def summary(rows) -> str:
    """Deletion AUC (lower is better) and insertion AUC (higher) per method, with intervals."""
    return faithfulness_summary(rows, AUCS)


@CHECKS.register(title="Deletion and insertion", columns=COLUMNS, summary=summary,
                 figures=(curves_figure, auc_figure), headline=AUCS)
def deletion_insertion(ctx: CheckContext, baseline: str = "blur", resolution: int = 28,
                       steps: int = 50, blur_ksize: int = 51, blur_sigma: float = 50.0,
                       saliency: str = "absolute", **_) -> Iterator[dict | MapRecord]:
    """Deletion and insertion curves and AUCs of every method's maps of ctx.data.inputs
    (N, C, H, W), explaining the model's predicted class."""
    _validate(baseline, resolution, steps)
    todo = ctx.pending(0)
    if not todo.methods:
        return
    x = ctx.data.inputs
    target = predict(ctx.model, x, ctx.batch_size)
    base_images, described = baseline_images(x, baseline, blur_ksize, blur_sigma)
    cells = cell_index(x.shape[-2:], resolution)
    n_cells = int(cells.max()) + 1
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_cells / steps).long()
    fractions = counts.double() / n_cells
    maps = ranking_maps(todo, target, saliency)
    ranks = torch.stack([pixel_ranks(m[RANKING], cells) for m in maps.values()]).to(x.device)
    scorer = replace(ctx, model=scoring_model(ctx.model))
    ends = end_scores(scorer, x, base_images, target)
    inner = inner_scores(scorer, x, base_images, target, ranks, counts.to(x.device))
    knobs = {"check": "deletion_insertion", "stage": "original", "stage_index": 0,
             "baseline": described, "resolution": math.isqrt(n_cells), "steps": steps,
             "normalization": saliency}
    for m, method in enumerate(maps):
        curves = {kind: torch.cat([ends[kind][:, :1], inner[kind][m], ends[kind][:, 1:]], dim=1)
                  for kind in CURVES}
        base = {**knobs, "method": method, "method_hparams": method_hparams(todo.methods[method])}
        yield from method_rows(ctx, base, curves, fractions, target,
                               maps[method]["constant"])
        record = map_record(ctx, maps[method], "deletion_insertion", method, "original", 0)
        if record is not None:
            yield record
    yield StageDone(0)


def _validate(baseline: str, resolution: int, steps: int) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"check.baseline must be one of {', '.join(BASELINES)}, got "
                         f"{baseline!r}")
    if resolution < 1 or steps < 1:
        raise ValueError(f"check.resolution and check.steps must be >= 1, got {resolution} and "
                         f"{steps}")


def baseline_images(x: Tensor, baseline: str, ksize: int, sigma: float) -> tuple[Tensor, str]:
    """The image every pixel is deleted into: (N, C, H, W), and its description for the rows.
    The blur's kernel and sigma are given at 224 px and scale with the smaller side."""
    if baseline == "zero":
        return torch.zeros_like(x), "zero"
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous(), "mean"
    scale = min(x.shape[-2:]) / REFERENCE_SIDE
    k = max(1, round(ksize * scale))
    k += 1 - k % 2  # odd, as cv2 requires
    s = sigma * scale
    return blurred_baseline(x, k, s), f"blur(ksize={k},sigma={s:.4g})"


def cell_index(size: tuple[int, int], resolution: int) -> Tensor:
    """The mask cell of every pixel, (H, W) long in [0, r*r): pixel (i, j) is in cell
    (floor(i r / H), floor(j r / W)) (nearest upsampling of an r x r mask), with r capped at
    the image's smaller side so that no cell is empty."""
    height, width = int(size[0]), int(size[1])
    r = min(resolution, height, width)
    rows = torch.arange(height) * r // height
    cols = torch.arange(width) * r // width
    return rows[:, None] * r + cols[None, :]


def pixel_ranks(saliency: Tensor, cells: Tensor) -> Tensor:
    """Rank of each pixel's cell in the order of decreasing mean saliency over the cell
    (0 = most salient; ties by cell index). saliency (N, H, W) -> (N, H, W) long."""
    n_cells = int(cells.max()) + 1
    flat = cells.flatten().to(saliency.device)
    sums = torch.zeros(len(saliency), n_cells, dtype=torch.float64, device=saliency.device)
    sums.index_add_(1, flat, saliency.flatten(1).double().nan_to_num(0.0))
    means = sums / torch.bincount(flat, minlength=n_cells)
    order = torch.sort(means, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_cells, device=order.device).expand_as(order))
    return rank[:, flat].view(saliency.shape)


def end_scores(ctx: CheckContext, x: Tensor, base: Tensor, target: Tensor) -> dict[str, Tensor]:
    """The ends of every curve, one forward pass per input and end: deletion goes from the
    image to the baseline, insertion from the baseline to the image. {kind: (N, 2)}."""
    n = len(x)
    both = torch.cat([x, base])
    probs, _ = chunked_outputs(ctx.model, lambda j: both[j], 2 * n, target.repeat(2),
                               ctx.internal_batch_size)
    image, blurred = probs[:n], probs[n:]
    return {"deletion": torch.stack([image, blurred], 1),
            "insertion": torch.stack([blurred, image], 1)}


def inner_scores(ctx: CheckContext, x: Tensor, base: Tensor, target: Tensor, ranks: Tensor,
                 counts: Tensor) -> dict[str, Tensor]:
    """Scores at steps 1 .. steps-1 of both curves of every method and input:
    {kind: (M, N, steps - 1)}. Image j of the flat order (method, input, kind, step) is built
    only in its chunk: the first ``counts[k]`` cells of the method's order deleted (or
    inserted)."""
    methods, n = ranks.shape[:2]
    inner = counts[1:-1]
    steps = len(inner)
    total = methods * n * 2 * steps

    def make(j: Tensor) -> Tensor:
        m, rest = j // (n * 2 * steps), j % (n * 2 * steps)
        i, rest = rest // (2 * steps), rest % (2 * steps)
        insertion, k = rest // steps, rest % steps
        perturbed = ranks[m, i] < inner[k, None, None]  # (B, H, W): cells taken so far
        from_image = perturbed == insertion.bool()[:, None, None]
        return torch.where(from_image[:, None], x[i], base[i])

    index = torch.arange(n, device=x.device).repeat_interleave(2 * steps).repeat(methods)
    probs, _ = chunked_outputs(ctx.model, make, total, target[index], ctx.internal_batch_size)
    probs = probs.view(methods, n, 2, steps)
    return {"deletion": probs[:, :, 0], "insertion": probs[:, :, 1]}


def method_rows(ctx: CheckContext, base: dict, curves: dict[str, Tensor], fractions: Tensor,
                target: Tensor, constant: Tensor) -> Iterator[dict]:
    """The AUC rows and the curve rows of one method. curves {kind: (N, steps + 1)}."""
    samples, targets = ctx.data.samples.tolist(), target.cpu().tolist()
    for i, sample in enumerate(samples):
        # a constant map orders nothing: its cells go in index order (scored, and said so)
        reason = "constant map: cells in index order" if bool(constant[i]) else ""
        row = {**base, "sample": sample, "target": targets[i], "reason": reason}
        for kind, metric in CURVES.items():
            yield {**row, "metric": f"{kind}_auc",
                   "value": float(trapezoid(curves[kind][i], fractions))}
            for fraction, value in zip(fractions.tolist(), curves[kind][i].tolist()):
                yield {**row, "metric": metric, "fraction": fraction, "value": value}
