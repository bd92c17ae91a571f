"""Competitive Gradient x Input (Gupta & Arora 2019, "A Simple Saliency Method That Passes the
Sanity Checks", arXiv 1905.12152).

Gradient x Input is computed for every class c: a_c = x * d logit_c / dx. A feature (input
element) keeps the target's value a_t only where the target wins the competition among the
classes: a_t > 0 and a_t is the largest a_c, or a_t < 0 and a_t is the smallest; everything else
is 0. The target takes part in its own competition, so "largest" means a_t >= max_c a_c (a tie
with another class keeps the value; a strict comparison against a maximum that includes a_t
itself would zero everything).

The per-class gradients are vector-Jacobian products of one forward pass: ``torch.func.vjp``
once per chunk of inputs, then ``torch.func.vmap`` over one-hot cotangents, so many classes go
through one batched backward. (``autograd.grad(..., is_grads_batched=True)`` computes the same,
but on CPU its convolution and BatchNorm backward fall back to a per-class loop.) Rows of one
batched backward (inputs x classes) stay under ``internal_batch_size``; the winners are reduced
chunk by chunk, so the (classes, C, H, W) stack is never held in memory. Eval-mode BatchNorms
are folded into their convolutions first (``methods.fold``): the function and its gradients
are the same, and each of the M backward rows skips the BatchNorms.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from harness.base.registry import Range
from methods.fold import gradient_model
from methods.registry import METHODS

CLASS_SETS = ("all", "topk")


def competing_classes(logits: Tensor, target: Tensor, classes: str, k: int) -> Tensor:
    """The classes that compete for each input, the target first. logits: (n, K) -> (n, M).

    ``all``: every class, M = K. ``topk``: the target and the k other classes with the highest
    logits, M = min(k, K - 1) + 1.
    """
    n, n_classes = logits.shape
    target = target.to(logits.device).view(-1, 1)
    if classes == "all":
        every = torch.arange(n_classes, device=logits.device).expand(n, n_classes)
        others = every[every != target].view(n, n_classes - 1)
    elif classes == "topk":
        if k < 0:
            raise ValueError(f"cgi: k must be >= 0, got {k}")
        masked = logits.detach().scatter(1, target, float("-inf"))
        others = masked.topk(min(k, n_classes - 1), dim=1).indices
    else:
        raise ValueError(f"cgi: classes must be one of {', '.join(CLASS_SETS)}, got {classes!r}")
    return torch.cat([target, others], dim=1)


def class_gradient_chunks(vjp: Callable, logits: Tensor, order: Tensor,
                          internal_batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """d logit_c / dx for the classes ``order`` (n, M) of each input, chunk by chunk.

    ``logits, vjp = torch.func.vjp(model, x)`` for n inputs, logits (n, K). Yields
    ``(columns (n, m), gradients (m, n, C, H, W))`` with m * n <= internal_batch_size (m >= 1):
    gradients[j, i] = d logit[i, columns[i, j]] / dx[i], one batched backward per chunk.
    """
    n = order.shape[0]
    batched = torch.func.vmap(vjp)
    for columns in order.split(max(1, internal_batch_size // n), dim=1):
        cotangents = logits.new_zeros(columns.shape[1], *logits.shape)
        cotangents.scatter_(2, columns.T.unsqueeze(2), 1.0)
        (gradients,) = batched(cotangents)
        yield columns, gradients


def competition_winners(x: Tensor, chunks: Iterator[tuple[Tensor, Tensor]]) -> Tensor:
    """a_t where the target (first column of the first chunk) wins, else 0. x: (n, C, H, W)."""
    target_value = best = worst = None
    for _columns, gradients in chunks:
        contributions = gradients * x  # (m, n, C, H, W)
        if target_value is None:
            target_value, best, worst = contributions[0], contributions[0], contributions[0]
        best = torch.maximum(best, contributions.amax(dim=0))
        worst = torch.minimum(worst, contributions.amin(dim=0))
    wins = ((target_value > 0) & (target_value >= best)) | (
        (target_value < 0) & (target_value <= worst))
    return torch.where(wins, target_value, torch.zeros_like(target_value))


def _cgi_chunk(model: nn.Module, x: Tensor, target: Tensor, classes: str, k: int,
               internal_batch_size: int) -> tuple[Tensor, int]:
    """CGI of one chunk of inputs (n, C, H, W), and the number of competing classes."""
    x = x.detach()
    with torch.no_grad():  # func transforms differentiate anyway; no graph for the weights
        logits, vjp = torch.func.vjp(model, x)
        order = competing_classes(logits, target, classes, k)
        chunks = class_gradient_chunks(vjp, logits, order, internal_batch_size)
        return competition_winners(x, chunks), order.shape[1]


@METHODS.register(ranges={"k": Range(0)})  # k = 0: the target competes with itself only
def cgi(model: nn.Module, x: Tensor, target: Tensor, *, classes: str = "all", k: int = 10,
        internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Competitive Gradient x Input (Gupta & Arora 2019, arXiv 1905.12152). (B, C, H, W).

    x: (B, C, H, W), target: (B,). ``classes="all"``: the target competes with every class (the
    paper); ``"topk"``: with the k other classes of highest logit only (k ignored for "all").
    Cost per input: one forward and M backward rows (M competing classes), batched.
    """
    if classes not in CLASS_SETS:
        raise ValueError(f"cgi: classes must be one of {', '.join(CLASS_SETS)}, got {classes!r}")
    model = gradient_model(model)  # same gradients; M backward rows skip every BatchNorm
    parts, start, per_input = [], 0, None
    while start < len(x):  # the first chunk has one input and tells how many classes compete
        n = 1 if per_input is None else max(1, internal_batch_size // per_input)
        part, per_input = _cgi_chunk(model, x[start:start + n], target[start:start + n],
                                     classes, k, internal_batch_size)
        parts.append(part)
        start += n
    return torch.cat(parts)
