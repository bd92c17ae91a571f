"""Datasets. ``DATASETS[name](n=..., data_config=..., **cfg) -> Dataset``.

Inputs come out preprocessed for the model (its own timm data config: resize, crop, mean/std),
together with display images for figures. Everything here works offline: the foolbox package
ships 20 real ImageNet photos, scikit-learn ships the digits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.registry import Registry

DATASETS = Registry("dataset")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe"}


@dataclass
class Dataset:
    inputs: torch.Tensor  # (N, C, H, W) float, preprocessed for the model
    labels: torch.Tensor  # (N,) long
    samples: torch.Tensor  # (N,) long: index of each input in the full dataset
    mean: tuple[float, ...]  # per channel: inputs * std + mean gives display images in [0, 1]
    std: tuple[float, ...]
    source: str = ""  # where the data came from, told to the user
    class_names: list[str] = field(default_factory=list)

    def display_images(self) -> np.ndarray:
        """(N, H, W, C) float32 in [0, 1] for figures."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        images = (self.inputs.cpu() * std + mean).clamp(0, 1)
        return images.permute(0, 2, 3, 1).numpy().astype(np.float32)


def _first(n: int | None, total: int) -> int:
    if n is not None and n < 1:
        raise ValueError(f"dataset.n must be >= 1, got {n}")
    return total if n is None else min(n, total)


def _image_transform(data_config: dict):
    import timm.data

    return timm.data.create_transform(**_timm_transform_config(data_config), is_training=False)


def _timm_transform_config(data_config: dict) -> dict:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: data_config[k] for k in keys if k in data_config}
    config.setdefault("input_size", (3, 224, 224))
    return config


def _load_images(paths: list[Path], data_config: dict) -> torch.Tensor:
    transform = _image_transform(data_config)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    return torch.stack(images)


def _norm_stats(data_config: dict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(data_config.get("mean", (0.0,) * channels))
    std = tuple(data_config.get("std", (1.0,) * channels))
    return mean, std


@DATASETS.register
def imagenet_samples(n: int | None = 20, data_config: dict | None = None, **_) -> Dataset:
    """The 20 real ImageNet validation photos shipped in the ``foolbox`` package
    (``foolbox/data/imagenet_XX_<label>.jpg``), read by path without importing foolbox."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dataset imagenet_samples needs the package foolbox "
                           "(pip install foolbox==3.3.4)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(folder.glob("imagenet_*_*.jpg"))
    files = files[: _first(n, len(files))]
    labels = [int(re.match(r"imagenet_\d+_(\d+)", f.stem).group(1)) for f in files]
    config = data_config or {}
    mean, std = _norm_stats(config, 3)
    return Dataset(inputs=_load_images(files, config), labels=torch.tensor(labels),
                   samples=torch.arange(len(files)), mean=mean, std=std,
                   source=f"foolbox ImageNet samples ({folder})",
                   class_names=imagenet_class_names())


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class descriptions bundled with timm (short form)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


@DATASETS.register
def imagenet_folder(root: str | None = None, n: int | None = 16, data_config: dict | None = None,
                    **_) -> Dataset:
    """An ImageNet-style folder: one sub-folder per class (sorted class folders give the class
    indices, as for the ImageNet validation set in WordNet-id folders)."""
    if not root:
        raise ValueError("dataset=imagenet_folder needs dataset.root=PATH (one sub-folder per class)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"dataset.root={root}: no such folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((base / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"dataset.root={root}: no images in class sub-folders")
    files = files[: _first(n, len(files))]
    config = data_config or {}
    mean, std = _norm_stats(config, 3)
    return Dataset(inputs=_load_images([f for f, _ in files], config),
                   labels=torch.tensor([label for _, label in files]),
                   samples=torch.arange(len(files)), mean=mean, std=std,
                   source=f"image folder {base}", class_names=classes)


@DATASETS.register
def digits(n: int | None = 16, data_config: dict | None = None, **_) -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1] and resized to the model's input size
    (bilinear): real data for second-long tests."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    count = _first(n, len(bunch.target))
    images = torch.tensor(bunch.images[:count], dtype=torch.float32).unsqueeze(1) / 16.0
    channels, height, width = (data_config or {}).get("input_size", (1, 28, 28))
    images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear",
                                             align_corners=False).clamp(0, 1)
    mean, std = _norm_stats(data_config or {}, channels)
    inputs = (images.repeat(1, channels, 1, 1) - torch.tensor(mean).view(1, -1, 1, 1)) \
        / torch.tensor(std).view(1, -1, 1, 1)
    return Dataset(inputs=inputs, labels=torch.tensor(bunch.target[:count]),
                   samples=torch.arange(count), mean=mean, std=std,
                   source="scikit-learn load_digits")
