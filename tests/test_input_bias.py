"""Input-bias probes (Brocki & Chung 2020, arXiv 2011.05002; Kindermans et al. 2017, arXiv
1711.00867): exact first-layer compensation, the probes' rows, the dark_object generator, and
that the caller's model is never changed."""
import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from checks import CHECKS
from checks.compensation import compensated, first_layer
from checks.input_bias import (
    CompensationError,
    dark_mass_ratio,
    encoding_change,
    mass_in_object,
)
from harness.base.context import CheckContext, MapRecord, MetricSpec
from harness.base.meta import model_meta
from harness.base.randomize import snapshot
from harness.data import DATASETS
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS

METRIC_NORMALIZATION = {"ssim": "absolute", "spearman": "signed", "spearman_abs": "absolute",
                        "hog": "absolute", "pearson": "signed"}
METRIC_KWARGS = {"hog": {"pixels_per_cell": 8}}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_ctx(model, methods=("gradient", "gradient_x_input"), n=3, dataset="digits",
             **kw) -> CheckContext:
    data = DATASETS[dataset](n=n, data_config=model_meta(model).data_config)
    return CheckContext(
        model=model, data=data, methods={m: partial(METHODS[m], seed=0) for m in methods},
        metrics=[MetricSpec(name, partial(METRICS[name], **METRIC_KWARGS.get(name, {})),
                            METRIC_NORMALIZATION.get(name, "absolute"))
                 for name in sorted(METRICS)],
        progress=False, **kw)


def rows_of(items) -> pd.DataFrame:
    return pd.DataFrame([item for item in items if isinstance(item, dict)])


def unchanged(model, before) -> bool:
    state = model.state_dict()
    no_hooks = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    return set(state) == set(before) and no_hooks and all(
        torch.equal(v, state[k]) for k, v in before.items())


