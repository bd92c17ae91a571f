"""Complexity of one map or one output, batched and row-wise (Hedström et al. 2024, "A Fresh
Look at Sanity Checks for Saliency Maps", arXiv 2401.06465, eMPRT): the Shannon entropy of a
histogram of each map, and of each softmax output.

Not similarity metrics (they score one map, not a pair), so not in ``METRICS``; plain torch
functions that the ``efficient_mprt`` check calls.
"""
from __future__ import annotations

import torch
from torch import Tensor


def equal_width_bins(values: Tensor, bins: int) -> Tensor:
    """Counts of ``bins`` equal-width bins between each row's min and max, the last bin closed:
    ``np.histogram(values[i], bins)`` row by row, bin for bin (the same arithmetic in the rows'
    dtype, and numpy's correction of values that rounding puts one bin off their edges; a
    constant row gets numpy's range v -/+ 0.5). values: (B, P) float -> float64 (B, bins)."""
    low, high = values.amin(dim=1), values.amax(dim=1)
    constant = low == high
    low, high = torch.where(constant, low - 0.5, low), torch.where(constant, high + 0.5, high)
    span = high - low
    steps = torch.arange(bins + 1, dtype=values.dtype, device=values.device)
    edges = steps[None] * (span / bins)[:, None] + low[:, None]  # np.linspace's arithmetic
    edges[:, -1] = high
    index = ((values - low[:, None]) / span[:, None] * bins).to(torch.int64)
    index = index.clamp_(0, bins - 1)
    index -= (values < edges.gather(1, index)).long()
    index += ((values >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    counts = torch.zeros(values.shape[0], bins, dtype=torch.float64, device=values.device)
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))


def entropy_rows(weights: Tensor) -> Tensor:
    """Shannon entropy (natural log) of each row of non-negative ``weights`` (B, K) normalized
    to sum 1, as ``scipy.stats.entropy(pk=weights[i])``. -> float64 (B,)."""
    p = weights.to(torch.float64)
    p = p / p.sum(dim=1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(dim=1)


def histogram_entropy(maps: Tensor, bins: int = 100) -> Tensor:
    """Entropy of the equal-width histogram of each map (Hedström et al. 2024, eMPRT; Quantus
    0.6's ``discrete_entropy``): maps (B, ...) -> float64 (B,); 0 for a constant map."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return entropy_rows(equal_width_bins(maps.flatten(1), bins))


def output_entropy(logits: Tensor) -> Tensor:
    """Entropy (natural log) of the softmax output of each row of ``logits`` (B, K) -> (B,)."""
    return entropy_rows(torch.softmax(logits.to(torch.float64), dim=1))
