"""``methods.fold.fold_batchnorm``: the folded model has the same logits and input gradients,
no BatchNorm left where one follows a convolution, and the original model is untouched."""
from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from harness.zoo import MODELS
from methods.fold import fold_batchnorm, gradient_model
from methods.polyphase import PolyphaseConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh timm models have mean 0 / var 1 / gamma 1 / beta 0, which a wrong fold survives."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


class SharedConvOutput(nn.Module):
    """conv -> bn, and the conv's output also goes around the BatchNorm: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        y = torch.relu(self.bn(z) + z)
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = -y
        return self.fc(y.mean((2, 3)))


def lite0() -> nn.Module:
    return MODELS["efficientnet_lite0"]()


CASES = {  # name: (model factory, input size, BatchNorms left after folding)
    "efficientnet_lite0": (lite0, 64, 0),  # timm BatchNormAct2d, Conv2dSame, ReLU6
    "resnet18": (lambda: with_random_statistics(MODELS["timm"](name="resnet18")), 64, 0),
    "shared_conv_output": (lambda: with_random_statistics(SharedConvOutput()), 16, 1),
}


def input_gradients(model: nn.Module, x: Tensor, classes: int = 3) -> Tensor:
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    return torch.stack([torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)[0]
                        for c in range(classes)])


@pytest.mark.parametrize("name", CASES)
def test_folded_model_has_the_same_logits_and_gradients(name):
    factory, size, left = CASES[name]
    model = factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {k: type(m) for k, m in model.named_modules()}
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    folded = fold_batchnorm(model)
    assert folded is not model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == left
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    scale = expected.abs().max()
    torch.testing.assert_close(actual / scale, expected / scale, atol=1e-5, rtol=0)
    grads, folded_grads = input_gradients(model, x), input_gradients(folded, x)
    scale = grads.abs().max()
    assert scale > 0
    torch.testing.assert_close(folded_grads / scale, grads / scale, atol=1e-5, rtol=0)
    # the original is untouched: same weights, same modules, still with its BatchNorms
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {k: type(m) for k, m in model.named_modules()} == types


def test_nothing_to_fold_returns_the_model(tiny_model):
    assert fold_batchnorm(tiny_model) is tiny_model  # no BatchNorm
    training = with_random_statistics(MODELS["timm"](name="resnet18")).train()
    assert fold_batchnorm(training) is training  # batch statistics: not an affine map
    untraceable = with_random_statistics(Untraceable())
    assert fold_batchnorm(untraceable) is untraceable


def test_gradient_model_swaps_a_stem_without_batchnorm(tiny_model):
    """No BatchNorm but a strided 3-channel stem: the trace with the polyphase stem, the same
    input gradients (float64: they differ by the order of the stem's sums, ~1e-16); a model with
    neither (the tiny CNN) is returned as it is."""
    assert gradient_model(tiny_model) is tiny_model
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(4)).double()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model(x)  # materialize the lazy layer
    swapped = gradient_model(model)
    assert isinstance(swapped.get_submodule("0"), PolyphaseConv2d)
    assert type(model[0]) is nn.Conv2d
    grads, swapped_grads = input_gradients(model, x), input_gradients(swapped, x)
    torch.testing.assert_close(swapped_grads, grads, atol=1e-12 * grads.abs().max(), rtol=0)


def folding_methods() -> list[str]:
    """Registry entries whose module calls gradient_model (a new one is tested automatically)."""
    from methods import METHODS

    return sorted(name for name in METHODS
                  if hasattr(sys.modules[METHODS[name].__module__], "gradient_model"))


SMALL_BUDGETS = {"guided_ig": {"steps": 8}, "blur_ig": {"steps": 8},
                 "cgi": {"classes": "topk", "k": 20}}
# Maps that jump when the model's output changes by float rounding: iGOS++'s backtracking line
# search accepts or rejects a step on a loss comparison, so a rounding-level change of the loss
# can take another step (seen: 0.8 of the map's maximum on one random model).
ROUNDING_SENSITIVE = {"igos_pp"}


@pytest.fixture(scope="module")
def smooth_model() -> nn.Module:
    """efficientnet_b0 (SiLU, BatchNormAct2d) with random statistics: no ReLU kinks or max-pool
    ties, where a rounding-level change may route a gradient differently (ResNet's max-pool on the
    near-constant images of a blur path did, at 1e-3 of the maximum)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return with_random_statistics(MODELS["timm"](name="efficientnet_b0", num_classes=10))


@pytest.mark.parametrize("name", [n for n in folding_methods() if n not in ROUNDING_SENSITIVE])
def test_methods_explain_the_folded_model_like_the_model(name, smooth_model, monkeypatch):
    """The map through the folded copy (polyphase stem included) equals the map with both
    switched off."""
    from methods import METHODS

    assert isinstance(gradient_model(smooth_model).conv_stem, PolyphaseConv2d)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([3, 7])
    method = partial(METHODS[name], **SMALL_BUDGETS.get(name, {}), internal_batch_size=8)
    folded = method(smooth_model, x, target)
    monkeypatch.setattr(sys.modules[METHODS[name].__module__], "gradient_model", lambda m: m)
    unfolded = method(smooth_model, x, target)
    scale = unfolded.abs().max()
    assert scale > 0
    torch.testing.assert_close(folded / scale, unfolded / scale, atol=1e-5, rtol=0)
