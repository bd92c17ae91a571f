"""Change of input encoding absorbed by the first layer (Kindermans et al. 2017, "The
(Un)reliability of saliency methods", arXiv 1711.00867, §3).

A new encoding x' = alpha * x + beta (per input channel; a brightness shift is alpha = 1,
beta = delta) is fed to a model whose first parametrized layer (conv or dense, reading the input
directly) is changed so that it computes exactly what it computed on x:

* weights W' = W / alpha (per input channel), bias b' = b - W' beta (Kindermans et al.: the
  shift is absorbed into the first layer's bias; a layer without bias gets one for the time
  being);
* the border: a zero-padded conv pads x' with 0, which is not the image of the original padding
  (0 -> beta), so near the border W' beta over the padded taps is missing and the scalar bias
  over-compensates. The exact remedy used here is an input-independent correction D of the
  layer's output, D = layer(0) - layer'(beta), added to every output: a per-position bias that
  is 0 in the interior (up to rounding) and equals the padding taps' share at the border. It is
  the same as padding x' with beta; it works for any padding scheme of the layer (timm's dynamic
  "same" padding included), and for dense layers it only removes rounding. D is recomputed
  from the layer's current weights at every forward (two one-image passes of the layer), so it
  stays exact when a method changes the layer for its call (LRP merges BatchNorm into it).

So layer'(x') + D = layer(x) for every x, up to float rounding. Methods see a model that
computes the same function; only the input they are given changed. LRP rules that recompute the
layer's output with modified parameters see the new bias but not D (a forward hook); the rows
record the first layer and the size of D.

Everything happens inside :func:`compensated`, which restores the layer's weights, its bias (or
its absence) and removes the hook on exit, also after an exception.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.base.randomize import first_calls, restore_, snapshot

SUPPORTED = (nn.Conv2d, nn.Linear)


@dataclass
class Compensation:
    """What :func:`compensated` did, for the rows."""

    layer: str  # module name of the first parametrized layer
    kind: str  # Conv2d | Linear (or a subclass name, e.g. Conv2dSame)
    added_bias: bool  # the layer had no bias: one was added for the time being
    border: float  # max |D|: the border correction (0 up to rounding for dense layers)


def first_layer(model: nn.Module, example: Tensor) -> tuple[str, nn.Module]:
    """The first parametrized leaf module a forward of ``example`` (1, C, H, W) calls.

    It must be a conv or dense layer whose input is the model input itself (possibly
    flattened); otherwise the compensation could not be exact and a ValueError says why.
    """
    seen = first_calls(model, example)
    if not seen:
        raise ValueError(f"{type(model).__name__} has no parametrized layer")
    name, module, received = seen[0]
    if not isinstance(module, SUPPORTED):
        raise ValueError(f"input_bias compensates a first Conv2d or Linear layer; the first "
                         f"parametrized layer of {type(model).__name__} is {name} "
                         f"({type(module).__name__})")
    reads_input = received is not None and received.numel() == example.numel() and torch.equal(
        received.reshape(-1), example.reshape(-1))
    if not reads_input:
        raise ValueError(f"the first layer {name} does not read the model input directly "
                         "(a preprocessing step before it?): the compensation would not be exact")
    return name, module


def per_feature(values: Tensor, example: Tensor, shape: torch.Size) -> Tensor:
    """Per-channel ``values`` (C,) broadcast over ``example`` (1, C, H, W) and laid out as the
    first layer sees its input (``shape``: (1, C, H, W) for a conv, (1, C*H*W) for a dense
    layer after flattening)."""
    return values.view(1, -1, *([1] * (example.dim() - 2))).expand_as(example).reshape(shape)


@contextmanager
def compensated(model: nn.Module, alpha: Tensor, beta: Tensor,
                example: Tensor) -> Iterator[Compensation]:
    """Inside the block, ``model(alpha * x + beta)`` equals the original ``model(x)``.

    alpha, beta: (C,) per input channel (alpha != 0); example: one input (1, C, H, W) to find
    the first layer. The model is restored on exit (weights, bias or its absence, no hook left),
    also after an exception.
    """
    if not bool((alpha != 0).all()):
        raise ValueError("the encoding's scale alpha must be non-zero")
    name, layer = first_layer(model, example)
    weight = layer.weight
    alpha, beta = (v.to(weight.device, weight.dtype) for v in (alpha, beta))
    example = example.to(weight.device, weight.dtype)
    shape = _layer_input_shape(layer, example)
    saved, had_bias = snapshot(layer), layer.bias is not None
    handle = None
    try:
        with torch.no_grad():
            zero = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
            original_zero = layer(zero)
            if not had_bias:
                layer.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device,
                                                      dtype=weight.dtype))
            _divide_input_weights(layer, alpha, per_feature(alpha, example, shape))
            shifted = per_feature(beta, example, shape)
            layer.bias.sub_(_weights_times(layer, beta, shifted))
            border = original_zero - layer(shifted)
        handle = layer.register_forward_hook(
            lambda module, _args, out: out + border_correction(module, beta, shifted))
        yield Compensation(layer=name, kind=type(layer).__name__, added_bias=not had_bias,
                           border=float(border.abs().max()))
    finally:
        if handle is not None:
            handle.remove()
        if not had_bias:
            layer.bias = None
            saved = {k: v for k, v in saved.items() if k != "bias"}
        restore_(layer, saved)


def _layer_input_shape(layer: nn.Module, example: Tensor) -> torch.Size:
    if isinstance(layer, nn.Linear):
        return torch.Size([1, layer.in_features])
    return example.shape


def _divide_input_weights(layer: nn.Module, alpha: Tensor, flat_alpha: Tensor) -> None:
    """W' = W / alpha over the input features: per channel for a conv (grouped ones too),
    per flat feature for a dense layer. alpha: (C,); flat_alpha: alpha laid out as the input."""
    if isinstance(layer, nn.Linear):
        layer.weight.div_(flat_alpha.view(1, -1))
        return
    groups = getattr(layer, "groups", 1)
    weight = layer.weight
    grouped = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
    grouped.div_(alpha.view(groups, 1, -1, 1, 1))


@torch.no_grad()
def border_correction(layer: nn.Module, beta: Tensor, shifted: Tensor) -> Tensor:
    """D = W beta - (layer(beta) - layer(0)) with the layer's current weights: what the padded
    taps of a constant input beta would have added, (1, K, ...); 0 away from the border.

    Computed from the current weights at every call, so it stays right when a method changes
    the layer for the length of its call (LRP canonizers merge the following BatchNorm into it:
    D scales with the merged weights). The layer's class ``forward`` runs, not its hooks.
    """
    forward = type(layer).forward
    linear = forward(layer, shifted) - forward(layer, torch.zeros_like(shifted))
    interior = _weights_times(layer, beta, shifted)
    return interior.view(1, -1, *([1] * (linear.dim() - 2))) - linear


def _weights_times(layer: nn.Module, beta: Tensor, shifted: Tensor) -> Tensor:
    """W' beta per output unit (K,): what a constant input beta adds away from any border.

    beta: (C,) per channel; shifted: beta laid out as the layer's input (dense layers)."""
    if isinstance(layer, nn.Linear):
        return layer.weight @ shifted[0]
    groups = getattr(layer, "groups", 1)
    weight = layer.weight  # (K, C / groups, kh, kw)
    per_group = beta.view(groups, 1, -1, 1, 1)  # (groups, 1, C / groups, 1, 1)
    grouped = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
    return (grouped * per_group).sum(dim=(2, 3, 4)).reshape(-1)
