"""What a check receives from the runner, what it yields back, and what it declares about
itself (:class:`CheckFacts`, given at registration). No file I/O in checks: the runner writes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from harness.base.dataset import Dataset

if TYPE_CHECKING:  # pandas and matplotlib load only where tables and figures are made
    import pandas as pd
    from matplotlib.figure import Figure

Method = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # hparams bound


@dataclass
class MetricSpec:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B,H,W), (B,H,W) -> (B,)
    normalization: str  # key of metrics.NORMALIZATIONS


@dataclass
class TrainedModel:
    """A model of the run's architecture trained by the runner (``harness.train``) on the
    dataset's train split, with the labels ``true`` or ``random`` (a fixed permutation)."""

    model: nn.Module  # eval mode, on the run's device
    labels: str  # "true" | "random"
    train_accuracy: float  # on the images it was trained on, with the labels it was trained on
    test_accuracy: float  # on the whole test split, with the true labels
    train_size: int
    test_size: int
    epochs: int  # epochs actually run (early stop once train accuracy >= the target)
    checkpoint: str = ""  # cache file it was loaded from or saved to
    cached: bool = False  # loaded from the cache instead of trained


@dataclass
class CheckContext:
    model: nn.Module
    data: Dataset  # inputs already on the run's device
    methods: dict[str, Method]
    metrics: list[MetricSpec]
    seed: int = 0
    batch_size: int = 16  # images per method call (each method chunks further internally)
    internal_batch_size: int = 16  # rows per forward pass of a check's own batches (perturbed images)
    n_maps: int = 4  # maps of the first n_maps samples are yielded for figures
    progress: bool = True
    # bytes the run may use (``memory_limit``, resolved by the runner): a check keeps reusable
    # activations (methods.prefix) under half of it
    memory_limit: int | None = None
    # labels ("true" | "random") -> the run's architecture trained on them (cached checkpoints);
    # filled by the runner for checks that train (``trains_models``), else None
    train: Callable[[str], TrainedModel] | None = None
    # finished(stage_index, method): is that unit of work already stored (a resumed run)?
    # The store answers; a check asks it to skip finished work, and yields no rows for it.
    finished: Callable[[int, str], bool] = lambda stage_index, method: False

    def pending(self, stage_index: int) -> CheckContext:
        """This context with only the methods whose unit at ``stage_index`` is not finished."""
        methods = {m: fn for m, fn in self.methods.items() if not self.finished(stage_index, m)}
        return replace(self, methods=methods)


@dataclass(frozen=True)
class StageDone:
    """Yielded by a check after the last row of a stage: the stage's units are complete and
    are written at once, so an interruption during the next stage keeps them. (Without it a
    stage is written when the next one starts or the check ends.)"""

    stage_index: int


@dataclass(frozen=True)
class RunNote:
    """A run-level fact a check hands to the runner, never a row: ``run.json`` keeps ``value``
    (JSON-able) under ``key`` and the end-of-run summary ends with ``line`` (if any). A resumed
    run recomputes it (a check yields it whether or not its stages were finished before)."""

    key: str
    value: Any
    line: str = ""


@dataclass
class MapRecord:
    """Normalized maps of the first samples at one stage, for figure grids."""

    check: str
    method: str
    stage: str
    stage_index: int
    samples: torch.Tensor  # (K,)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # normalization -> (K, H, W)


# The columns every row has (results/README.md): the tidy table's required columns, filled by
# the runner (run_id, model, dataset, seed) or by the check, and the scoring columns of
# :func:`checks.scoring.score`, with the value a row that lacks one gets.
REQUIRED_COLUMNS = ("run_id", "model", "dataset", "method", "check", "stage", "stage_index",
                    "sample", "target", "metric", "value", "seed")
STANDARD_COLUMNS: dict[str, Any] = {"method": "", "normalization": "", "reason": "",
                                    "method_hparams": "{}"}


@dataclass
class FigureData:
    """What a check's figure functions draw from, read from a run dir by the runner.

    ``maps``: method -> (K, S, H, W) float32 maps of the first K saved ``samples`` at the S
    stages ``stage_names`` (stage_index order); NaN where a method lacks a stage or a sample.
    ``images``: the K display images (H, W, C) in [0, 1] (None when not saved), ``labels``
    a caption suffix per sample such as `` (tabby cat)``.
    """

    check: str
    title: str  # the check's title with model and dataset, for figure titles
    heading: str  # the check's title alone
    rows: pd.DataFrame  # the check's rows
    stage_names: list[str] = field(default_factory=list)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    images: list[np.ndarray | None] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    normalization: str = "absolute"


FigureFn = Callable[[FigureData], Iterator[tuple[str, "Figure"]]]  # yields (file stem, figure)
SummaryFn = Callable[["pd.DataFrame"], str]


@dataclass(frozen=True)
class CheckFacts:
    """What a check declares at registration: ``@CHECKS.register(columns=..., figures=...)``.

    The runner, store, collector and figure driver read these and name no check.
    """

    title: str = ""  # for figures and the summary, e.g. "Cascading randomization"
    # extra columns of its rows -> the value of a row that does not set it (one schema per part)
    columns: Mapping[str, Any] = field(default_factory=dict)
    # the row columns (after ``check``) naming one unit of work: one parquet part, resumed whole
    unit: tuple[str, ...] = ("stage_index", "method")
    # metrics whose rows describe a model, not an input (sample -1): the collect step keeps
    # them once per model instead of once per shard
    per_model_metrics: tuple[str, ...] = ()
    trains_models: bool = False  # the runner fills ctx.train and explains the test split
    summary: SummaryFn | None = None  # the end-of-run text; None: the similarity summary
    figures: tuple[FigureFn, ...] = ()
    # checks the settings (the check's config) before any model or data is loaded: raises a
    # one-line ValueError for a value its Literal annotations cannot express (a nested setting)
    validate: Callable[[dict], None] | None = None
    # the metrics that sum the check up, read at its last stage (mean per method over samples):
    # the sweep figures set two checks' headline scores against each other
    headline: tuple[str, ...] = ()

    def row_defaults(self) -> dict[str, Any]:
        return {**STANDARD_COLUMNS, **self.columns}


def check_check_facts(name: str, fn: Callable, facts: CheckFacts) -> None:
    """Registration check of a check (run at import): its unit names row columns it has."""
    from harness.base.registry import RegistrationError

    known = set(REQUIRED_COLUMNS) | set(facts.row_defaults())
    unknown = [c for c in facts.unit if c not in known]
    if unknown:
        raise RegistrationError(f"check {name!r}: unit column {', '.join(unknown)} is neither a "
                                "required column nor one of its declared columns")
    if not all(callable(f) for f in facts.figures) or any(
            f is not None and not callable(f) for f in (facts.summary, facts.validate)):
        raise RegistrationError(f"check {name!r}: figures, summary and validate must be "
                                "functions")


