"""Config -> objects -> check -> stored rows. One run of one (model, dataset, check) with its
methods and metrics. ``run(cfg, choices, run_dir)`` is plain Python; ``harness.cli`` wraps it in
Hydra.
"""
from __future__ import annotations

import platform
import subprocess
import time
import uuid
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from checks import CHECKS
from harness.context import CheckContext, MetricSpec
from harness.data import DATASETS, Dataset
from harness.meta import model_meta
from harness.store import RunStore, read_rows
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS, NORMALIZATIONS

PACKAGES = ("torch", "torchvision", "timm", "captum", "numpy", "scipy", "scikit-image", "pandas",
            "pyarrow", "hydra-core", "sanity-harness")
GROUPS = ("model", "dataset", "method", "check", "metric")


def resolve_device(name: str) -> torch.device:
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available; use device=cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def selected(cfg: DictConfig, choices: dict, group: str) -> list[str]:
    """Names selected in a multi-select group (Hydra's choices; keys of the node as fallback)."""
    names = choices.get(group)
    if names is None:
        return list(cfg[group].keys())
    return [names] if isinstance(names, str) else list(names)


def _kwargs(node) -> dict:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def build_methods(cfg: DictConfig, names: list[str]) -> dict:
    common = {"internal_batch_size": cfg.internal_batch_size, "seed": cfg.seed}
    return {n: partial(METHODS[n], **common, **_kwargs(cfg.method.get(n))) for n in names}


def build_metrics(cfg: DictConfig, names: list[str]) -> list[MetricSpec]:
    specs = []
    for name in names:
        kwargs = _kwargs(cfg.metric.get(name))
        normalization = kwargs.pop("normalization", "absolute")
        NORMALIZATIONS[normalization]  # unknown normalization fails here, before any compute
        specs.append(MetricSpec(name, partial(METRICS[name], **kwargs), normalization))
    return specs


def check_registered(names: dict[str, list[str]]) -> None:
    """Every selected name exists in its registry: fail before loading anything."""
    registries = {"model": MODELS, "dataset": DATASETS, "method": METHODS, "check": CHECKS,
                  "metric": METRICS}
    for group, group_names in names.items():
        for name in group_names:
            registries[group][name]


def run(cfg: DictConfig, choices: dict, run_dir: Path) -> Path:
    """Run the configured check and write rows, maps, run.json and figures into ``run_dir``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    names = {g: selected(cfg, choices, g) for g in GROUPS}
    check_registered(names)
    device = resolve_device(str(cfg.device))
    torch.manual_seed(cfg.seed)
    if cfg.get("flush_denormal", False):
        torch.set_flush_denormal(True)  # subnormal activations/gradients slow CPU kernels down

    tic = time.perf_counter()
    model = MODELS[names["model"][0]](**_kwargs(cfg.model)).to(device)
    timings["load_model_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    data = _load_data(cfg, names["dataset"][0], model)
    data.inputs = data.inputs.to(device)
    timings["load_data_s"] = time.perf_counter() - tic

    model_name = str(cfg.model.get("name", names["model"][0]))
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    store = RunStore(run_dir, {"run_id": run_id, "model": model_name,
                               "dataset": names["dataset"][0], "seed": int(cfg.seed)})
    store.write_inputs(data, cfg.n_maps)
    ctx = CheckContext(model=model, data=data, methods=build_methods(cfg, names["method"]),
                       metrics=build_metrics(cfg, names["metric"]), seed=int(cfg.seed),
                       batch_size=int(cfg.batch_size), n_maps=int(cfg.n_maps),
                       progress=bool(cfg.progress))
    print(f"[sanity] {model_name} on {data.source}: {len(data.samples)} inputs, "
          f"{len(ctx.methods)} methods, check {names['check'][0]}, device {device}")
    tic = time.perf_counter()
    for item in CHECKS[names["check"][0]](ctx, **_kwargs(cfg.check)):
        store.add(item)
    store.flush()
    timings["check_s"] = time.perf_counter() - tic
    timings["figures_s"] = _figures(run_dir) if cfg.figures else 0.0
    timings["total_s"] = time.perf_counter() - start
    store.write_json("run.json", _run_record(cfg, names, run_id, device, data, store, timings))
    return run_dir


def _load_data(cfg: DictConfig, name: str, model) -> Dataset:
    return DATASETS[name](**_kwargs(cfg.dataset), data_config=model_meta(model).data_config)


def _figures(run_dir: Path) -> float:
    from harness.figures import make_figures

    tic = time.perf_counter()
    make_figures(run_dir)
    return time.perf_counter() - tic


def _run_record(cfg: DictConfig, names: dict, run_id: str, device, data: Dataset,
                store: RunStore, timings: dict) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["method"] = {n: resolved.get("method", {}).get(n, {}) for n in names["method"]}
    return {"run_id": run_id, "selected": names, "config": resolved, "git_sha": _git_sha(),
            "packages": _versions(), "python": platform.python_version(),
            "host": platform.node(), "device": str(device), "data_source": data.source,
            "rows": store.rows_written, "timings": timings}


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = ""
    return versions


def summary(run_dir: Path) -> str:
    """Mean similarity per method and metric at the original and the last stage."""
    rows = read_rows(run_dir)
    last = rows["stage_index"].max()
    picked = rows[rows["stage_index"].isin([0, last])]
    table = picked.pivot_table(index="method", columns=["metric", "stage_index"], values="value",
                               aggfunc="mean")
    return table.round(3).to_string()
