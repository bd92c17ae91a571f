"""Training for the data randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency
Maps", arXiv 1810.03292, §5): the run's architecture trained on the true labels of the train
split, or on a fixed random permutation of them until it memorizes them.

A plain torch loop (shuffled mini-batches, cross-entropy, Adam or SGD, constant or cosine
learning rate), deterministic for a given seed, with a tqdm bar per model. ``subset=N`` trains
on the first N images of the train split only, so that random labels can be memorized on a CPU.
Training stops after ``epochs``, after ``max_steps`` updates (a budget that does not depend on
the dataset's size), or once the running train accuracy of an epoch reaches ``target_accuracy``.

Checkpoints are cached under ``<cache_dir>/checkpoints/``, named by a hash of everything that
determines them: the architecture (registry name, config and module structure), the training
data (a fingerprint of the images and labels actually used), the labels, the seed and the
training settings. A second run loads them. A checkpoint also stores that hash and a hash of
its own weights; one that cannot be read or whose hashes disagree is reported and retrained.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.base.context import TrainedModel
from harness.base.randomize import stage_seed
from harness.data import Dataset
from harness.execution import TORCH_FORMATS

LABELS = ("true", "random")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
CHECKPOINT_FORMAT = 1
DEFAULT_CACHE_DIR = "~/.cache/sanity-harness"


@dataclass(frozen=True)
class TrainSettings:
    """Everything about training besides data, labels, seed and architecture (config ``train``;
    ``train.true_labels`` and ``train.random_labels`` override keys for one of the models)."""

    subset: int | None = None  # train on the first N images of the train split (None: all)
    epochs: int = 10
    max_steps: int | None = None  # stop after this many updates (None: epochs decide)
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine (to 0 over the planned updates)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    batch_size: int = 64
    target_accuracy: float = 1.0  # stop once an epoch's running train accuracy reaches it

    @classmethod
    def of(cls, train_cfg: dict, labels: str) -> TrainSettings:
        """Settings of the ``labels`` model: the common keys, then its own overrides."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in train_cfg.items() if k in known}
        values.update(train_cfg.get(f"{labels}_labels") or {})
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown train setting(s) {', '.join(sorted(unknown))}; valid: "
                             f"{', '.join(sorted(known))}")
        settings = cls(**values)
        for key, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(settings, key) not in valid:
                raise ValueError(f"train.{key} must be one of {', '.join(valid)}, "
                                 f"got {getattr(settings, key)!r}")
        return settings

    def planned_steps(self, count: int) -> int:
        """Updates the training of ``count`` images runs at most."""
        steps = self.epochs * math.ceil(count / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)


def normalize_labels(value) -> str | None:
    """``train.labels``: None (do not train), ``true`` (YAML may give a bool) or ``random``."""
    if value is None or value is False or str(value).lower() in ("none", "null", "false", ""):
        return None
    name = "true" if value is True else str(value).lower()
    if name not in LABELS:
        raise ValueError(f"train.labels must be true, random or null, got {value!r}")
    return name


