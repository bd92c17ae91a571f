"""Shared by checks: explain a dataset in batches, normalize once, score against a reference."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.base.context import CheckContext, MapRecord, StageDone
from methods.common import shared_pieces
from metrics import NORMALIZATIONS
from metrics.normalize import is_constant

FIGURE_NORMALIZATIONS = ("absolute", "signed")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Argmax class of each input, (N,)."""
    return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)])


def explain_all(ctx: CheckContext, target: torch.Tensor,
                extra: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Maps of every input for every method, normalized once per normalization in use.

    Inputs go in batches of ``ctx.batch_size``; within a batch the methods share their common
    pieces (input gradient, noisy gradients, GBP and GradCAM maps). Returns
    ``{method: {normalization: (N, H, W), "constant": (N,) bool}}``, plus ``{key: fn(raw)}``
    for every reduction ``fn`` (raw (B, C, H, W) -> (B, ...)) in ``extra``.
    """
    needed = {spec.normalization for spec in ctx.metrics} | set(FIGURE_NORMALIZATIONS)
    extra = dict(extra or {})
    parts = {m: {key: [] for key in [*needed, *extra, "constant"]} for m in ctx.methods}
    batches = list(zip(ctx.data.inputs.split(ctx.batch_size), target.split(ctx.batch_size)))
    bar = tqdm(total=len(batches) * len(ctx.methods), desc="methods", leave=False,
               disable=not ctx.progress)
    for x, t in batches:
        with shared_pieces():
            for method, fn in ctx.methods.items():
                bar.set_postfix_str(method)
                raw = fn(ctx.model, x, t).detach()
                bar.update()
                parts[method]["constant"].append(is_constant(raw))
                for key in needed:
                    parts[method][key].append(NORMALIZATIONS[key](raw))
                for key, reduce in extra.items():
                    parts[method][key].append(reduce(raw))
    bar.close()
    return {m: {key: torch.cat(v) for key, v in out.items()} for m, out in parts.items()}


def score(ctx: CheckContext, maps: dict, reference: dict, base: dict,
          target: torch.Tensor) -> Iterator[dict]:
    """One row per (sample, metric): similarity of ``maps`` to ``reference``."""
    constant = (maps["constant"] | reference["constant"]).cpu()
    samples = ctx.data.samples.tolist()
    targets = target.cpu().tolist()
    base = {**base, "method_hparams": method_hparams(ctx.methods.get(base.get("method")))}
    for spec in ctx.metrics:
        values = spec.fn(maps[spec.normalization], reference[spec.normalization]).double().cpu()
        for i, value in enumerate(values.tolist()):
            reason = "constant map" if constant[i] else ("" if value == value else "undefined")
            yield {**base, "sample": samples[i], "target": targets[i], "metric": spec.name,
                   "value": float("nan") if constant[i] else value,
                   "normalization": spec.normalization, "reason": reason}


def score_stage(ctx: CheckContext, references: dict, knobs: dict, stage: str, index: int,
                target: torch.Tensor, with_maps: bool = False
                ) -> Iterator[dict | MapRecord | StageDone]:
    """Explain the inputs with the model as it is now and score every method against its
    ``references`` maps (:func:`explain_all` output): one unit of rows per method, followed by
    its map record when ``with_maps``. ``knobs`` are columns of every row (``check`` among
    them); methods not in ``ctx.methods`` (finished units of a resumed run) are skipped. Ends
    with :class:`StageDone`: the stage's units are written at once."""
    if not ctx.methods:
        return
    stage_maps = explain_all(ctx, target)
    for method, maps in stage_maps.items():
        base = {**knobs, "method": method, "stage": stage, "stage_index": index}
        yield from score(ctx, maps, references[method], base, target)
        if with_maps:
            yield map_record(ctx, maps, knobs["check"], method, stage, index)
    yield StageDone(index)


def method_hparams(method) -> str:
    """The method's own hyperparameters as sorted JSON, e.g. ``{"classes": "all", "k": 10}``:
    the keywords the runner bound (``harness.run.BoundMethod``), without the run-wide
    ``internal_batch_size`` and ``seed`` (their own columns / run.json); ``{}`` otherwise."""
    keywords = getattr(method, "keywords", None) or {}
    own = {k: v for k, v in keywords.items() if k not in ("internal_batch_size", "seed")}
    return json.dumps(own, sort_keys=True, default=str)


def map_record(ctx: CheckContext, maps: dict, check: str, method: str, stage: str,
               stage_index: int) -> MapRecord | None:
    k = min(ctx.n_maps, len(ctx.data.samples))
    if k <= 0:
        return None
    return MapRecord(check=check, method=method, stage=stage, stage_index=stage_index,
                     samples=ctx.data.samples[:k].cpu(),
                     maps={key: maps[key][:k].cpu() for key in FIGURE_NORMALIZATIONS})
