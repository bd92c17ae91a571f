"""In-place model randomization that always restores (Adebayo et al. 2018, arXiv 1810.03292, §4).

Stages are randomization blocks (zoo metadata) or, with ``granularity=module``, every
parametrized leaf module, both in execution order. Each stage draws from its own seed, derived
from the base seed and the stage name, so that no seed is reused across layers.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from harness.base.meta import block_modules, model_meta

INITS = ("default", "normal", "permute")
NORMAL_STD = 0.01  # truncated normal, as in the paper's re-initialization of Inception-v3


def stage_seed(base_seed: int, stage: str) -> int:
    """A 63-bit seed derived from the base seed and the stage name (stable across runs)."""
    digest = hashlib.sha256(f"{base_seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def first_calls(model: nn.Module,
                x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor | None]]:
    """The parametrized leaf modules in the order a forward pass of ``x`` first calls them, each
    with the (detached) input it received then (None if not passed as a tensor argument)."""
    calls: dict[str, tuple[nn.Module, torch.Tensor | None]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in calls:  # first call wins (shared modules run more than once)
                received = args[0] if args and isinstance(args[0], torch.Tensor) else None
                calls[name] = (module, None if received is None else received.detach())
        return hook

    handles = [module.register_forward_pre_hook(record(name))
               for name, module in model.named_modules()
               if any(True for _ in module.parameters(recurse=False))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(name, module, received) for name, (module, received) in calls.items()]


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the parametrized leaf modules in the order a forward pass of ``x`` calls them."""
    return [name for name, _, _ in first_calls(model, x)]


def stages(model: nn.Module, x: torch.Tensor, granularity: str) -> list[tuple[str, list[nn.Module]]]:
    """The randomization stages ``(name, modules)`` in execution order (input -> logits)."""
    if granularity == "block":
        return [(b, block_modules(model, b)) for b in model_meta(model).blocks]
    if granularity == "module":
        return [(n, [model.get_submodule(n)]) for n in execution_order(model, x[:1])]
    raise ValueError(f"check.granularity must be block or module, got {granularity!r}")


def ordered(stage_list: list, order: str) -> list:
    """``top_down`` starts at the logits (the paper's cascade); ``bottom_up`` at the input."""
    if order == "top_down":
        return stage_list[::-1]
    if order == "bottom_up":
        return list(stage_list)
    raise ValueError(f"check.order must be top_down or bottom_up, got {order!r}")


@torch.no_grad()
def randomize_(modules: list[nn.Module], init: str, seed: int, batchnorm_stats: bool = False) -> None:
    """Re-initialize the parameters of ``modules`` in place, reproducibly from ``seed``.

    ``default``: each module's own ``reset_parameters``; ``normal``: truncated N(0, 0.01²);
    ``permute``: shuffle the entries of each tensor. BatchNorm: affine parameters only unless
    ``batchnorm_stats`` (then running mean/var are reset to 0/1 too).
    """
    if init not in INITS:
        raise ValueError(f"check.init must be one of {', '.join(INITS)}, got {init!r}")
    device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in modules:
            for leaf in module.modules():
                _randomize_leaf(leaf, init, batchnorm_stats)


def _randomize_leaf(leaf: nn.Module, init: str, batchnorm_stats: bool) -> None:
    params = list(leaf.parameters(recurse=False))
    if not params:
        return
    is_norm = isinstance(leaf, nn.modules.batchnorm._NormBase)
    stats = {}
    if is_norm and not batchnorm_stats:  # reset_parameters would also reset the statistics
        stats = {k: v.clone() for k, v in leaf.named_buffers(recurse=False)}
    if init == "default" and hasattr(leaf, "reset_parameters"):
        leaf.reset_parameters()
    elif init == "permute":
        for p in params:
            p.copy_(p.flatten()[torch.randperm(p.numel(), device=p.device)].view_as(p))
    else:  # normal, and the fallback for modules without their own initializer
        for p in params:
            nn.init.trunc_normal_(p, std=NORMAL_STD, a=-2 * NORMAL_STD, b=2 * NORMAL_STD)
    if is_norm and batchnorm_stats and init != "default":
        leaf.reset_running_stats()
    for name, value in stats.items():
        getattr(leaf, name).copy_(value)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def restore_(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` back into the model's tensors in place (no new tensor objects)."""
    current = model.state_dict(keep_vars=True)
    for key, value in saved.items():
        current[key].data.copy_(value)


@contextmanager
def restored(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Snapshot the model on entry; restore it on exit, also after an exception."""
    saved = snapshot(model)
    try:
        yield saved
    finally:
        restore_(model, saved)