def permuted_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random permutation of ``labels`` (N,): the same label histogram, the link
    between image and label destroyed (Zhang et al. 2017, arXiv 1611.03530)."""
    generator = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=generator).to(labels.device)]


@dataclass
class Trainer:
    """``trainer(labels) -> TrainedModel``: the run's architecture trained on the train split
    with ``labels`` (``true`` or ``random``), from the cache when it holds the checkpoint."""

    build: Callable[[], nn.Module]  # a fresh, deterministically initialized model
    train_set: Dataset  # the whole train split
    test_set: Dataset  # the whole test split
    identity: dict  # registry names and configs of model and dataset, for the cache key
    settings: dict  # the `train` config node
    seed: int = 0
    cache_dir: str | Path = DEFAULT_CACHE_DIR
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    memory_format: str = "contiguous"  # of the models trained and their inputs (the run's)
    trained: dict[str, TrainedModel] = field(default_factory=dict)  # labels -> result, this run

    def __call__(self, labels: str) -> TrainedModel:
        labels = normalize_labels(labels)
        if labels is None:
            raise ValueError("Trainer needs labels true or random")
        if labels not in self.trained:
            self.trained[labels] = self._train_or_load(labels)
        return self.trained[labels]

    def checkpoint_path(self, labels: str) -> Path:
        """Where the checkpoint of ``labels`` with the current settings lives."""
        settings = TrainSettings.of(self.settings, labels)
        x, y = self.training_data(labels, settings)
        return self._path(labels, self._key_hash(labels, settings, x, y))

    def training_data(self, labels: str, settings: TrainSettings
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``subset`` train images and their true or permuted labels."""
        count = len(self.train_set.labels)
        if settings.subset is not None:
            if settings.subset < 1:
                raise ValueError(f"train.subset must be >= 1 or null, got {settings.subset}")
            count = min(settings.subset, count)
        x, y = self.train_set.inputs[:count], self.train_set.labels[:count]
        if labels == "random":
            y = permuted_labels(y, stage_seed(self.seed, "random_labels"))
        return x, y

    def _train_or_load(self, labels: str) -> TrainedModel:
        settings = TrainSettings.of(self.settings, labels)
        x, y = self.training_data(labels, settings)
        key_hash = self._key_hash(labels, settings, x, y)
        path = self._path(labels, key_hash)
        model = self.build().to(self.device, memory_format=TORCH_FORMATS[self.memory_format])
        saved = load_checkpoint(path, key_hash)
        if saved is not None:
            model.load_state_dict(saved["state_dict"])
            epochs, train_accuracy = int(saved["epochs"]), float(saved["train_accuracy"])
        else:
            print(f"[sanity] training {self.identity['model']} on {labels} labels: {len(y)} "
                  f"images of {self.identity['dataset']}")
            desc = f"train ({labels} labels)"
            epochs = fit(model, x, y, settings, stage_seed(self.seed, f"train:{labels}"),
                         self.progress, desc)
            train_accuracy = accuracy(model, x, y)
            save_checkpoint(path, model, key_hash, self._key(labels, settings, x, y),
                            epochs=epochs, train_accuracy=train_accuracy)
        model.eval()
        result = TrainedModel(model=model, labels=labels, train_accuracy=train_accuracy,
                              test_accuracy=accuracy(model, self.test_set.inputs,
                                                     self.test_set.labels),
                              train_size=len(y), test_size=len(self.test_set.labels),
                              epochs=epochs, checkpoint=str(path), cached=saved is not None)
        print(f"[sanity] {labels}-label model ({'cached' if result.cached else 'trained'}, "
              f"{epochs} epochs): train accuracy {train_accuracy:.1%} on {len(y)} images, "
              f"test accuracy {result.test_accuracy:.1%} on {result.test_size}; {path}")
        return result

    def _key(self, labels: str, settings: TrainSettings, x: torch.Tensor,
             y: torch.Tensor) -> dict:
        return {"format": CHECKPOINT_FORMAT, "labels": labels, "seed": self.seed,
                "settings": asdict(settings), "identity": self.identity,
                "architecture": repr(self.build()), "data": fingerprint(x, y)}

    def _key_hash(self, labels: str, settings: TrainSettings, x: torch.Tensor,
                  y: torch.Tensor) -> str:
        key = self._key(labels, settings, x, y)
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, labels: str, key_hash: str) -> Path:
        name = f"{self.identity['dataset']}-{self.identity['model']}-{labels}-{key_hash[:16]}.pt"
        return Path(self.cache_dir).expanduser() / "checkpoints" / name


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings, seed: int,
        progress: bool = True, desc: str = "train") -> int:
    """Train ``model`` in place on ``x`` (N, C, H, W), ``y`` (N,); returns the epochs run.

    Deterministic for a given ``seed`` (batch order from a seeded generator, no global RNG).
    Stops after ``settings.max_steps`` updates, or once an epoch's running train accuracy
    reaches ``settings.target_accuracy``.
    """
    steps_left = settings.planned_steps(len(y))
    optimizer = _optimizer(model, settings)
    scheduler = _scheduler(optimizer, settings.schedule, steps_left)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(1, settings.epochs + 1), desc=desc, disable=not progress, leave=False)
    epoch = 0
    with torch.enable_grad():
        for epoch in bar:
            loss, running_accuracy, steps = _epoch(model, optimizer, scheduler, x, y,
                                                   settings.batch_size, generator, steps_left)
            steps_left -= steps
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{running_accuracy:.3f}")
            if running_accuracy >= settings.target_accuracy or steps_left <= 0:
                break
    bar.close()
    model.eval()
    return epoch


def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, x: torch.Tensor,
           y: torch.Tensor, batch_size: int, generator: torch.Generator,
           max_steps: int) -> tuple[float, float, int]:
    """One pass over shuffled mini-batches (at most ``max_steps``); returns the mean loss, the
    running accuracy and the number of updates."""
    order = torch.randperm(len(y), generator=generator).to(y.device)
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for batch in order.split(batch_size)[:max_steps]:
        logits = model(x[batch])
        loss = F.cross_entropy(logits, y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(batch)
        correct += (logits.argmax(1) == y[batch]).sum().item()
        seen, steps = seen + len(batch), steps + 1
    return total_loss / max(1, seen), correct / max(1, seen), steps


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int):
    """None (constant) or a per-update cosine decay of the learning rate to 0 over ``steps``."""
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps))))


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=settings.lr,
                            weight_decay=settings.weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Share of ``x`` (N, C, H, W) whose argmax class is ``y`` (N,), in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return correct / max(1, len(y))


def fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes, bytes), to detect corrupt checkpoints."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(fingerprint(state[name]).encode())
    return digest.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, key_hash: str, key: dict, **info) -> None:
    """Weights, their hash and the cache key, written atomically (temporary name, rename)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "key_hash": key_hash,
               "key": json.dumps(key, sort_keys=True, default=str), "state_dict": state,
               "state_hash": state_hash(state), **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key_hash: str) -> dict | None:
    """The checkpoint at ``path`` if it exists and is sound, else None (a corrupt one is
    reported: unreadable, made for another key, or weights that do not match their hash)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        problem = _checkpoint_problem(payload, key_hash)
    except Exception as err:  # noqa: BLE001  (any unreadable file is corrupt)
        problem = f"unreadable ({type(err).__name__})"
    if problem:
        print(f"[sanity] checkpoint {path} is corrupt ({problem}); training again")
        return None
    return payload


def _checkpoint_problem(payload, key_hash: str) -> str:
    if not isinstance(payload, dict) or "state_dict" not in payload:
        return "no state dict"
    if payload.get("key_hash") != key_hash:
        return "stored hash does not match its name"
    if payload.get("state_hash") != state_hash(payload["state_dict"]):
        return "weights do not match their stored hash"
    return ""
