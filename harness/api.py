"""``harness.evaluate``: a sanity check from Python (a notebook) on your own model, inputs and
methods, through the same code path as the ``sanity`` CLI: the config is composed from
``conf/`` as the CLI composes it, decoded into the same run plan, and run by the same runner.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError
from torch import nn

from harness.base.dataset import Dataset
from harness.console import counted
from harness.plan import Given, make_plan
from harness.run import execute, with_blocks
from methods import METHODS

MethodLike = str | Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate(model: nn.Module | str, inputs: torch.Tensor | Dataset | str,
             targets: torch.Tensor | None = None, *, methods: Sequence[MethodLike] = ("gradient",),
             check: str = "cascading", metrics: Sequence[str] = ("ssim", "spearman_abs"),
             run_dir: str | Path | None = None, blocks: Sequence[str] | None = None,
             gradcam_layer: str | None = None, **settings) -> pd.DataFrame:
    """Run ``check`` on ``model`` and ``inputs`` with ``methods`` and ``metrics``; the tidy table.

    * ``model``: an ``nn.Module`` (put in eval mode) or a zoo name (``"efficientnet_lite0"``).
      Its randomization stages: ``blocks`` (module names, input to logits), by default its
      top-level children; or ``check={"granularity": "module"}`` for every parametrized leaf.
      ``gradcam_layer`` names the layer GradCAM uses (default: the last conv layer).
    * ``inputs``: a tensor (N, C, H, W) already preprocessed for the model, a
      :class:`harness.base.dataset.Dataset`, or a dataset name (``"imagenet_samples"``).
      ``targets`` (N,): the inputs' labels (for target policies that use labels; the
      randomization checks explain the model's prediction by default).
    * ``methods``: registry names and plain functions ``(model, x, target) -> map``; a function
      gets ``internal_batch_size``, ``seed`` only if it takes them, and may return (B, C, H, W),
      (B, H, W) or (B, 1, H, W). Its name in the table is its ``__name__``.
    * every config key as a keyword: a top-level key (``seed=1``, ``n_maps=0``,
      ``internal_batch_size=8``), a group's key as ``<group>_<key>`` (``check_order="bottom_up"``,
      ``dataset_n=4``) or a group as a dict (``method={"smoothgrad": {"n_samples": 10}}``,
      ``train={"epochs": 2}``). An unknown key fails in one line.
    * ``run_dir``: where rows, maps, run.json and figures go (a rerun resumes, as with the
      CLI); without it nothing is written and only the table is returned.
    """
    given = Given(model=_model(model, blocks, gradcam_layer), data=_data(inputs, targets),
                  methods=_functions(methods))
    names = [m if isinstance(m, str) else m.__name__ for m in methods]
    overrides = [f"check={check}", f"method=[{','.join(n for n in names if n in METHODS)}]",
                 f"metric=[{','.join(metrics)}]", "progress=false"]
    overrides += ["~model"] if given.model is not None else [f"model={model}"]
    overrides += ["~dataset"] if given.data is not None else [f"dataset={inputs}"]
    cfg, choices = _compose(overrides)
    _describe_given(cfg, given, names)
    _merge_settings(cfg, nested({"figures": run_dir is not None, **settings}, cfg))
    target_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="sanity-"))
    try:
        execute(make_plan(cfg, choices, target_dir, given))
        return pd.read_parquet(target_dir / "rows")
    finally:
        if run_dir is None:
            shutil.rmtree(target_dir, ignore_errors=True)


def _model(model: nn.Module | str, blocks, gradcam_layer) -> nn.Module | None:
    if isinstance(model, str):
        return None
    return with_blocks(model.eval(), list(blocks) if blocks else None, gradcam_layer)


def _data(inputs: torch.Tensor | Dataset | str, targets: torch.Tensor | None) -> Dataset | None:
    if isinstance(inputs, str) or isinstance(inputs, Dataset):
        return inputs if isinstance(inputs, Dataset) else None
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be a tensor (N, C, H, W), got shape {tuple(inputs.shape)}")
    n, channels = inputs.shape[:2]
    labels = torch.full((n,), -1, dtype=torch.long) if targets is None else \
        torch.as_tensor(targets, dtype=torch.long).reshape(n)
    return Dataset(inputs=inputs.detach().float(), labels=labels, samples=torch.arange(n),
                   mean=(0.0,) * channels, std=(1.0,) * channels,
                   source=f"a tensor of {counted(n, 'input')} given to harness.evaluate")


def _functions(methods: Sequence[MethodLike]) -> dict[str, Callable]:
    found = {}
    for method in methods:
        if isinstance(method, str):
            METHODS[method]  # an unknown name fails here, listing the valid ones
            continue
        name = getattr(method, "__name__", "")
        if not name or name == "<lambda>" or name in METHODS:
            raise ValueError(f"method {name or method!r}: a function needs a name of its own "
                             "(not a lambda, not a registered method's name): def my_map(...)")
        found[name] = method
    return found


def _compose(overrides: list[str]) -> tuple:
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _describe_given(cfg, given: Given, names: list[str]) -> None:
    """What run.json and the config digest record of the given objects: the model's class and
    a digest of its weights, the inputs' digest, each function's module and name (so a rerun
    into the same run dir resumes only with the same objects)."""
    with open_dict(cfg):
        if given.model is not None:
            cfg.model = {"name": type(given.model).__name__,
                         "object": f"{type(given.model).__module__}.{type(given.model).__name__}",
                         "weights_sha": _digest(*given.model.state_dict().values())}
        if given.data is not None:
            cfg.dataset = {"source": given.data.source,
                           "inputs_sha": _digest(given.data.inputs, given.data.labels)}
        cfg.method = {name: dict(cfg.method.get(name) or {}) if name in METHODS else
                      {"_function_": f"{given.methods[name].__module__}.{name}"} for name in names}


def nested(settings: Mapping, cfg) -> dict:
    """``check_order="bottom_up"`` -> ``{"check": {"order": "bottom_up"}}``; a key the config
    has at its top level (``n_maps``, ``internal_batch_size``) stays as it is."""
    out: dict = {}
    for key, value in settings.items():
        group, _, rest = key.partition("_")
        if key in cfg or not rest or group not in cfg:
            out[key] = value
        else:
            out.setdefault(group, {})[rest] = value
    return out


def _merge_settings(cfg, settings: Mapping) -> None:
    """Keyword settings into the composed config; a key it does not have fails in one line."""
    for key, value in settings.items():
        try:
            cfg.merge_with({key: value})
        except ConfigKeyError as err:
            raise ValueError(f"{key}={value!r}: {str(err).splitlines()[0]}") from None


def _digest(*tensors: torch.Tensor) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:12]
