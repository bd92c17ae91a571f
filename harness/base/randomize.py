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
# init=default for a parameter no module initializer covers (a ViT's class token and position
# embedding, LayerScale's gamma): timm's own initializer of cls_token / pos_embed, trunc N(0, 0.02²)
LOOSE_STD = 0.02
Part = nn.Module | nn.Parameter  # what a stage randomizes: whole modules, or loose parameters


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


def stages(model: nn.Module, x: torch.Tensor, granularity: str) -> list[tuple[str, list[Part]]]:
    """The randomization stages ``(name, parts)`` in execution order (input -> logits)."""
    if granularity == "block":
        return [(b, block_modules(model, b)) for b in model_meta(model).blocks]
    if granularity == "module":
        called = execution_order(model, x[:1])
        return [(n or "root", module_parts(model, n, set(called))) for n in called]
    raise ValueError(f"check.granularity must be block or module, got {granularity!r}")


def module_parts(model: nn.Module, name: str, called: set[str]) -> list[Part]:
    """What the stage of module ``name`` randomizes with ``granularity=module``: the module
    when no descendant is a stage of its own; else its own parameters (a ViT's class token on
    the root) and the children that are never called as modules (``nn.MultiheadAttention``
    uses its ``out_proj`` weights without calling it), so that every tensor has a stage."""
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    if not any(c.startswith(prefix) and c != name for c in called):
        return [module]
    parts: list[Part] = list(module.parameters(recurse=False))
    for child_name, child in module.named_children():
        full = prefix + child_name
        if not any(c == full or c.startswith(full + ".") for c in called):
            parts.append(child)
    return parts


def ordered(stage_list: list, order: str) -> list:
    """``top_down`` starts at the logits (the paper's cascade); ``bottom_up`` at the input."""
    if order == "top_down":
        return stage_list[::-1]
    if order == "bottom_up":
        return list(stage_list)
    raise ValueError(f"check.order must be top_down or bottom_up, got {order!r}")


@torch.no_grad()
def randomize_(parts: list[Part], init: str, seed: int, batchnorm_stats: bool = False) -> None:
    """Re-initialize every parameter of ``parts`` (modules, loose parameters) in place,
    reproducibly from ``seed``.

    ``default``: each module's own initializer (``reset_parameters``, or
    ``nn.MultiheadAttention``'s ``_reset_parameters``); a parameter no initializer covers (a
    loose one, or one of a module without initializer) gets timm's trunc N(0, 0.02²).
    ``normal``: truncated N(0, 0.01²); ``permute``: shuffle the entries of each tensor.
    BatchNorm: affine parameters only unless ``batchnorm_stats`` (then running mean/var are
    reset to 0/1 too). A module shared by two parts is randomized once.
    """
    if init not in INITS:
        raise ValueError(f"check.init must be one of {', '.join(INITS)}, got {init!r}")
    tensors = [p for part in parts for p in
               ([part] if isinstance(part, nn.Parameter) else part.parameters())]
    device = next((p.device for p in tensors), torch.device("cpu"))
    seen: set[int] = set()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for part in parts:
            if isinstance(part, nn.Parameter):
                _randomize_tensors([part], init, seen)
                continue
            for leaf in part.modules():
                if id(leaf) not in seen:
                    seen.add(id(leaf))
                    _randomize_leaf(leaf, init, batchnorm_stats, seen)


def _initializer(leaf: nn.Module):
    """The module's own initializer, if it has one (MultiheadAttention's is private)."""
    if isinstance(leaf, nn.MultiheadAttention):
        return leaf._reset_parameters
    return getattr(leaf, "reset_parameters", None)


def _randomize_leaf(leaf: nn.Module, init: str, batchnorm_stats: bool, seen: set[int]) -> None:
    params = list(leaf.parameters(recurse=False))
    if not params:
        return
    is_norm = isinstance(leaf, nn.modules.batchnorm._NormBase)
    stats = {}
    if is_norm and not batchnorm_stats:  # reset_parameters would also reset the statistics
        stats = {k: v.clone() for k, v in leaf.named_buffers(recurse=False)}
    initializer = _initializer(leaf) if init == "default" else None
    if initializer is not None:
        initializer()
        seen.update(id(p) for p in params)
    else:
        _randomize_tensors(params, init, seen)
    if is_norm and batchnorm_stats and init != "default":
        leaf.reset_running_stats()
    for name, value in stats.items():
        getattr(leaf, name).copy_(value)


def _randomize_tensors(params: list[nn.Parameter], init: str, seen: set[int]) -> None:
    """Parameters without a module initializer: permuted, or drawn from a truncated normal
    (std ``NORMAL_STD`` for init=normal, ``LOOSE_STD`` for init=default); each tensor once."""
    std = LOOSE_STD if init == "default" else NORMAL_STD
    for p in params:
        if id(p) in seen:  # shared with a part already randomized in this stage
            continue
        seen.add(id(p))
        if init == "permute":
            p.copy_(p.flatten()[torch.randperm(p.numel(), device=p.device)].view_as(p))
        else:
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)


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
