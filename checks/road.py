"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy
for Attribution Methods", arXiv 2202.00449): pixels removed in the order of the map and
*imputed* instead of blanked, so the model sees no tell-tale mask shape, and no retraining.

Noisy linear imputation (their §4): every removed pixel takes the weighted mean of its 8
neighbours (weight 1/6 for the 4 direct ones, 1/12 for the diagonals; neighbours outside the
image left out), a sparse linear system over the removed pixels solved exactly for all channels
at once (scipy's ``spsolve``), then Gaussian noise of std ``noise`` (model input units, seeded
per input and image) is added to the imputed pixels.

Orders: MoRF (most relevant first: the top fraction of the map's pixels removed) and LeRF
(least relevant first), at the paper's removal fractions 10 %, 20 %, ..., 90 %. Scores: whether
the model still predicts the explained class (``morf_accuracy``, ``lerf_accuracy``; the paper's
curves are their mean) and its softmax probability (``morf_probability``,
``lerf_probability``) at each ``fraction``; per sample the AUC of the probability over the
fractions (``morf_auc``, lower is better; ``lerf_auc``, higher is better) and ``road_gap`` =
lerf_auc - morf_auc. Every imputed image is built inside its chunk of ``ctx.internal_batch_size``
images and scored with the chunk.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
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

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORDERS = ("morf", "lerf")
AUCS = ("morf_auc", "lerf_auc", "road_gap")
NEIGHBOURS = tuple(((di, dj), 1 / 6 if di == 0 or dj == 0 else 1 / 12)
                   for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0))
COLUMNS = {"fraction": math.nan, "order": "", "noise": math.nan}


def summary(rows) -> str:
    """MoRF AUC (lower is better), LeRF AUC and the gap (higher is better), with intervals."""
    return faithfulness_summary(rows, AUCS)


@CHECKS.register(title="ROAD (noisy linear imputation)", columns=COLUMNS, summary=summary,
                 figures=(curves_figure, auc_figure), headline=AUCS)
def road(ctx: CheckContext, fractions: list[float] | tuple[float, ...] = FRACTIONS,
         noise: float = 0.01, saliency: str = "absolute", **_) -> Iterator[dict | MapRecord]:
    """MoRF and LeRF curves of every method's maps of ctx.data.inputs (N, C, H, W), with the
    removed pixels imputed, explaining the model's predicted class."""
    if not all(0 < f < 1 for f in fractions):
        raise ValueError(f"check.fractions must lie in (0, 1), got {list(fractions)}")
    todo = ctx.pending(0)
    if not todo.methods:
        return
    x = ctx.data.inputs
    target = predict(ctx.model, x, ctx.batch_size)
    maps = ranking_maps(todo, target, saliency)
    ranks = torch.stack([pixel_ranks(maps[m][RANKING]) for m in maps])  # (M, N, H, W)
    probs, correct = imputed_scores(replace(ctx, model=scoring_model(ctx.model)), ranks,
                                    target, tuple(fractions), noise)
    knobs = {"check": "road", "stage": "original", "stage_index": 0, "normalization": saliency,
             "noise": float(noise)}
    for m, method in enumerate(maps):
        base = {**knobs, "method": method, "method_hparams": method_hparams(todo.methods[method])}
        yield from method_rows(ctx, base, probs[m], correct[m], target, tuple(fractions))
        record = map_record(ctx, maps[method], "road", method, "original", 0)
        if record is not None:
            yield record
    yield StageDone(0)


def pixel_ranks(saliency: Tensor) -> Tensor:
    """Rank of every pixel by decreasing saliency (0 = most relevant; ties by index).
    (N, H, W) -> (N, H, W) long."""
    flat = saliency.flatten(1).double().nan_to_num(0.0)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
    return rank.view(saliency.shape)


def removed_mask(rank: Tensor, fraction: float, order: str) -> np.ndarray:
    """The pixels removed at ``fraction``: the most (MoRF) or least (LeRF) relevant ones.
    rank (H, W) -> (H, W) bool."""
    total = rank.numel()
    count = round(fraction * total)
    chosen = rank < count if order == "morf" else rank >= total - count
    return chosen.cpu().numpy()


