"""Similarity metrics of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", arXiv 1810.03292).

Every metric is ``METRICS[name](a, b, **kw) -> Tensor (B,)`` (float64) for maps ``a, b`` of shape
(B, H, W), float32 or float64. Row ``i`` compares ``a[i]`` with ``b[i]`` only. The batch is
computed with batched torch ops (no loop over images or pixels), in slices of a few maps so that
intermediates stay in the CPU cache. Two steps borrow numpy where torch is slow or inexact on
CPU: the row-wise argsort of the rank correlation, and the arctan2 of the few HOG pixels that
lie on an orientation-bin edge. Each metric equals its scikit-image / scipy reference within
1e-5 (tests/test_metrics.py).

A row is NaN when either map of the pair contains NaN or is constant (zero variance): a constant
map carries no ranking and no structure to compare. (scikit-image's SSIM would still return a
number for a constant map; we deliberately do not.)
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from metrics import METRICS

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage: an 11-tap window for sigma 1.5, as in Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03
HOG_EPS = 1e-5  # skimage's L2-Hys epsilon
HOG_CLIP = 0.2
HOG_EDGE_TOL = 1e-9  # angles this close to a bin edge (in bin widths) are binned with numpy
# Batches are processed in slices of about this many pixels: every metric is row-wise, and a
# slice's float64 intermediates stay in the CPU cache (about 2x faster than whole batches).
CHUNK_PIXELS = 1 << 18


# --------------------------------------------------------------------------- shared helpers
def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(
            f"metrics take two maps of the same shape (B, H, W); got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _by_chunks(fn: Callable[..., Tensor], *maps: Tensor, per_row: int = 1, **kw) -> Tensor:
    """``fn(*maps, **kw)`` for a row-wise ``fn``, computed on slices of the batch dimension of
    about ``CHUNK_PIXELS`` pixels, where ``fn`` keeps ``per_row`` full maps per row."""
    rows = max(1, CHUNK_PIXELS // max(1, per_row * maps[0].shape[1:].numel()))
    if maps[0].shape[0] <= rows:
        return fn(*maps, **kw)
    return torch.cat([fn(*parts, **kw) for parts in zip(*(m.split(rows) for m in maps))])


def _degenerate(x: Tensor) -> Tensor:
    """Rows of ``x`` (B, ...) that contain NaN or are constant -> bool (B,)."""
    flat = x.flatten(1)
    return torch.isnan(flat).any(dim=1) | (flat.amax(dim=1) == flat.amin(dim=1))


def _nan_rows(score: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """NaN for the rows where ``a`` or ``b`` is degenerate; ``score`` is (B,)."""
    return score.masked_fill(_degenerate(a) | _degenerate(b), float("nan"))


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


# --------------------------------------------------------------------------- SSIM
def _gaussian_taps(sigma: float, truncate: float) -> Tensor:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate*sigma+0.5)``),
    float64 (K,)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return w / w.sum()


def _valid_filter_matrix(taps: Tensor, n: int, device: torch.device) -> Tensor:
    """(n-K+1, n) banded matrix G with ``(G @ v)[i] = sum_k taps[k] * v[i+k]``: a 1-D
    'valid' correlation (the Gaussian is symmetric, so also a convolution)."""
    k = taps.numel()
    cols = torch.arange(n - k + 1)[:, None] + torch.arange(k)[None, :]
    g = torch.zeros(n - k + 1, n, dtype=torch.float64)
    g.scatter_(1, cols, taps.expand(n - k + 1, k))
    return g.to(device)


def _filter_last(x: Tensor, taps: Tensor, block: int = 48) -> Tensor:
    """'Valid' correlation of the last dim of ``x`` (..., n) with ``taps`` (K,) -> (..., n-K+1).

    Each run of ``block`` outputs is one matrix product with a small banded matrix: BLAS speed
    without the 20x wasted work of one dense (n-K+1, n) matrix, and several times faster than
    an 11-tap conv2d on CPU.
    """
    k, n = taps.numel(), x.shape[-1]
    out = x.new_empty(*x.shape[:-1], n - k + 1)
    band = _valid_filter_matrix(taps, block + k - 1, x.device).T  # (block+K-1, block)
    for start in range(0, n - k + 1, block):
        size = min(block, n - k + 1 - start)
        window = x[..., start:start + size + k - 1]
        out[..., start:start + size] = window @ band[: size + k - 1, :size]
    return out


def _ssim_rows(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Mean SSIM per row of float64 maps (B, H, W) -> (B,).

    skimage filters with reflect padding and then crops r = 5 pixels per border before
    averaging; the kept pixels are exactly those whose window lies inside the image, so a
    'valid' separable filter gives the same numbers without the discarded border.
    """
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE)
    # var_x and var_y only appear as a sum, so x^2 + y^2 is filtered as one map (4 filters, not 5)
    stack = torch.stack([x, y, x * x + y * y, x * y])  # (4, B, H, W)
    stack = _filter_last(_filter_last(stack, taps).transpose(-1, -2), taps)
    mu_x, mu_y, sq, xy = stack  # each (B, W', H'), transposed: the mean does not care
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mxy = mu_x * mu_y
    msq = mu_x.square_().add_(mu_y.square_())
    # (2 mu_x mu_y + c1)(2 cov + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2)), in place
    num = xy.sub_(mxy).mul_(2.0).add_(c2).mul_(mxy.mul_(2.0).add_(c1))
    den = sq.sub_(msq).add_(c2).mul_(msq.add_(c1))
    return num.div_(den).mean(dim=(1, 2))


