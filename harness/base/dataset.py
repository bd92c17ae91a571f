"""The dataset type every dataset returns, its registry, and the helpers loaders share.

``DATASETS[name](n=..., data_config=..., **cfg) -> Dataset`` (the loaders live in
:mod:`harness.data` and :mod:`harness.dark_object`; this module is the base they build on).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from harness.base.registry import Registry

DATASETS = Registry("dataset")


@dataclass
class Dataset:
    inputs: torch.Tensor  # (N, C, H, W) float, preprocessed for the model
    labels: torch.Tensor  # (N,) long
    samples: torch.Tensor  # (N,) long: index of each input in the full dataset
    mean: tuple[float, ...]  # per channel: inputs * std + mean gives display images in [0, 1]
    std: tuple[float, ...]
    source: str = ""  # where the data came from, told to the user
    class_names: list[str] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (N, H, W) bool ground-truth object masks, if known

    def display_images(self) -> np.ndarray:
        """(N, H, W, C) float32 in [0, 1] for figures."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        images = (self.inputs.cpu() * std + mean).clamp(0, 1)
        return images.permute(0, 2, 3, 1).numpy().astype(np.float32)


def first_count(n: int | None, total: int) -> int:
    if n is not None and n < 1:
        raise ValueError(f"dataset.n must be >= 1, got {n}")
    return total if n is None else min(n, total)


def check_split(split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise ValueError(f"dataset.split must be one of {', '.join(valid)}, got {split!r}")


def norm_stats(data_config: dict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(data_config.get("mean", (0.0,) * channels))
    std = tuple(data_config.get("std", (1.0,) * channels))
    return mean, std


def to_model_input(images: torch.Tensor, data_config: dict
                   ) -> tuple[torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """Gray images (N, 1, h, w) in [0, 1] -> model inputs (N, C, H, W): resized (bilinear) to
    the model's input size, repeated over its channels, normalized with its mean and std."""
    channels, height, width = data_config.get("input_size", (1, 28, 28))
    if tuple(images.shape[-2:]) != (height, width):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear",
                                                 align_corners=False).clamp(0, 1)
    mean, std = norm_stats(data_config, channels)
    inputs = (images.repeat(1, channels, 1, 1) - torch.tensor(mean).view(1, -1, 1, 1)) \
        / torch.tensor(std).view(1, -1, 1, 1)
    return inputs, mean, std
