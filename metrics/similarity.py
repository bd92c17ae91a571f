"""Similarity metrics of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", arXiv 1810.03292).

Every metric is ``METRICS[name](a, b, **kw) -> Tensor (B,)`` (float64) for maps ``a, b`` of shape
(B, H, W), float32 or float64. Row ``i`` compares ``a[i]`` with ``b[i]`` only, and the whole
batch is computed at once with torch ops (no loop over images or pixels). Each metric equals its
scikit-image / scipy reference within 1e-5 (tests/test_metrics.py).

A row is NaN when either map of the pair contains NaN or is constant (zero variance): a constant
map carries no ranking and no structure to compare. (scikit-image's SSIM would still return a
number for a constant map; we deliberately do not.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metrics import METRICS

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage: an 11-tap window for sigma 1.5, as in Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03
HOG_EPS = 1e-5  # skimage's L2-Hys epsilon
HOG_CLIP = 0.2


# --------------------------------------------------------------------------- shared helpers
def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(
            f"metrics take two maps of the same shape (B, H, W); got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


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
def _gaussian_taps(sigma: float, truncate: float, device: torch.device) -> Tensor:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate*sigma+0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return w / w.sum()


def _gaussian_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian filter without padding: (N, H, W) -> (N, H-2r, W-2r).

    skimage filters with reflect padding and then crops r pixels per border before averaging;
    the cropped pixels are exactly those whose window lies inside the image, so a 'valid'
    convolution gives the same numbers without computing the discarded border.
    """
    k = taps.numel()
    y = F.conv2d(x[:, None], taps.view(1, 1, k, 1))
    return F.conv2d(y, taps.view(1, 1, 1, k))[:, 0]


@METRICS.register
def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity (Wang et al. 2004) per row: (B, H, W) x (B, H, W) -> (B,).

    Equals ``skimage.metrics.structural_similarity(a[i], b[i], gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range)`` (Adebayo et al. 2018 use
    SSIM on absolute-normalized maps, range 1; signed maps need ``data_range=2``).
    Maps must be at least 11x11.
    """
    _check_pair(a, b)
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE, a.device)
    if min(a.shape[1:]) < taps.numel():
        raise ValueError(
            f"ssim needs maps of at least {taps.numel()}x{taps.numel()} pixels (its Gaussian "
            f"window), got {a.shape[1]}x{a.shape[2]}"
        )
    x, y = a.double(), b.double()
    n = x.shape[0]
    mu_x, mu_y, xx, yy, xy = _gaussian_valid(
        torch.cat([x, y, x * x, y * y, x * y]), taps
    ).split(n)
    var_x, var_y = xx - mu_x * mu_x, yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return _nan_rows((num / den).mean(dim=(1, 2)), a, b)


# --------------------------------------------------------------------------- rank correlation
def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of each row of ``x`` (B, N), ties getting their average rank -> float64
    (B, N); the ranks of ``scipy.stats.rankdata(method='average')``.

    A value ``v`` occupies the sorted positions ``[#(<v), #(<=v))``, whose mean 1-based rank is
    ``(#(<v) + #(<=v) + 1) / 2``; two binary searches give both counts for the whole batch.
    """
    x = x.contiguous()
    s = x.sort(dim=1).values
    lo = torch.searchsorted(s, x, right=False)
    hi = torch.searchsorted(s, x, right=True)
    return (lo + hi + 1).double() * 0.5


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    _check_pair(a, b)
    r = _pearson_rows(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))
    return _nan_rows(r, a, b)


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
    return _nan_rows(_pearson_rows(a.flatten(1), b.flatten(1)), a, b)


