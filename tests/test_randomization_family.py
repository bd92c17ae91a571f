"""The randomization family after 2018 (issue #13): ``smooth_mprt`` and the smoothing option,
``efficient_mprt`` and ``random_logit`` (Hedström et al. 2024, arXiv 2401.06465; Sixt et al.
2020, arXiv 1912.09818). Equal to Quantus 0.6 where Quantus computes the same quantity: the
histogram entropy of the same maps, the off-class similarity with the same off class."""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from checks import CHECKS
from checks.random_logit import off_classes
from checks.smoothing import Smoothing, SmoothedMethod, noisy_copies
from harness.base.randomize import ordered, randomize_, restored, stage_seed, stages
from methods import METHODS
from metrics import METRICS, NORMALIZATIONS
from metrics.complexity import equal_width_bins, histogram_entropy, output_entropy
from tests.test_checks import make_ctx, rows_of

pytestmark = pytest.mark.usefixtures("one_thread")

# Two float64 code paths that group the same rows differently (chunks, a stacked batch of
# copies vs one call per copy) differ by reordered sums: <= ~100 ulps of 2.2e-16 relative to
# the map's scale (tests/test_methods.py); the mean over N copies adds N roundings. 1e4 ulps
# leaves two orders of magnitude, and a wrong copy or noise moves the map by O(1).
FLOAT64_ATOL = 1e4 * torch.finfo(torch.float64).eps
# scipy.stats.entropy and ours sum the same 100 float64 terms p log p (|p log p| <= 1/e) in
# another order: each rounding <= 2^-53 of a partial sum <= log(100) = 4.6.
ENTROPY_ATOL = 100 * 4.61 * 2.0 ** -53 * 10


@pytest.fixture
def model():
    from harness.zoo import MODELS

    return MODELS["tiny_cnn"](in_chans=1)


def frame(items) -> pd.DataFrame:
    return pd.DataFrame(rows_of(items))


# --------------------------------------------------------------------------- smoothing


def test_smoothing_with_one_copy_is_the_plain_check(model):
    """n = 1 (the clean copy alone) gives the very rows of the plain cascade."""
    plain = frame(CHECKS["cascading"](make_ctx(model)))
    one = frame(CHECKS["cascading"](make_ctx(model), smooth={"n": 1, "noise_magnitude": 0.1}))
    pd.testing.assert_frame_equal(one, plain)
    x = make_ctx(model).data.inputs
    target = torch.zeros(len(x), dtype=torch.long)
    wrapped = SmoothedMethod(METHODS["gradient"], Smoothing(1, 0.1), seed=0)
    assert torch.equal(wrapped(model, x, target), METHODS["gradient"](model, x, target))


@pytest.mark.parametrize("check", ["cascading", "independent"])
def test_smoothing_option_keeps_stage0_at_one(model, check):
    """The same noise for the original model and every stage: stage 0 scores 1."""
    rows = frame(CHECKS[check](make_ctx(model), smooth={"n": 6, "noise_magnitude": 0.2}))
    stage0 = rows[rows.stage_index == 0]
    assert np.allclose(stage0.value, 1.0, atol=1e-6, rtol=0)
    assert (rows.smooth_n == 6).all() and (rows.smooth_noise == 0.2).all()
    plain = frame(CHECKS[check](make_ctx(model)))
    later = rows.stage_index > 0  # the smoothing changes the maps of randomized models
    assert not np.allclose(rows[later].value, plain[plain.stage_index > 0].value)


def test_smooth_mprt_is_the_bottom_up_cascade_with_50_copies(model):
    rows = frame(CHECKS["smooth_mprt"](make_ctx(model, methods=("gradient",), n=2)))
    assert set(rows.check) == {"smooth_mprt"} and set(rows.order) == {"bottom_up"}
    assert set(rows.smooth_n) == {50} and set(rows.smooth_noise) == {0.1}
    assert list(rows.drop_duplicates("stage_index").stage) == ["original", "conv1", "conv2",
                                                               "fc"]


def test_smoothed_map_is_the_mean_of_a_hand_loop(model):
    """One call on B * N stacked copies equals N calls, one per copy, averaged (float64)."""
    model = model.double()
    x = make_ctx(model, n=3).data.inputs.double()
    target = torch.tensor([0, 3, 4])
    smoothing = Smoothing(5, 0.1)
    copies = noisy_copies(x, smoothing, seed=4).view(3, 5, *x.shape[1:])
    assert torch.equal(copies[:, 0], x)  # one copy is the clean input
    loop = sum(METHODS["gradient"](model, copies[:, k], target) for k in range(5)) / 5
    ours = SmoothedMethod(partial(METHODS["gradient"], internal_batch_size=4), smoothing, 4)
    out = ours(model, x, target)
    scale = loop.abs().max()
    torch.testing.assert_close(out / scale, loop / scale, atol=FLOAT64_ATOL, rtol=0)
    chunked = SmoothedMethod(partial(METHODS["gradient"], internal_batch_size=1), smoothing, 4)
    torch.testing.assert_close(chunked(model, x, target) / scale, out / scale,
                               atol=FLOAT64_ATOL, rtol=0)


