"""Bad input caught before any compute, each in one line that says what to change.

The runner calls these after the config is composed and before the check runs: method
hyperparameters against the method's signature and the ranges declared in its registration
(``METHODS.facts(name).ranges``), the model against what each method needs (its ``needs``
fact), the dataset's inputs against what the model takes, the shard against the dataset.
"""
from __future__ import annotations

import inspect
import types
import typing

import torch
from torch import nn

from harness.base.facts import MethodFacts, MetricFacts
from harness.base.meta import model_meta
from harness.base.registry import Range
from methods import METHODS
from metrics import METRICS

RUN_WIDE = ("internal_batch_size", "seed")  # bound by the runner for every method
ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def check_hparams(method: str, fn, hparams: dict, facts: MethodFacts | None = None) -> None:
    """Every ``method.<name>.<key>`` is a keyword of the method, of the annotated type and
    within the range the method declares for it (``facts``, by default those registered under
    ``method``; a method outside ``METHODS`` declares none)."""
    facts = facts if facts is not None else method_facts(method)
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    own = [p for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name not in RUN_WIDE]
    for key, value in hparams.items():
        if key not in params or key in RUN_WIDE:
            raise ValueError(f"method.{method}.{key}: unknown hyperparameter of {method}; it "
                             f"takes {', '.join(p.name for p in own) or 'none'}")
        _check_type(f"method.{method}.{key}", value, hints.get(key))
        _check_range(f"method.{method}.{key}", value, facts.ranges.get(key))


def check_metric_args(metric: str, fn, kwargs: dict, facts: MetricFacts | None = None) -> None:
    """Every ``metric.<name>.<key>`` (``normalization`` popped first) is a keyword of the metric,
    of the annotated type and within its declared range (``facts``, by default those registered
    under ``metric``)."""
    facts = facts if facts is not None else (
        METRICS.facts(metric) if metric in METRICS else MetricFacts())
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    for key, value in kwargs.items():
        if key not in params or key in ("a", "b"):
            raise ValueError(f"metric.{metric}.{key}: unknown setting of {metric}; it takes "
                             f"normalization, {', '.join(list(params)[2:]) or 'nothing else'}")
        _check_type(f"metric.{metric}.{key}", value, hints.get(key))
        _check_range(f"metric.{metric}.{key}", value, facts.ranges.get(key))


def method_facts(name: str) -> MethodFacts:
    """The facts registered under ``name``, or the defaults for a method outside ``METHODS``."""
    return METHODS.facts(name) if name in METHODS else MethodFacts()


def _check_type(label: str, value, hint) -> None:
    allowed = _types_of(hint)
    if allowed and not any(_is_a(value, t) for t in allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{label} must be {names}, got {value!r}")


def _is_a(value, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, never a count or a level here
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _types_of(hint) -> tuple[type, ...]:
    """The plain types an annotation allows (``float | None`` -> float, NoneType)."""
    if hint is None:
        return ()
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _types_of(arg))
    return (hint,) if isinstance(hint, type) else ()


def check_choices(label: str, fn, kwargs: dict) -> None:
    """Every setting annotated with ``Literal[...]`` (a check's ``order``, a dataset's ``split``)
    is one of its choices, and one annotated ``bool`` is true or false: ``check.order=sideways``
    fails before a model is loaded."""
    hints = typing.get_type_hints(fn)
    for key, value in kwargs.items():
        if hints.get(key) is bool and not isinstance(value, bool):  # check.reuse_prefix=maybe
            raise ValueError(f"{label}.{key} must be true or false, got {value!r}")
        choices = literal_choices(hints.get(key))
        if choices and value not in choices:
            raise ValueError(f"{label}.{key} must be one of {', '.join(map(str, choices))}, "
                             f"got {value!r}")


def literal_choices(hint) -> tuple:
    """The values a ``Literal[...]`` annotation (also inside ``X | None``) allows; () else."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(v for arg in typing.get_args(hint) for v in literal_choices(arg))
    return ()


def check_count(key: str, value, low: int) -> int:
    """A whole number of at least ``low`` (``seed``, ``batch_size``, ...), in one line if not."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be a whole number >= {low}, got {value!r}")
    return value


def _check_range(label: str, value, bounds: Range | None) -> None:
    if bounds is None or value is None or isinstance(value, bool):
        return
    if not bounds.contains(value):
        raise ValueError(f"{label} must be {bounds}, got {value!r}")


def check_model_needs(model: nn.Module, model_name: str, methods: dict) -> None:
    """Each method's declared ``needs`` (``conv``: a GradCAM layer; ``relu``: ReLU modules) are
    there. ``methods``: name -> the callable (a bound ``functools.partial``); facts by name."""
    has = {"conv": bool(model_meta(model).gradcam_layer),
           "relu": any(isinstance(m, ACTIVATIONS) for m in model.modules())}
    for method in methods:  # a bound partial or a plain callable: facts come by name
        for need in method_facts(method).needs:
            if not has[need]:
                what = "a conv layer" if need == "conv" else "nn.ReLU or nn.ReLU6 modules"
                raise ValueError(f"method {method} needs {what}, which model {model_name} lacks; "
                                 f"leave {method} out of method=[...] or pick another model")


@torch.no_grad()
def check_input_size(model: nn.Module, model_name: str, inputs: torch.Tensor,
                     dataset: str) -> None:
    """One forward of one input: the model takes the dataset's input shape."""
    try:
        model(inputs[:1])
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(f"model {model_name} cannot take inputs of shape "
                         f"{tuple(inputs.shape[1:])} from dataset {dataset}: {reason}") from err


def check_shard(shard: int, num_shards: int) -> None:
    if not (isinstance(num_shards, int) and num_shards >= 1):
        raise ValueError(f"dataset.num_shards must be an integer >= 1, got {num_shards!r}")
    if not (isinstance(shard, int) and 0 <= shard < num_shards):
        raise ValueError(f"dataset.shard must be an integer in [0, {num_shards - 1}] for "
                         f"dataset.num_shards={num_shards}, got {shard!r}")