# --------------------------------------------------------------------------- HOG
def _gradients(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences with zero borders (skimage's ``_hog_channel_gradient``):
    (B, H, W) -> (g_row, g_col), each (B, H, W) float64.

    The difference is taken in the input dtype before the cast, as skimage does, so that
    float32 maps give bit-identical gradients (and hence identical orientation bins).
    """
    g_row = torch.zeros_like(maps)
    g_col = torch.zeros_like(maps)
    g_row[:, 1:-1, :] = maps[:, 2:, :] - maps[:, :-2, :]
    g_col[:, :, 1:-1] = maps[:, :, 2:] - maps[:, :, :-2]
    return g_row.double(), g_col.double()


def _orientation_bins(g_row: Tensor, g_col: Tensor, orientations: int) -> Tensor:
    """Orientation bin of each pixel (B, H, W) -> int64, ``orientations`` meaning 'no bin'.

    skimage's Cython histogram counts a pixel in bin ``i`` iff
    ``e_i <= angle < e_{i+1}`` with ``e_i = (180. / orientations) * i`` in double precision and
    ``angle = rad2deg(arctan2(g_row, g_col)) % 180``. An angle that rounds to 180.0 (tiny
    negative angles) lies in no bin, which a right-sided search reproduces.
    """
    per_bin = 180.0 / orientations
    edges = torch.tensor([per_bin * i for i in range(orientations + 1)], dtype=torch.float64,
                         device=g_row.device)
    angle = torch.remainder(torch.atan2(g_row, g_col) * (180.0 / math.pi), 180.0)
    return (torch.searchsorted(edges, angle.contiguous(), right=True) - 1).clamp(0, orientations)


def _cell_histograms(maps: Tensor, orientations: int, cell: tuple[int, int]) -> Tensor:
    """Per-cell orientation histograms (B, H, W) -> (B, n_cells_row, n_cells_col, orientations):
    the sum of gradient magnitudes per bin divided by the cell area (skimage's ``cell_hog``).
    Pixels beyond the last whole cell are ignored, as in skimage."""
    bsz, h, w = maps.shape
    ncr, ncc = h // cell[0], w // cell[1]
    g_row, g_col = _gradients(maps)
    mag = torch.hypot(g_row, g_col)[:, : ncr * cell[0], : ncc * cell[1]]
    bins = _orientation_bins(g_row, g_col, orientations)[:, : ncr * cell[0], : ncc * cell[1]]
    # one flat histogram index per pixel: (sample, cell row, cell col, bin); bin == orientations
    # is an overflow slot that collects the unbinned pixels and is dropped below
    dev = maps.device
    cell_r = torch.arange(ncr * cell[0], device=dev) // cell[0]
    cell_c = torch.arange(ncc * cell[1], device=dev) // cell[1]
    cell_id = cell_r[:, None] * ncc + cell_c[None, :]
    sample = torch.arange(bsz, device=dev)[:, None, None] * (ncr * ncc)
    index = (sample + cell_id) * (orientations + 1) + bins
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
    hist = _cell_histograms(maps, orientations, cell)  # (B, ncr, ncc, n)
    # every block of block[0] x block[1] neighbouring cells, skimage's feature order
    blocks = hist.unfold(1, block[0], 1).unfold(2, block[1], 1)  # (B, nbr, nbc, n, br, bc)
    blocks = blocks.permute(0, 1, 2, 4, 5, 3).flatten(3)  # (B, nbr, nbc, br*bc*n)
    return _l2_hys(blocks).flatten(1)


@METRICS.register
def hog(a: Tensor, b: Tensor, pixels_per_cell: int = 16, orientations: int = 9,
        cells_per_block: int = 3) -> Tensor:
    """Pearson correlation of the HOG descriptors of the two maps (Adebayo et al. 2018's
    "HOG similarity"): (B, H, W) x (B, H, W) -> (B,). See :func:`hog_features`."""
    _check_pair(a, b)
    feats = hog_features(torch.cat([a, b]), orientations, pixels_per_cell, cells_per_block)
    fa, fb = feats.split(a.shape[0])
    return _nan_rows(_pearson_rows(fa, fb), a, b)
