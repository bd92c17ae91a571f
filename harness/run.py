"""Config -> objects -> check -> stored rows. One run of one (model, dataset, check) with its
methods and metrics. ``run(cfg, choices, run_dir)`` is plain Python; ``harness.cli`` wraps it in
Hydra.
"""
from __future__ import annotations

import inspect
import platform
import time
from dataclasses import replace
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from checks import CHECKS
from harness.base.context import CheckContext, MetricSpec
from harness.base.meta import model_meta
from harness.data import DATASETS, Dataset
from harness.store import RunStore, claim_run_dir, config_digest, read_rows
from harness.train import DEFAULT_CACHE_DIR, Trainer, normalize_labels
from harness.validate import check_hparams, check_input_size, check_model_needs, check_shard
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS, NORMALIZATIONS

PACKAGES = ("torch", "torchvision", "timm", "captum", "numpy", "scipy", "scikit-image", "pandas",
            "pyarrow", "hydra-core", "sanity-harness")
GROUPS = ("model", "dataset", "method", "check", "metric")
ACCURACY_METRICS = ("train_accuracy", "test_accuracy")  # rows of checks that train models


def resolve_device(name: str) -> torch.device:
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available; use device=cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def selected(cfg: DictConfig, choices: dict, group: str) -> list[str]:
    """Names selected in a group: Hydra's choice, or for a multi-select list (for which Hydra
    records no choice) the keys of the group's node, which holds exactly the selected files."""
    names = choices.get(group)
    if names is None:
        return list(cfg[group].keys())
    return [names] if isinstance(names, str) else list(names)


def _kwargs(node) -> dict:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def build_methods(cfg: DictConfig, names: list[str]) -> dict:
    """The selected methods with their hyperparameters bound (checked against each method's
    signature and declared ranges first)."""
    common = {"internal_batch_size": cfg.internal_batch_size, "seed": cfg.seed}
    methods = {}
    for name in names:
        hparams = _kwargs(cfg.method.get(name))
        check_hparams(name, METHODS[name], hparams)
        methods[name] = partial(METHODS[name], **common, **hparams)
    return methods


def build_metrics(cfg: DictConfig, names: list[str],
                  map_size: tuple[int, int] | None = None) -> list[MetricSpec]:
    """Metric specs; with ``map_size`` each metric is first tried on maps of that size."""
    specs = []
    for name in names:
        kwargs = _kwargs(cfg.metric.get(name))
        normalization = kwargs.pop("normalization", "absolute")
        NORMALIZATIONS[normalization]  # unknown normalization fails here, before any compute
        if map_size is not None:
            kwargs = fit_metric(name, kwargs, map_size)
        specs.append(MetricSpec(name, partial(METRICS[name], **kwargs), normalization))
    return specs


