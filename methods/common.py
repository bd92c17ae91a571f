"""Plumbing shared by the saliency methods (Adebayo et al. 2018, arXiv 1810.03292).

* chunking: a stacked batch (inputs x noise samples / path steps) runs in chunks of at most
  ``internal_batch_size`` rows, one forward + backward per chunk;
* the gradient of the target logit with respect to the input, never ``.backward()``, so no
  parameter ``.grad`` is ever accumulated;
* hooks that exist only inside a ``with`` block and are removed also on error (zennit style);
* seeded Gaussian noise that leaves the global RNG alone;
* upsampling of layer maps (GradCAM) to the input's shape;
* ``shared_pieces()``: inside it, a piece several methods need (the input gradient, the noisy
  gradients of SmoothGrad and VarGrad, the Guided Backprop and GradCAM maps) is computed once.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.prefix import active_cache

ForwardHook = Callable[[nn.Module, tuple, Tensor], None]
_SHARED: ContextVar[dict | None] = ContextVar("shared_pieces", default=None)


@contextmanager
def shared_pieces() -> Iterator[None]:
    """Compute shared pieces once inside the block (README, "Speed"): Gradient and Gradient x Input
    share the input gradient, SmoothGrad and VarGrad the noisy gradients, Guided GradCAM reuses
    Guided Backprop and GradCAM. The caller guarantees the model does not change inside."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared(fn: Callable[[], object], kind: str, model: nn.Module, x: Tensor, target: Tensor,
           *settings: Hashable):
    """``fn()``, memoized by (kind, model, x, target, settings) inside ``shared_pieces()``."""
    cache = _SHARED.get()
    if cache is None:
        return fn()
    key = (kind, id(model), x.data_ptr(), x._version, tuple(x.shape), x.dtype, str(x.device),
           tuple(target.tolist()), settings)
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def target_logits(logits: Tensor, target: Tensor) -> Tensor:
    """``logits[i, target[i]]``: logits (B, K), target (B,) -> (B,). The logit, not softmax."""
    return logits.gather(1, target.to(logits.device).view(-1, 1)).squeeze(1)


def map_chunks(fn: Callable[[Tensor, Tensor], Tensor], rows: Tensor, targets: Tensor,
               internal_batch_size: int) -> Tensor:
    """``fn`` on consecutive chunks of at most ``internal_batch_size`` rows, concatenated.

    rows: (N, ...), targets: (N,). ``fn(rows_chunk, targets_chunk)`` returns (n, ...).
    """
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
    pairs = zip(rows.split(internal_batch_size), targets.split(internal_batch_size))
    return torch.cat([fn(rows_chunk, targets_chunk) for rows_chunk, targets_chunk in pairs])


def logit_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """d logit[target] / dx for one chunk, x: (n, C, H, W) -> (n, C, H, W), detached.

    A detached leaf copy of ``x`` takes the gradient, so the caller's ``x`` (and its ``.grad``)
    is never touched; ``autograd.grad`` w.r.t. that leaf only leaves parameter ``.grad`` alone.
    """
    cache = active_cache(model)  # a randomization check's recorded prefix (methods.prefix)
    if cache is not None:
        grad = cache.gradient(x, lambda logits: target_logits(logits, target).sum())
        if grad is not None:
            return grad
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():  # the caller may be inside torch.no_grad()
        score = target_logits(model(leaf), target).sum()  # rows are independent: sum = per row
        (grad,) = torch.autograd.grad(score, leaf)
    return grad.detach()


def input_gradients(model: nn.Module, rows: Tensor, targets: Tensor,
                    internal_batch_size: int) -> Tensor:
    """d logit[target] / d row for a stacked batch rows: (N, C, H, W), targets: (N,)."""
    return map_chunks(lambda r, t: logit_gradient(model, r, t), rows, targets,
                      internal_batch_size)


@contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: ForwardHook) -> Iterator[None]:
    """``hook`` as a forward hook on every module, all removed on exit (also on error)."""
    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured_outputs(module: nn.Module) -> Iterator[list[Tensor]]:
    """A list that receives the output of every call of ``module`` inside the block."""
    outputs: list[Tensor] = []
    with forward_hooks([module], lambda _module, _inputs, output: outputs.append(output)):
        yield outputs


def noise_sigma(x: Tensor, noise_level: float) -> Tensor:
    """SmoothGrad's sigma = noise_level * (max - min) PER SAMPLE over (C, H, W).

    x: (B, C, H, W) -> (B,). Smilkov et al. 2017, arXiv 1706.03825.
    """
    flat = x.detach().flatten(1)
    return noise_level * (flat.amax(dim=1) - flat.amin(dim=1))


def gaussian_noise(x: Tensor, n_samples: int, sigma: Tensor, seed: int) -> Tensor:
    """N(0, sigma[i]^2) noise for every sample i and draw: x (B, C, H, W) -> (B, n, C, H, W).

    A private generator on x's device keeps the global RNG untouched. The draw order is
    captum's NoiseTunnel's (one normal draw of shape (B * n, C, H, W), sample-major), so a run
    of captum after ``torch.manual_seed(seed)`` on a CPU sees the very same noise.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    shape = (x.shape[0] * n_samples, *x.shape[1:])
    standard = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    standard = standard.view(x.shape[0], n_samples, *x.shape[1:])
    return standard * sigma.to(x.dtype).view(-1, 1, *([1] * (x.dim() - 1)))


def upsample_like(layer_map: Tensor, x: Tensor, mode: str) -> Tensor:
    """A layer map (B, 1, h, w) upsampled to x's (H, W) and broadcast over its channels.

    Returns (B, C, H, W), contiguous (a copy, so callers may modify it in place).
    """
    upsampled = F.interpolate(layer_map, size=tuple(x.shape[2:]), mode=mode)
    return upsampled.expand_as(x).contiguous()
