"""Random logit test (Sixt et al. 2020, "When Explanations Lie: Why Many Modified BP
Attributions Fail", arXiv 1912.09818, §5): the similarity between a method's map for the
explained class y and its map for a class y_off drawn uniformly from the other classes. A
method that explains the model's decision for a class must change with the class; a
class-insensitive method (``sobel``, and the modified backpropagation rules the paper studies)
scores high. Lower is better.

* Stage 0 (``explained_class``) compares the map for y with a re-computation: 1 for
  deterministic methods, the harness's built-in determinism check.
* Stage 1 (``off_class``) compares the map for y_off with the map for y, with every metric of
  the run on 2-D maps (:func:`checks.scoring.score`).

y_off is drawn for each sample from a private generator seeded by the run's seed and the
sample's index (so a sample gets the same class in every shard, batch and rerun) and is
recorded in the ``off_class`` column (-1 at stage 0). ``target``: ``fixed`` (y = the model's
prediction) or ``label`` (the dataset's label).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from checks.model_randomization import HEADLINE
from checks.plotting import grid_figures
from checks.random_logit_figures import bar_figure
from checks.registry import CHECKS
from checks.scoring import explain_all, map_record, predict, score, score_stage
from harness.base.context import CheckContext, MapRecord, StageDone
from harness.base.randomize import stage_seed

STAGES = ("explained_class", "off_class")


@CHECKS.register(title="Random logit (off-class similarity)",
                 columns={"target_policy": "", "off_class": -1},
                 figures=(bar_figure, grid_figures), headline=HEADLINE)
def random_logit(ctx: CheckContext, target: Literal["fixed", "label"] = "fixed",
                 **_) -> Iterator[dict | MapRecord]:
    """Maps of x (N, C, H, W) for y versus maps for a random other class y_off."""
    if target not in ("fixed", "label"):
        raise ValueError(f"check.target must be fixed or label, got {target!r}")
    x = ctx.data.inputs
    explained = (predict(ctx.model, x, ctx.batch_size) if target == "fixed"
                 else ctx.data.labels.to(x.device))
    with torch.no_grad():
        classes = ctx.model(x[:1]).shape[1]
    off = off_classes(explained, ctx.data.samples, classes, ctx.seed)
    knobs = {"check": "random_logit", "target_policy": target, "off_class": -1}
    todo = [ctx.pending(index) for index in range(len(STAGES))]
    needed = {m: ctx.methods[m] for m in set().union(*(stage.methods for stage in todo))}
    if not needed:
        return
    references = explain_all(replace(ctx, methods=needed), explained)
    for method, maps in references.items():
        yield map_record(ctx, maps, "random_logit", method, STAGES[0], 0)
    yield from score_stage(todo[0], references, knobs, STAGES[0], 0, explained)
    yield from _off_class_stage(todo[1], references, knobs, explained, off)


def off_classes(target: Tensor, samples: Tensor, classes: int, seed: int) -> Tensor:
    """For each sample a class drawn uniformly from the ``classes - 1`` classes other than its
    ``target`` (N,), from a generator seeded by ``seed`` and the sample's index. -> (N,)."""
    if classes < 2:
        raise ValueError(f"random_logit needs a model with >= 2 classes, got {classes}")
    drawn = []
    for sample, t in zip(samples.tolist(), target.tolist()):
        generator = torch.Generator().manual_seed(stage_seed(seed, f"random_logit:{sample}"))
        r = int(torch.randint(classes - 1, (1,), generator=generator))
        drawn.append(r + (r >= t))  # skip the target: uniform over the others
    return torch.tensor(drawn, dtype=torch.long, device=target.device)


def _off_class_stage(ctx: CheckContext, references: dict, knobs: dict, explained: Tensor,
                     off: Tensor) -> Iterator[dict | MapRecord | StageDone]:
    if not ctx.methods:
        return
    off_of = dict(zip(ctx.data.samples.tolist(), off.tolist()))
    stage = {**knobs, "stage": STAGES[1], "stage_index": 1}
    for method, maps in explain_all(ctx, off).items():
        for row in score(ctx, maps, references[method], {**stage, "method": method}, explained):
            yield {**row, "off_class": off_of[row["sample"]]}
        yield map_record(ctx, maps, "random_logit", method, STAGES[1], 1)
    yield StageDone(1)
