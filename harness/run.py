"""The runner: plan, check, build, execute, record. One run of one (model, dataset, check) with
its methods and metrics. ``run(cfg, choices, run_dir)`` is plain Python (``harness.cli`` wraps
it in Hydra): :func:`harness.plan.make_plan` decodes and validates the config, then every step
takes the plan. Nothing here names a check, a method or a metric: what a check needs (training,
its unit of work, its summary, its figures) comes from its registration.
"""
from __future__ import annotations

import inspect
import json
import platform
import time
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig

from checks import CHECKS
from checks.summary import similarity_summary
from checks.uncertainty import summary_table
from harness.base.context import CheckContext, MetricSpec
from harness.base.meta import attach_meta, fallback_meta, model_meta
from harness.console import counted
from harness.data import DATASETS, Dataset
from harness.execution import (
    TORCH_FORMATS,
    auto_chunk,
    available_memory,
    choose_format,
    peak_rss_bytes,
    precision_context,
    to_format,
)
from harness.plan import RunPlan, make_plan
from harness.report import write_report
from harness.store import (
    SUMMARY,
    RunStore,
    claim_run_dir,
    own_run_dir,
    read_rows,
    record_finished,
    write_table,
)
from harness.train import Trainer
from harness.validate import check_input_size, check_model_needs
from harness.version import git_sha
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS

PACKAGES = ("torch", "torchvision", "timm", "captum", "numpy", "scipy", "scikit-image", "pandas",
            "pyarrow", "hydra-core", "sanity-harness")


def resolve_device(name: str) -> torch.device:
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(name)


@dataclass
class Execution:
    """How every forward+backward of the run executes, chosen once before any map is made
    (:mod:`harness.execution`): the reference maps and every stage's maps alike."""

    memory_format: str  # contiguous | channels_last (auto resolved)
    precision: str  # fp32 | bf16
    internal_batch_size: int  # rows per forward+backward (auto resolved)
    details: dict  # how they were chosen (run.json "execution")


@dataclass
class Built:
    """What a plan builds before the check runs."""

    model: torch.nn.Module
    data: Dataset
    methods: dict  # name -> the method with its hyperparameters bound
    metrics: list[MetricSpec]
    trainer: Trainer | None
    device: torch.device
    weights: str  # where the model's weights came from (a column of every row)
    warnings: list[str]  # said to the user and recorded in run.json
    execution: Execution  # memory format, precision, rows per pass (columns and run.json)


def run(cfg: DictConfig, choices: dict, run_dir: Path) -> Path:
    """Run the configured check and write rows, maps, run.json and figures into ``run_dir``."""
    return execute(make_plan(cfg, choices, run_dir))


def execute(plan: RunPlan) -> Path:
    """Own the run dir (its lock; ``resume=wait`` waits for another owner), then run."""
    with own_run_dir(plan.run_dir, wait=plan.resume == "wait"):
        return execute_owned(plan)


