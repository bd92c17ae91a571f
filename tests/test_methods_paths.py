"""Guided IG and Blur IG equal PAIR's ``saliency`` core implementations (the authors' code);
Guided IG without deviation is Integrated Gradients; iGOS++ keeps its masks in [0, 1] and its
map points at the pixels whose deletion hurts the class on a real ImageNet model."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import Tensor, nn

from methods import METHODS
from methods.igos import IgosProblem, bilateral_weights, blurred_baseline, igos_pp_masks, upsample
from methods.path_methods import gaussian_blur


def assert_close_scaled(actual: Tensor, expected: Tensor, atol: float) -> None:
    """Equal up to ``atol`` relative to the largest |expected|."""
    scale = expected.abs().max()
    assert scale > 0, "a zero reference proves nothing"
    torch.testing.assert_close(actual / scale, expected / scale, atol=atol, rtol=0)


@pytest.fixture
def numpy_quantile_shim(monkeypatch):
    """saliency 0.2.1 calls np.quantile(..., interpolation=...), removed in numpy 2."""
    quantile = np.quantile

    def shimmed(a, q, *args, interpolation=None, **kwargs):
        if interpolation is not None:
            kwargs["method"] = interpolation
        return quantile(a, q, *args, **kwargs)

    monkeypatch.setattr(np, "quantile", shimmed)


def call_model_function(model: nn.Module, target: int, channels_last: bool):
    """saliency's interface: gradients of the target logit for a numpy batch."""
    from saliency.core.base import INPUT_OUTPUT_GRADIENTS

    def call(batch, call_model_args=None, expected_keys=None):
        rows = torch.from_numpy(np.asarray(batch, dtype=np.float64))
        rows = rows.permute(0, 3, 1, 2) if channels_last else rows
        leaf = rows.requires_grad_(True)
        (grad,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
        grad = grad.permute(0, 2, 3, 1) if channels_last else grad
        return {INPUT_OUTPUT_GRADIENTS: grad.numpy()}

    return call


@pytest.fixture
def model64(tiny_model):
    return tiny_model.double()


@pytest.mark.parametrize("max_dist,baseline", [(0.02, 0.0), (0.1, 0.25), (1.0, 0.0)])
def test_guided_ig_equals_saliency(max_dist, baseline, model64, tiny_batch,
                                   numpy_quantile_shim):
    from saliency.core import GuidedIG

    x, target = tiny_batch
    x = x.double()
    ours = METHODS["guided_ig"](model64, x, target, steps=10, max_dist=max_dist,
                                baseline=baseline, internal_batch_size=2)
    for i in range(len(x)):
        reference = GuidedIG().GetMask(
            x[i].numpy(), call_model_function(model64, int(target[i]), channels_last=False),
            x_baseline=np.full(x[i].shape, baseline), x_steps=10, fraction=0.25,
            max_dist=max_dist)
        assert_close_scaled(ours[i], torch.from_numpy(reference), atol=1e-4)


def test_guided_ig_without_deviation_is_integrated_gradients(tiny_model, tiny_batch):
    x, target = tiny_batch
    guided = METHODS["guided_ig"](tiny_model, x, target, steps=12, max_dist=0.0)
    straight = METHODS["integrated_gradients"](tiny_model, x, target, steps=12,
                                               method="riemann_left")
    assert_close_scaled(guided, straight, atol=1e-5)
    assert (METHODS["guided_ig"](tiny_model, x, target, steps=12) - straight).abs().max() \
        > 1e-3 * straight.abs().max()  # the default deviation changes the path


def test_gaussian_blur_equals_scipy():
    image = torch.rand(2, 3, 17, 29, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    sigmas = [0.0, 0.01, 0.3, 2.5, 11.0]  # radius 0 ... larger than the image
    for sigma in sigmas:
        ours = gaussian_blur(image, [sigma, sigma])
        reference = scipy.ndimage.gaussian_filter(image.numpy(), sigma=[0, 0, sigma, sigma],
                                                  mode="constant")
        torch.testing.assert_close(ours, torch.from_numpy(reference), atol=1e-12, rtol=0)


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_equals_saliency(sqrt, model64, tiny_batch):
    from saliency.core import BlurIG

    x, target = tiny_batch
    x = x.double()
    ours = METHODS["blur_ig"](model64, x, target, steps=12, max_sigma=12.0, sqrt=sqrt,
                              internal_batch_size=7)
    for i in range(len(x)):
        reference = BlurIG().GetMask(
            x[i].permute(1, 2, 0).numpy(),
            call_model_function(model64, int(target[i]), channels_last=True),
            max_sigma=12.0, steps=12, sqrt=sqrt)
        assert_close_scaled(ours[i], torch.from_numpy(reference).permute(2, 0, 1), atol=1e-4)


# --- iGOS++ -----------------------------------------------------------------------------------

IGOS_SMALL = {"size": 8, "L1": 1.0, "L2": 20.0, "ig_iter": 2, "iterations": 3,
              "alpha": 1000.0, "noise": 0.2, "blur_ksize": 51, "blur_sigma": 50.0,
              "internal_batch_size": 16, "seed": 0}


def spot_model() -> nn.Module:
    """Two classes; class 0 wins only when the top-left 8 x 8 cell of a 32 x 32 image is bright
    (logit 10 * its mean - 5): its evidence sits in one known place."""
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 2))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
        model[2].weight[0, [0, 16, 32]] = 10 / 3  # cell (0, 0) of each channel
        model[2].bias[0] = -5
    return model.eval()


