"""What a check receives from the runner and what it yields back (no file I/O in checks)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from harness.base.dataset import Dataset

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
    n_maps: int = 4  # maps of the first n_maps samples are yielded for figures
    progress: bool = True
    # labels ("true" | "random") -> the run's architecture trained on them (cached checkpoints);
    # filled by the runner for checks that train (``trains_models``), else None
    train: Callable[[str], TrainedModel] | None = None
    # (check, stage_index, method) units already stored by an interrupted run: not recomputed
    done: frozenset[tuple[str, int, str]] = frozenset()

    def pending(self, check: str, stage_index: int) -> CheckContext:
        """This context with only the methods whose unit at ``stage_index`` is not done."""
        methods = {m: fn for m, fn in self.methods.items()
                   if (check, stage_index, m) not in self.done}
        return replace(self, methods=methods)


@dataclass
class MapRecord:
    """Normalized maps of the first samples at one stage, for figure grids."""

    check: str
    method: str
    stage: str
    stage_index: int
    samples: torch.Tensor  # (K,)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # normalization -> (K, H, W)