def execute_owned(plan: RunPlan) -> Path:
    """Claim the run dir, build, run the check into the store, draw, record. A run dir that
    holds finished parts of the same config is resumed: only the rest is computed."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    device = resolve_device(plan.device)
    run_id, _ = claim_run_dir(plan.run_dir, plan.digest, plan.resume)
    torch.manual_seed(plan.seed)
    if plan.flush_denormal:
        torch.set_flush_denormal(True)  # subnormal activations/gradients slow CPU kernels down
    built = build(plan, device, timings)
    store = RunStore(plan.run_dir, {"run_id": run_id, "model": plan.model_label,
                                    "dataset": plan.dataset, "seed": plan.seed,
                                    "shard": plan.shard, "num_shards": plan.num_shards,
                                    "weights": built.weights,
                                    "memory_format": built.execution.memory_format,
                                    "precision": built.execution.precision},
                     CHECKS.facts(plan.check))
    for line in store.problems:  # parts it does not trust (moved aside), foreign files
        print(f"[sanity] {line}")
    kept = len(store.done)
    if kept:
        print(f"[sanity] resuming {plan.run_dir}: {kept} finished parts kept, computing only "
              "the rest")
    tic = time.perf_counter()
    run_check(plan, built, store)
    if kept:
        print(f"[sanity] resumed: {counted(kept, 'part')} kept, {counted(store.parts, 'part')} "
              "computed")
    timings["check_s"] = time.perf_counter() - tic
    write_table(plan.run_dir / SUMMARY, summary_table(read_rows(plan.run_dir), plan.seed))
    timings["figures_s"] = draw_figures(plan.run_dir) if plan.figures else 0.0
    timings["total_s"] = time.perf_counter() - start
    record_finished(plan.run_dir, run_record(plan, built, run_id, store, timings, kept))
    write_report(plan.run_dir)
    return plan.run_dir


def build(plan: RunPlan, device: torch.device, timings: dict[str, float]) -> Built:
    """The model, the data (this shard), the bound methods and metrics, the trainer; a model
    trained first when ``train.labels`` asks for it."""
    tic = time.perf_counter()
    model = build_model(plan).to(device)
    check_model_needs(model, plan.model_label, plan.methods)
    timings["load_model_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    data = plan.given.data or load_data(plan, model, split="test" if plan.trains else None)
    warnings = fewer_inputs_than_asked(plan, data)
    data = take_shard(data, plan.shard, plan.num_shards)
    data.inputs = data.inputs.to(device)
    check_input_size(model, plan.model_label, data.inputs, plan.dataset)
    metrics = build_metrics(plan, tuple(data.inputs.shape[-2:]))
    execution = choose_execution(plan, model, data.inputs[:plan.batch_size])
    model, data.inputs = to_format(model, data.inputs, execution.memory_format)
    trainer = build_trainer(plan, model, device, execution.memory_format) if plan.trains else None
    timings["load_data_s"] = time.perf_counter() - tic
    weights = weights_source(plan, model)
    if plan.train_labels:  # any check on a model trained first (cached)
        tic = time.perf_counter()
        trained = trainer(plan.train_labels)
        model, weights = trained.model, f"trained:{Path(trained.checkpoint).stem}"
        timings["train_s"] = time.perf_counter() - tic
    check_weights(plan, weights)
    methods = bind_methods(plan, execution)
    return Built(model, data, methods, metrics, trainer, device, weights, warnings, execution)


def choose_execution(plan: RunPlan, model: torch.nn.Module, x: torch.Tensor) -> Execution:
    """The run's memory format (``auto``: the model's declared choice, else measured on the
    first batch x), precision and rows per forward+backward (``auto``: the largest chunk under
    ``memory_limit``, estimated from a probe in the chosen format and precision)."""
    declared = (MODELS.facts(plan.model).memory_format
                if plan.given.model is None and plan.model in MODELS else "")
    details: dict = {"memory_format_source": "given"}
    memory_format = plan.memory_format
    if memory_format == "auto" and declared:
        memory_format, details["memory_format_source"] = declared, "declared by the model"
    elif memory_format == "auto":
        memory_format, seconds = choose_format(model, x, plan.precision)
        details.update(memory_format_source="measured" if seconds else "small model",
                       memory_format_seconds=seconds)
    rows = plan.internal_batch_size
    if rows == "auto":
        limit = memory_limit(plan)
        moved, x = to_format(model, x, memory_format)
        rows, details["internal_batch_size_probe"] = auto_chunk(moved, x, plan.precision, limit)
        print(f"[sanity] internal_batch_size=auto: {rows} rows per forward+backward under "
              f"{limit / 2**20:.0f} MB")
    return Execution(memory_format, plan.precision, int(rows), details)


def memory_limit(plan: RunPlan) -> int:
    """The run's ``memory_limit`` in bytes: given, or half the machine's available memory
    (``internal_batch_size=auto`` sizes its chunks under it, a check its kept activations)."""
    return plan.memory_limit or available_memory() // 2


def fewer_inputs_than_asked(plan: RunPlan, data: Dataset) -> list[str]:
    """``dataset.n`` above what the dataset holds: said in one line (and recorded)."""
    asked = plan.dataset_kwargs.get("n")
    if plan.given.data is not None or asked is None or len(data.samples) >= asked:
        return []
    text = (f"dataset.n={asked} but {plan.dataset} has {len(data.samples)} inputs: using "
            f"{len(data.samples)}")
    print(f"[sanity] warning: {text}")
    return [text]


def weights_source(plan: RunPlan, model: torch.nn.Module) -> str:
    """Where the model's weights came from: the zoo's record, or the user's object."""
    if plan.given.model is not None:
        return f"given:{plan.model_kwargs.get('weights_sha', '')}"
    if "_target_" in plan.model_kwargs:
        return f"built:{plan.model_kwargs['_target_']}"
    return model_meta(model).weights or "unknown"