def test_noise_belongs_to_the_input_not_the_batch(model):
    """A sample's noise is the same alone or in a batch, and its std is magnitude * range."""
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    smoothing = Smoothing(30, 0.1)
    batch = noisy_copies(x, smoothing, seed=1).view(3, 30, 3, 40, 40)
    assert torch.equal(batch[1], noisy_copies(x[1:2], smoothing, seed=1))
    assert not torch.equal(batch[1], noisy_copies(x[1:2], smoothing, seed=2))
    noise = (batch[:, 1:] - x[:, None]).flatten(1)  # 29 * 4800 draws per sample
    sigma = 0.1 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    # the sample std of 139200 normal draws is within 1 % of sigma (~26 standard errors)
    torch.testing.assert_close(noise.std(dim=1), sigma, rtol=0.01, atol=0)


@pytest.mark.parametrize("smooth,message", [({"n": -1}, "check.smooth.n"),
                                            ({"samples": 3}, "unknown key samples"),
                                            ({"noise_magnitude": -0.1}, "noise_magnitude")])
def test_bad_smoothing_settings_fail_in_one_line(model, smooth, message):
    with pytest.raises(ValueError, match=message):
        rows_of(CHECKS["cascading"](make_ctx(model), smooth=smooth))


# --------------------------------------------------------------------------- efficient MPRT


def test_histogram_equals_numpy_bin_for_bin():
    """Values on bin edges, ties, float32 and float64, a constant row: np.histogram's counts."""
    g = np.random.default_rng(0)
    rows = [g.normal(size=500), g.integers(-50, 50, 500), np.round(g.normal(size=500), 1) ** 3,
            np.full(500, 2.5)]
    for dtype in (np.float32, np.float64):
        values = np.stack(rows).astype(dtype)
        expected = np.stack([np.histogram(r, bins=100)[0] for r in values])
        assert np.array_equal(equal_width_bins(torch.from_numpy(values), 100).numpy(), expected)


def test_entropy_equals_quantus_discrete_entropy(model):
    """Quantus 0.6's discrete_entropy (the complexity of its EfficientMPRT) on the same maps."""
    from quantus.functions.complexity_func import discrete_entropy, entropy

    ctx = make_ctx(model, n=6)
    x, target = ctx.data.inputs, torch.arange(6) % 5
    maps = METHODS["gradient"](model, x, target).sum(1)  # (B, H, W), Quantus's channel sum
    ours = histogram_entropy(maps).numpy()
    theirs = [discrete_entropy(a=m, x=m, n_bins=100) for m in maps.numpy()]
    np.testing.assert_allclose(ours, theirs, atol=ENTROPY_ATOL, rtol=0)
    logits = model(x).detach()
    probs = torch.softmax(logits.double(), 1).numpy()
    np.testing.assert_allclose(output_entropy(logits).numpy(),
                               [entropy(a=p, x=p) for p in probs], atol=ENTROPY_ATOL, rtol=0)


def test_efficient_mprt_rise_equals_quantus_on_the_same_maps(model):
    """The check's rows: (H(e_rand) - H(e)) / H(e) with Quantus's entropy of e (the original
    model) and e_rand (every stage randomized bottom-up with the cascade's seeds)."""
    from quantus.functions.complexity_func import discrete_entropy

    ctx = make_ctx(model, methods=("gradient",), n=4)
    rows = frame(CHECKS["efficient_mprt"](ctx))
    x = ctx.data.inputs
    target = model(x).argmax(1)
    e = METHODS["gradient"](model, x, target).sum(1).numpy()
    with restored(model):
        for name, modules in ordered(stages(model, x, "block"), "bottom_up"):
            randomize_(modules, "default", stage_seed(0, name))
        e_rand = METHODS["gradient"](model, x, target).sum(1).numpy()
    h = np.array([discrete_entropy(a=m, x=m) for m in e])
    h_rand = np.array([discrete_entropy(a=m, x=m) for m in e_rand])
    rise = rows[rows.metric == "complexity_rise"].sort_values("sample")
    np.testing.assert_allclose(rise.value, (h_rand - h) / h, atol=1e-9, rtol=0)
    assert set(rows.metric) == {"map_entropy", "output_entropy", "complexity_rise",
                                "output_entropy_rise"}
    assert (rows["sample"] >= 0).all()  # per-sample rows only


