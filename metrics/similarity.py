"""Similarity metrics of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", arXiv 1810.03292).

Every metric is ``METRICS[name](a, b, **kw) -> Tensor (B,)`` (float64, on the device of ``a``) for
maps ``a, b`` of shape (B, H, W), float32 or float64. Row ``i`` compares ``a[i]`` with ``b[i]``
only. Each metric equals its scikit-image / scipy reference within 1e-5 (tests/test_metrics.py).

How they are fast (the references cost 60-70 ms per pair of 224x224 maps; these 1-3 ms):

* SSIM filters in float32 with banded matrix products (BLAS) after centering each map on its
  mean, which keeps the variance ``E[x^2] - E[x]^2`` accurate (about 1e-8 from skimage's
  float64, see the tests). It runs in torch on the maps' device.
* Spearman sorts each row once, without argsort: a float32 converts exactly to a float64 whose
  29 low mantissa bits are zero, and they hold the entry's index through numpy's SIMD sort
  (argsort is 2-5x slower, torch.sort on CPU 10x). The ranks are exact integers, and so is the
  arithmetic of the correlation until its last division.
* HOG bins orientations with float32 arctan2 and re-bins the rare pixels within 1e-4 of a bin
  width of an edge with skimage's own float64 rule, so every pixel lands in skimage's bin; the
  cell histograms are one ``index_add_``.
* Batches are cut into slices of rows, computed on ``torch.get_num_threads()`` threads, each
  slice single-threaded (see :mod:`metrics.parallel`). Spearman and HOG compute in numpy on
  the CPU (maps on another device are copied there); the scores go back to ``a``'s device.
* Pieces of a map that do not depend on the other map are memoized on the tensor object
  (weakly; any in-place change invalidates them). The checks compare every stage with the
  same reference tensor ``b``: its ranks and HOG descriptors are computed once per run, and
  the NaN / constant flags of a map once for all metrics.

A row is NaN when either map of the pair contains NaN (or inf) or is constant (zero variance): a
constant map carries no ranking and no structure to compare. (scikit-image's SSIM would still
return a number for a constant map; we deliberately do not.)
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from harness.base.registry import Range
from metrics.parallel import by_chunks, coarse_threads
from metrics.registry import METRICS

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage: an 11-tap window for sigma 1.5, as in Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_BLOCKS = (24, 24)  # output rows per banded product: vertical pass, horizontal pass
HOG_EPS = 1e-5  # skimage's L2-Hys epsilon
HOG_CLIP = 0.2
# float32 angles are within ~1e-6 bin widths of skimage's float64 ones; pixels closer than
# this to a bin edge are re-binned with skimage's exact float64 rule
HOG_EDGE_TOL = 1e-4
# Batches are processed in slices of about this many pixels: every metric is row-wise, and a
# slice's intermediates stay in the CPU cache (and in malloc's free lists: fresh pages cost).
CHUNK_PIXELS = 1 << 18

T = TypeVar("T")


# --------------------------------------------------------------------------- shared helpers
def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(
            f"metrics take two maps of the same shape (B, H, W); got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _by_chunks(fn: Callable[..., T], *arrays, row_pixels: int, **kw) -> list[T]:
    """:func:`metrics.parallel.by_chunks` with slices of about ``CHUNK_PIXELS`` pixels."""
    return by_chunks(fn, *arrays, row_pixels=row_pixels, chunk_pixels=CHUNK_PIXELS, **kw)


def _degenerate(x: Tensor) -> Tensor:
    """Rows of ``x`` (B, ...) that contain NaN or inf or are constant -> bool (B,),
    memoized on ``x``."""

    def compute() -> Tensor:
        flat = x.detach().flatten(1)
        if flat.shape[1] == 0:
            return torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)  # NaN propagates; 10x faster than aminmax
        return ~(hi > lo) | torch.isinf(hi) | torch.isinf(lo)

    return _memoized(x, "degenerate", compute)


def _nan_rows(score: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """NaN for the rows where ``a`` or ``b`` is degenerate; ``score`` is (B,)."""
    bad = _degenerate(a) | _degenerate(b)
    return score.to(a.device).masked_fill(bad.to(a.device), float("nan"))


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise Pearson correlation of ``x, y`` (B, N) -> (B,), in float64, clipped to [-1, 1]
    like ``scipy.stats.pearsonr``. A row with zero variance gives NaN."""
    x = x.double()
    y = y.double()
    xm = x - x.mean(dim=1, keepdim=True)
    ym = y - y.mean(dim=1, keepdim=True)
    den = torch.sqrt((xm * xm).sum(dim=1) * (ym * ym).sum(dim=1))
    r = (xm * ym).sum(dim=1) / torch.where(den > 0, den, torch.ones_like(den))
    return r.clamp(-1.0, 1.0).masked_fill(~(den > 0), float("nan"))