def check_weights(plan: RunPlan, weights: str) -> None:
    """Random weights are never silent: a model neither loaded nor trained runs only with
    ``model.weights=random`` (checks that train their own models do not use its weights)."""
    if weights == "random" and plan.weights != "random" and not plan.trains:
        raise ValueError(f"model {plan.model_label} has random weights (neither loaded nor "
                         "trained): give model.checkpoint=PATH, train it first with "
                         "train.labels=true, or say model.weights=random to check it so")


def run_check(plan: RunPlan, built: Built, store: RunStore) -> None:
    """The check's rows and maps into the store; finished units (a resumed run) are skipped."""
    store.write_inputs(built.data, plan.n_maps)
    ctx = CheckContext(model=built.model, data=built.data, methods=built.methods,
                       metrics=built.metrics, seed=plan.seed, batch_size=plan.batch_size,
                       internal_batch_size=built.execution.internal_batch_size,
                       n_maps=plan.n_maps, progress=plan.progress, train=built.trainer,
                       memory_limit=memory_limit(plan),
                       finished=partial(store.finished, plan.check))
    print(f"[sanity] {plan.model_label} on {built.data.source}: "
          f"{counted(len(built.data.samples), 'input')}, {counted(len(ctx.methods), 'method')}, "
          f"check {plan.check}, device {built.device}")
    for item in CHECKS[plan.check](ctx, **plan.check_kwargs):
        store.add(item)
    store.flush()


def build_model(plan: RunPlan) -> torch.nn.Module:
    """The model given from Python, built by its config's ``_target_`` (a user's function),
    or by the zoo; in eval mode. ``blocks`` / ``gradcam_layer`` in a ``_target_`` config (or
    given to :func:`harness.evaluate`) name its randomization blocks and GradCAM layer."""
    if plan.given.model is not None:
        return plan.given.model.eval()
    if "_target_" not in plan.model_kwargs:
        return MODELS[plan.model](**builder_kwargs(plan))
    from hydra.utils import instantiate

    kwargs = {k: v for k, v in plan.model_kwargs.items()
              if k not in ("name", "blocks", "gradcam_layer", "weights")}
    try:
        model = instantiate(kwargs)
    except Exception as err:  # Hydra wraps the user's ImportError / TypeError in its own
        raise ValueError(f"model._target_={kwargs['_target_']}: "
                         f"{str(err).strip().splitlines()[0]}") from None
    return with_blocks(model.eval(), plan.model_kwargs.get("blocks"),
                       plan.model_kwargs.get("gradcam_layer"))


def builder_kwargs(plan: RunPlan) -> dict:
    """The model config for its zoo builder: ``name`` labels the model unless the builder takes
    it (timm's architecture name)."""
    takes_name = "name" in inspect.signature(MODELS[plan.model]).parameters
    return {k: v for k, v in plan.model_kwargs.items() if k != "name" or takes_name}


def with_blocks(model: torch.nn.Module, blocks: list[str] | None,
                gradcam_layer: str | None) -> torch.nn.Module:
    """``model`` with the randomization blocks and GradCAM layer a user names (by default the
    generic ones: its top-level children, its last conv layer)."""
    if blocks is None and gradcam_layer is None:
        return model
    fallback = fallback_meta(model)
    for name in [*(blocks or ()), *([gradcam_layer] if gradcam_layer else [])]:
        model.get_submodule(name)  # a wrong name fails here, with torch's message
    return attach_meta(model, replace(fallback, blocks=list(blocks or fallback.blocks),
                                      gradcam_layer=gradcam_layer or fallback.gradcam_layer))


