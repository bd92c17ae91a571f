"""Model parameter randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps",
arXiv 1810.03292, §4): randomize the model stage by stage and compare each method's maps with
its maps of the original model.

* ``cascading``: cumulative randomization, from the logits down (``order=top_down``, the paper)
  or from the input up (``order=bottom_up``, advised by Hedström et al. 2023).
* ``independent``: one stage at a time, the rest of the model original.
* ``smooth_mprt`` (Hedström et al. 2024, "A Fresh Look at Sanity Checks for Saliency Maps",
  arXiv 2401.06465): the cascade from the input up, every map the mean over N = 50 noisy copies
  of the input (:mod:`checks.smoothing`). The same option, ``smooth: {n: N, noise_magnitude:
  0.1}``, smooths ``cascading`` and ``independent`` (``n: 0``, the default there, is off).

Stage 0 (``original``) compares the original map with a re-computation: deterministic methods
score 1 there, a built-in determinism check. Randomization is in place and the model is restored
from a saved state dict on exit, also when the generator is interrupted.

Every run audits its coverage (:mod:`harness.base.coverage`): the tensors each stage changed and
those no stage changed, handed to the runner as a :class:`RunNote` (``run.json``: ``coverage``;
a warning in the summary when a parameter was never randomized), never as rows. A resumed run
randomizes its finished stages again (cheap, and the cascade builds on them), so its audit is
whole too.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Literal

from tqdm.auto import tqdm

from checks.plotting import grid_figures, similarity_figure
from checks.registry import CHECKS
from checks.scoring import explain_all, map_record, predict, score_stage
from checks.smoothing import COLUMNS as SMOOTH_COLUMNS
from checks.smoothing import Smoothing, smoothed
from harness.base.context import CheckContext, MapRecord, RunNote
from harness.base.coverage import CoverageAudit
from harness.base.randomize import ordered, randomize_, restore_, restored, stage_seed, stages
from methods.prefix import reused_prefix

TARGETS = ("fixed", "argmax")
Order = Literal["top_down", "bottom_up"]
Granularity = Literal["block", "module"]
Init = Literal["default", "normal", "permute"]
Target = Literal["fixed", "argmax"]
COLUMNS = {"order": "", "granularity": "", "init": "", "target_policy": "",  # the knobs
           **SMOOTH_COLUMNS}
NO_SMOOTHING = MappingProxyType({"n": 0, "noise_magnitude": 0.1})
SMOOTH_MPRT = MappingProxyType({"n": 50, "noise_magnitude": 0.1})  # the paper's settings
FIGURES = (similarity_figure, grid_figures)  # Figures 4 and 2 of the paper
# the similarity of the last stage's map (the fully randomized model) to the original one
HEADLINE = ("ssim", "spearman_abs", "spearman", "hog")


FALLBACK_LIMIT = 2 * 2**30  # a context built by hand, without the runner's memory_limit


def prefix_budget(memory_limit: int | None) -> int:
    """Bytes of recorded activations a check may keep: half the run's ``memory_limit`` (the
    runner resolves it: given, or half the available memory)."""
    return (memory_limit or FALLBACK_LIMIT) // 2


def validate_smoothing(settings: dict) -> None:
    """The ``smooth`` setting, checked when the run is planned (before any model loads)."""
    Smoothing.of(settings.get("smooth"))


@CHECKS.register(title="Cascading randomization", columns=COLUMNS, figures=FIGURES,
                 headline=HEADLINE, validate=validate_smoothing)
def cascading(ctx: CheckContext, order: Order = "top_down", granularity: Granularity = "block",
              init: Init = "default", target: Target = "fixed", batchnorm_stats: bool = False,
              smooth: Mapping = NO_SMOOTHING, reuse_prefix: bool = True,
              **_) -> Iterator[dict | MapRecord]:
    """Cascading randomization: stage k has the first k stages (in ``order``) randomized."""
    yield from _randomization_test(ctx, "cascading", True, order, granularity, init, target,
                                   batchnorm_stats, smooth, reuse_prefix)


@CHECKS.register(title="Independent randomization", columns=COLUMNS, figures=FIGURES,
                 headline=HEADLINE, validate=validate_smoothing)
def independent(ctx: CheckContext, order: Order = "top_down", granularity: Granularity = "block",
                init: Init = "default", target: Target = "fixed", batchnorm_stats: bool = False,
                smooth: Mapping = NO_SMOOTHING, reuse_prefix: bool = True,
                **_) -> Iterator[dict | MapRecord]:
    """Independent randomization: stage k has only the k-th stage (in ``order``) randomized."""
    yield from _randomization_test(ctx, "independent", False, order, granularity, init, target,
                                   batchnorm_stats, smooth, reuse_prefix)


@CHECKS.register(title="Smooth MPRT (cascading, noisy-copy means)", columns=COLUMNS,
                 figures=FIGURES, headline=HEADLINE, validate=validate_smoothing)
def smooth_mprt(ctx: CheckContext, order: Order = "bottom_up",
                granularity: Granularity = "block", init: Init = "default",
                target: Target = "fixed", batchnorm_stats: bool = False,
                smooth: Mapping = SMOOTH_MPRT, reuse_prefix: bool = True,
                **_) -> Iterator[dict | MapRecord]:
    """Smooth MPRT (Hedström et al. 2024, arXiv 2401.06465): the cascade with every map, of
    the original and of each randomized model, the mean of the method's maps of ``smooth.n``
    copies of the input x (N, C, H, W), one clean and n - 1 with N(0, sigma^2) noise, sigma =
    ``smooth.noise_magnitude`` * (max x - min x) per sample; bottom-up by default."""
    yield from _randomization_test(ctx, "smooth_mprt", True, order, granularity, init, target,
                                   batchnorm_stats, smooth, reuse_prefix)


def _randomization_test(ctx: CheckContext, check: str, cumulative: bool, order: str,
                        granularity: str, init: str, target: str, batchnorm_stats: bool,
                        smooth: Mapping | None = None, reuse_prefix: bool = True
                        ) -> Iterator[dict | MapRecord | RunNote]:
    if target not in TARGETS:
        raise ValueError(f"check.target must be fixed or argmax, got {target!r}")
    smoothing = Smoothing.of(smooth)
    plan = ordered(stages(ctx.model, ctx.data.inputs, granularity), order)
    knobs = {"check": check, "order": order, "granularity": granularity, "init": init,
             "target_policy": target, **smoothing.columns()}
    ctx = replace(ctx, methods=smoothed(ctx.methods, smoothing, ctx.seed))
    # the unchanged part of every stage's forward pass is the original one: recorded once and
    # reused, unless every stage changes the input's first layer (a bottom-up cascade, whose
    # passes still run through the trace with its BatchNorms folded)
    record = not (cumulative and order == "bottom_up")
    with restored(ctx.model) as saved, reused_prefix(
            ctx.model, prefix_budget(ctx.memory_limit), enabled=reuse_prefix,
            record=record) as reusing:
        audit = CoverageAudit.of(ctx.model, saved)
        explained = predict(ctx.model, ctx.data.inputs, ctx.batch_size)
        # a resumed run explains the original model only for methods with a unit left to do
        todo = [ctx.pending(index) for index in range(len(plan) + 1)]
        needed = set().union(*(stage.methods for stage in todo))
        references = explain_all(replace(ctx, methods={m: ctx.methods[m] for m in needed}),
                                 explained) if needed else {}
        for m, maps in references.items():
            yield map_record(ctx, maps, check, m, "original", 0)
        yield from score_stage(todo[0], references, knobs, "original", 0, explained)
        bar = tqdm(plan, desc=f"{check} stages", disable=not ctx.progress, leave=False)
        for index, (name, modules) in enumerate(bar, start=1):
            if not cumulative:
                restore_(ctx.model, saved)
                audit.restored()
            # randomized even when done: the cumulative model of later stages builds on it,
            # and the coverage audit of a resumed run is whole
            randomize_(modules, init, stage_seed(ctx.seed, name), batchnorm_stats)
            audit.differs(ctx.model, name)
            if not todo[index].methods:
                continue
            stage_target = explained if target == "fixed" else predict(
                ctx.model, ctx.data.inputs, ctx.batch_size)
            yield from score_stage(todo[index], references, knobs, name, index, stage_target,
                                    with_maps=True)
        reused = (reusing.stats.record() if reusing is not None
                  else "untraceable" if reuse_prefix else "off")
    yield RunNote("coverage", audit.record(), audit.summary_line(batchnorm_stats))
    yield RunNote("prefix_reuse", reused)
