"""Map normalizations: raw signed attributions (B, C, H, W) -> comparable maps (B, H, W).

Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", arXiv 1810.03292) compare maps after
reducing the channels and clipping at the 99th percentile of each map. Both normalizations here
work strictly per sample: nothing is ever pooled across the batch.

A sample whose normalization is undefined becomes an all-NaN map, so that every metric scores
it NaN instead of crashing or inventing a value: a constant map (``vmax == vmin`` for
``absolute``, a constant channel sum or ``span == 0`` for ``signed``; note that this includes
maps that are constant on at least 99 % of their pixels) or a map containing NaN.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from harness.registry import Registry

NORMALIZATIONS = Registry("normalization")

PERCENTILE = 99.0
CHUNK_PIXELS = 1 << 18  # pixels per batch slice (see _by_samples)


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


def _by_samples(fn: Callable[[Tensor], Tensor], m: Tensor) -> Tensor:
    """``fn(m)`` for a per-sample ``fn`` (B, C, H, W) -> (B, H, W), computed on slices of the
    batch so that the float64 intermediates stay in the CPU cache (about 1.5x faster)."""
    _check_bchw(m)
    rows = max(1, CHUNK_PIXELS // max(1, m.shape[2] * m.shape[3]))
    if m.shape[0] <= rows:
        return fn(m)
    return torch.cat([fn(part) for part in m.split(rows)])


def _scale(s: Tensor, shift: Tensor, span: Tensor, low: float, dtype: torch.dtype) -> Tensor:
    """``clip((s - shift) / span, low, 1)`` per sample for float64 ``s`` (B, H, W) and (B,)
    ``shift, span``; samples with ``span <= 0`` or NaN become all-NaN maps of ``dtype``."""
    ok = span > 0  # False for constant maps and NaN
    safe = torch.where(ok, span, torch.ones_like(span))
    out = s.sub_(shift[:, None, None]).div_(safe[:, None, None]).clamp_(low, 1.0)
    out = out.masked_fill_(~ok[:, None, None], float("nan"))
    return out.to(dtype if dtype.is_floating_point else torch.float32)


def _absolute(m: Tensor) -> Tensor:
    s = m.abs().sum(dim=1, dtype=torch.float64)
    flat = s.flatten(1)
    vmin = flat.amin(dim=1)
    return _scale(s, vmin, percentile(flat, PERCENTILE) - vmin, 0.0, m.dtype)


def _signed(m: Tensor) -> Tensor:
    s = m.sum(dim=1, dtype=torch.float64)
    flat = s.flatten(1)
    span = percentile(flat.abs(), PERCENTILE)
    # a constant non-zero map would become all +-1: undefined like the other constant maps
    span = span.masked_fill(flat.amax(dim=1) == flat.amin(dim=1), 0.0)
    return _scale(s, torch.zeros_like(span), span, -1.0, m.dtype)


@NORMALIZATIONS.register
def absolute(m: Tensor) -> Tensor:
    """Absolute-value grayscale map (Adebayo et al.'s ``abs_grayscale_norm``), in [0, 1].

    ``s = sum_c |m|``, then ``clip((s - min s) / (p99(s) - min s), 0, 1)`` per sample.
    (B, C, H, W) -> (B, H, W), same dtype as ``m`` (computed in float64).
    """
    return _by_samples(_absolute, m)


@NORMALIZATIONS.register
def signed(m: Tensor) -> Tensor:
    """Signed grayscale map in [-1, 1]: ``clip(s / p99(|s|), -1, 1)`` with ``s = sum_c m``.

    Keeps the sign of the attribution (Adebayo et al. 2018 report rank correlations with and
    without absolute values).
    (B, C, H, W) -> (B, H, W), same dtype as ``m`` (computed in float64).
    """
    return _by_samples(_signed, m)


def is_constant(m: Tensor) -> Tensor:
    """Which samples of a raw map (B, C, H, W) are constant (all entries equal) -> bool (B,).

    Every metric scores such a sample NaN (under either normalization), so the runner can
    give the reason. Samples containing NaN are not reported as constant.
    """
    _check_bchw(m)
    flat = m.flatten(1)
    return flat.amax(dim=1) == flat.amin(dim=1)
