"""Metrics and normalizations (Adebayo et al. 2018, arXiv 1810.03292).

Generic properties of every registered metric (identity scores 1, shape (B,), row-wise
independence, NaN for constant / NaN maps without warnings), then equality with the references
within 1e-5: skimage's SSIM and HOG, scipy's Spearman (with ties) and Pearson, on random maps and
on maps produced by both normalizations, including 224x224 and non-multiple-of-cell sizes. Then
the machinery of speed: both sort paths of the ranks, threads (same bits as one thread), and the
pieces memoized on the reference tensor (transparent, invalidated by in-place changes, weak).
"""
import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from omegaconf import OmegaConf
from skimage.feature import hog as sk_hog
from skimage.metrics import structural_similarity

import metrics.normalize as normalize_mod
import metrics.parallel as parallel_mod
import metrics.similarity as similarity_mod
from metrics import METRICS, NORMALIZATIONS
from metrics.normalize import is_constant, percentile
from metrics.similarity import average_ranks, hog_features

TOL = 1e-5
CONF = Path(__file__).resolve().parents[1] / "conf" / "metric"
SHAPE = (4, 48, 64)  # the smallest size every metric accepts with its defaults (HOG: 3x3 cells)
DATA_RANGE = {"absolute": 1.0, "signed": 2.0}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raw_pair(b: int, h: int, w: int, seed: int = 0, dtype=torch.float64):
    """Two correlated raw attribution maps (B, 3, H, W), heavy-tailed like real gradients."""
    g = gen(seed)
    m1 = torch.randn(b, 3, h, w, generator=g, dtype=torch.float64) ** 3
    m2 = m1 + 0.7 * torch.randn(b, 3, h, w, generator=g, dtype=torch.float64) ** 3
    return m1.to(dtype), m2.to(dtype)


def normalized_pair(norm: str, b: int, h: int, w: int, seed: int = 0, dtype=torch.float64):
    m1, m2 = raw_pair(b, h, w, seed, dtype)
    return NORMALIZATIONS[norm](m1), NORMALIZATIONS[norm](m2)


def uniform_pair(b: int, h: int, w: int, seed: int = 0):
    g = gen(seed)
    a = torch.rand(b, h, w, generator=g, dtype=torch.float64)
    return a, (a + 0.5 * torch.rand(b, h, w, generator=g, dtype=torch.float64)).clamp(max=1.0)


def bright_pair(b: int, h: int, w: int, seed: int = 0):
    """High mean, tiny variance: the hardest case for SSIM's float32 variance E[x^2] - E[x]^2."""
    g = gen(seed)
    a = 0.99 + 0.001 * torch.rand(b, h, w, generator=g, dtype=torch.float64)
    return a, (a + 0.0005 * torch.rand(b, h, w, generator=g, dtype=torch.float64)).clamp(max=1.0)


def tie_pair(b: int, h: int, w: int, seed: int = 0, levels: int = 4):
    """Plateau maps: few distinct values, so ranks tie massively and gradients point exactly at
    0, 45, 90, 135 and 180 degrees (HOG bin edges for some orientation counts)."""
    g = gen(seed)
    a = torch.randint(0, levels, (b, h, w), generator=g).double() / (levels - 1)
    flip = torch.rand(b, h, w, generator=g) < 0.2
    return a, torch.where(flip, 1.0 - a, a)