def _np_pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`_pearson_rows` for float64 numpy rows (B, N) -> (B,)."""
    xm = x - x.mean(axis=1, keepdims=True)
    ym = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt(np.einsum("ij,ij->i", xm, xm) * np.einsum("ij,ij->i", ym, ym))
    ok = den > 0
    r = np.einsum("ij,ij->i", xm, ym) / np.where(ok, den, 1.0)
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


def _to_numpy(x: Tensor) -> np.ndarray:
    """A CPU numpy view (or copy) of ``x``: float32 stays float32, anything else is float64."""
    x = x.detach().cpu()
    if x.dtype != torch.float32:
        x = x.double()
    return x.numpy()


# --------------------------------------------------------------------------- memoized pieces
# tensor -> {piece name and parameters: (stamp, value)}. Keys are held weakly (by identity),
# so a map's pieces live exactly as long as the map.
_PIECES = WeakTensorKeyDictionary()


def _stamp(t: Tensor) -> tuple | None:
    """What must not change for a memoized piece of ``t`` to stay valid; None if ``t`` cannot
    tell (inference tensors keep no version counter)."""
    try:
        version = t._version  # bumped by every in-place change, set_ and resize_ included
    except RuntimeError:
        return None
    return (version, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device)


def _memoized(t: Tensor, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, a function of the map ``t`` only, memoized on the tensor object ``t``.

    The checks pass the same reference tensor ``b`` at every stage, and the same maps to
    every metric of a normalization: the ranks and HOG descriptors of ``b`` are computed once
    per run, the NaN / constant flags of any map once per map. Any in-place change of ``t``
    invalidates its pieces.
    """
    stamp = _stamp(t)
    if stamp is None:
        return compute()
    pieces = _PIECES.get(t)
    if pieces is None:
        pieces = _PIECES[t] = {}
    hit = pieces.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = compute()
    pieces[key] = (stamp, value)
    return value


def clear_cache() -> None:
    """Forget every memoized piece (they are also dropped with their tensor)."""
    _PIECES.clear()


# --------------------------------------------------------------------------- SSIM
def _gaussian_taps(sigma: float, truncate: float) -> Tensor:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate*sigma+0.5)``),
    float64 (K,)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return w / w.sum()


