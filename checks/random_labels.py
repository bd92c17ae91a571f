"""Data randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps",
arXiv 1810.03292, §5): the same architecture trained once on the true labels and once on
randomly permuted labels until it memorizes them; each method's maps of the two models on the
same test inputs are compared. A method whose maps barely change cannot be explaining what the
model learned from the data.

Rows (besides the similarity rows, one per method, sample and metric):

* ``train_accuracy`` and ``test_accuracy`` of both models (``method`` empty, ``sample`` and
  ``target`` -1, ``n_images`` the images they were measured on), stage ``true_labels``
  (stage_index 0) or ``random_labels`` (stage_index 1). Train accuracy is measured with the
  labels the model was trained on, test accuracy with the true labels (chance for the
  random-label model).
* Stage 0 (``true_labels``) compares the true-label model's maps with a re-computation (1 for
  deterministic methods); stage 1 (``random_labels``) compares the random-label model's maps
  with the true-label model's maps.

The models come from ``ctx.train`` (the runner trains them, or loads cached checkpoints); the
check itself does no file I/O.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Literal

import torch

from checks.random_labels_figures import ACCURACY_METRICS, bar_figure, grid_figure
from checks.registry import CHECKS
from checks.scoring import explain_all, map_record, predict, score_stage
from checks.summary import measurement_summary, similarity_summary
from harness.base.context import CheckContext, MapRecord, TrainedModel

TARGETS = ("label", "fixed", "argmax")
STAGES = ("true_labels", "random_labels")


def summary(rows) -> str:
    """Both models' accuracies, then the similarity of their maps."""
    accuracies = measurement_summary(rows, ACCURACY_METRICS, index="stage", digits=4)
    return "\n\n".join(t for t in (accuracies, similarity_summary(rows)) if t)


@CHECKS.register(title="Data randomization (random labels)",
                 columns={"target_policy": "", "n_images": -1, "epochs": -1},
                 per_model_metrics=ACCURACY_METRICS, trains_models=True, summary=summary,
                 figures=(bar_figure, grid_figure))
def random_labels(ctx: CheckContext, target: Literal["label", "fixed", "argmax"] = "label",
                  **_) -> Iterator[dict | MapRecord]:
    """Maps of the true-label model versus the random-label model on the test inputs.

    ``target``: ``label`` (the input's true label, for both models), ``fixed`` (the class the
    true-label model predicts, for both) or ``argmax`` (each model's own prediction).
    """
    if target not in TARGETS:
        raise ValueError(f"check.target must be one of {', '.join(TARGETS)}, got {target!r}")
    if ctx.train is None:
        raise ValueError("check random_labels trains models: it needs ctx.train (the runner "
                         "provides it)")
    models = [ctx.train("true"), ctx.train("random")]
    knobs = {"check": "random_labels", "target_policy": target}
    for index, trained in enumerate(models):
        if not ctx.finished(index, ""):
            yield from _accuracy_rows(trained, knobs, STAGES[index], index)

    # a resumed run explains only the methods with a unit left to do (the models come from
    # the checkpoint cache)
    todo = [ctx.pending(index) for index in range(len(STAGES))]
    needed = {m: ctx.methods[m] for m in set().union(*(stage.methods for stage in todo))}
    if not needed:
        return
    true_ctx, random_ctx = (replace(ctx, model=trained.model) for trained in models)
    true_target = _target(true_ctx, target)
    references = explain_all(replace(true_ctx, methods=needed), true_target)
    for method, maps in references.items():
        yield map_record(ctx, maps, "random_labels", method, STAGES[0], 0)
    yield from score_stage(replace(true_ctx, methods=todo[0].methods), references, knobs,
                           STAGES[0], 0, true_target)
    random_target = _target(random_ctx, target) if target == "argmax" else true_target
    yield from score_stage(replace(random_ctx, methods=todo[1].methods), references, knobs,
                           STAGES[1], 1, random_target, with_maps=True)


def _target(ctx: CheckContext, policy: str) -> torch.Tensor:
    if policy == "label":
        return ctx.data.labels.to(ctx.data.inputs.device)
    return predict(ctx.model, ctx.data.inputs, ctx.batch_size)


def _accuracy_rows(trained: TrainedModel, knobs: dict, stage: str,
                   index: int) -> Iterator[dict]:
    for metric, value, count in (("train_accuracy", trained.train_accuracy, trained.train_size),
                                 ("test_accuracy", trained.test_accuracy, trained.test_size)):
        yield {**knobs, "method": "", "stage": stage, "stage_index": index, "sample": -1,
               "target": -1, "metric": metric, "value": float(value), "normalization": "",
               "reason": "", "n_images": int(count), "epochs": int(trained.epochs)}