def test_igos_pp_masks_in_unit_interval_and_map_finds_the_evidence():
    x = torch.zeros(2, 3, 32, 32)
    x[1] = 0.1 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, :8, :8] = 1.0
    target = torch.tensor([0, 0])
    masks = igos_pp_masks(spot_model(), x, target, **IGOS_SMALL)
    assert masks.shape == (2, 2, 1, 8, 8)
    assert masks.min() == 0 and masks.max() == 1  # the clipping to [0, 1] was needed
    saliency = METHODS["igos_pp"](spot_model(), x, target, **IGOS_SMALL)
    expected = 1 - upsample(masks[:, 0] * masks[:, 1], x.shape[-2:])
    torch.testing.assert_close(saliency, expected.expand_as(x))
    assert saliency.min() >= 0 and saliency.max() <= 1
    inside, outside = saliency[:, 0, :8, :8].mean(dim=(1, 2)), saliency[:, 0, 20:, 20:]
    assert (inside > 0.9).all() and (outside.amax(dim=(1, 2)) < 0.1).all()


def integrated_scores_by_autograd(problem: IgosProblem, masks: Tensor, key: tuple) -> Tensor:
    """The reference's loss terms written out: for each (mask, direction) the mean softmax
    probability over the noisy points t/S * mask, t = 1..S, deletion +, insertion -. (B,)"""
    steps, size = problem.ig_iter, problem.image.shape[-2:]
    deletion, insertion = upsample(masks[:, 0], size), upsample(masks[:, 1], size)
    noise = problem.path_noise(key)
    total = 0
    terms = [(deletion * insertion, True), (deletion * insertion, False), (deletion, True),
             (insertion, False)]
    for j, (pixel_mask, deleting) in enumerate(terms):
        t = torch.linspace(1 / steps, 1, steps, dtype=masks.dtype).view(1, -1, 1, 1, 1)
        blend = pixel_mask.unsqueeze(1) * t
        keep, drop = (problem.image, problem.baseline)[::1 if deleting else -1]
        points = keep.unsqueeze(1) * blend + drop.unsqueeze(1) * (1 - blend) + noise[j]
        probs = problem.model(points.flatten(0, 1)).softmax(dim=1).view(len(masks), steps, -1)
        score = probs[torch.arange(len(masks)), :, problem.target].sum(dim=1) / steps
        total = total + (score if deleting else -score)
    return total


def test_igos_pp_loss_and_gradient_equal_autograd(model64, tiny_batch):
    """The chunked integrated mask gradients equal autograd through the whole loss."""
    x, target = tiny_batch
    x = x.double()
    problem = IgosProblem(model64, x, blurred_baseline(x, 51, 50.0), target, 4, 0.2, 1.0,
                          20.0, 5, 0, *bilateral_weights(x))
    masks = torch.rand(3, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    everyone = torch.arange(3)
    leaf = masks.clone().requires_grad_(True)
    scores = integrated_scores_by_autograd(problem, leaf, (1, 0))
    regularization = problem.regularization(leaf[:, 0] * leaf[:, 1], everyone)
    (expected,) = torch.autograd.grad((scores / 2 + regularization).sum(), leaf)
    torch.testing.assert_close(problem.gradient(masks, 1), expected, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(problem.loss(masks, everyone, (1, 0)),
                               (scores + regularization).detach(), atol=1e-12, rtol=1e-9)


def test_blurred_baseline_equals_cv2():
    cv2 = pytest.importorskip("cv2")
    image = torch.rand(1, 3, 60, 70, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    ours = blurred_baseline(image, 51, 50.0)
    reference = cv2.GaussianBlur(image[0].permute(1, 2, 0).numpy(), (51, 51), sigmaX=50.0)
    torch.testing.assert_close(ours[0], torch.from_numpy(reference).permute(2, 0, 1),
                               atol=1e-10, rtol=0)


@pytest.mark.slow
def test_igos_pp_deletion_beats_random_on_imagenet():
    """Deleting (blurring) the top 10% pixels of the iGOS++ map lowers the probability of the
    predicted class more than deleting a random 10%, for most photos (efficientnet_lite0)."""
    from harness.base.meta import model_meta
    from harness.data import DATASETS
    from harness.zoo import MODELS

    model = MODELS["efficientnet_lite0"]()
    data = DATASETS["imagenet_samples"](n=4, data_config=model_meta(model).data_config)
    x = data.inputs
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    saliency = METHODS["igos_pp"](model, x, target, iterations=2, ig_iter=1,
                                  internal_batch_size=16)[:, 0]  # kept short: ~190 rows
    blurred = blurred_baseline(x, 51, 50.0)
    k = saliency[0].numel() // 10
    top = saliency.flatten(1).topk(k, dim=1).indices
    shuffled = torch.rand(saliency.flatten(1).shape, generator=torch.Generator().manual_seed(0))
    random = shuffled.topk(k, dim=1).indices
    drops = [deleted_probability(model, x, blurred, target, keep) for keep in (top, random)]
    assert (drops[0] < drops[1]).sum() >= 3, (drops, target)


def deleted_probability(model: nn.Module, x: Tensor, blurred: Tensor, target: Tensor,
                        pixels: Tensor) -> Tensor:
    """Probability of ``target`` after replacing ``pixels`` (B, k) by the blurred image."""
    mask = torch.zeros(x.shape[0], x.shape[-2] * x.shape[-1])
    mask.scatter_(1, pixels, 1.0)
    mask = mask.view(x.shape[0], 1, *x.shape[-2:])
    with torch.no_grad():
        probs = model(x * (1 - mask) + blurred * mask).softmax(dim=1)
    return probs.gather(1, target.view(-1, 1)).squeeze(1)