class NoBias(nn.Module):
    """A first conv without bias (as in ResNets), grouped, followed by a dense layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, groups=2, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


# --------------------------------------------------------------------------- compensation


def _encodings(channels: int):
    g = torch.Generator().manual_seed(1)
    yield torch.ones(channels), torch.full((channels,), 0.5)  # shift +0.5
    yield torch.ones(channels), torch.full((channels,), -0.25)
    yield 0.5 + torch.rand(channels, generator=g), torch.randn(channels, generator=g)  # scale


@pytest.mark.parametrize("build,shape", [
    (lambda: MODELS["tiny_cnn"](in_chans=3), (3, 16, 16)),       # zero-padded conv
    (lambda: MODELS["mlp"](hidden=[20], input_size=8), (1, 8, 8)),  # flatten, then dense
    (NoBias, (4, 9, 9)),                                         # no bias, grouped, stride 2
])
def test_compensation_is_exact_and_restores(build, shape):
    model = build().eval()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = snapshot(model)
    with torch.no_grad():
        reference = model(x)
    for alpha, beta in _encodings(shape[0]):
        encoded = alpha.view(1, -1, 1, 1) * x + beta.view(1, -1, 1, 1)
        with compensated(model, alpha, beta, x[:1]) as done, torch.no_grad():
            out = model(encoded)
            uncompensated_layer = done.layer
        assert (out - reference).abs().max() < 1e-5
        assert unchanged(model, before)
        with torch.no_grad():  # without the compensation the encoding does change the logits
            assert (model(encoded) - reference).abs().max() > 1e-3
    assert uncompensated_layer == first_layer(model, x[:1])[0]


def test_border_correction_is_needed_for_zero_padding_only():
    conv = MODELS["tiny_cnn"](in_chans=3)
    dense = MODELS["mlp"](hidden=[20], input_size=8)
    with compensated(conv, torch.ones(3), torch.full((3,), 0.5), torch.rand(1, 3, 16, 16)) as c:
        assert c.border > 1e-2 and c.layer == "conv1" and not c.added_bias
    with compensated(dense, torch.ones(1), torch.full((1,), 0.5), torch.rand(1, 1, 8, 8)) as d:
        assert d.border < 1e-5 and d.layer == "fc1"


def test_model_restored_after_an_exception_inside():
    model = NoBias()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with compensated(model, torch.full((4,), 2.0), torch.ones(4), torch.rand(1, 4, 9, 9)):
            assert model.conv.bias is not None  # a bias added for the time being
            raise RuntimeError("boom")
    assert model.conv.bias is None and unchanged(model, before)


@pytest.mark.parametrize("build", [
    lambda: MODELS["efficientnet_lite0"](),
    lambda: MODELS["timm"](name="resnet18", pretrained=False),
], ids=["efficientnet_lite0", "resnet18"])
def test_real_models_logits_unchanged(build):
    model = build()
    before = snapshot(model)
    data = DATASETS["imagenet_samples"](n=2, data_config=model_meta(model).data_config)
    x = data.inputs
    with torch.no_grad():
        reference = model(x)
    changes = [(torch.ones(3), torch.full((3,), d)) for d in (-0.5, 0.5)]
    changes += [encoding_change(data.mean, data.std, e, 3) for e in ("unit", "imagenet")]
    for alpha, beta in changes:
        with compensated(model, alpha, beta, x[:1]) as done, torch.no_grad():
            out = model(alpha.view(1, -1, 1, 1) * x + beta.view(1, -1, 1, 1))
        assert (out - reference).abs().max() < 1e-4, done
        assert done.added_bias  # both first convs have no bias (BatchNorm follows)
    assert unchanged(model, before)


def test_border_correction_follows_a_batchnorm_merge():
    """LRP canonizers merge the BatchNorm after the first conv into it for their call: the
    compensated model still computes the original logits then."""
    from zennit.composites import EpsilonPlus

    from methods.lrp_zennit import canonizers_for, registered

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
    alpha, beta = torch.full((3,), 2.0), torch.full((3,), -1.0)
    with compensated(model, alpha, beta, x[:1]):
        with registered(EpsilonPlus(canonizers=canonizers_for(model, x)), model), \
                torch.no_grad():
            merged = model(2 * x - 1)
            assert model[1].eps == 0.0  # the merge happened
    assert (merged - reference).abs().max() < 1e-5


def test_first_layer_must_read_the_input():
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(ValueError, match="BatchNorm2d"):
        first_layer(model, torch.rand(1, 1, 8, 8))


# --------------------------------------------------------------------------- the probes


@pytest.fixture(scope="module")
def probe_rows():
    model = MODELS["tiny_cnn"](in_chans=1, num_classes=10)
    before = snapshot(model)
    ctx = make_ctx(model, n=3, n_maps=2)
    items = list(CHECKS["input_bias"](ctx, deltas=[-0.5, 0.25]))
    assert unchanged(model, before)
    return rows_of(items), [i for i in items if isinstance(i, MapRecord)]


def test_probe_stages_and_rows(probe_rows):
    rows, records = probe_rows
    # digits for tiny_cnn: mean 0, std 1, so the [0,1] encoding is the model's own (stage 0)
    stages = ["original", "shift=-0.5", "shift=+0.25", "scale=[-1,1]", "scale=imagenet"]
    assert list(dict.fromkeys(rows.sort_values("stage_index", kind="stable")["stage"])) == stages
    similarity = rows[rows.metric.isin(list(METRICS))]
    assert len(similarity) == 4 * 2 * 3 * len(METRICS)  # stages x methods x samples x metrics
    intensity = rows[rows.normalization == "mass"]
    assert set(intensity.metric) == {"intensity_correlation", "zero_point_correlation",
                                     "dark_mass_ratio"}  # digits have no object masks
    assert len(intensity) == 5 * 2 * 3 * 3
    logit = rows[rows.metric == "max_logit_change"]
    assert len(logit) == 4 and (logit.value <= 1e-4).all() and (logit["sample"] == -1).all()
    assert (logit.first_layer == "conv1").all() and (logit.border_correction > 0).all()
    assert not rows[["check", "stage", "metric", "method"]].isna().any().any()
    assert rows.loc[rows.probe == "shift", "delta"].notna().all()
    assert len(records) == 5 * 2 and all(r.maps["absolute"].shape == (2, 32, 32)
                                         for r in records)


def test_gradient_is_invariant_and_gradient_x_input_is_not(probe_rows):
    rows, _ = probe_rows
    shifted = rows[rows.stage.str.startswith("shift=") & rows.metric.isin(list(METRICS))]
    gradient = shifted[shifted.method == "gradient"]
    assert gradient.value.min() >= 0.99  # every metric, every sample, every shift
    times_input = shifted[shifted.method == "gradient_x_input"]
    assert times_input.value.mean() < 0.9


def test_tolerance_fails_loudly_and_model_restored():
    model = MODELS["tiny_cnn"](in_chans=1)
    before = snapshot(model)
    with pytest.raises(CompensationError, match="tolerance"):
        list(CHECKS["input_bias"](make_ctx(model, methods=("gradient",), n=2),
                                  probes=["shift"], deltas=[0.5], tolerance=-1.0))
    assert unchanged(model, before)


def test_model_restored_when_closed_between_stages():
    """Closing the check mid-way (a consumer that stops) leaves the model as it was; each
    stage's compensation is undone before its rows are handed out."""
    model = MODELS["tiny_cnn"](in_chans=1)
    before = snapshot(model)
    items = CHECKS["input_bias"](make_ctx(model, methods=("gradient",), n=2), probes=["shift"])
    for item in items:
        if isinstance(item, dict) and item["metric"] == "max_logit_change":
            assert unchanged(model, before)  # the stage is done: compensation undone
            break
    items.close()
    assert unchanged(model, before)