class BoundMethod:
    """A method with its hyperparameters and the run-wide settings bound, called as
    ``(model, x, target)``. A plain function ``(model, x, target) -> map`` is a method: it gets
    only the keywords it takes; a map shaped (B, H, W) or (B, 1, H, W) is broadcast over x's
    channels; any other shape fails in one line."""

    def __init__(self, name: str, fn, keywords: dict, precision: str = "fp32"):
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.name, self.func, self.precision = name, fn, precision
        self.keywords = {k: v for k, v in keywords.items() if takes_all or k in params}

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor
                 ) -> torch.Tensor:
        with precision_context(self.precision):
            out = torch.as_tensor(self.func(model, x, target, **self.keywords))
        # maps in float32 and contiguous whatever the passes ran in: normalization and metrics
        # see the same layout and dtype under every setting
        out = out.float().contiguous() if out.is_floating_point() else out
        if out.shape == x.shape:
            return out
        if out.shape in (x.shape[:1] + x.shape[2:], x.shape[:1] + (1,) + x.shape[2:]):
            return out.reshape(x.shape[0], 1, *x.shape[2:]).expand_as(x).contiguous()
        raise ValueError(f"method {self.name} returned a map of shape {tuple(out.shape)} for "
                         f"inputs of shape {tuple(x.shape)}; a method returns (B, C, H, W) "
                         "like its input, or (B, H, W) / (B, 1, H, W)")


def bind_methods(plan: RunPlan, execution: Execution) -> dict[str, BoundMethod]:
    """The selected methods with their hyperparameters and the run-wide settings bound."""
    common = {"internal_batch_size": execution.internal_batch_size, "seed": plan.seed}
    return {name: BoundMethod(name, plan.given.methods.get(name) or METHODS[name],
                              {**common, **hparams}, execution.precision)
            for name, hparams in plan.methods.items()}


def build_metrics(plan: RunPlan, map_size: tuple[int, int] | None = None) -> list[MetricSpec]:
    """Metric specs; with ``map_size`` each metric is first tried on maps of that size."""
    specs = []
    for name, settings in plan.metrics.items():
        if map_size is not None:
            settings = fit_metric(name, settings, map_size)
        specs.append(MetricSpec(name, partial(METRICS[name], **settings),
                                plan.normalizations[name]))
    return specs


def fit_metric(name: str, settings: dict, map_size: tuple[int, int]) -> dict:
    """The metric's settings, checked on two random maps of the run's size before any compute.

    Settings that do not fit are adjusted by the metric's declared ``fit`` (with a warning that
    names what changed); any other misfit fails here in one line.
    """
    error = _probe_metric(name, settings, map_size)
    fit = METRICS.facts(name).fit if name in METRICS else None
    if error and fit is not None:
        fitted = fit(settings, map_size)
        if not _probe_metric(name, fitted, map_size):
            changed = ", ".join(f"metric.{name}.{k}={settings.get(k, 'default')} -> {v}"
                                for k, v in fitted.items() if settings.get(k) != v)
            print(f"[sanity] warning: {changed}: the settings do not fit {map_size[0]}x"
                  f"{map_size[1]} maps (set metric.{name}.* to choose)")
            return fitted
    if error:
        params = ", ".join(f"metric.{name}.{k}" for k in settings) or f"metric.{name}"
        raise ValueError(f"metric {name} cannot score {map_size[0]}x{map_size[1]} maps: {error} "
                         f"(adjust {params}, or leave {name} out of metric=[...])")
    return settings


def _probe_metric(name: str, kwargs: dict, map_size: tuple[int, int]) -> str:
    maps = torch.rand(2, 2, *map_size, generator=torch.Generator().manual_seed(0))
    try:
        METRICS[name](maps[0], maps[1], **kwargs)
    except (ValueError, TypeError) as err:
        return str(err)
    return ""


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


def load_data(plan: RunPlan, model: torch.nn.Module, split: str | None = None,
              n: int | None | str = "config") -> Dataset:
    """The dataset for ``model``; ``split`` and ``n`` override the plan's when given."""
    kwargs = dict(plan.dataset_kwargs)
    if split is not None:
        kwargs["split"] = split
    if n != "config":
        kwargs["n"] = n
    return DATASETS[plan.dataset](**kwargs, data_config=model_meta(model).data_config)


