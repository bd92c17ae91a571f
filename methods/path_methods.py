"""Path methods beyond the straight line of Integrated Gradients: Guided Integrated Gradients
(Kapishnikov et al. 2021, arXiv 2106.09788) and Blur Integrated Gradients (Xu et al. 2020,
arXiv 2004.03383). Both are proven equal to PAIR's ``saliency`` core implementations in
``tests/test_methods_paths.py``.

Every method: ``(model, x, target, *, internal_batch_size=64, seed=0, **hparams) -> Tensor``
with x: (B, C, H, W), target: (B,) class indices; returns raw, signed (B, C, H, W), detached.
The path bookkeeping runs in float64 (as the reference does); the model sees x's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from harness.base.registry import Range
from methods.common import input_gradients, logit_gradient
from methods.fold import gradient_model
from methods.registry import METHODS

# --- Guided Integrated Gradients ---------------------------------------------------------------

CLOSE = 1e-9  # relative and absolute tolerance of "the step's L1 target is reached"


@METHODS.register(ranges={"steps": Range(1), "fraction": Range(0, 1, exclusive_low=True),
                          "max_dist": Range(0)})  # max_dist = 0: Integrated Gradients
def guided_ig(model: nn.Module, x: Tensor, target: Tensor, *, steps: int = 200,
              fraction: float = 0.25, max_dist: float = 0.02, baseline: float = 0.0,
              internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Guided IG (Kapishnikov et al. 2021, arXiv 2106.09788): the path from the baseline to x
    moves, at each of ``steps`` steps, the ``fraction`` of features with the smallest |gradient|
    first, never further than ``max_dist`` (in alpha) from the straight line; the attribution
    sums gradient * displacement. ``max_dist=0`` is Integrated Gradients (left Riemann sum).

    x: (B, C, H, W); the B inputs advance together, each step is one chunked forward + backward
    of the B current points. Returns (B, C, H, W).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = gradient_model(model)  # same gradients; the steps' passes skip every BatchNorm
    end = x.detach().flatten(1).double()
    start = torch.full_like(end, baseline)
    point, attribution = start.clone(), torch.zeros_like(end)
    l1_total = (end - start).abs().sum(dim=1)
    for step in range(steps):
        grad = input_gradients(model, point.to(x.dtype).view_as(x), target,
                               internal_batch_size).flatten(1).double()
        alpha = (step + 1.0) / steps
        l1_target = l1_total * (1 - (step + 1) / steps)
        point, gained = guided_step(point, start, end, grad, alpha, max_dist, l1_target,
                                    fraction)
        attribution += gained
    return attribution.view_as(x).to(x.dtype)


def guided_step(point: Tensor, start: Tensor, end: Tensor, grad: Tensor, alpha: float,
                max_dist: float, l1_target: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """One Guided IG step for every row (B, N) at once: move features with small |grad| towards
    their upper bound until the row's L1 distance to ``end`` is ``l1_target`` (B,).

    Features stay within alpha in [alpha - max_dist, alpha + max_dist] of the straight line.
    Returns the new point and the attribution gained, grad * displacement, both (B, N).
    """
    alpha_low, alpha_high = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    low, high = start + (end - start) * alpha_low, start + (end - start) * alpha_high
    blocked = grad.clone()  # |grad| of features at their upper bound is set to inf
    gained = torch.zeros_like(point)
    active = torch.ones(point.shape[0], dtype=torch.bool, device=point.device)
    while active.any():
        before = point
        point = catch_up(point, start, end, low, alpha_low, alpha_high, active)
        l1 = (point - end).abs().sum(dim=1)
        moving = active & ~is_close(l1, l1_target)
        blocked[point == high] = math.inf
        selected = lowest_fraction(blocked, fraction) & moving[:, None]
        room = ((point - high).abs() * selected).sum(dim=1)
        gamma = torch.where(room > 0, (l1 - l1_target) / room, math.inf)
        partial = point + (high - point) * gamma[:, None]
        point = torch.where(selected, torch.where(gamma[:, None] > 1, high, partial), point)
        gained += (point - before) * grad
        active = moving & (gamma > 1) & (room > 0)  # room == 0: nothing left to move
    return point, gained


def catch_up(point: Tensor, start: Tensor, end: Tensor, low: Tensor, alpha_low: float,
             alpha_high: float, active: Tensor) -> Tensor:
    """Features of active rows whose alpha fell behind ``alpha_low`` jump to ``low``.

    A feature with end == start has no alpha; it counts as ``alpha_high`` (never behind).
    """
    delta = end - start
    alphas = torch.where(delta != 0, (point - start) / delta, alpha_high)
    return torch.where((alphas < alpha_low) & active[:, None], low, point)


def is_close(a: Tensor, b: Tensor) -> Tensor:
    """``math.isclose(a, b, rel_tol=CLOSE, abs_tol=CLOSE)`` elementwise."""
    return (a - b).abs() <= torch.maximum(CLOSE * torch.maximum(a.abs(), b.abs()),
                                          torch.full_like(a, CLOSE))


def lowest_fraction(grad: Tensor, fraction: float) -> Tensor:
    """Features whose |grad| is at most the row's ``fraction`` quantile ("lower" rule), among
    those not blocked (inf). grad: (B, N) -> bool (B, N)."""
    magnitude = grad.abs()
    k = math.floor((grad.shape[1] - 1) * fraction) + 1
    threshold = magnitude.kthvalue(k, dim=1, keepdim=True).values
    return (magnitude <= threshold) & (grad != math.inf)


# --- Blur Integrated Gradients ----------------------------------------------------------------

@METHODS.register(ranges={"max_sigma": Range(0, exclusive_low=True), "steps": Range(1),
                          "grad_step": Range(0, exclusive_low=True)})
def blur_ig(model: nn.Module, x: Tensor, target: Tensor, *, max_sigma: float = 50.0,
            steps: int = 100, grad_step: float = 0.01, sqrt: bool = False,
            internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Blur IG (Xu et al. 2020, arXiv 2004.03383): integrated gradients along the path of
    Gaussian blurs of x from sigma = ``max_sigma`` down to 0, in ``steps`` steps (sigma spaced
    linearly, or as a square root with ``sqrt``); d(blur)/d sigma by a forward difference of
    ``grad_step``. Blurs are scipy's ``gaussian_filter(mode="constant", truncate=4)``.

    x: (B, C, H, W); the B * steps path points (sample-major) run in chunks of at most
    ``internal_batch_size`` rows. Returns (B, C, H, W).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = gradient_model(model)  # same gradients; the steps' passes skip every BatchNorm
    sigmas = blur_sigmas(max_sigma, steps, sqrt)
    image = x.detach().double()
    total = torch.zeros_like(image)
    rows = torch.arange(x.shape[0] * steps, device=x.device)
    for chunk in rows.split(_positive(internal_batch_size)):
        sample, step = chunk // steps, (chunk % steps).tolist()
        point = gaussian_blur(image[sample], [sigmas[i] for i in step])
        wider = gaussian_blur(image[sample], [sigmas[i] + grad_step for i in step])
        grads = logit_gradient(model, point.to(x.dtype), target[sample]).double()
        weights = torch.tensor([sigmas[i + 1] - sigmas[i] for i in step], dtype=image.dtype,
                               device=x.device).view(-1, 1, 1, 1)
        total.index_add_(0, sample, weights * (wider - point) / grad_step * grads)
    return (-total).to(x.dtype)


def _positive(internal_batch_size: int) -> int:
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
    return internal_batch_size


def blur_sigmas(max_sigma: float, steps: int, sqrt: bool) -> list[float]:
    """The ``steps + 1`` blur levels from 0 to ``max_sigma`` (the reference's spacing)."""
    levels = [i * max_sigma / steps for i in range(steps + 1)]
    return [math.sqrt(level) for level in levels] if sqrt else levels


def gaussian_blur(images: Tensor, sigmas: list[float]) -> Tensor:
    """Blur images[i] (n, C, H, W) over H and W with sigmas[i], channel by channel, as
    ``scipy.ndimage.gaussian_filter(mode="constant", truncate=4.0)``: kernel radius
    int(4 sigma + 0.5), zero outside the image. Each 1-D pass is a banded matrix product."""
    rows = torch.stack([gaussian_matrix(s, images.shape[-2], images) for s in sigmas])
    cols = torch.stack([gaussian_matrix(s, images.shape[-1], images) for s in sigmas])
    return rows.unsqueeze(1) @ images @ cols.unsqueeze(1).transpose(-1, -2)


def gaussian_matrix(sigma: float, size: int, like: Tensor) -> Tensor:
    """(size, size) matrix K with K @ v = 1-D Gaussian filter of v, zero padding (scipy's
    ``_gaussian_kernel1d`` weights, normalized over the full kernel); sigma 0: identity."""
    if sigma == 0:
        return torch.eye(size, dtype=like.dtype, device=like.device)
    radius = int(4.0 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    norm = torch.exp(-0.5 / (sigma * sigma) * taps**2).sum()
    index = torch.arange(size, dtype=like.dtype, device=like.device)
    offset = index.view(1, -1) - index.view(-1, 1)
    weights = torch.exp(-0.5 / (sigma * sigma) * offset**2) / norm
    return torch.where(offset.abs() <= radius, weights, torch.zeros_like(weights))