def _band(taps: Tensor, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(rows, rows+K-1) banded matrix G with ``(G @ v)[i] = sum_k taps[k] * v[i+k]``: a 1-D
    'valid' correlation (the Gaussian is symmetric, so also a convolution)."""
    k = taps.numel()
    cols = torch.arange(rows)[:, None] + torch.arange(k)[None, :]
    g = torch.zeros(rows, rows + k - 1, dtype=torch.float64)
    g.scatter_(1, cols, taps.expand(rows, k))
    return g.to(dtype=dtype, device=device)


def _filter_first(x: Tensor, band: Tensor, out: Tensor) -> Tensor:
    """'Valid' filter along the first dim of a contiguous ``x`` (n, ...) into a contiguous
    ``out`` (n-K+1, ...).

    Each run of ``band.shape[0]`` output rows is one product ``band @ rows`` with a contiguous
    slice: BLAS speed without the 20x wasted work of one dense (n-K+1, n) matrix.
    """
    step, k = band.shape[0], band.shape[1] - band.shape[0] + 1
    n = x.shape[0]
    flat, flat_out = x.view(n, -1), out.view(n - k + 1, -1)
    for s in range(0, n - k + 1, step):
        m = min(step, n - k + 1 - s)
        torch.mm(band[:m, : m + k - 1], flat[s:s + m + k - 1], out=flat_out[s:s + m])
    return out


def _filter_last_transposed(x: Tensor, band: Tensor) -> Tensor:
    """'Valid' filter along the last dim of ``x`` (..., n) -> (n-K+1, prod(...)), transposed:
    ``band @ slice.T`` lets BLAS read the rows in place and write contiguous output."""
    step, k = band.shape[0], band.shape[1] - band.shape[0] + 1
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    out = x.new_empty(n - k + 1, flat.shape[0])
    for s in range(0, n - k + 1, step):
        m = min(step, n - k + 1 - s)
        torch.mm(band[:m, : m + k - 1], flat[:, s:s + m + k - 1].t(), out=out[s:s + m])
    return out


@functools.lru_cache(maxsize=4)
def _ssim_bands(device: torch.device) -> tuple[Tensor, Tensor]:
    """The float32 band matrices of the vertical and the horizontal Gaussian pass."""
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE)
    return tuple(_band(taps, rows, torch.float32, device) for rows in SSIM_BLOCKS)


def _ssim_rows(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Mean SSIM per row of maps (B, H, W) -> (B,) float64, computed in float32.

    skimage filters with reflect padding and then crops r = 5 pixels per border before
    averaging; the kept pixels are exactly those whose window lies inside the image, so a
    'valid' separable filter gives the same numbers without the discarded border.
    Each map is centered on its mean first: covariances do not change, and the float32
    cancellation in ``E[x^2] - E[x]^2`` then stays small even on flat bright regions.
    Identical maps give exactly 1: every numerator equals its denominator bit for bit (an
    ``addcmul`` of equal squares is exact, fused or not; the filters are linear).
    """
    bsz, h, w = x.shape
    vert, horiz = _ssim_bands(x.device)
    k = vert.shape[1] - vert.shape[0] + 1
    x, y = x.float(), y.float()
    cx, cy = x.mean(dim=(1, 2)), y.mean(dim=(1, 2))
    # the four maps to filter, each centered and in (H, B, W) layout, where the vertical pass
    # is one product per block of rows. var_x and var_y only appear as a sum, so x^2 + y^2 is
    # filtered as one map (4 filters, not 5).
    maps = x.new_empty(4, h, bsz, w)
    xt = torch.sub(x.transpose(0, 1), cx.view(1, -1, 1), out=maps[0])
    yt = torch.sub(y.transpose(0, 1), cy.view(1, -1, 1), out=maps[1])
    torch.addcmul(torch.mul(xt, xt, out=maps[2]), yt, yt, out=maps[2])
    torch.mul(xt, yt, out=maps[3])
    vertical = x.new_empty(4, h - k + 1, bsz, w)
    for c in range(4):
        _filter_first(maps[c], vert, vertical[c])
    # the horizontal pass of all four at once, transposed: (W', 4 * H' * B)
    filtered = _filter_last_transposed(vertical, horiz).view(w - k + 1, 4, -1)
    mu_x, mu_y, sq, xy = filtered.unbind(1)  # each (W', H' * B): the mean does not care
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    # contrast-structure (2 cov + c2) / (var_x + var_y + c2), in place
    prod = mu_x * mu_y
    squares = torch.addcmul(mu_x * mu_x, mu_y, mu_y)
    cs = xy.sub_(prod).mul_(2.0).add_(c2).div_(sq.sub_(squares).add_(c2))
    # luminance (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) of the uncentered means
    mu_x = mu_x.view(w - k + 1, -1, bsz).add_(cx)
    mu_y = mu_y.view(w - k + 1, -1, bsz).add_(cy)
    lum = torch.mul(mu_x, mu_y, out=prod.view_as(mu_x)).mul_(2.0).add_(c1)
    squares = torch.mul(mu_x, mu_x, out=squares.view_as(mu_x)).addcmul_(mu_y, mu_y)
    lum = lum.div_(squares.add_(c1))
    ssim_map = cs.view_as(lum).mul_(lum)  # (W', H', B)
    # the mean: float32 sums of W' terms, then float64
    pixels = ssim_map.shape[0] * ssim_map.shape[1]
    return ssim_map.sum(dim=0).sum(dim=0, dtype=torch.float64) / pixels


@METRICS.register(normalization="absolute", title="SSIM",
                  ranges={"data_range": Range(0, exclusive_low=True)})
@coarse_threads
def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) per row: (B, H, W) x (B, H, W) -> (B,).

    Equals ``skimage.metrics.structural_similarity(a[i], b[i], gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range)`` within 1e-5 (about 1e-8 in
    practice: filtered in float32). Adebayo et al. 2018 use SSIM on absolute-normalized maps,
    range 1; signed maps need ``data_range=2``. Maps must be at least 11x11.
    """
    _check_pair(a, b)
    win = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
    if min(a.shape[1:]) < win:
        raise ValueError(
            f"ssim needs maps of at least {win}x{win} pixels (its Gaussian window), "
            f"got {a.shape[1]}x{a.shape[2]}"
        )
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=a.device)
    parts = _by_chunks(_ssim_rows, a.detach(), b.detach(), row_pixels=a.shape[1] * a.shape[2],
                       data_range=float(data_range))
    return _nan_rows(torch.cat(parts), a, b)


# --------------------------------------------------------------------------- rank correlation
# A float32 converted to float64 has 29 zero mantissa bits at the bottom: room for a flat index.
INDEX_BITS = 29
EXACT_RANKS_F32 = 1 << 24  # centered ranks of rows shorter than this are exact in float32


@functools.lru_cache(maxsize=8)
def _key_offsets(bsz: int, n: int) -> np.ndarray:
    """What :func:`_sort_rows` adds to the bits of float64 (bsz, n): one to the exponent, so
    that no key is subnormal, and the flat index to the free mantissa bits; read-only."""
    offsets = np.arange(bsz * n, dtype=np.uint64).reshape(bsz, n)
    offsets += np.uint64(1 << 52)
    offsets.flags.writeable = False
    return offsets


def _sort_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of ``x`` (B, N) -> (order, tied): ``order`` (B * N,) intp are the flat
    indices of ``x`` in row-wise sorted order; ``tied`` (B, N) bool marks the sorted entries
    equal to their successor (-0.0 equals 0.0, as in scipy).

    float32 rows take the fast path: a float32 converts exactly to float64, whose 29 lowest
    mantissa bits are then zero and can hold the entry's flat index. One sort of these
    float64 keys (numpy's SIMD sort) replaces an argsort, which is 2-5x slower. The keys are
    also doubled (one added to the exponent): zeros would otherwise become subnormal, which
    flush-to-zero modes (``torch.set_flush_denormal``) may wipe out. Rows with inf or NaN
    come out in a wrong order there (``order`` is still a permutation): the metrics score
    them NaN anyway, and :func:`average_ranks` passes them as float64.
    """
    bsz, n = x.shape
    if x.dtype != np.float32 or x.size >= 1 << INDEX_BITS:
        order = np.argsort(x, axis=1)
        keys = np.take_along_axis(x, order, axis=1)
        order += np.arange(0, x.size, n)[:, None]
        tied = np.zeros((bsz, n), bool)
        np.equal(keys[:, 1:], keys[:, :-1], out=tied[:, :-1])
        return order.reshape(-1), tied
    packed = np.add(x, 0.0, dtype=np.float64)  # -0.0 + 0.0 == +0.0: they tie
    bits = packed.view(np.uint64)
    bits += _key_offsets(bsz, n)  # finite: no carries (zero low bits, exponent < 2046)
    packed.sort(axis=1)
    order = np.bitwise_and(bits, np.uint64((1 << INDEX_BITS) - 1)).view(np.intp)
    value = bits >> np.uint64(INDEX_BITS)  # the float32 value, as an integer
    tied = np.zeros((bsz, n), bool)
    np.equal(value[:, 1:], value[:, :-1], out=tied[:, :-1])
    return order.reshape(-1), tied