def fit_metric(name: str, kwargs: dict, map_size: tuple[int, int]) -> dict:
    """The metric's settings, checked on two random maps of the run's size before any compute.

    HOG cells too large for small maps (the paper's 16-pixel cells need 48x48, MNIST maps are
    28x28) are halved until they fit, with a warning; any other misfit fails here in one line.
    """
    error = _probe_metric(name, kwargs, map_size)
    if error and name == "hog":
        fitted = dict(kwargs)
        while error and fitted.get("pixels_per_cell", 16) > 1:
            fitted["pixels_per_cell"] = max(1, int(fitted.get("pixels_per_cell", 16)) // 2)
            error = _probe_metric(name, fitted, map_size)
        if not error:
            print(f"[sanity] warning: metric.hog.pixels_per_cell="
                  f"{kwargs.get('pixels_per_cell', 16)} does not fit {map_size[0]}x{map_size[1]}"
                  f" maps; using {fitted['pixels_per_cell']} (set metric.hog.pixels_per_cell "
                  "to choose)")
            return fitted
    if error:
        params = ", ".join(f"metric.{name}.{k}" for k in kwargs) or f"metric.{name}"
        raise ValueError(f"metric {name} cannot score {map_size[0]}x{map_size[1]} maps: {error} "
                         f"(adjust {params}, or leave {name} out of metric=[...])")
    return kwargs


def _probe_metric(name: str, kwargs: dict, map_size: tuple[int, int]) -> str:
    maps = torch.rand(2, 2, *map_size, generator=torch.Generator().manual_seed(0))
    try:
        METRICS[name](maps[0], maps[1], **kwargs)
    except (ValueError, TypeError) as err:
        return str(err)
    return ""


def registries() -> dict:
    """The registry of each config group."""
    return {"model": MODELS, "dataset": DATASETS, "method": METHODS, "check": CHECKS,
            "metric": METRICS}


def check_registered(names: dict[str, list[str]]) -> None:
    """Every selected name exists in its registry: fail before loading anything."""
    for group, group_names in names.items():
        for name in group_names:
            registries()[group][name]


def run(cfg: DictConfig, choices: dict, run_dir: Path) -> Path:
    """Run the configured check and write rows, maps, run.json and figures into ``run_dir``.

    Everything that can be checked without compute is checked first (names, hyperparameters,
    shard, the run dir's earlier config, what the methods need of the model, the input size).
    A run dir that holds finished parts of the same config is resumed: only the rest is
    computed.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    names = {g: selected(cfg, choices, g) for g in GROUPS}
    check_registered(names)
    methods = build_methods(cfg, names["method"])
    shard = (int(cfg.dataset.get("shard", 0)), int(cfg.dataset.get("num_shards", 1)))
    check_shard(*shard)
    device = resolve_device(str(cfg.device))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_id, kept = claim_run_dir(run_dir, config_digest(resolved), cfg.get("resume", "auto"))
    torch.manual_seed(cfg.seed)
    if cfg.get("flush_denormal", False):
        torch.set_flush_denormal(True)  # subnormal activations/gradients slow CPU kernels down

    tic = time.perf_counter()
    model_name = str(cfg.model.get("name", names["model"][0]))
    model = MODELS[names["model"][0]](**_kwargs(cfg.model)).to(device)
    check_model_needs(model, model_name, methods)
    timings["load_model_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    labels = normalize_labels(cfg.get("train", {}).get("labels"))
    trains = bool(getattr(CHECKS[names["check"][0]], "trains_models", False)) or bool(labels)
    data = take_shard(_load_data(cfg, names["dataset"][0], model,
                                 split="test" if trains else None), *shard)
    data.inputs = data.inputs.to(device)
    check_input_size(model, model_name, data.inputs, names["dataset"][0])
    metrics = build_metrics(cfg, names["metric"], tuple(data.inputs.shape[-2:]))
    trainer = build_trainer(cfg, names, model, device) if trains else None
    timings["load_data_s"] = time.perf_counter() - tic
    if labels:  # any check on a model trained first (cached): train.labels=true|random
        tic = time.perf_counter()
        model = trainer(labels).model
        timings["train_s"] = time.perf_counter() - tic

    store = RunStore(run_dir, {"run_id": run_id, "model": model_name,
                               "dataset": names["dataset"][0], "seed": int(cfg.seed),
                               "shard": shard[0], "num_shards": shard[1]})
    if kept:
        print(f"[sanity] resuming {run_dir}: {kept} finished parts kept, computing only the rest")
    store.write_inputs(data, cfg.n_maps)
    ctx = CheckContext(model=model, data=data, methods=methods,
                       metrics=metrics, seed=int(cfg.seed),
                       batch_size=int(cfg.batch_size), n_maps=int(cfg.n_maps),
                       progress=bool(cfg.progress), train=trainer, done=store.done)
    print(f"[sanity] {model_name} on {data.source}: {len(data.samples)} inputs, "
          f"{len(ctx.methods)} methods, check {names['check'][0]}, device {device}")
    tic = time.perf_counter()
    for item in CHECKS[names["check"][0]](ctx, **_kwargs(cfg.check)):
        store.add(item)
    store.flush()
    if kept:
        print(f"[sanity] resumed: {kept} parts kept, {store.parts} parts computed")
    timings["check_s"] = time.perf_counter() - tic
    timings["figures_s"] = _figures(run_dir) if cfg.figures else 0.0
    timings["total_s"] = time.perf_counter() - start
    record = _run_record(cfg, names, run_id, device, data, store, timings)
    record.update(parts_kept=kept, parts_computed=store.parts)
    record["metric_settings"] = {s.name: dict(s.fn.keywords) for s in metrics}
    if trainer is not None:
        record["trained"] = {k: _trained_record(t) for k, t in trainer.trained.items()}
    store.write_json("run.json", record)
    return run_dir


def take_shard(data: Dataset, shard: int, num_shards: int) -> Dataset:
    """The ``shard``-th of ``num_shards`` contiguous, near-equal slices of the dataset (sizes
    differ by at most one), with the original sample ids: deterministic, and the shards of a
    dataset are disjoint and cover it in order."""
    if num_shards == 1:
        return data
    total = len(data.samples)
    lo, hi = shard * total // num_shards, (shard + 1) * total // num_shards
    if lo == hi:
        raise ValueError(f"dataset.shard={shard} of dataset.num_shards={num_shards} is empty: "
                         f"the dataset has {total} inputs (raise dataset.n or lower num_shards)")
    masks = None if data.masks is None else data.masks[lo:hi]
    return replace(data, inputs=data.inputs[lo:hi], labels=data.labels[lo:hi],
                   samples=data.samples[lo:hi], masks=masks,
                   source=f"{data.source}, shard {shard} of {num_shards}")


def _load_data(cfg: DictConfig, name: str, model, split: str | None = None,
               n: int | None | str = "config") -> Dataset:
    """The dataset for ``model``; ``split`` and ``n`` override the config when given."""
    kwargs = {k: v for k, v in _kwargs(cfg.dataset).items() if k not in ("shard", "num_shards")}
    if split is not None:
        kwargs["split"] = split
    if n != "config":
        kwargs["n"] = n
    return DATASETS[name](**kwargs, data_config=model_meta(model).data_config)


def build_trainer(cfg: DictConfig, names: dict, model, device: torch.device) -> Trainer:
    """Trains the run's architecture on the dataset's whole train split (``train`` config),
    caching checkpoints in ``cache_dir``; test accuracy on the whole test split."""
    dataset = names["dataset"][0]
    with_splits = sorted(n for n, fn in DATASETS.items()
                         if "split" in inspect.signature(fn).parameters)
    if dataset not in with_splits:
        raise ValueError(f"dataset {dataset} has no train/test split to train on; use one of "
                         f"{', '.join(with_splits)}")
    model_cfg = _kwargs(cfg.model)
    train_set, test_set = (_load_data(cfg, dataset, model, split=s, n=None)
                           for s in ("train", "test"))
    for part in (train_set, test_set):
        part.inputs, part.labels = part.inputs.to(device), part.labels.to(device)
    identity = {"model": str(cfg.model.get("name", names["model"][0])),
                "model_registry": names["model"][0], "model_config": model_cfg,
                "dataset": dataset}
    return Trainer(build=partial(MODELS[names["model"][0]], **model_cfg), train_set=train_set,
                   test_set=test_set, identity=identity, settings=_kwargs(cfg.get("train")),
                   seed=int(cfg.seed), cache_dir=str(cfg.get("cache_dir") or DEFAULT_CACHE_DIR),
                   device=device, progress=bool(cfg.progress))


def _trained_record(trained) -> dict:
    return {"train_accuracy": trained.train_accuracy, "test_accuracy": trained.test_accuracy,
            "train_size": trained.train_size, "test_size": trained.test_size,
            "epochs": trained.epochs, "checkpoint": trained.checkpoint, "cached": trained.cached}


def _figures(run_dir: Path) -> float:
    from harness.figures import make_figures

    tic = time.perf_counter()
    make_figures(run_dir)
    return time.perf_counter() - tic


def _run_record(cfg: DictConfig, names: dict, run_id: str, device, data: Dataset,
                store: RunStore, timings: dict) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {"run_id": run_id, "selected": names, "config": resolved, "git_sha": _git_sha(),
            "packages": _versions(), "python": platform.python_version(),
            "host": platform.node(), "device": str(device), "data_source": data.source,
            "rows": store.rows_written, "timings": timings}


def _git_sha() -> str:
    from harness.version import git_sha  # the harness's own clone only, never an outer repo

    return git_sha()


def _versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = ""
    return versions


def summary(run_dir: Path) -> str:
    """Mean similarity per method and metric at the original and the last stage (and the
    accuracies of trained models, when the check trains some)."""
    rows = read_rows(run_dir)
    accuracy = rows[rows["metric"].isin(ACCURACY_METRICS)]
    rows = rows[~rows["metric"].isin(ACCURACY_METRICS)]
    last = rows["stage_index"].max()
    picked = rows[rows["stage_index"].isin([0, last])]
    table = picked.pivot_table(index="method", columns=["metric", "stage_index"], values="value",
                               aggfunc="mean")
    text = table.round(3).to_string()
    if len(accuracy):
        accuracies = accuracy.pivot_table(index="stage", columns="metric", values="value",
                                          aggfunc="mean", sort=False)
        text = f"{accuracies.round(4).to_string()}\n\n{text}"
    return text
