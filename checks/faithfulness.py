"""Shared by the faithfulness checks (``deletion_insertion``, ``pic``, ``road``): perturbed
images scored in batches, the maps that order the pixels, and the end-of-run summary.

Every check builds its perturbed images lazily, chunk by chunk: a chunk of
``ctx.internal_batch_size`` images of any input, method and step goes through the model at
once, so the cost is (images / internal_batch_size) forward passes and the memory one chunk.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from checks.plotting import curve_table, method_order
from checks.scoring import explain_all
from checks.uncertainty import ALPHA, control_table
from harness.base.context import CheckContext
from methods.fold import fold_batchnorm
from metrics import NORMALIZATIONS

RANKING = "ranking"  # the key of the map that orders the pixels in explain_all's output
CONTROL = "random_uniform"


def scoring_model(model: nn.Module) -> nn.Module:
    """The model for forward passes only: a copy with its eval-mode BatchNorms folded into the
    convolutions (the same function; :func:`methods.fold.fold_batchnorm`) in channels-last
    memory (faster convolutions on CPU), or the model itself when nothing folds (it is never
    changed)."""
    folded = fold_batchnorm(model)
    return folded if folded is model else folded.to(memory_format=torch.channels_last)


@torch.inference_mode()  # no autograd bookkeeping at all: only the scores leave this function
def chunked_outputs(model: nn.Module, make: Callable[[Tensor], Tensor], count: int,
                    targets: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The images ``make(j)`` of j = 0..count-1 through ``model``, ``batch`` at a time:
    ``make`` builds a chunk (B, C, H, W) from the index tensor j (B,); ``targets`` (count,).
    Returns (softmax probability of the target, whether the target is the argmax), each
    (count,), float64 and bool on the CPU."""
    probs, correct = [], []
    for index in torch.arange(count, device=targets.device).split(max(1, batch)):
        images = make(index)
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images)
        probs.append(logits.softmax(dim=1).gather(1, targets[index, None])[:, 0].double().cpu())
        correct.append((logits.argmax(dim=1) == targets[index]).cpu())
    if not probs:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(probs), torch.cat(correct)


def ranking_maps(ctx: CheckContext, target: Tensor, saliency: str) -> dict[str, dict]:
    """Every pending method's maps of the inputs, explained once: ``explain_all`` output with
    the map that orders the pixels under :data:`RANKING` (``saliency`` normalization,
    (N, H, W) float64, larger = more salient)."""
    reduce = NORMALIZATIONS[saliency]
    return explain_all(replace(ctx, metrics=[]), target,
                       {RANKING: lambda raw: reduce(raw.double()).cpu()})


def trapezoid(y: Tensor, x: Tensor) -> Tensor:
    """Area under y(x) by the trapezoid rule along the last dim, float64. (..., S) -> (...)."""
    return torch.trapezoid(y.double(), x.double(), dim=-1)


def faithfulness_summary(rows: pd.DataFrame, metrics: tuple[str, ...]) -> str:
    """Mean [95 % bootstrap interval] per method of each AUC metric, and whether the method is
    distinguishable from the ``random_uniform`` control on the same inputs (two-sided
    Wilcoxon signed-rank p < 0.05, :func:`checks.uncertainty.control_table`)."""
    rows = rows[rows["metric"].isin(metrics) & (rows["sample"] >= 0)]
    if rows.empty:
        return ""
    own = rows[["method", "metric", "stage_index", "stage", "sample", "value"]]
    seed = int(rows["seed"].iloc[0]) if "seed" in rows else 0
    table = curve_table(own, seed=seed)
    tests = control_table(own, CONTROL).set_index(["metric", "method"])
    lines = []
    for metric in metrics:
        part = table[table["metric"] == metric].set_index("method")
        if part.empty:
            continue
        lines.append(f"{metric} (mean [95% bootstrap interval], n; vs {CONTROL}: paired test)")
        for method in method_order(part.index):
            r = part.loc[method]
            lines.append(f"  {method:<22} {r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                         f"n={int(r['n'])}{_versus(tests, metric, method)}")
    return "\n".join(lines)


def _versus(tests: pd.DataFrame, metric: str, method: str) -> str:
    if (metric, method) not in tests.index:
        return ""
    p = tests.loc[(metric, method), "p_vs_control"]
    if not np.isfinite(p):
        return "  (vs random: no paired samples)"
    verdict = "distinct from random" if p < ALPHA else "not distinguishable from random"
    return f"  ({verdict}, p={p:.2g})"