@METRICS.register
def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) per row: (B, H, W) x (B, H, W) -> (B,).

    Equals ``skimage.metrics.structural_similarity(a[i], b[i], gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range)`` (Adebayo et al. 2018 use
    SSIM on absolute-normalized maps, range 1; signed maps need ``data_range=2``).
    Maps must be at least 11x11.
    """
    _check_pair(a, b)
    win = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
    if min(a.shape[1:]) < win:
        raise ValueError(
            f"ssim needs maps of at least {win}x{win} pixels (its Gaussian window), "
            f"got {a.shape[1]}x{a.shape[2]}"
        )
    score = _by_chunks(_ssim_rows, a.double(), b.double(), per_row=4,
                       data_range=float(data_range))
    return _nan_rows(score, a, b)


# --------------------------------------------------------------------------- rank correlation
def _argsort_rows(x: Tensor) -> Tensor:
    """Row-wise argsort (B, N) -> int64 (B, N). On CPU numpy's SIMD sort is used: it is 5-15x
    faster than ``torch.sort`` there, and the order of equal values does not matter here."""
    if x.device.type != "cpu":
        return torch.argsort(x, dim=1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # exact for half / bfloat16, which numpy cannot sort
    return torch.from_numpy(np.argsort(x.detach().numpy(), axis=1))


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of each row of ``x`` (B, N), ties getting their average rank -> float64
    (B, N): ``scipy.stats.rankdata(x, method='average', axis=1)``.

    After sorting, each run of equal values spans sorted positions ``first..last`` and its
    average rank is ``(first + last) / 2 + 1``; running max / min find the run ends in O(N).
    """
    n = x.shape[1]
    order = _argsort_rows(x)
    s = x.gather(1, order)
    pos = torch.arange(n, device=x.device).expand_as(order)
    step = s[:, 1:] != s[:, :-1]  # True where a new run of equal values starts
    edge = torch.ones_like(step[:, :1])
    first = torch.where(torch.cat([edge, step], 1), pos, 0).cummax(1).values
    last = torch.where(torch.cat([step, edge], 1), pos, n).flip(1).cummin(1).values.flip(1)
    rank_sorted = (first + last).double() * 0.5 + 1.0
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def _spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    return _pearson_rows(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    _check_pair(a, b)
    return _nan_rows(_by_chunks(_spearman_rows, a, b), a, b)


@METRICS.register
def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation over pixels: (B, H, W) x (B, H, W) -> (B,).

    Equals ``scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic``, ties included
    (normalized maps have many: zeros and values clipped at the 99th percentile). Configured on
    signed maps; see :func:`spearman_abs` for the absolute-value variant of Adebayo et al. 2018.
    """
    return _spearman(a, b)


@METRICS.register
def spearman_abs(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation, configured on absolute-normalized maps (Adebayo et al. 2018,
    "rank correlation (absolute value)"). The computation is :func:`spearman`'s;
    (B, H, W) x (B, H, W) -> (B,)."""
    return _spearman(a, b)


@METRICS.register
def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the flattened maps: (B, H, W) x (B, H, W) -> (B,); equals
    ``scipy.stats.pearsonr(a[i].ravel(), b[i].ravel()).statistic``."""
    _check_pair(a, b)
    score = _by_chunks(lambda x, y: _pearson_rows(x.flatten(1), y.flatten(1)), a, b)
    return _nan_rows(score, a, b)


# --------------------------------------------------------------------------- HOG
def _gradients(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences with zero borders (skimage's ``_hog_channel_gradient``):
    (B, H, W) -> (g_row, g_col), each (B, H, W) float64.

    The difference is taken in the input dtype before the cast, as skimage does, so that
    float32 maps give bit-identical gradients (and hence identical orientation bins).
    """
    g_row = torch.zeros(maps.shape, dtype=torch.float64, device=maps.device)
    g_col = torch.zeros_like(g_row)
    g_row[:, 1:-1, :] = maps[:, 2:, :] - maps[:, :-2, :]
    g_col[:, :, 1:-1] = maps[:, :, 2:] - maps[:, :, :-2]
    return g_row, g_col


def _exact_bins(g_row: Tensor, g_col: Tensor, orientations: int) -> Tensor:
    """skimage's bin rule evaluated with numpy itself, for 1-D gradient subsets -> int64.

    skimage counts a pixel in bin ``i`` iff ``e_i <= angle < e_{i+1}`` with
    ``e_i = (180. / orientations) * i`` and ``angle = rad2deg(arctan2(g_row, g_col)) % 180``;
    an angle that rounds to 180.0 lies in no bin (returned as ``orientations``). This must be
    numpy's arctan2: torch's vectorized atan2 can differ from it by an ulp, which flips pixels
    that lie exactly on an edge (plateau maps: 0, 45, 90, 135 degrees up to rounding).
    """
    angle = np.rad2deg(np.arctan2(g_row.cpu().numpy(), g_col.cpu().numpy())) % 180
    upper = (180.0 / orientations) * np.arange(1, orientations + 1)
    bins = np.searchsorted(upper, angle, side="right")
    return torch.from_numpy(bins).to(g_row.device)


def _orientation_bins(g_row: Tensor, g_col: Tensor, mag: Tensor, orientations: int) -> Tensor:
    """Orientation bin of each pixel (B, H, W) -> int64 in [0, orientations]; the value
    ``orientations`` means 'in no bin' (see :func:`_exact_bins` for skimage's rule).

    The bulk is binned from torch's atan2, which is within a few ulps of numpy's. Pixels whose
    angle lies within ``1e-9`` of a bin width of an edge (and that carry magnitude) are re-binned
    with numpy, so every pixel lands in exactly skimage's bin. NaN gets 'no bin' (the
    caller makes its row NaN).
    """
    q = torch.atan2(g_row, g_col).mul_(180.0 / math.pi).remainder_(180.0)
    q = q.div_(180.0 / orientations)  # position in bin widths
    bins = q.floor()
    frac = q.sub_(bins)
    unsure = ((frac < HOG_EDGE_TOL) | (frac > 1.0 - HOG_EDGE_TOL)) & (mag > 0)
    bins = bins.nan_to_num_(float(orientations)).clamp_(0, orientations).long()
    where = unsure.nonzero(as_tuple=True)
    if where[0].numel():
        bins[where] = _exact_bins(g_row[where], g_col[where], orientations)
    return bins


def _cell_histograms(maps: Tensor, orientations: int, cell: tuple[int, int]) -> Tensor:
    """Per-cell orientation histograms (B, H, W) -> float64 (B, n_cells_row, n_cells_col,
    orientations): the sum of gradient magnitudes per bin divided by the cell area, as in
    skimage's ``cell_hog``. Pixels beyond the last whole cell are ignored, as in skimage."""
    bsz, h, w = maps.shape
    ncr, ncc = h // cell[0], w // cell[1]
    g_row, g_col = _gradients(maps)
    crop = (slice(None), slice(0, ncr * cell[0]), slice(0, ncc * cell[1]))
    g_row, g_col = g_row[crop], g_col[crop]
    mag = torch.hypot(g_row, g_col)
    bins = _orientation_bins(g_row, g_col, mag, orientations)
    # one flat histogram slot per (sample, cell row, cell col, bin), plus one overflow slot per
    # cell that collects the unbinned pixels and is dropped below
    dev = maps.device
    cell_r = torch.arange(ncr * cell[0], device=dev) // cell[0]
    cell_c = torch.arange(ncc * cell[1], device=dev) // cell[1]
    cell_id = cell_r[:, None] * ncc + cell_c[None, :]
    sample = torch.arange(bsz, device=dev)[:, None, None] * (ncr * ncc)
    index = (sample + cell_id).mul_(orientations + 1).add_(bins)
    hist = torch.zeros(bsz * ncr * ncc * (orientations + 1), dtype=torch.float64, device=dev)
    hist.index_add_(0, index.flatten(), mag.flatten())
    hist = hist.view(bsz, ncr, ncc, orientations + 1)[..., :orientations]
    return hist / (cell[0] * cell[1])


def _l2_hys(blocks: Tensor) -> Tensor:
    """L2-Hys block normalization over the last dim (skimage, eps=1e-5, clip at 0.2)."""
    out = blocks / torch.sqrt((blocks * blocks).sum(dim=-1, keepdim=True) + HOG_EPS**2)
    out = out.clamp(max=HOG_CLIP)
    return out / torch.sqrt((out * out).sum(dim=-1, keepdim=True) + HOG_EPS**2)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def hog_features(maps: Tensor, orientations: int = 9,
                 pixels_per_cell: int | tuple[int, int] = 16,
                 cells_per_block: int | tuple[int, int] = 3) -> Tensor:
    """Histogram-of-oriented-gradients descriptors of a batch of maps (B, H, W) -> (B, F), float64.

    Row ``i`` equals ``skimage.feature.hog(maps[i], orientations, pixels_per_cell,
    cells_per_block, block_norm='L2-Hys', feature_vector=True)``, F = n_blocks_row *
    n_blocks_col * cells_per_block**2 * orientations (same feature order). skimage sums each
    cell in float32; we sum in float64, which differs by about 1e-7 relative.
    """
    cell, block = _pair(pixels_per_cell), _pair(cells_per_block)
    if maps.ndim != 3:
        raise ValueError(f"hog_features takes maps (B, H, W), got shape {tuple(maps.shape)}")
    h, w = maps.shape[1:]
    if h // cell[0] < block[0] or w // cell[1] < block[1]:
        raise ValueError(
            f"hog needs maps of at least {block[0] * cell[0]}x{block[1] * cell[1]} pixels "
            f"({block} blocks of {cell}-pixel cells), got {h}x{w}"
        )
    feats = _by_chunks(_hog_rows, maps, orientations=orientations, cell=cell, block=block)
    # NaN pixels fall into no bin above; give their whole row NaN, as skimage's NaN-filled cells
    return feats.masked_fill(torch.isnan(maps).flatten(1).any(dim=1)[:, None], float("nan"))


def _hog_rows(maps: Tensor, orientations: int, cell: tuple[int, int],
              block: tuple[int, int]) -> Tensor:
    hist = _cell_histograms(maps, orientations, cell)  # (B, ncr, ncc, n)
    # every block of block[0] x block[1] neighbouring cells, in skimage's feature order
    blocks = hist.unfold(1, block[0], 1).unfold(2, block[1], 1)  # (B, nbr, nbc, n, br, bc)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3).flatten(3)  # (B, nbr, nbc, br*bc*n)
    return _l2_hys(blocks).flatten(1)


@METRICS.register
def hog(a: Tensor, b: Tensor, pixels_per_cell: int = 16, orientations: int = 9,
        cells_per_block: int = 3) -> Tensor:
    """Pearson correlation of the HOG descriptors of the two maps (Adebayo et al. 2018's
    "HOG similarity"): (B, H, W) x (B, H, W) -> (B,). See :func:`hog_features`."""
    _check_pair(a, b)
    fa = hog_features(a, orientations, pixels_per_cell, cells_per_block)
    fb = hog_features(b, orientations, pixels_per_cell, cells_per_block)
    return _nan_rows(_pearson_rows(fa, fb), a, b)