def _rank_dtype(n: int) -> type:
    return np.float32 if n < EXACT_RANKS_F32 else np.float64


@functools.lru_cache(maxsize=8)
def _untied(n: int) -> np.ndarray:
    """``2 * rank - (n + 1)`` at sorted positions 0..n-1 without ties (n,), read-only."""
    d = np.arange(1 - n, n, 2, dtype=_rank_dtype(n))
    d.flags.writeable = False
    return d


@functools.lru_cache(maxsize=8)
def _untied_t64(n: int) -> Tensor:
    """:func:`_untied` as a float64 tensor."""
    return torch.from_numpy(_untied(n).astype(np.float64))


def _ties(tied: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Entries of sorted rows that tie (``tied`` (B, N) from :func:`_sort_rows`) -> (flat
    indices into the sorted rows, ``2 * rank - (N + 1)`` there, int64), or None without ties.

    A run of equal entries at positions ``first..last`` shares the average rank
    ``(first + last) / 2 + 1``; the work beyond finding ``tied`` is O(ties).
    """
    n = tied.shape[1]
    link = np.flatnonzero(tied)  # the last column is False: runs never cross rows
    if link.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(link) != 1) + 1
    first = np.concatenate((link[:1], link[breaks]))  # flat index of each run's ends
    last = np.concatenate((link[breaks - 1], link[-1:])) + 1
    count = last - first + 1
    value = 2 * (first % n) + (last - first) + 1 - n  # first + last + 1 - n, row positions
    # flat indices first..last of every run, all at once
    members = np.arange(count.sum()) + np.repeat(first - (np.cumsum(count) - count), count)
    return members, np.repeat(value, count)


def _sum_of_squares(ties: tuple[np.ndarray, np.ndarray] | None, bsz: int, n: int
                    ) -> np.ndarray:
    """Row sums of the squared centered ranks (B,) float64, from the ties alone: without ties
    the sum of (2k + 1 - n)^2 over k < n is n (n^2 - 1) / 3; tied entries change it."""
    sq = np.full(bsz, n * (n * n - 1.0) / 3.0)
    if ties is not None:
        members, value = ties
        row = members // n
        old = 2 * (members - row * n) + 1 - n
        sq += np.bincount(row, (value * value - old * old).astype(np.float64), minlength=bsz)
    return sq


def _centered_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``2 * rank - (N + 1)`` of each row of ``x`` (B, N), ties averaged -> (B, N), float32
    for N < 2**24 (else float64): exact integers whose row mean is exactly 0; and their row
    sums of squares (B,) float64."""
    bsz, n = x.shape
    order, tied = _sort_rows(x)
    untied = _untied(n)
    out = np.empty(bsz * n, untied.dtype)
    out[order] = np.tile(untied, bsz)  # 10 % faster than broadcasting untied
    ties = _ties(tied)
    if ties is not None:
        out[order[ties[0]]] = ties[1]
    return out.reshape(bsz, n), _sum_of_squares(ties, bsz, n)


def _spearman_chunk(a: np.ndarray, db: np.ndarray, db_sq: np.ndarray) -> np.ndarray:
    """Spearman correlation of the rows of ``a`` (B, N) with rows of centered ranks ``db``
    (B, N) whose sums of squares are ``db_sq`` (B,) -> (B,) float64.

    Pearson of ranks, in exact integer arithmetic (float64 sums of products below 2**53).
    The centered ranks of ``a`` are those without ties, changed at the tied entries, so
    ``db`` gathered in ``a``'s sorted order meets a constant vector plus a few corrections.
    (A gather costs half a scatter.)
    """
    bsz, n = a.shape
    order, tied = _sort_rows(a)
    # db in a's sorted order, and its products with the untied ranks: torch's gather is 25 %
    # faster than numpy's, its matrix-vector product 2x faster than einsum (and single-threaded
    # here); all exact, as integers below 2**53
    dbs = torch.from_numpy(db.reshape(-1)).index_select(0, torch.from_numpy(order))
    num = torch.mv(dbs.view(bsz, n).double(), _untied_t64(n)).numpy()
    dbs = dbs.numpy().reshape(bsz, n)
    ties = _ties(tied)
    if ties is not None:
        members, value = ties
        row = members // n
        old = 2 * (members - row * n) + 1 - n
        num += np.bincount(row, (value - old) * dbs.reshape(-1)[members], minlength=bsz)
    den = np.sqrt(_sum_of_squares(ties, bsz, n) * db_sq)
    ok = den > 0  # a constant row has all ranks equal: no correlation
    return np.where(ok, np.clip(num / np.where(ok, den, 1.0), -1.0, 1.0), np.nan)


def _rank_input(x: Tensor) -> np.ndarray:
    """Rows (B, N) as numpy for ranking: float32 when exact (the fast packed sort), else float64."""
    x = x.detach().cpu()
    if x.dtype == torch.float64:
        single = x.float()
        if torch.equal(single.double(), x):  # float32 maps stored as float64: same ranks
            return single.numpy()
    return _to_numpy(x)


@coarse_threads
def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of each row of ``x`` (B, N), ties getting their average rank -> float64
    (B, N): ``scipy.stats.rankdata(x, method='average', axis=1)``; rows with NaN are NaN."""
    n = x.shape[1]
    xs = _rank_input(x)
    if not np.isfinite(xs).all():
        xs = xs.astype(np.float64)  # the exact (argsort) path of _sort_rows
    parts = _by_chunks(_centered_ranks, xs, row_pixels=n)
    d = np.concatenate([p[0] for p in parts]) if parts else np.zeros(x.shape)
    ranks = (d.astype(np.float64) + (n + 1)) * 0.5
    ranks[np.isnan(xs).any(axis=1)] = np.nan
    return torch.from_numpy(ranks).to(x.device)


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    _check_pair(a, b)
    bsz, n = a.shape[0], a.shape[1:].numel()
    if bsz == 0:
        return torch.zeros(0, dtype=torch.float64, device=a.device)

    def reference() -> tuple[np.ndarray, np.ndarray]:
        parts = _by_chunks(_centered_ranks, _rank_input(b.flatten(1)), row_pixels=n)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    db, db_sq = _memoized(b, "centered_ranks", reference)
    score = np.concatenate(_by_chunks(_spearman_chunk, _rank_input(a.flatten(1)), db, db_sq,
                                      row_pixels=n))
    return _nan_rows(torch.from_numpy(score), a, b)


@METRICS.register(normalization="signed", title="Rank correlation (no abs)")
@coarse_threads
def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation over pixels: (B, H, W) x (B, H, W) -> (B,).

    Equals ``scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic``, ties included
    (normalized maps have many: zeros and values clipped at the 99th percentile). Configured on
    signed maps; see :func:`spearman_abs` for the absolute-value variant of Adebayo et al. 2018.
    The ranks of ``b`` (the reference) are memoized on the tensor.
    """
    return _spearman(a, b)


@METRICS.register(normalization="absolute", title="Rank correlation (abs)")
@coarse_threads
def spearman_abs(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation, configured on absolute-normalized maps (Adebayo et al. 2018,
    "rank correlation (absolute value)"). The computation is :func:`spearman`'s;
    (B, H, W) x (B, H, W) -> (B,)."""
    return _spearman(a, b)


@METRICS.register(normalization="signed", title="Pearson correlation")
@coarse_threads
def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the flattened maps: (B, H, W) x (B, H, W) -> (B,); equals
    ``scipy.stats.pearsonr(a[i].ravel(), b[i].ravel()).statistic``."""
    _check_pair(a, b)
    parts = _by_chunks(lambda x, y: _pearson_rows(x.flatten(1), y.flatten(1)),
                       a.detach(), b.detach(), row_pixels=a.shape[1] * a.shape[2])
    return _nan_rows(torch.cat(parts) if parts else a.new_zeros(0, dtype=torch.float64), a, b)


# --------------------------------------------------------------------------- HOG
def _gradients(maps: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Central differences with zero borders (skimage's ``_hog_channel_gradient``) of maps
    (B, H, W), kept for the top-left ``rows x cols`` pixels -> (g_row, g_col), input dtype.

    The difference is taken in the input dtype, as skimage does, so that float32 maps give
    bit-identical gradients (and hence identical orientation bins).
    """
    bsz, h, w = maps.shape
    g_row = np.empty((bsz, rows, cols), maps.dtype)
    g_col = np.empty((bsz, rows, cols), maps.dtype)
    r1, c1 = min(rows, h - 1), min(cols, w - 1)  # the last row / column of the map stays 0
    np.subtract(maps[:, 2:r1 + 1, :cols], maps[:, :r1 - 1, :cols], out=g_row[:, 1:r1])
    np.subtract(maps[:, :rows, 2:c1 + 1], maps[:, :rows, :c1 - 1], out=g_col[:, :, 1:c1])
    g_row[:, 0] = 0
    g_row[:, r1:] = 0
    g_col[:, :, 0] = 0
    g_col[:, :, c1:] = 0
    return g_row, g_col


def _exact_bins(g_row: np.ndarray, g_col: np.ndarray, orientations: int) -> np.ndarray:
    """skimage's bin rule evaluated with numpy itself, for 1-D float64 gradients -> int64.

    skimage counts a pixel in bin ``i`` iff ``e_i <= angle < e_{i+1}`` with
    ``e_i = (180. / orientations) * i`` and ``angle = rad2deg(arctan2(g_row, g_col)) % 180``;
    an angle that rounds to 180.0 lies in no bin (returned as ``orientations``). This must be
    numpy's float64 arctan2, bit for bit: pixels that lie exactly on an edge are common on
    plateau maps (0, 45, 90, 135 degrees up to rounding).
    """
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    upper = (180.0 / orientations) * np.arange(1, orientations + 1)
    return np.searchsorted(upper, angle, side="right")


@functools.lru_cache(maxsize=8)
def _cell_slots(bsz: int, rows: int, cols: int, cell: tuple[int, int], slots: int
                ) -> np.ndarray:
    """First histogram slot of each pixel's (sample, cell), int32 (B, rows, cols), read-only."""
    ncr, ncc = rows // cell[0], cols // cell[1]
    cell_r = np.arange(rows, dtype=np.int32) // cell[0]
    cell_c = np.arange(cols, dtype=np.int32) // cell[1]
    first = (np.arange(bsz, dtype=np.int32)[:, None, None] * ncr + cell_r[:, None]) * ncc + cell_c
    first *= slots
    first.flags.writeable = False
    return first


def _histogram_slots(g_row: np.ndarray, g_col: np.ndarray, orientations: int,
                     cell: tuple[int, int]) -> np.ndarray:
    """The histogram slot of every pixel (B, R, C) -> int32: ``2 * orientations + 1`` slots per
    cell, where slots ``k`` and ``k + orientations`` both mean bin ``k`` (angles below and
    above 0 degrees, so no ``% 180`` is needed) and the last slot means 'in no bin'.

    The bulk is binned from float32 arctan2, within a few 1e-6 bin widths of skimage's float64
    angle. Pixels within ``HOG_EDGE_TOL`` bin widths of an edge are re-binned with skimage's
    float64 rule (:func:`_exact_bins`), so every pixel lands in exactly skimage's bin.
    """
    q = np.arctan2(g_row.astype(np.float32, copy=False), g_col.astype(np.float32, copy=False))
    q *= np.float32(orientations / math.pi)
    q += np.float32(orientations)  # (0, 2 * orientations] bin widths
    slot = q.astype(np.int32)  # floor, as q > 0
    off = np.rint(q)
    np.subtract(q, off, out=off)
    unsure = np.flatnonzero(np.abs(off, out=off) < np.float32(HOG_EDGE_TOL))
    # g_row == 0 (common on plateaus) means an angle of 0 or 180 degrees, both exactly 0.0
    # after skimage's % 180: bin 0 (and no magnitude when g_col == 0 too)
    horizontal = g_row.reshape(-1)[unsure] == 0
    slot.reshape(-1)[unsure[horizontal]] = 0
    unsure = unsure[~horizontal]
    if unsure.size:
        exact = _exact_bins(g_row.reshape(-1)[unsure].astype(np.float64),
                            g_col.reshape(-1)[unsure].astype(np.float64), orientations)
        exact[exact == orientations] = 2 * orientations  # 'in no bin'
        slot.reshape(-1)[unsure] = exact
    bsz, rows, cols = q.shape
    slot += _cell_slots(bsz, rows, cols, cell, 2 * orientations + 1)
    return slot


def _cell_histograms(maps: np.ndarray, orientations: int, cell: tuple[int, int]) -> np.ndarray:
    """Per-cell orientation histograms of finite maps (B, H, W) -> float64 (B, n_cells_row,
    n_cells_col, orientations): the sum of gradient magnitudes per bin divided by the cell
    area, as in skimage's ``cell_hog``. Pixels beyond the last whole cell are ignored, as in
    skimage."""
    bsz, h, w = maps.shape
    ncr, ncc = h // cell[0], w // cell[1]
    g_row, g_col = _gradients(maps, ncr * cell[0], ncc * cell[1])
    gr32 = g_row.astype(np.float32, copy=False)
    gc32 = g_col.astype(np.float32, copy=False)
    mag = gr32 * gr32
    mag += gc32 * gc32
    np.sqrt(mag, out=mag)
    slots = _histogram_slots(g_row, g_col, orientations, cell)
    # float32 sums, like skimage's cell_hog; torch's index_add_ releases the GIL (bincount
    # does not) and needs no float64 copy of the weights
    hist = torch.zeros(bsz * ncr * ncc * (2 * orientations + 1))
    hist.index_add_(0, torch.from_numpy(slots.reshape(-1)), torch.from_numpy(mag.reshape(-1)))
    hist = hist.numpy().astype(np.float64).reshape(bsz, ncr, ncc, 2 * orientations + 1)
    hist = hist[..., :orientations] + hist[..., orientations:-1]
    hist /= cell[0] * cell[1]
    return hist


def _l2_hys(blocks: np.ndarray) -> np.ndarray:
    """L2-Hys block normalization over the last dim (skimage, eps=1e-5, clip at 0.2)."""
    out = blocks / np.sqrt(np.einsum("...i,...i->...", blocks, blocks) + HOG_EPS**2)[..., None]
    np.minimum(out, HOG_CLIP, out=out)
    return out / np.sqrt(np.einsum("...i,...i->...", out, out) + HOG_EPS**2)[..., None]


def _hog_histograms(maps: np.ndarray, orientations: int, cell: tuple[int, int]) -> np.ndarray:
    """:func:`_cell_histograms` of maps (B, H, W) whose rows with NaN or inf become NaN."""
    bad = ~np.isfinite(maps).all(axis=(1, 2))
    if bad.any():
        maps = np.where(bad[:, None, None], 0, maps)  # keep the slots valid, NaN at the end
    hist = _cell_histograms(maps, orientations, cell)
    hist[bad] = np.nan
    return hist


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _hog_numpy(maps: Tensor, orientations: int, cell: tuple[int, int],
               block: tuple[int, int]) -> np.ndarray:
    """HOG descriptors (B, F) float64 of maps (B, H, W) after the shape checks.

    The cell histograms are computed on slices of rows (in threads); the block normalization
    on the whole batch, where numpy's per-call overhead is paid once.
    """
    arr = _to_numpy(maps)
    parts = _by_chunks(_hog_histograms, arr, row_pixels=arr.shape[1] * arr.shape[2],
                       orientations=orientations, cell=cell)
    shape = (0, arr.shape[1] // cell[0], arr.shape[2] // cell[1], orientations)
    hist = np.concatenate(parts) if parts else np.zeros(shape)  # (B, ncr, ncc, n)
    # every block of block[0] x block[1] neighbouring cells, in skimage's feature order
    windows = np.lib.stride_tricks.sliding_window_view(hist, block, axis=(1, 2))
    blocks = windows.transpose(0, 1, 2, 4, 5, 3)  # (B, nbr, nbc, br, bc, n)
    blocks = blocks.reshape(*blocks.shape[:3], block[0] * block[1] * orientations)
    return _l2_hys(blocks).reshape(len(hist), math.prod(blocks.shape[1:]))


def _hog_args(maps: Tensor, orientations: int, pixels_per_cell, cells_per_block
              ) -> tuple[int, tuple[int, int], tuple[int, int]]:
    cell, block = _pair(pixels_per_cell), _pair(cells_per_block)
    if maps.ndim != 3:
        raise ValueError(f"hog_features takes maps (B, H, W), got shape {tuple(maps.shape)}")
    h, w = maps.shape[1:]
    if h // cell[0] < block[0] or w // cell[1] < block[1]:
        raise ValueError(
            f"hog needs maps of at least {block[0] * cell[0]}x{block[1] * cell[1]} pixels "
            f"({block} blocks of {cell}-pixel cells), got {h}x{w}"
        )
    return int(orientations), cell, block


@coarse_threads
def hog_features(maps: Tensor, orientations: int = 9,
                 pixels_per_cell: int | tuple[int, int] = 16,
                 cells_per_block: int | tuple[int, int] = 3) -> Tensor:
    """Histogram-of-oriented-gradients descriptors of a batch of maps (B, H, W) -> (B, F), float64.

    Row ``i`` equals ``skimage.feature.hog(maps[i], orientations, pixels_per_cell,
    cells_per_block, block_norm='L2-Hys', feature_vector=True)``, F = n_blocks_row *
    n_blocks_col * cells_per_block**2 * orientations (same feature order), within 1e-5:
    skimage sums float64 magnitudes in float32 per cell; we sum float32 magnitudes in float32,
    which differs by about 1e-7 relative. Rows with NaN (or inf) are NaN.
    """
    args = _hog_args(maps, orientations, pixels_per_cell, cells_per_block)
    return torch.from_numpy(_hog_numpy(maps, *args)).to(maps.device)


def fit_hog(settings: dict, map_size: tuple[int, int]) -> dict:
    """HOG settings for maps of ``map_size`` (H, W): cells too large for small maps (the paper's
    16-pixel cells in 3x3 blocks need 48x48 maps; MNIST's are 28x28) halved until a block fits.
    """
    fitted = dict(settings)
    cell = int(fitted.get("pixels_per_cell", 16))
    block = int(fitted.get("cells_per_block", 3))
    while cell > 1 and min(map_size) // cell < block:
        cell = max(1, cell // 2)
    if cell != int(fitted.get("pixels_per_cell", 16)):
        fitted["pixels_per_cell"] = cell
    return fitted


@METRICS.register(normalization="absolute", title="HOGs similarity", fit=fit_hog, ranges={
    "pixels_per_cell": Range(1), "orientations": Range(1), "cells_per_block": Range(1)})
@coarse_threads
def hog(a: Tensor, b: Tensor, pixels_per_cell: int = 16, orientations: int = 9,
        cells_per_block: int = 3) -> Tensor:
    """Pearson correlation of the HOG descriptors of the two maps (Adebayo et al. 2018's
    "HOG similarity"): (B, H, W) x (B, H, W) -> (B,). See :func:`hog_features`; the
    descriptors of ``b`` (the reference) are memoized on the tensor."""
    _check_pair(a, b)
    args = _hog_args(a, orientations, pixels_per_cell, cells_per_block)
    fa = _hog_numpy(a, *args)
    fb = _memoized(b, ("hog", *args), lambda: _hog_numpy(b, *args))
    return _nan_rows(torch.from_numpy(_np_pearson_rows(fa, fb)), a, b)