def test_unknown_probe_fails_in_one_line():
    model = MODELS["tiny_cnn"](in_chans=1)
    with pytest.raises(ValueError, match="valid: shift, scale, intensity"):
        list(CHECKS["input_bias"](make_ctx(model, n=1), probes=["shfit"]))


# --------------------------------------------------------------------------- intensity metrics


def test_dark_mass_ratio_and_mass_in_object():
    intensity = torch.arange(100, dtype=torch.float64).view(1, 10, 10).repeat(3, 1, 1)
    mass = torch.stack([torch.ones(10, 10), (intensity[0] >= 50).double(),
                        (intensity[0] < 10).double()]).double()
    assert torch.allclose(dark_mass_ratio(mass, intensity, 0.1),
                          torch.tensor([1.0, 0.0, 10.0], dtype=torch.float64))
    masks = intensity < 50
    assert torch.allclose(mass_in_object(mass, masks),
                          torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))


def test_dark_object_rows_on_the_object():
    model = MODELS["tiny_cnn"](in_chans=1, num_classes=3)
    rows = rows_of(CHECKS["input_bias"](make_ctx(model, methods=("gradient",), n=4,
                                                 dataset="dark_object"), probes=["intensity"]))
    inside = rows[rows.metric == "mass_in_object"]
    assert len(inside) == 4 and inside.value.between(0, 1).all()
    assert list(inside.polarity) == ["dark", "bright", "dark", "bright"]
    assert inside.object_fraction.between(0.02, 0.5).all()


# --------------------------------------------------------------------------- dark_object