# --------------------------------------------------------------------------- generic properties
@pytest.mark.parametrize("name", sorted(METRICS))
def test_identical_maps_score_one(name):
    for norm in NORMALIZATIONS:
        a, _ = normalized_pair(norm, *SHAPE)
        kw = {"data_range": DATA_RANGE[norm]} if name == "ssim" else {}
        score = METRICS[name](a, a.clone(), **kw)
        assert torch.allclose(score, torch.ones_like(score), atol=1e-10, rtol=0), (norm, score)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_shape_and_range(name):
    a, b = normalized_pair("absolute", *SHAPE)
    score = METRICS[name](a, b)
    assert score.shape == (SHAPE[0],) and score.dtype == torch.float64
    assert torch.isfinite(score).all() and (score.abs() <= 1 + 1e-12).all()
    assert METRICS[name](a[:0], b[:0]).shape == (0,)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_rows_are_independent(name, monkeypatch):
    a, b = normalized_pair("absolute", *SHAPE)
    score = METRICS[name](a, b)
    a2, b2 = a.clone(), b.clone()
    a2[1:], b2[1:] = normalized_pair("absolute", SHAPE[0] - 1, *SHAPE[1:], seed=5)
    a2[2] *= 0.5  # a scaled row must not leak into the others either
    assert torch.allclose(METRICS[name](a2, b2)[:1], score[:1], atol=1e-12, rtol=0)
    assert torch.allclose(METRICS[name](a[:1], b[:1]), score[:1], atol=1e-12, rtol=0)
    # batch slicing (one row per slice here) gives the same numbers as a single slice
    monkeypatch.setattr(similarity_mod, "CHUNK_PIXELS", 1)
    assert torch.allclose(METRICS[name](a, b), score, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constant_or_nan_row_gives_nan(name, dtype):
    a, b = normalized_pair("absolute", 5, *SHAPE[1:], dtype=dtype)
    a[1] = 0.0  # constant
    b[2] = 0.3  # constant in the second map only
    a[3, 5, 7] = float("nan")
    b[4, 6, 8] = -float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score = METRICS[name](a, b)
    assert torch.isfinite(score[0]) and torch.isnan(score[1:]).all()
    assert torch.equal(score[0], METRICS[name](a[:1], b[:1])[0])  # the others do not leak


@pytest.mark.parametrize("name", sorted(METRICS))
def test_float32_maps(name):
    a, b = normalized_pair("absolute", *SHAPE)
    s64 = METRICS[name](a, b)
    s32 = METRICS[name](a.float(), b.float())
    assert torch.allclose(s32, s64, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_config_applies(name):
    """conf/metric/<name>.yaml nests its options under the name; all but the normalization are
    keyword arguments of the metric."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert list(cfg) == [name]
    kwargs = dict(cfg[name])
    a, b = normalized_pair(kwargs.pop("normalization"), *SHAPE)
    assert torch.isfinite(METRICS[name](a, b, **kwargs)).all()


def test_bad_shapes_raise():
    a = torch.rand(2, 48, 48)
    with pytest.raises(ValueError, match="same shape"):
        METRICS["spearman"](a, a[:, :, :40])
    with pytest.raises(ValueError, match="at least 11x11"):
        METRICS["ssim"](a[:, :10, :], a[:, :10, :])
    with pytest.raises(ValueError, match="at least 48x48"):
        METRICS["hog"](a[:, :47], a[:, :47])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        NORMALIZATIONS["absolute"](a)


# --------------------------------------------------------------------------- references
def sk_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> np.ndarray:
    return np.array([
        structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=data_range)
        for x, y in zip(a.double().numpy(), b.double().numpy())
    ])


def sk_hog_features(maps: torch.Tensor, orientations=9, ppc=16, cpb=3) -> np.ndarray:
    return np.stack([
        sk_hog(x, orientations=orientations, pixels_per_cell=(ppc, ppc),
               cells_per_block=(cpb, cpb), block_norm="L2-Hys", feature_vector=True)
        for x in maps.numpy()
    ])


def scipy_rows(fn, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([fn(x.ravel(), y.ravel()).statistic
                     for x, y in zip(a.double().numpy(), b.double().numpy())])


def pairs():
    """(label, a, b, data_range) on which every metric is compared with its reference."""
    out = []
    for norm in NORMALIZATIONS:
        out.append((f"{norm} 48x64", *normalized_pair(norm, *SHAPE, seed=1), DATA_RANGE[norm]))
        out.append((f"{norm} 224", *normalized_pair(norm, 2, 224, 224, seed=2), DATA_RANGE[norm]))
        out.append((f"{norm} 53x70 f32",
                    *normalized_pair(norm, 2, 53, 70, seed=3, dtype=torch.float32),
                    DATA_RANGE[norm]))
    out.append(("uniform 50x49", *uniform_pair(3, 50, 49, seed=4), 1.0))
    out.append(("ties 48x64", *tie_pair(3, 48, 64, seed=5), 1.0))
    out.append(("bright flat 48x64", *bright_pair(3, 48, 64, seed=6), 1.0))
    return out


PAIRS = pairs()
IDS = [p[0] for p in PAIRS]


@pytest.mark.parametrize("label,a,b,data_range", PAIRS, ids=IDS)
def test_ssim_equals_skimage(label, a, b, data_range):
    ours = METRICS["ssim"](a, b, data_range=data_range).numpy()
    np.testing.assert_allclose(ours, sk_ssim(a, b, data_range), atol=TOL, rtol=0)


def test_ssim_smallest_map_equals_skimage():
    a, b = uniform_pair(2, 11, 13, seed=6)
    np.testing.assert_allclose(METRICS["ssim"](a, b).numpy(), sk_ssim(a, b, 1.0),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("label,a,b,data_range", PAIRS, ids=IDS)
def test_spearman_equals_scipy(label, a, b, data_range):
    ref = scipy_rows(scipy.stats.spearmanr, a, b)
    for name in ("spearman", "spearman_abs"):
        np.testing.assert_allclose(METRICS[name](a, b).numpy(), ref, atol=TOL, rtol=0)


def test_average_ranks_equal_rankdata_with_ties():
    g = gen(7)
    x = torch.randint(0, 5, (4, 500), generator=g).float()
    x[1] = torch.rand(500, generator=g)
    x[2, :250] = 0.0
    x[2, 100] = -0.0  # equal to 0.0, must share its rank
    x[3] = torch.randn(500, generator=g)
    x[3, ::5] = x[3, 1::5]  # negative and positive ties
    ref = scipy.stats.rankdata(x.numpy(), axis=1)
    # float32 (packed sort), float64 holding float32 values (the same), float64 (argsort)
    np.testing.assert_array_equal(average_ranks(x).numpy(), ref)
    np.testing.assert_array_equal(average_ranks(x.double()).numpy(), ref)
    y = x.double() + 1e-12 * torch.rand(4, 500, generator=g, dtype=torch.float64)
    y[:, 1:491:7] = y[:, 4:494:7]  # ties between values that float32 could not hold
    np.testing.assert_array_equal(average_ranks(y).numpy(),
                                  scipy.stats.rankdata(y.numpy(), axis=1))


def test_average_ranks_inf_and_nan_rows():
    x = torch.rand(3, 300, generator=gen(8))
    x[0, 3], x[0, 4], x[0, 5] = float("inf"), -float("inf"), float("inf")
    x[1, 7] = float("nan")
    ranks = average_ranks(x).numpy()
    np.testing.assert_array_equal(ranks[[0, 2]], scipy.stats.rankdata(x[[0, 2]].numpy(), axis=1))
    assert np.isnan(ranks[1]).all()  # as scipy's rankdata: a NaN row has no ranking


def test_average_ranks_with_flush_denormal():
    """The runner flushes denormals to zero; the sort keys of zeros must survive it."""
    x = torch.rand(3, 3000, generator=gen(10)) - 0.5
    x[:, ::3] = 0.0
    x[1, ::7] = -0.0
    ref = scipy.stats.rankdata(x.numpy(), axis=1)
    try:
        torch.set_flush_denormal(True)
        ranks = average_ranks(x).numpy()
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(ranks, ref)


def test_rank_sort_paths_agree():
    """The packed float32 sort and the float64 argsort give the same centered ranks."""
    x = (torch.randn(3, 2000, generator=gen(9)) * 4).round() / 4  # many ties, both signs
    x[1, :100] = -0.0
    x32 = x.numpy()
    for fast, slow in zip(similarity_mod._centered_ranks(x32),
                          similarity_mod._centered_ranks(x32.astype(np.float64))):
        np.testing.assert_array_equal(fast, slow)
    d, sq = similarity_mod._centered_ranks(x32)  # the sums of squares from the ties alone
    np.testing.assert_array_equal(sq, (d.astype(np.float64) ** 2).sum(axis=1))


@pytest.mark.parametrize("label,a,b,data_range", PAIRS, ids=IDS)
def test_pearson_equals_scipy(label, a, b, data_range):
    ref = scipy_rows(scipy.stats.pearsonr, a, b)
    np.testing.assert_allclose(METRICS["pearson"](a, b).numpy(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("label,a,b,data_range", PAIRS, ids=IDS)
def test_hog_features_and_similarity_equal_skimage(label, a, b, data_range):
    fa, fb = sk_hog_features(a), sk_hog_features(b)
    np.testing.assert_allclose(hog_features(a).numpy(), fa, atol=TOL, rtol=0)
    ref = np.array([scipy.stats.pearsonr(x, y).statistic for x, y in zip(fa, fb)])
    np.testing.assert_allclose(METRICS["hog"](a, b).numpy(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("h,w,ppc,cpb,orientations", [
    (40, 52, 8, 3, 9),    # not a multiple of the cell: skimage ignores the remainder
    (70, 83, 16, 3, 9),
    (45, 50, 7, 2, 9),    # odd cells
    (48, 64, 8, 2, 4),    # bin edges at 45, 90, 135 degrees: exact plateau angles
    (48, 64, 8, 1, 6),
    (48, 48, 16, 3, 7),   # 180/7 is inexact: edges are rounded doubles
])
def test_hog_features_layouts_and_bin_edges(h, w, ppc, cpb, orientations):
    for maps in (*tie_pair(3, h, w, seed=8), normalized_pair("absolute", 2, h, w, seed=9)[0],
                 normalized_pair("signed", 2, h, w, seed=10)[0]):
        ours = hog_features(maps, orientations, ppc, cpb).numpy()
        ref = sk_hog_features(maps, orientations, ppc, cpb)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_hog_angles_that_round_to_180_degrees():
    """A gradient a hair below 0 degrees gives angle % 180 == 180.0, which skimage counts in no
    bin; a hair around 180 degrees gives 0 (bin 0). Columns: 0, tiny ramp, +-1, repeated."""
    g = gen(11)
    maps = torch.zeros(2, 48, 48, dtype=torch.float64)
    ramp = 1e-30 * torch.arange(48, dtype=torch.float64)[:, None]
    maps[:, :, 1::3] = torch.where(torch.rand(2, 1, 16, generator=g) < 0.5, ramp, -ramp)
    maps[:, :, 2::3] = torch.where(torch.rand(2, 48, 16, generator=g) < 0.5, 1.0, -1.0)
    np.testing.assert_allclose(hog_features(maps).numpy(), sk_hog_features(maps),
                               atol=TOL, rtol=0)


def test_hog_features_nan_row():
    a, _ = normalized_pair("absolute", *SHAPE)
    clean = hog_features(a)
    a[1, 10, 10] = float("nan")
    feats = hog_features(a)
    assert torch.isnan(feats[1]).all() and torch.equal(feats[[0, 2, 3]], clean[[0, 2, 3]])


# --------------------------------------------------------------------------- threads and cache
CACHED = ("spearman", "spearman_abs", "hog")  # metrics that memoize pieces of ``b``


@pytest.mark.parametrize("name", sorted(METRICS))
def test_threads_give_identical_scores(name, monkeypatch):
    """Slices of rows on the thread pool give the same bits as in the calling thread."""
    a, b = normalized_pair("absolute", 6, 48, 64, seed=20, dtype=torch.float32)
    monkeypatch.setattr(similarity_mod, "CHUNK_PIXELS", 2 * 48 * 64)  # three slices
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = METRICS[name](a, b)
        similarity_mod.clear_cache()
        torch.set_num_threads(2)
        pooled = METRICS[name](a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial.isnan(), pooled.isnan())
    assert torch.equal(serial.nan_to_num(), pooled.nan_to_num())


def test_threads_keep_their_setting():
    """Pool workers run torch single-threaded, and the caller's setting is what it was."""
    threads = torch.get_num_threads()
    pool = parallel_mod._pool()
    assert torch.get_num_threads() == threads
    assert set(pool.map(lambda _: torch.get_num_threads(), range(8))) == {1}
    a, b = normalized_pair("absolute", 2, 48, 64, seed=25)
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(similarity_mod, "_ssim_rows",
                      lambda *x, _f=similarity_mod._ssim_rows, **k:
                      seen.append(torch.get_num_threads()) or _f(*x, **k))
        METRICS["ssim"](a, b)
    assert seen and set(seen) == {1}  # slices run single-threaded on the driver, too
    assert torch.get_num_threads() == threads


def test_caller_thread_count_is_never_toggled(monkeypatch):
    """Metrics and normalizations never call ``torch.set_num_threads`` on the caller's thread:
    toggling it costs the model's next forward+backward about 100 ms (see metrics.parallel)."""
    import threading

    parallel_mod._pool(), parallel_mod._driver()  # pools built (their one-time setting done)
    caller = threading.get_ident()
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda n: calls.append(threading.get_ident()) or real(n))
    a, b = normalized_pair("absolute", 4, 48, 64, seed=26)
    raw = torch.randn(4, 3, 48, 64)
    for fn in (NORMALIZATIONS["absolute"], NORMALIZATIONS["signed"]):
        fn(raw)
    for name in sorted(METRICS):
        METRICS[name](a, b)
    assert caller not in calls


@pytest.mark.parametrize("name", CACHED)
def test_reference_cache_is_transparent(name, monkeypatch):
    a, b = normalized_pair("absolute", 3, 48, 64, seed=21, dtype=torch.float32)
    a2, _ = normalized_pair("absolute", 3, 48, 64, seed=22, dtype=torch.float32)
    similarity_mod.clear_cache()
    first = METRICS[name](a, b)
    calls = {"_centered_ranks": 0, "_hog_numpy": 0}  # pieces computed from now on

    def counting(fn_name):
        orig = getattr(similarity_mod, fn_name)

        def wrapper(*args, **kw):
            calls[fn_name] += 1
            return orig(*args, **kw)
        return wrapper

    for fn_name in calls:
        monkeypatch.setattr(similarity_mod, fn_name, counting(fn_name))
    again = METRICS[name](a, b)
    other = METRICS[name](a2, b)  # another first map, the same reference
    # b's ranks and descriptors come from the cache; hog still describes a and a2
    assert calls == {"_centered_ranks": 0, "_hog_numpy": 2 if name == "hog" else 0}
    assert torch.equal(again, first)
    monkeypatch.undo()
    similarity_mod.clear_cache()
    assert torch.equal(METRICS[name](a2, b.clone()), other)  # the same bits without the cache


@pytest.mark.parametrize("name", sorted(METRICS))
def test_reference_cache_sees_in_place_changes(name):
    a, b = normalized_pair("absolute", 3, 48, 64, seed=23, dtype=torch.float32)
    before = METRICS[name](a, b)
    b[1] = b[1].flip(0)  # in place: the memoized ranks / descriptors of b are stale
    after = METRICS[name](a, b)
    assert torch.equal(after, METRICS[name](a, b.clone()))
    assert not torch.equal(after[1], before[1]) and torch.equal(after[[0, 2]], before[[0, 2]])
    b.view(-1)[2 * 48 * 64:] = 0.5  # through another view: the NaN/constant flags are stale
    last = METRICS[name](a, b)
    assert torch.isnan(last[2]) and torch.equal(last[:2], after[:2])


def test_reference_cache_is_weak_and_skips_inference_tensors():
    a, b = normalized_pair("absolute", 2, 48, 64, seed=24, dtype=torch.float32)
    similarity_mod.clear_cache()
    METRICS["spearman"](a, b)
    assert b in similarity_mod._PIECES and a in similarity_mod._PIECES  # a: NaN/constant flags
    del b
    gc.collect()
    assert len(similarity_mod._PIECES) == 1  # b's pieces went with b
    with torch.inference_mode():  # no version counter: computed every time, never stored
        c = a.flip(1)
        score = METRICS["spearman"](a, c)
    assert len(similarity_mod._PIECES) == 1
    assert torch.equal(score, METRICS["spearman"](a, c.clone()))


# --------------------------------------------------------------------------- normalizations
def np_absolute(m: np.ndarray) -> np.ndarray:
    s = np.abs(m).sum(axis=0)
    vmin, vmax = s.min(), np.percentile(s, 99)
    return np.clip((s - vmin) / (vmax - vmin), 0, 1)


def np_signed(m: np.ndarray) -> np.ndarray:
    s = m.sum(axis=0)
    return np.clip(s / np.percentile(np.abs(s), 99), -1, 1)


NP_REF = {"absolute": np_absolute, "signed": np_signed}


def test_normalizations_registered():
    assert sorted(NORMALIZATIONS) == ["absolute", "signed"]


@pytest.mark.parametrize("norm", sorted(NP_REF))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalization_equals_numpy(norm, dtype):
    for shape in [(3, 3, 37, 41), (2, 3, 224, 224), (2, 1, 20, 20)]:
        m = (torch.randn(*shape, generator=gen(12), dtype=torch.float64) ** 3).to(dtype)
        before = m.clone()
        out = NORMALIZATIONS[norm](m)
        assert torch.equal(m, before)  # the input is left alone
        assert out.shape == (shape[0], *shape[2:]) and out.dtype == dtype
        ref = np.stack([NP_REF[norm](x) for x in m.double().numpy()])
        np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", sorted(NP_REF))
def test_normalization_is_per_sample(norm, monkeypatch):
    m = torch.randn(4, 3, 30, 30, generator=gen(13), dtype=torch.float64)
    out = NORMALIZATIONS[norm](m)
    m2 = m.clone()
    m2[0] *= 1000.0
    m2[2] = torch.randn(3, 30, 30, generator=gen(14), dtype=torch.float64)
    out2 = NORMALIZATIONS[norm](m2)
    assert torch.equal(out2[[1, 3]], out[[1, 3]])
    assert torch.allclose(out2[0], out[0], atol=1e-12, rtol=0)  # scale-free within a sample
    monkeypatch.setattr(normalize_mod, "CHUNK_PIXELS", 1)  # one sample per slice
    assert torch.equal(NORMALIZATIONS[norm](m), out)


@pytest.mark.parametrize("norm", sorted(NP_REF))
def test_constant_map_normalizes_to_nan(norm):
    m = torch.randn(4, 3, 16, 16, generator=gen(15))
    m[1] = 0.0
    m[2] = 2.5
    m[3, :, 4, 4] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = NORMALIZATIONS[norm](m)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1:]).all()


def test_is_constant():
    m = torch.randn(4, 3, 8, 8, generator=gen(16))
    m[1] = 0.0
    m[2] = -1.5
    m[3, 0, 0, 0] = float("nan")
    assert is_constant(m).tolist() == [False, True, True, False]


def test_percentile_equals_numpy():
    g = gen(17)
    for n in (1, 2, 7, 100, 101, 1000, 50176):
        x = torch.randn(3, n, generator=g, dtype=torch.float64)
        for q in (0.0, 37.5, 50.0, 99.0, 100.0):
            np.testing.assert_allclose(percentile(x, q).numpy(),
                                       np.percentile(x.numpy(), q, axis=1), rtol=0, atol=1e-12)
