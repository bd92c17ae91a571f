"""The run plan: a composed Hydra config decoded into plain, typed, validated values.

Everything that can be checked without compute is checked here (registry names, method
hyperparameters against their signatures and declared ranges, metric normalizations, the shard,
the device, ``resume``), so a wrong config fails in one line before a model is loaded. The raw
config goes no further than :func:`make_plan`: the runner's functions take the plan.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from checks import CHECKS
from harness.base.dataset import Dataset
from harness.data import DATASETS
from harness.execution import memory_bytes, memory_format_name, precision_name
from harness.plugins import load_plugins
from harness.store import config_digest
from harness.train import DEFAULT_CACHE_DIR, normalize_labels
from harness.validate import (
    check_choices,
    check_count,
    check_hparams,
    check_metric_args,
    check_shard,
)
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS, NORMALIZATIONS

GROUPS = ("model", "dataset", "method", "check", "metric")
DEVICES = ("auto", "cpu", "cuda")
RESUME = ("auto", "true", "false", "wait")  # wait: for another process owning the run dir
WEIGHTS = ("auto", "random")  # random: weights neither loaded nor trained, said on purpose


@dataclass(frozen=True)
class Given:
    """Objects given from Python (:func:`harness.evaluate`) or built from a ``_target_`` in the
    config, in place of registry entries: a model, a dataset, methods by name."""

    model: nn.Module | None = None
    data: Dataset | None = None
    methods: dict[str, Callable] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPlan:
    """One run of one (model, dataset, check) with its methods and metrics."""

    run_dir: Path
    model: str  # registry names
    dataset: str
    check: str
    methods: dict[str, dict] = field(default_factory=dict)  # name -> its hyperparameters
    metrics: dict[str, dict] = field(default_factory=dict)  # name -> its settings
    normalizations: dict[str, str] = field(default_factory=dict)  # metric -> normalization
    model_kwargs: dict = field(default_factory=dict)
    model_label: str = ""  # what rows and messages call the model (model.name, else its key)
    weights: str = "auto"  # "random": run a model with random weights on purpose
    dataset_kwargs: dict = field(default_factory=dict)  # without shard / num_shards
    shard: int = 0
    num_shards: int = 1
    check_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    internal_batch_size: int | str = 16  # rows per forward+backward, or "auto" (memory_limit)
    memory_limit: int | None = None  # bytes for internal_batch_size=auto (None: half available)
    memory_format: str = "auto"  # auto | contiguous | channels_last (harness.execution)
    precision: str = "fp32"  # fp32 | bf16
    n_maps: int = 4
    progress: bool = True
    figures: bool = True
    flush_denormal: bool = False
    resume: str = "auto"
    train: dict = field(default_factory=dict)  # training settings (harness.train)
    train_labels: str | None = None  # train the model first: "true" | "random" | None
    cache_dir: str = DEFAULT_CACHE_DIR
    config: dict = field(default_factory=dict)  # the resolved config, recorded in run.json
    given: Given = field(default_factory=Given, compare=False)

    @property
    def names(self) -> dict[str, list[str]]:
        """The selected registry names of each group."""
        return {"model": [self.model], "dataset": [self.dataset], "method": list(self.methods),
                "check": [self.check], "metric": list(self.metrics)}

    @property
    def digest(self) -> str:
        return config_digest(self.config)

    @property
    def trains(self) -> bool:
        """The run trains models: the check does, or the model is trained first."""
        return CHECKS.facts(self.check).trains_models or bool(self.train_labels)


def make_plan(cfg: DictConfig, choices: dict, run_dir: Path, given: Given = Given()) -> RunPlan:
    """Decode and validate a composed config (``choices``: Hydra's group choices). ``given``
    holds objects passed from Python; a ``_target_`` in a model or method config names a
    user's function instead of a registry entry."""
    names = {group: selected(cfg, choices, group) for group in GROUPS}
    model_kwargs = plain(cfg.model)
    weights = str(model_kwargs.pop("weights", "auto"))
    if weights not in WEIGHTS:
        raise ValueError(f"model.weights must be {' or '.join(WEIGHTS)}, got {weights!r}")
    if given.model is not None or "_target_" in model_kwargs:
        names["model"] = [str(model_kwargs.get("name") or model_kwargs.get("_target_"))]
    given = replace(given, methods={**given.methods, **targeted_methods(cfg, names["method"])})
    check_registered({group: [n for n in group_names if not external(group, n, given, cfg)]
                      for group, group_names in names.items()})
    methods = {name: plain(cfg.method.get(name)) for name in names["method"]}
    for name, hparams in methods.items():
        hparams.pop("_target_", None), hparams.pop("_function_", None)  # where, not how
        check_hparams(name, given.methods.get(name) or METHODS[name], hparams)
    metrics = {name: plain(cfg.metric.get(name)) for name in names["metric"]}
    normalizations = {name: settings.pop("normalization", METRICS.facts(name).normalization)
                      for name, settings in metrics.items()}
    for name, settings in metrics.items():
        NORMALIZATIONS[normalizations[name]]  # an unknown one fails here, before any compute
        check_metric_args(name, METRICS[name], settings)
    dataset_kwargs = plain(cfg.dataset)
    shard = (dataset_kwargs.pop("shard", 0), dataset_kwargs.pop("num_shards", 1))
    check_shard(*shard)
    check_kwargs = plain(cfg.check)
    check_keys("check", names["check"][0], CHECKS[names["check"][0]], check_kwargs, skip=1)
    check_choices("check", CHECKS[names["check"][0]], check_kwargs)
    validate = CHECKS.facts(names["check"][0]).validate
    if validate is not None:
        validate(check_kwargs)
    if given.model is None and "_target_" not in model_kwargs:
        check_keys("model", names["model"][0], MODELS[names["model"][0]], model_kwargs,
                   also=("name",))
    if given.data is None:
        check_keys("dataset", names["dataset"][0], DATASETS[names["dataset"][0]],
                   dataset_kwargs, also=("data_config",))
        check_choices("dataset", DATASETS[names["dataset"][0]], dataset_kwargs)
    train = plain(cfg.get("train"))
    return RunPlan(
        run_dir=Path(run_dir), model=names["model"][0], dataset=names["dataset"][0],
        check=names["check"][0], methods=methods, metrics=metrics,
        normalizations=normalizations, model_kwargs=model_kwargs,
        model_label=str(model_kwargs.get("name", names["model"][0])), weights=weights,
        dataset_kwargs=dataset_kwargs, shard=shard[0], num_shards=shard[1],
        check_kwargs=check_kwargs, seed=check_count("seed", cfg.seed, 0),
        device=device_name(cfg.device), batch_size=check_count("batch_size", cfg.batch_size, 1),
        internal_batch_size=chunk_rows(cfg.internal_batch_size),
        memory_limit=memory_bytes(cfg.get("memory_limit")),
        memory_format=memory_format_name(cfg.get("memory_format", "auto")),
        precision=precision_name(cfg.get("precision", "fp32")),
        n_maps=check_count("n_maps", cfg.n_maps, 0), progress=bool(cfg.progress),
        figures=bool(cfg.figures),
        flush_denormal=bool(cfg.get("flush_denormal", False)),
        resume=resume_mode(cfg.get("resume", "auto")), train=train,
        train_labels=normalize_labels(train.get("labels")),
        cache_dir=str(cfg.get("cache_dir") or DEFAULT_CACHE_DIR),
        config=OmegaConf.to_container(cfg, resolve=True), given=given)


def external(group: str, name: str, given: Given, cfg: DictConfig) -> bool:
    """Not a registry entry: an object given from Python or a config's ``_target_``."""
    if group == "model":
        return given.model is not None or "_target_" in cfg.model
    if group == "dataset":
        return given.data is not None
    return group == "method" and name in given.methods


def targeted_methods(cfg: DictConfig, names: list[str]) -> dict[str, Callable]:
    """Methods whose config names a function with ``_target_`` (a module on ``PYTHONPATH``)."""
    from hydra.utils import get_method

    found = {}
    for name in names:
        target = (cfg.method.get(name) or {}).get("_target_")
        if target:
            try:
                found[name] = get_method(target)
            except Exception as err:  # Hydra wraps the ImportError in its own
                raise ValueError(f"method.{name}._target_={target}: cannot import it "
                                 f"({str(err).strip().splitlines()[0]}); is its module on "
                                 "PYTHONPATH?") from None
    return found


def check_keys(group: str, name: str, fn: Callable, kwargs: dict, skip: int = 0,
               also: tuple[str, ...] = ()) -> None:
    """Every key of ``<group>`` is a named parameter of the entry's function (after its first
    ``skip`` positional ones): a typo such as ``+model.nmae=...`` fails instead of being
    swallowed by a ``**kwargs``."""
    import inspect

    params = [p for p in list(inspect.signature(fn).parameters.values())[skip:]
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    valid = [p.name for p in params] + [a for a in also if a not in {p.name for p in params}]
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"{group}.{key}: unknown key of {group} {name}; valid keys: "
                             f"{', '.join(v for v in valid if v != 'data_config') or 'none'}")


def selected(cfg: DictConfig, choices: dict, group: str) -> list[str]:
    """Names selected in a group: Hydra's choice, or for a multi-select list (for which Hydra
    records no choice) the keys of the group's node, which holds exactly the selected files."""
    names = choices.get(group)
    if names is None:
        names = list(cfg[group].keys()) if group in cfg and cfg[group] is not None else []
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"{group}=[] selects no {group}; choose at least one of "
                         f"{', '.join(sorted(registries()[group]))}")
    return names


def registries() -> dict:
    """The registry of each config group, with the entries of installed plugins."""
    load_plugins()
    return {"model": MODELS, "dataset": DATASETS, "method": METHODS, "check": CHECKS,
            "metric": METRICS}


def check_registered(names: dict[str, list[str]]) -> None:
    """Every selected name exists in its registry: fail before loading anything."""
    for group, group_names in names.items():
        for name in group_names:
            registries()[group][name]


def plain(node) -> dict:
    """A config node as a plain dict (interpolations resolved); {} for a missing node."""
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def chunk_rows(value) -> int | str:
    """``internal_batch_size``: a whole number >= 1, or ``auto`` (the largest chunk under
    ``memory_limit``, :func:`harness.execution.auto_chunk`)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"internal_batch_size must be a whole number >= 1 or auto, got {value!r}")
    return value


def device_name(value) -> str:
    name = "auto" if value is None else str(value)
    if not (name in DEVICES or name.startswith("cuda:")):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    return name


def resume_mode(value) -> str:
    mode = str(value).lower()
    if mode not in RESUME:
        raise ValueError(f"resume must be {', '.join(RESUME[:-1])} or {RESUME[-1]}, "
                         f"got {value!r}")
    return mode
