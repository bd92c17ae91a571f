"""Guided Backprop, GradCAM and Guided GradCAM, as compared by Adebayo et al. 2018
("Sanity Checks for Saliency Maps", arXiv 1810.03292).

Every method: ``(model, x, target, *, internal_batch_size=64, seed=0, **hparams) -> Tensor``
with x: (B, C, H, W), target: (B,) class indices; returns raw, signed (B, C, H, W), detached.
Hooks live only inside ``with`` blocks (removed also on error).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from harness.base.meta import gradcam_layer
from methods.common import (
    captured_outputs,
    forward_hooks,
    input_gradients,
    map_chunks,
    shared,
    target_logits,
    upsample_like,
)
from methods.registry import METHODS

GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


# --- Guided Backprop --------------------------------------------------------------------------

def _clamp_output_gradient(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
    # The gradient reaching the activation's output is clamped at 0 from below; the
    # activation's own backward then masks it by the active range (x > 0 for ReLU, 0 < x < 6
    # for ReLU6). Masking by 0/1 commutes with the clamp, so this equals captum's
    # relu(grad_input). A tensor hook (not a module backward hook) also works for inplace ReLU.
    if output.requires_grad:
        output.register_hook(lambda grad: grad.clamp(min=0))


@contextmanager
def guided_activations(model: nn.Module) -> Iterator[None]:
    """Inside the block, gradients through every nn.ReLU / nn.ReLU6 of model are guided."""
    activations = [m for m in model.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    if not activations:
        raise ValueError(f"guided backprop needs nn.ReLU or nn.ReLU6 modules; "
                         f"{type(model).__name__} has none (functional ones can't be hooked)")
    with forward_hooks(activations, _clamp_output_gradient):
        yield


def guided_gradients(model: nn.Module, x: Tensor, target: Tensor,
                     internal_batch_size: int) -> Tensor:
    """Guided backprop map of x: (B, C, H, W) -> (B, C, H, W), shared with Guided GradCAM."""
    def compute() -> Tensor:
        with guided_activations(model):
            return input_gradients(model, x, target, internal_batch_size)

    return shared(compute, "guided_backprop", model, x, target)


@METHODS.register(needs=("relu",))
def guided_backprop(model: nn.Module, x: Tensor, target: Tensor, *,
                    internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Gradient where every ReLU/ReLU6 passes back only positive gradients
    (Springenberg et al. 2014, arXiv 1412.6806). (B, C, H, W)."""
    return guided_gradients(model, x, target, internal_batch_size)


# --- GradCAM ----------------------------------------------------------------------------------

def _gradcam_chunk(model: nn.Module, layer: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """sum_k w_k A_k with w_k = spatial mean of d logit[target] / dA_k. (n, 1, h, w)."""
    leaf = x.detach().requires_grad_(True)  # the graph reaches A even for frozen weights
    with torch.enable_grad(), captured_outputs(layer) as outputs:
        score = target_logits(model(leaf), target).sum()
        if len(outputs) != 1:
            raise ValueError(f"the GradCAM layer ran {len(outputs)} times in one forward; "
                             "it must run exactly once")
        (grads,) = torch.autograd.grad(score, outputs[0])
    weights = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
    return (weights * outputs[0]).sum(dim=1, keepdim=True).detach()


def gradcam_maps(model: nn.Module, x: Tensor, target: Tensor, relu: bool,
                 internal_batch_size: int) -> Tensor:
    """GradCAM at the layer of ``harness.base.meta.gradcam_layer``: x (B, C, H, W) -> (B, 1, h, w)."""
    layer = gradcam_layer(model)

    def compute() -> Tensor:
        return map_chunks(lambda rows, targets: _gradcam_chunk(model, layer, rows, targets), x,
                          target, internal_batch_size)

    maps = shared(compute, "gradcam", model, x, target)
    return maps.clamp(min=0) if relu else maps


@METHODS.register(needs=("conv",))
def gradcam(model: nn.Module, x: Tensor, target: Tensor, *, relu: bool = True,
            interpolate_mode: str = "bilinear", internal_batch_size: int = 64,
            seed: int = 0) -> Tensor:
    """ReLU(sum_k w_k A_k) at the last conv block, upsampled to x and broadcast over its
    channels (Selvaraju et al. 2017, arXiv 1610.02391). (B, C, H, W)."""
    return upsample_like(gradcam_maps(model, x, target, relu, internal_batch_size), x,
                         interpolate_mode)


@METHODS.register(needs=("conv", "relu"))
def guided_gradcam(model: nn.Module, x: Tensor, target: Tensor, *,
                   interpolate_mode: str = "nearest", internal_batch_size: int = 64,
                   seed: int = 0) -> Tensor:
    """Guided backprop * upsampled GradCAM (Selvaraju et al. 2017, arXiv 1610.02391);
    "nearest" upsampling as captum's GuidedGradCam. (B, C, H, W)."""
    cam = gradcam_maps(model, x, target, relu=True, internal_batch_size=internal_batch_size)
    return guided_gradients(model, x, target, internal_batch_size) * upsample_like(
        cam, x, interpolate_mode)


# what the runner checks the model has before any compute (harness/validate.py)