def test_dark_object_masks_match_the_images():
    data = DATASETS["dark_object"](n=40, split="train", noise=0.05)
    images, masks = data.inputs[:, 0], data.masks  # mean 0, std 1: inputs are the pixels
    assert images.shape == masks.shape == (40, 28, 28) and masks.dtype == torch.bool
    for i in range(40):
        inside, outside = images[i][masks[i]], images[i][~masks[i]]
        dark = int(data.samples[i]) % 2 == 0
        assert inside.numel() > 20 and outside.numel() > 300
        expected_in, expected_out = (0.1, 0.9) if dark else (0.9, 0.1)
        assert abs(inside.mean() - expected_in) < 0.03 and abs(outside.mean() - expected_out) < 0.03
        # every pixel is on the side of 0.5 its mask says (noise 0.05 cannot cross it)
        assert ((inside < 0.5) == dark).all() and ((outside < 0.5) != dark).all()
    assert set(data.labels.tolist()) == {0, 1, 2}
    assert data.class_names == ["square", "disk", "cross"]


def test_dark_object_is_fixed_by_its_seed_and_split():
    few = DATASETS["dark_object"](n=5, split="test")
    more = DATASETS["dark_object"](n=12, split="test")
    assert torch.equal(few.inputs, more.inputs[:5]) and torch.equal(few.masks, more.masks[:5])
    train = DATASETS["dark_object"](n=5, split="train")
    assert not set(train.samples.tolist()) & set(more.samples.tolist())
    other = DATASETS["dark_object"](n=5, split="test", seed=1)
    assert not torch.equal(other.inputs, few.inputs)
    big = DATASETS["dark_object"](n=3, data_config={"input_size": (3, 56, 56), "mean": (0.5,) * 3,
                                                    "std": (0.5,) * 3})
    assert big.inputs.shape == (3, 3, 56, 56) and big.masks.shape == (3, 56, 56)
    pixels = big.inputs[:, 0] * 0.5 + 0.5
    assert all(((pixels[i][big.masks[i]] < 0.5).float().mean() > 0.9) == (i % 2 == 0)
               for i in range(3))


def test_mask_shapes_differ_by_class():
    data = DATASETS["dark_object"](n=60, split="train")
    fill = {}  # object area / bounding-box area: square ~1, disk ~pi/4, cross ~0.5
    for mask, label in zip(data.masks, data.labels.tolist()):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill.setdefault(label, []).append(float(mask.sum() / box))
    means = [np.mean(fill[c]) for c in range(3)]
    assert means[0] > 0.95 and 0.7 < means[1] < 0.9 and means[2] < 0.65
    assert not math.isnan(sum(means))


def test_store_and_figures(tmp_path, monkeypatch):
    from harness import figures
    from harness.store import RunStore, read_rows

    model = MODELS["tiny_cnn"](in_chans=1, num_classes=3)
    ctx = make_ctx(model, methods=("gradient", "rectgrad"), n=2, dataset="dark_object",
                   n_maps=0)  # map grids: the generic path, tested in test_figures.py
    ctx.metrics = ctx.metrics[:1]
    store = RunStore(tmp_path, {"run_id": "r", "model": "tiny_cnn", "dataset": "dark_object",
                                "seed": 0}, CHECKS.facts("input_bias"))
    for item in CHECKS["input_bias"](ctx, deltas=[0.5], encodings=["signed"]):
        store.add(item)
    store.flush()
    rows = read_rows(tmp_path)  # one schema over all parts: no column lost
    assert len(rows) == store.rows_written and rows["polarity"].isin(["dark", "bright", ""]).all()
    assert rows.loc[rows.metric == "mass_in_object", "object_fraction"].notna().all()
    built = {}  # stem -> figure; rendering PNG/PDF is test_figures.py's business
    monkeypatch.setattr(figures, "save_figure", lambda fig, stem: built.update({stem.name: fig})
                        or [stem])
    figures.make_figures(tmp_path)
    assert set(built) == {"input_bias_bias", "input_bias_similarity"}
    bars = built["input_bias_bias"].axes
    assert [ax.get_title() for ax in bars] == ["dark mass ratio (1 = no bias)",
                                               "attribution mass in the object"]
    assert len(bars[1].patches) == 2 * 2  # methods x polarities
