"""Gradient-family saliency methods of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps",
arXiv 1810.03292): Gradient, Gradient x Input, Integrated Gradients, SmoothGrad and VarGrad.

Every method: ``(model, x, target, *, internal_batch_size=64, seed=0, **hparams) -> Tensor``
with x: (B, C, H, W), target: (B,) class indices; returns raw, signed (B, C, H, W), detached.
Noise samples and path steps are stacked with the inputs into one batch of B * n rows
(sample-major), run in chunks of at most ``internal_batch_size`` rows.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from harness.base.registry import Range
from methods.common import gaussian_noise, input_gradients, noise_sigma, shared
from methods.registry import METHODS

# Noise samples, and sigma as a fraction of each input's range (max - min).
NOISE_RANGES = {"n_samples": Range(1), "noise_level": Range(0, exclusive_low=True)}


@METHODS.register
def gradient(model: nn.Module, x: Tensor, target: Tensor, *, internal_batch_size: int = 64,
             seed: int = 0) -> Tensor:
    """d logit[target] / dx (Simonyan et al. 2013, arXiv 1312.6034). (B, C, H, W)."""
    return shared_input_gradient(model, x, target, internal_batch_size)


@METHODS.register
def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor, *,
                     internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Gradient * x (Shrikumar et al. 2016, arXiv 1605.01713). (B, C, H, W)."""
    return shared_input_gradient(model, x, target, internal_batch_size) * x.detach()


def shared_input_gradient(model: nn.Module, x: Tensor, target: Tensor,
                          internal_batch_size: int) -> Tensor:
    """The input gradient (B, C, H, W), computed once for Gradient and Gradient x Input."""
    return shared(lambda: input_gradients(model, x, target, internal_batch_size), "gradient",
                  model, x, target)


# --- Integrated Gradients ---------------------------------------------------------------------

def path_alphas_and_weights(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Points alpha in [0, 1] and weights of the path integral, as captum's ``method`` names.

    "gausslegendre" (captum's default): Gauss-Legendre nodes mapped from [-1, 1] to [0, 1];
    "riemann_left" / "riemann_right" / "riemann_middle" / "riemann_trapezoid": equal steps.
    """
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    if steps < 2:
        raise ValueError(f"Riemann integration needs steps >= 2, got {steps}")
    weights = np.full(steps, 1.0 / steps)
    alphas = {"riemann_left": np.linspace(0, 1 - 1 / steps, steps),
              "riemann_right": np.linspace(1 / steps, 1, steps),
              "riemann_middle": np.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps),
              "riemann_trapezoid": np.linspace(0, 1, steps)}.get(method)
    if alphas is None:
        raise ValueError(f"unknown integration method {method!r}; valid choices: "
                         "gausslegendre, riemann_left, riemann_middle, riemann_right, "
                         "riemann_trapezoid")
    if method == "riemann_trapezoid":
        weights[[0, -1]] /= 2  # the end points count half
    return alphas, weights


# Gauss-Legendre takes any steps >= 1; the Riemann rules need 2 (path_alphas_and_weights says so).
@METHODS.register(ranges={"steps": Range(1)})
def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, *, steps: int = 50,
                         baseline: float = 0.0, method: str = "gausslegendre",
                         internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """(x - baseline) * weighted mean of gradients on the straight path baseline -> x
    (Sundararajan et al. 2017, arXiv 1703.01365). Paper settings: 50 steps, zero baseline.

    x: (B, C, H, W); the B * steps path points (sample-major) form one chunked batch.
    """
    alphas, weights = (torch.as_tensor(a, dtype=x.dtype, device=x.device)
                       for a in path_alphas_and_weights(steps, method))
    delta = x.detach() - baseline
    expand = (1, steps) + (1,) * (x.dim() - 1)  # (1, S, 1, 1, 1)
    path = baseline + alphas.view(expand) * delta.unsqueeze(1)  # (B, S, C, H, W)
    grads = input_gradients(model, path.flatten(0, 1), target.repeat_interleave(steps),
                            internal_batch_size).view_as(path)
    return delta * (grads * weights.view(expand)).sum(dim=1)


# --- SmoothGrad and VarGrad share the same noisy gradients ------------------------------------

def noisy_gradient_moments(model: nn.Module, x: Tensor, target: Tensor, n_samples: int,
                           noise_level: float, internal_batch_size: int,
                           seed: int) -> tuple[Tensor, Tensor]:
    """Mean and mean of squares over the noise samples of :func:`noisy_gradients`, each
    (B, C, H, W); computed once for SmoothGrad and VarGrad with the same settings."""
    def moments() -> tuple[Tensor, Tensor]:
        grads = noisy_gradients(model, x, target, n_samples, noise_level, internal_batch_size,
                                seed)
        return grads.mean(dim=1), (grads * grads).mean(dim=1)

    return shared(moments, "noisy_gradients", model, x, target, n_samples, noise_level, seed)


def noisy_gradients(model: nn.Module, x: Tensor, target: Tensor, n_samples: int,
                    noise_level: float, internal_batch_size: int, seed: int) -> Tensor:
    """Gradients at x + N(0, sigma^2), sigma = noise_level * (max - min) per sample.

    x: (B, C, H, W) -> (B, n_samples, C, H, W); noise drawn as captum's NoiseTunnel does.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    noisy = x.detach().unsqueeze(1) + gaussian_noise(x, n_samples, noise_sigma(x, noise_level),
                                                     seed)
    grads = input_gradients(model, noisy.flatten(0, 1), target.repeat_interleave(n_samples),
                            internal_batch_size)
    return grads.view_as(noisy)


@METHODS.register(ranges=NOISE_RANGES)
def smoothgrad(model: nn.Module, x: Tensor, target: Tensor, *, n_samples: int = 50,
               noise_level: float = 0.15, internal_batch_size: int = 64,
               seed: int = 0) -> Tensor:
    """Mean gradient over noisy copies of x (Smilkov et al. 2017, arXiv 1706.03825).

    Paper settings: 50 samples, sigma = 0.15 * (max - min) per sample. (B, C, H, W).
    """
    mean, _ = noisy_gradient_moments(model, x, target, n_samples, noise_level,
                                     internal_batch_size, seed)
    return mean


@METHODS.register(ranges=NOISE_RANGES)
def vargrad(model: nn.Module, x: Tensor, target: Tensor, *, n_samples: int = 50,
            noise_level: float = 0.15, internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Population variance of the SmoothGrad gradients, mean(g^2) - mean(g)^2 as captum's
    NoiseTunnel "vargrad" (Adebayo et al. 2018, arXiv 1810.03307 and 1810.03292). (B, C, H, W).
    """
    mean, mean_sq = noisy_gradient_moments(model, x, target, n_samples, noise_level,
                                           internal_batch_size, seed)
    return mean_sq - mean**2
