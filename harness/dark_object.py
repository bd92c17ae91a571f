"""A synthetic task for the input-bias probe (Brocki & Chung 2020, "Input Bias in Rectified
Gradients and Modified Saliency Maps", arXiv 2011.05002): the class is the shape of one object
(``square``, ``disk``, ``cross``); in half of the images the object is dark on a bright
background, in the other half bright on a dark background. The object is all that matters for
the label, so a faithful map puts its mass on the object in both polarities; a method that
multiplies by the input (whose zero is black here) loses the dark objects.

Every image comes with its ground-truth object mask, so localisation can be scored
(``mass_in_object`` in ``checks.input_bias``). Images are generated from a seeded generator per
split (no files, no network), gray in [0, 1], then laid out for the model like the other gray
datasets (resized to its input size, repeated over its channels, normalized with its mean/std).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from harness.base.dataset import DATASETS, Dataset, check_split, first_count, to_model_input

SHAPES = ("square", "disk", "cross")
POLARITIES = ("dark", "bright")  # the object's brightness relative to the background
SPLIT_SIZES = {"train": 3000, "test": 600}
SPLIT_OFFSETS = {"train": 0, "test": SPLIT_SIZES["train"]}  # sample = index in train + test


@DATASETS.register
def dark_object(n: int | None = 16, data_config: dict | None = None, split: str = "test",
                size: int = 28, seed: int = 0, dark: float = 0.1, bright: float = 0.9,
                noise: float = 0.05, **_) -> Dataset:
    """Dark objects on bright backgrounds and bright objects on dark ones, ``split`` ``train``
    (3,000 images) or ``test`` (600), the first ``n``; ``size`` x ``size`` pixels before the
    resize to the model's input. Pixel values: ``dark`` and ``bright`` plus Gaussian noise of
    std ``noise``, clipped to [0, 1]. Polarity alternates with the sample index (even: dark
    object). ``Dataset.masks``: (N, H, W) bool, the object's pixels at the model's input size.
    """
    check_split(split, tuple(SPLIT_SIZES))
    total = SPLIT_SIZES[split]  # the whole split is drawn, so the first n never depend on n
    samples = np.arange(total) + SPLIT_OFFSETS[split]
    generator = np.random.default_rng([seed, SPLIT_OFFSETS[split]])
    labels = generator.integers(0, len(SHAPES), size=total)
    masks = np.stack([object_mask(size, SHAPES[label], generator) for label in labels])
    images = render(masks, samples % 2 == 0, dark, bright, noise, generator)
    count = first_count(n, total)
    samples, labels, masks, images = samples[:count], labels[:count], masks[:count], images[:count]
    config = data_config or {}
    inputs, mean, std = to_model_input(torch.from_numpy(images).unsqueeze(1), config)
    return Dataset(inputs=inputs, labels=torch.from_numpy(labels.astype(np.int64)),
                   samples=torch.from_numpy(samples.astype(np.int64)), mean=mean, std=std,
                   source=f"synthetic dark_object, {split} split (seed {seed})",
                   class_names=list(SHAPES),
                   masks=_resized_masks(masks, tuple(inputs.shape[-2:])))


def object_mask(size: int, shape: str, generator: np.random.Generator) -> np.ndarray:
    """(size, size) bool: one ``shape`` of random radius and position, inside the image."""
    radius = generator.uniform(0.18, 0.28) * size
    margin = math.ceil(radius) + 1
    cy, cx = generator.uniform(margin, size - margin, size=2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "disk":
        return dy ** 2 + dx ** 2 <= radius ** 2
    arm = radius * 0.35  # cross: two bars of width 2 * arm
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | \
        ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))


def render(masks: np.ndarray, dark_objects: np.ndarray, dark: float, bright: float,
           noise: float, generator: np.random.Generator) -> np.ndarray:
    """Gray images (N, H, W) float32 in [0, 1] of the masks (N, H, W) with their polarity."""
    on_dark = dark_objects[:, None, None]
    object_value = np.where(on_dark, dark, bright)
    background = np.where(on_dark, bright, dark)
    images = np.where(masks, object_value, background)
    images = images + generator.normal(0.0, noise, size=images.shape)
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def _resized_masks(masks: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Masks at the model's input size (nearest neighbour), (N, H, W) bool."""
    tensor = torch.from_numpy(masks).float().unsqueeze(1)
    if tuple(tensor.shape[-2:]) != size:
        tensor = torch.nn.functional.interpolate(tensor, size=size, mode="nearest")
    return tensor[:, 0] > 0.5
