"""Bad input caught before any compute, each in one line that says what to change.

The runner calls these after the config is composed and before the check runs: method
hyperparameters against the method's signature and the declared ranges below, the model
against what each method needs, the dataset's inputs against what the model takes, the shard
against the dataset.
"""
from __future__ import annotations

import inspect
import math
import types
import typing

import torch
from torch import nn

from harness.base.meta import model_meta

# Declared ranges of hyperparameters, by name, for every method that has one:
# (low, high, low_inclusive). Names mean the same in every method of methods/.
RANGES: dict[str, tuple[float, float, bool]] = {
    "steps": (1, math.inf, True),  # path steps
    "n_samples": (1, math.inf, True),  # noise samples
    "noise_level": (0, math.inf, False),  # sigma as a fraction of the input range
    "q": (0, 100, True),  # percentile
    "k": (1, math.inf, True),
    "epsilon": (0, math.inf, True),
    "alpha": (0, math.inf, True),
    "beta": (0, math.inf, True),
    "fraction": (0, 1, False),
    "max_dist": (0, math.inf, False),
    "max_sigma": (0, math.inf, False),
    "grad_step": (0, math.inf, False),
    "size": (1, math.inf, True),
    "ig_iter": (1, math.inf, True),
    "iterations": (1, math.inf, True),
    "blur_ksize": (1, math.inf, True),
    "blur_sigma": (0, math.inf, False),
}
RUN_WIDE = ("internal_batch_size", "seed")  # bound by the runner for every method
ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def check_hparams(method: str, fn, hparams: dict) -> None:
    """Every ``method.<name>.<key>`` is a keyword of the method, of the annotated type and
    within its declared range."""
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    own = [p for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name not in RUN_WIDE]
    for key, value in hparams.items():
        if key not in params or key in RUN_WIDE:
            raise ValueError(f"method.{method}.{key}: unknown hyperparameter of {method}; it "
                             f"takes {', '.join(p.name for p in own) or 'none'}")
        _check_type(f"method.{method}.{key}", value, hints.get(key))
        _check_range(f"method.{method}.{key}", value, RANGES.get(key))


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


def _check_range(label: str, value, bounds: tuple[float, float, bool] | None) -> None:
    if bounds is None or value is None or isinstance(value, bool):
        return
    low, high, inclusive = bounds
    above = value >= low if inclusive else value > low
    if not (above and value <= high):
        low_text = f">= {low}" if inclusive else f"> {low}"
        text = low_text if high == math.inf else f"within [{low}, {high}]"
        raise ValueError(f"{label} must be {text}, got {value!r}")


def check_model_needs(model: nn.Module, model_name: str, methods: dict) -> None:
    """Each method's ``needs`` (``conv``: a GradCAM layer; ``relu``: ReLU modules) are there."""
    has = {"conv": bool(model_meta(model).gradcam_layer),
           "relu": any(isinstance(m, ACTIVATIONS) for m in model.modules())}
    for method, fn in methods.items():
        for need in getattr(getattr(fn, "func", fn), "needs", ()):
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