def impute(image: np.ndarray, removed: np.ndarray, noise: float,
           rng: np.random.Generator) -> np.ndarray:
    """Noisy linear imputation (Rong et al. 2022, §4): the removed pixels (H, W) bool of
    ``image`` (C, H, W) float64 solved as the weighted mean of their neighbours, plus noise."""
    if not removed.any():
        return image.copy()
    from scipy import sparse  # imported where used: a failing command line skips it
    from scipy.sparse.linalg import spsolve

    height, width = removed.shape
    where = np.argwhere(removed)
    index = -np.ones(removed.shape, dtype=np.int64)
    index[removed] = np.arange(len(where))
    diagonal = np.zeros(len(where))
    rhs = np.zeros((len(where), image.shape[0]))
    rows, cols, values = [np.arange(len(where))], [np.arange(len(where))], []
    for (di, dj), weight in NEIGHBOURS:
        i, j = where[:, 0] + di, where[:, 1] + dj
        inside = (i >= 0) & (i < height) & (j >= 0) & (j < width)
        diagonal[inside] += weight
        own, neighbour = np.nonzero(inside)[0], index[i[inside], j[inside]]
        unknown = neighbour >= 0
        rows.append(own[unknown])
        cols.append(neighbour[unknown])
        values.append(np.full(int(unknown.sum()), -weight))
        known = own[~unknown]
        rhs[known] += weight * image[:, i[inside][~unknown], j[inside][~unknown]].T
    system = sparse.csc_matrix((np.concatenate([diagonal, *values]),
                                (np.concatenate(rows), np.concatenate(cols))),
                               shape=(len(where), len(where)))
    solved = spsolve(system, rhs).reshape(len(where), -1)
    out = image.copy()
    out[:, where[:, 0], where[:, 1]] = (solved + noise * rng.standard_normal(solved.shape)).T
    return out


def imputed_scores(ctx: CheckContext, ranks: Tensor, target: Tensor, fractions: tuple,
                   noise: float) -> tuple[Tensor, Tensor]:
    """Softmax of the class and correctness of every imputed image, (M, N, 2, F) each, in the
    flat order (method, input, order, fraction); each image is imputed inside its chunk."""
    methods, n = ranks.shape[:2]
    per_input = len(ORDERS) * len(fractions)
    x = ctx.data.inputs
    images = x.detach().double().cpu().numpy()

    def make(j: Tensor) -> Tensor:
        out = []
        for flat in j.tolist():
            m, rest = divmod(flat, n * per_input)
            i, rest = divmod(rest, per_input)
            o, f = divmod(rest, len(fractions))
            removed = removed_mask(ranks[m, i], fractions[f], ORDERS[o])
            rng = np.random.default_rng([ctx.seed, int(ctx.data.samples[i]), m, o, f])
            out.append(torch.from_numpy(impute(images[i], removed, noise, rng)))
        return torch.stack(out).to(x)

    owner = torch.arange(n, device=x.device).repeat_interleave(per_input).repeat(methods)
    probs, correct = chunked_outputs(ctx.model, make, methods * n * per_input, target[owner],
                                     ctx.internal_batch_size)
    shape = (methods, n, len(ORDERS), len(fractions))
    return probs.view(shape), correct.view(shape)


def method_rows(ctx: CheckContext, base: dict, probs: Tensor, correct: Tensor, target: Tensor,
                fractions: tuple) -> Iterator[dict]:
    """Curve rows (accuracy and probability per order and fraction) and AUC rows of one
    method; probs, correct (N, 2, F)."""
    samples, targets = ctx.data.samples.tolist(), target.cpu().tolist()
    x = torch.tensor(fractions, dtype=torch.float64)
    for i, sample in enumerate(samples):
        row = {**base, "sample": sample, "target": targets[i], "reason": ""}
        auc = {}
        for o, order in enumerate(ORDERS):
            for f, fraction in enumerate(fractions):
                point = {**row, "order": order, "fraction": float(fraction)}
                yield {**point, "metric": f"{order}_accuracy", "value": float(correct[i, o, f])}
                yield {**point, "metric": f"{order}_probability", "value": float(probs[i, o, f])}
            auc[order] = float(trapezoid(probs[i, o], x)) if len(fractions) > 1 else math.nan
            yield {**row, "order": order, "metric": f"{order}_auc", "value": auc[order],
                   "reason": "" if len(fractions) > 1 else "one fraction: no area"}
        gap = auc["lerf"] - auc["morf"]
        yield {**row, "metric": "road_gap", "value": gap,
               "reason": "one fraction: no area" if math.isnan(gap) else ""}
