"""Efficient MPRT (Hedström et al. 2024, "A Fresh Look at Sanity Checks for Saliency Maps",
arXiv 2401.06465, eMPRT): instead of comparing maps stage by stage, the relative rise of each
map's complexity from the original to the fully randomized model,

    complexity_rise = (H(e_rand) - H(e)) / H(e),

H the Shannon entropy (natural log) of an equal-width histogram of the map (``bins`` = 100), e
the map of the original model, e_rand the map of the model with every stage randomized
(cumulatively, ``order`` bottom-up, the same stages and per-stage seeds as ``cascading``): two
explanations per input instead of one per stage. A method that explains the model gives
noisier, higher-entropy maps of a random model (a rise > 0); a model-independent method such
as ``sobel`` scores 0.

The map is the channel sum of the raw signed attribution, sum_c a (B, H, W): no absolute value
and no normalization, as Quantus 0.6's ``EfficientMPRT`` defaults (``abs=False,
normalise=False``, ``discrete_entropy`` with 100 bins); ``absolute: true`` takes sum_c |a|.
(A positive rescaling of the map, like a normalization by its maximum, leaves the equal-width
histogram and so H unchanged.)

Rows, per sample (none per model): stage 0 ``original`` and stage 1 ``randomized``, each with
``map_entropy`` (H, per method) and ``output_entropy`` (entropy of the softmax output, method
empty: it describes the model on that input); stage 1 adds ``complexity_rise`` per method and
``output_entropy_rise`` ((H_out(rand) - H_out) / H_out, method empty). A map with H(e) = 0 (a
constant map) gets NaN with its ``reason``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from checks.efficient_mprt_figures import RISE_METRICS, rise_figure
from checks.model_randomization import Granularity, Init, Order
from checks.plotting import grid_figures
from checks.registry import CHECKS
from checks.scoring import explain_all, map_record, method_hparams, predict
from checks.summary import measurement_summary
from harness.base.context import CheckContext, MapRecord, StageDone
from harness.base.randomize import ordered, randomize_, restored, stage_seed, stages
from metrics.complexity import histogram_entropy, output_entropy

STAGES = ("original", "randomized")
COLUMNS = {"order": "", "granularity": "", "init": "", "bins": -1, "map_reduction": ""}
ENTROPY = "entropy"  # explain_all's extra reduction: the map's histogram entropy


def summary(rows) -> str:
    """Mean complexity rise per method and the rise of the output's entropy."""
    last = rows[rows["stage_index"] == 1]
    # the output's entropy rise describes the model on each input, not a method
    last = last.assign(method=last["method"].replace("", "(model output)"))
    return measurement_summary(last, RISE_METRICS)


@CHECKS.register(title="Efficient MPRT (complexity rise)", columns=COLUMNS, summary=summary,
                 figures=(rise_figure, grid_figures), headline=("complexity_rise",))
def efficient_mprt(ctx: CheckContext, order: Order = "bottom_up",
                   granularity: Granularity = "block", init: Init = "default",
                   batchnorm_stats: bool = False, bins: int = 100, absolute: bool = False,
                   **_) -> Iterator[dict | MapRecord]:
    """Entropy of each method's maps of x (N, C, H, W) for the original and the fully
    randomized model, and its relative rise."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"check.bins must be a whole number >= 2, got {bins!r}")
    plan = ordered(stages(ctx.model, ctx.data.inputs, granularity), order)
    base = {"check": "efficient_mprt", "order": order, "granularity": granularity,
            "init": init, "bins": bins, "map_reduction": "sum_abs" if absolute else "sum"}
    todo = [ctx.pending(index) for index in range(len(STAGES))]
    needed = {m: ctx.methods[m] for m in set().union(*(stage.methods for stage in todo))}
    explain = replace(ctx, methods=needed, metrics=[])  # scored by entropy, not by metrics
    reduce = {ENTROPY: lambda raw: histogram_entropy((raw.abs() if absolute else raw).sum(1),
                                                     bins)}
    with restored(ctx.model):
        explained = predict(ctx.model, ctx.data.inputs, ctx.batch_size)
        states = [_state(explain, explained, reduce)]
        for name, modules in plan:
            randomize_(modules, init, stage_seed(ctx.seed, name), batchnorm_stats)
        states.append(_state(explain, explained, reduce))
    # rows leave the check only once the model is restored (a consumer may stop at any row)
    for index, stage in enumerate(STAGES):
        rows = {**base, "stage": stage, "stage_index": index}
        yield from _stage_rows(ctx, todo[index], states, index, rows, explained)
        yield StageDone(index)


def _state(ctx: CheckContext, explained: Tensor, reduce: dict) -> tuple[dict, Tensor]:
    """The maps (with their entropies) and the output entropies of the model as it is now."""
    maps = explain_all(ctx, explained, reduce) if ctx.methods else {}
    with torch.no_grad():
        logits = torch.cat([ctx.model(x) for x in ctx.data.inputs.split(ctx.batch_size)])
    return maps, output_entropy(logits)


def _stage_rows(ctx: CheckContext, todo: CheckContext, states: list, index: int, base: dict,
                explained: Tensor) -> Iterator[dict | MapRecord]:
    (maps, out), (rand_maps, rand_out) = states
    stage_maps, stage_out = states[index]
    if not ctx.finished(index, ""):
        yield from _rows(ctx, {**base, "method": ""}, "output_entropy", stage_out, explained)
        if index == 1:
            yield from _rows(ctx, {**base, "method": ""}, "output_entropy_rise",
                             _rise(out, rand_out), explained, out == 0, "zero output entropy")
    for method in todo.methods:
        row = {**base, "method": method, "method_hparams": method_hparams(ctx.methods[method])}
        yield from _rows(ctx, row, "map_entropy", stage_maps[method][ENTROPY], explained)
        if index == 1:
            h, h_rand = maps[method][ENTROPY], rand_maps[method][ENTROPY]
            yield from _rows(ctx, row, "complexity_rise", _rise(h, h_rand), explained,
                             h == 0, "zero map entropy (constant map)")
        yield map_record(ctx, stage_maps[method], "efficient_mprt", method, base["stage"], index)


def _rise(before: Tensor, after: Tensor) -> Tensor:
    """(after - before) / before, NaN where before is 0."""
    return torch.where(before == 0, math.nan, (after - before) / before.clamp_min(1e-300))


def _rows(ctx: CheckContext, base: dict, metric: str, values: Tensor, target: Tensor,
          zero: Tensor | None = None, reason: str = "") -> Iterator[dict]:
    """One row per sample; the ``reason`` where ``zero`` (H = 0 before: the rise is NaN)."""
    zero = torch.zeros_like(values, dtype=torch.bool) if zero is None else zero
    for sample, t, value, z in zip(ctx.data.samples.tolist(), target.tolist(),
                                   values.tolist(), zero.tolist()):
        yield {**base, "sample": sample, "target": t, "metric": metric, "value": float(value),
               "normalization": "", "reason": reason if z else ""}
