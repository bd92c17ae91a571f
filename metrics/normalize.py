"""Map normalizations: raw signed attributions (B, C, H, W) -> comparable maps (B, H, W).

Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", arXiv 1810.03292) compare maps after
reducing the channels and clipping at the 99th percentile of each map. Both normalizations here
work strictly per sample: nothing is ever pooled across the batch.

A sample whose normalization is undefined (a constant map: ``vmax == vmin`` or ``span == 0``)
becomes an all-NaN map, so that every metric scores it NaN instead of crashing or inventing a
value. NaN in the raw map likewise gives an all-NaN map.
"""
from __future__ import annotations

import torch
from torch import Tensor

from harness.registry import Registry

NORMALIZATIONS = Registry("normalization")

PERCENTILE = 99.0


def _check_bchw(m: Tensor) -> None:
    if m.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) attribution map, got shape {tuple(m.shape)}")


def percentile(x: Tensor, q: float) -> Tensor:
    """Per-row ``q``-th percentile of ``x`` (B, N) -> (B,), with numpy's default 'linear' method.

    numpy's interpolation (including its two-sided lerp) is reproduced so that results equal
    ``np.percentile(x[i], q)``. Rows containing NaN give NaN, as in numpy. ``torch.quantile``
    would do the same but refuses inputs above 2**24 elements, i.e. > 334 maps of 224x224.
    """
    n = x.shape[1]
    virtual = (n - 1) * (q / 100.0)
    lo = int(virtual)
    hi = min(lo + 1, n - 1)
    gamma = virtual - lo
    # only the top (n - lo) values are needed: a partial selection beats a full sort
    top = torch.topk(x, n - lo, dim=1, largest=True, sorted=True).values
    a, b = top[:, -1], top[:, n - 1 - hi]
    diff = b - a
    out = b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma
    return out.masked_fill(torch.isnan(x).any(dim=1), float("nan"))


def _nan_where(out: Tensor, bad: Tensor) -> Tensor:
    """Set the samples flagged in ``bad`` (B,) of ``out`` (B, H, W) to NaN."""
    return out.masked_fill(bad[:, None, None], float("nan"))


@NORMALIZATIONS.register
def absolute(m: Tensor) -> Tensor:
    """Absolute-value grayscale map (Adebayo et al.'s ``abs_grayscale_norm``), in [0, 1].

    ``s = sum_c |m|``, then ``clip((s - min s) / (p99(s) - min s), 0, 1)`` per sample.
    (B, C, H, W) -> (B, H, W), same dtype as ``m`` (computed in float64).
    """
    _check_bchw(m)
    s = m.double().abs().sum(dim=1)
    flat = s.flatten(1)
    vmin = flat.amin(dim=1)
    span = percentile(flat, PERCENTILE) - vmin
    ok = span > 0  # False for constant maps and NaN
    safe = torch.where(ok, span, torch.ones_like(span))
    out = ((s - vmin[:, None, None]) / safe[:, None, None]).clamp(0.0, 1.0)
    return _nan_where(out, ~ok).to(m.dtype)


@NORMALIZATIONS.register
def signed(m: Tensor) -> Tensor:
    """Signed grayscale map in [-1, 1]: ``clip(s / p99(|s|), -1, 1)`` with ``s = sum_c m``.

    Keeps the sign of the attribution (Adebayo et al. 2018 also report signed comparisons).
    (B, C, H, W) -> (B, H, W), same dtype as ``m`` (computed in float64).
    """
    _check_bchw(m)
    s = m.double().sum(dim=1)
    span = percentile(s.abs().flatten(1), PERCENTILE)
    ok = span > 0
    safe = torch.where(ok, span, torch.ones_like(span))
    out = (s / safe[:, None, None]).clamp(-1.0, 1.0)
    return _nan_where(out, ~ok).to(m.dtype)


def is_constant(m: Tensor) -> Tensor:
    """Which samples of a raw map (B, C, H, W) are constant (all entries equal) -> bool (B,).

    Every metric scores such a sample NaN (under either normalization), so the runner can
    give the reason. Samples containing NaN are not reported as constant.
    """
    _check_bchw(m)
    flat = m.flatten(1)
    return flat.amax(dim=1) == flat.amin(dim=1)