def test_efficient_mprt_controls_and_constant_maps(model):
    ctx = make_ctx(model, methods=("sobel", "random_uniform"))
    ctx.methods["zeros"] = lambda m, x, t: torch.zeros_like(x)
    rows = frame(CHECKS["efficient_mprt"](ctx))
    rise = rows[rows.metric == "complexity_rise"]
    assert (rise[rise.method == "sobel"].value == 0).all()  # the same map: exactly 0
    # two independent uniform maps of 1024 pixels: plug-in entropies over 100 bins within
    # ~0.01 of each other (standard error ~0.007 of log(100) = 4.6): the rise is ~0.002
    assert rise[rise.method == "random_uniform"].value.abs().max() < 0.05
    zeros = rise[rise.method == "zeros"]
    assert zeros.value.isna().all() and (zeros.reason == "zero map entropy (constant map)").all()


# --------------------------------------------------------------------------- random logit


def test_off_class_uniform_over_the_other_classes_and_seeded_per_sample():
    samples = torch.arange(4000)
    target = samples % 10
    off = off_classes(target, samples, 10, seed=3)
    assert not (off == target).any() and off.min() >= 0 and off.max() <= 9
    # each (target, off) pair is drawn 4000 / 90 = 44.4 times on average; chi-square test
    pairs = np.bincount((target * 10 + off).numpy(), minlength=100).reshape(10, 10)
    observed = pairs[~np.eye(10, dtype=bool)]
    assert scipy.stats.chisquare(observed).pvalue > 1e-4
    assert torch.equal(off[7:9], off_classes(target[7:9], samples[7:9], 10, seed=3))
    assert not torch.equal(off, off_classes(target, samples, 10, seed=4))


def test_random_logit_equals_quantus_with_the_same_off_class(model, monkeypatch):
    """Quantus 0.6's RandomLogit with its correct batched Spearman on our signed-normalized
    maps equals our ``spearman`` rows when the check draws Quantus's off classes."""
    import quantus
    import checks.random_logit

    ctx = make_ctx(model, methods=("gradient",), n=5)
    x = ctx.data.inputs
    y = model(x).argmax(1)
    k = model(x).shape[1]
    # Quantus's draw (RandomLogit.evaluate_batch): np.random.seed(seed), one index per sample
    np.random.seed(42)
    index = np.random.randint(0, k - 1, len(x))
    y_off = np.array([[c for c in range(k) if c != t][i] for t, i in zip(y.tolist(), index)])
    monkeypatch.setattr(checks.random_logit, "off_classes",
                        lambda *_: torch.as_tensor(y_off))
    rows = frame(CHECKS["random_logit"](ctx))

    def explain(model, inputs, targets, **_):
        raw = METHODS["gradient"](model, torch.as_tensor(inputs), torch.as_tensor(targets))
        return NORMALIZATIONS["signed"](raw)[:, None].numpy()

    metric = quantus.RandomLogit(num_classes=k, seed=42, abs=False, normalise=False,
                                 similarity_func=quantus.similarity_func.correlation_spearman,
                                 disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                    explain_func=explain, device="cpu")
    ours = rows[(rows.stage_index == 1) & (rows.metric == "spearman")].sort_values("sample")
    assert list(ours.off_class) == list(y_off)
    # the same ranks of the same maps (ties averaged alike); the correlation of the ranks is
    # summed in another order in float64: ~1e-16 per term, far below 1e-12
    np.testing.assert_allclose(ours.value, theirs, atol=1e-12, rtol=0)


def test_random_logit_rows_and_controls(model):
    rows = frame(CHECKS["random_logit"](make_ctx(model, methods=("gradient", "sobel",
                                                                 "random_uniform"))))
    assert list(rows.drop_duplicates("stage_index").stage) == ["explained_class", "off_class"]
    assert (rows[rows.stage_index == 0].off_class == -1).all()
    off = rows[rows.stage_index == 1]
    assert (off.off_class != off.target).all() and (off.off_class >= 0).all()
    assert len(rows) == 2 * 3 * 4 * len(METRICS)  # stages x methods x samples x metrics
    assert (off[off.method == "sobel"].value == 1).all()  # class-blind: 1 by construction
    # independent uniform maps of 1024 pixels: each correlation ~N(0, 1/32^2), the mean of 4
    # ~N(0, 0.016^2); 0.1 is 6 standard deviations (HOG is not centred at 0 for noise)
    noise = off[(off.method == "random_uniform") & off.metric.isin(
        ["ssim", "spearman", "spearman_abs", "pearson"])]
    assert noise.groupby("metric").value.mean().abs().max() < 0.1
    gradient = off[(off.method == "gradient") & (off.metric == "spearman_abs")]
    assert gradient.value.mean() < 0.99  # the gradient depends on the class