def build_trainer(plan: RunPlan, model: torch.nn.Module, device: torch.device,
                  memory_format: str = "contiguous") -> Trainer:
    """Trains the run's architecture on the dataset's whole train split (``train`` settings),
    caching checkpoints in ``cache_dir``; test accuracy on the whole test split. Models and
    inputs in the run's ``memory_format``."""
    with_splits = sorted(n for n, fn in DATASETS.items()
                         if "split" in inspect.signature(fn).parameters)
    if plan.dataset not in with_splits:
        raise ValueError(f"dataset {plan.dataset} has no train/test split to train on; use one "
                         f"of {', '.join(with_splits)}")
    train_set, test_set = (load_data(plan, model, split=s, n=None) for s in ("train", "test"))
    for part in (train_set, test_set):
        part.inputs, part.labels = part.inputs.to(device), part.labels.to(device)
        part.inputs = part.inputs.contiguous(memory_format=TORCH_FORMATS[memory_format])
    identity = {"model": plan.model_label, "model_registry": plan.model,
                "model_config": plan.model_kwargs, "dataset": plan.dataset}
    return Trainer(build=partial(MODELS[plan.model], **builder_kwargs(plan)), train_set=train_set,
                   test_set=test_set, identity=identity, settings=plan.train, seed=plan.seed,
                   cache_dir=plan.cache_dir, device=device, progress=plan.progress,
                   memory_format=memory_format)


def draw_figures(run_dir: Path) -> float:
    """Seconds spent drawing the run's figures (the checks' declared figure functions)."""
    from harness.figures import make_figures

    tic = time.perf_counter()
    make_figures(run_dir)
    return time.perf_counter() - tic


def run_record(plan: RunPlan, built: Built, run_id: str, store: RunStore, timings: dict,
               kept: int) -> dict:
    """run.json: the resolved config, versions, where the data came from, what was done."""
    record = {"run_id": run_id, "selected": plan.names, "config": plan.config,
              "git_sha": git_sha(), "packages": versions(), "python": platform.python_version(),
              "host": platform.node(), "device": str(built.device),
              "data_source": built.data.source, "inputs": len(built.data.samples),
              "warnings": built.warnings, "rows": store.rows_written, "timings": timings,
              "parts_kept": kept, "parts_computed": store.parts,
              "parts": store.committed_rows(),  # every rows part -> rows (sanity verify)
              "rows_total": sum(store.committed_rows().values()),
              "execution": {"memory_format": built.execution.memory_format,
                            "precision": built.execution.precision,
                            "internal_batch_size": built.execution.internal_batch_size,
                            **built.execution.details},
              "peak_rss_bytes": peak_rss_bytes(),
              "metric_settings": {s.name: dict(s.fn.keywords) for s in built.metrics}}
    if built.trainer is not None:
        record["trained"] = {k: trained_record(t) for k, t in built.trainer.trained.items()}
    for key, note in store.notes.items():  # the check's run-level facts (e.g. coverage)
        if key in record:
            raise RuntimeError(f"check {plan.check} yielded a RunNote {key!r}, a key run.json "
                               "already has")
        record[key] = note.value
    record["summary_lines"] = [n.line for n in store.notes.values() if n.line]
    return record


def trained_record(trained) -> dict:
    return {"train_accuracy": trained.train_accuracy, "test_accuracy": trained.test_accuracy,
            "train_size": trained.train_size, "test_size": trained.test_size,
            "epochs": trained.epochs, "checkpoint": trained.checkpoint, "cached": trained.cached}


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = ""
    return found


def summary(run_dir: Path) -> str:
    """The end-of-run text: each check's declared summary of its rows (the similarity
    summary when it declares none), then the lines of its run-level notes (run.json)."""
    rows = read_rows(run_dir)
    texts = []
    for check in rows["check"].unique():
        facts = CHECKS.facts(check) if check in CHECKS else None
        text = (facts and facts.summary or similarity_summary)(rows[rows["check"] == check])
        texts.append(text)
    record = Path(run_dir) / "run.json"
    if record.is_file():
        texts.append("\n".join(json.loads(record.read_text()).get("summary_lines", [])))
    return "\n\n".join(t for t in texts if t)
