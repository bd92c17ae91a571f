"""The seed methods proven against references: LRP against zennit's attributor (and relevance
conservation, exact canonization of timm blocks), RectGrad against a hook-free reference, CGI
against a slow per-class loop, and the two controls in a cascading randomization check.

The contract table of tests/test_methods.py runs all of them too (shape, hooks, model restored,
determinism, chunking, batch independence, config = signature)."""
from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from checks import CHECKS
from harness.base.context import CheckContext, MetricSpec
from harness.base.meta import model_meta
from harness.data import DATASETS
from harness.zoo import MODELS
from methods import METHODS
from methods.cgi import class_gradient_chunks, competing_classes
from methods.common import target_logits
from methods.rectgrad import row_percentile
from metrics import METRICS

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def assert_close_scaled(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    scale = expected.abs().max()
    assert scale > 0, "a zero reference proves nothing"
    torch.testing.assert_close(actual / scale, expected / scale, atol=atol, rtol=0)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restored(model: nn.Module, before: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert all(not getattr(m, d) for m in model.modules() for d in HOOK_DICTS)
    assert not any(type(m).__name__ == "Sum" for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def zero_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
    return model


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that merging them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """efficientnet_lite0's architecture (timm tf_efficientnet_lite0: Conv2dSame, BatchNormAct2d,
    ReLU6, 9 skip blocks) with random weights: the structure is what LRP's canonizers must get
    right; 10 classes keep CGI's loop cheap."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same random weights in every run
        return MODELS["timm"](name="tf_efficientnet_lite0", num_classes=10)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # timm zero-initializes the last BN of each block: the branch would be 0
        for block in (*model.layer1, *model.layer2, *model.layer3, *model.layer4):
            block.bn2.weight.fill_(1.0)
    return model  # inplace ReLUs, as timm builds it


def small_images(n: int = 1, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(n, 3, size, size, generator=g) - 1, torch.arange(n) + 1


# --- LRP: zennit's attributor, conservation, canonization ------------------------------------

def zennit_reference(model: nn.Module, x: Tensor, target: Tensor, composite) -> Tensor:
    from zennit.attribution import Gradient

    logits = model(x).detach()
    one_hot_logit = torch.zeros_like(logits).scatter(1, target.view(-1, 1),
                                                     logits.gather(1, target.view(-1, 1)))
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), one_hot_logit)
    return relevance.detach()


def zennit_composites(canonizers=None) -> dict:
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlus, LayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta, Epsilon
    from zennit.types import Convolution

    def layer_map(conv_rule):
        return LayerMapComposite(layer_map=layer_map_base() + [
            (Convolution, conv_rule), (nn.Linear, Epsilon(epsilon=1e-6))], canonizers=canonizers)

    return {("lrp_epsilon", ()): layer_map(Epsilon(epsilon=1e-6)),
            ("lrp_alpha_beta", ()): EpsilonAlpha2Beta1(canonizers=canonizers),
            ("lrp_alpha_beta", (("alpha", 3.0), ("beta", 2.0))): layer_map(AlphaBeta(3.0, 2.0)),
            ("lrp_epsilon_plus", ()): EpsilonPlus(canonizers=canonizers)}


@pytest.mark.parametrize("name,hparams", list(zennit_composites()))
def test_lrp_equals_zennit_attributor(name, hparams, tiny_model, tiny_batch):
    x, target = tiny_batch
    reference = zennit_reference(tiny_model, x, target, zennit_composites()[name, hparams])
    ours = METHODS[name](tiny_model, x, target, internal_batch_size=2, **dict(hparams))
    assert_close_scaled(ours, reference)


def vgg_bn(eps: float) -> nn.Module:
    """A VGG-style Sequential of conv -> BatchNorm -> ReLU with non-trivial statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, eps=eps), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                          nn.BatchNorm2d(8, eps=eps), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5))
    return randomize_batchnorms(model).eval()


@pytest.mark.parametrize("name", ["lrp_epsilon", "lrp_alpha_beta", "lrp_epsilon_plus"])
def test_lrp_with_batchnorm_equals_zennit_sequential_merge(name, tiny_batch):
    """With eps = 0 zennit's SequentialMergeBatchNorm is exact too, so both must agree."""
    from zennit.canonizers import SequentialMergeBatchNorm

    x, target = tiny_batch
    model = vgg_bn(eps=0.0)
    before = snapshot(model)
    composite = zennit_composites([SequentialMergeBatchNorm()])[name, ()]
    reference = zennit_reference(model, x, target, composite)
    assert_close_scaled(METHODS[name](model, x, target), reference)
    assert_restored(model, before)


def test_lrp_epsilon_conserves_relevance_without_bias(tiny_model, tiny_batch):
    """sum of input relevance = explained logit, within relative 1e-4 for epsilon = 1e-12 (the
    default epsilon 1e-6 absorbs up to ~4e-4 of the tiny model's ~1e-2 logits)."""
    x, target = tiny_batch
    model = zero_biases(tiny_model)
    relevance = METHODS["lrp_epsilon"](model, x, target, epsilon=1e-12)
    logit = target_logits(model(x), target).detach()
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), logit, rtol=1e-4, atol=0)


@pytest.mark.parametrize("arch", ["lite0", "resnet18"])
def test_lrp_conservation_needs_the_residual_canonizers(arch, request, monkeypatch):
    """On bias-free timm models (efficientnet_lite0's skip blocks, ResNet's BasicBlock) the
    epsilon relevance sums to the logit within 1e-3; without the Sum canonizers it does not."""
    import methods.lrp_zennit as lrp  # the zennit side of methods.lrp

    model = zero_biases(copy.deepcopy(request.getfixturevalue(arch)))  # BN at init: no bias
    x, target = small_images()
    logit = target_logits(model(x), target).detach()
    total = METHODS["lrp_epsilon"](model, x, target).sum(dim=(1, 2, 3))
    torch.testing.assert_close(total, logit, rtol=1e-3, atol=0)
    monkeypatch.setattr(lrp, "canonizers_for", lambda m, inputs: [
        lrp.ExactMergeBatchNorm(lrp.batchnorm_pairs(m, inputs[:1]))])
    without = METHODS["lrp_epsilon"](model, x, target).sum(dim=(1, 2, 3))
    assert ((without - logit).abs() > 1e-2 * logit.abs()).all()


@pytest.mark.parametrize("arch", ["lite0", "resnet18"])
def test_canonization_is_exact_and_undone(arch, request):
    """Every BatchNorm is merged (also timm's BatchNormAct2d, which zennit's sequential merge
    skips), every skip join gets a Sum, the logits stay the same, the model is restored."""
    from zennit.core import Composite

    import methods.lrp_zennit as lrp  # the zennit side of methods.lrp

    model = randomize_batchnorms(copy.deepcopy(request.getfixturevalue(arch)))
    x, _ = small_images(2)
    before, logits = snapshot(model), model(x).detach()
    pairs = lrp.batchnorm_pairs(model, x[:1])
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    joins = {"lite0": 9, "resnet18": 8}[arch]
    with lrp.registered(Composite(canonizers=lrp.canonizers_for(model, x)), model):
        assert sum(type(m).__name__ == "Sum" for m in model.modules()) == joins
        assert all(m.eps == 0 and torch.equal(m.running_var, torch.ones_like(m.running_var))
                   for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert_close_scaled(model(x).detach(), logits, atol=1e-5)
    assert_restored(model, before)
    assert torch.equal(model(x).detach(), logits)


def test_lrp_on_lite0_restores_model_after_error(lite0):
    """An error in the middle of the explanation (bad target) still undoes canonization."""
    model = randomize_batchnorms(copy.deepcopy(lite0))
    x, _ = small_images()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        METHODS["lrp_epsilon_plus"](model, x, torch.tensor([99]))
    assert_restored(model, before)
    out = METHODS["lrp_epsilon_plus"](model, x, torch.tensor([3]))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


# --- RectGrad ---------------------------------------------------------------------------------

def test_row_percentile_equals_torch_quantile():
    values = torch.randn(4, 1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 12.5, 50.0, 98.0, 100.0):
        torch.testing.assert_close(row_percentile(values, q), torch.quantile(values, q / 100, 1))


class RectifiedClamp(torch.autograd.Function):
    """Reference: ReLU / ReLU6 whose backward keeps grad where a * grad >= the q-th percentile of
    the layer (per sample, torch.quantile), then applies the activation's derivative. No hooks."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float, q: float) -> Tensor:
        out = x.clamp(0, upper)
        ctx.save_for_backward(x, out)
        ctx.upper, ctx.q = upper, q
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out = ctx.saved_tensors
        importance = (out * grad).flatten(1)
        tau = torch.quantile(importance, ctx.q / 100, dim=1, keepdim=True)
        kept = grad * (importance >= tau).view_as(grad)
        return kept * ((x > 0) & (x < ctx.upper)), None, None


class RectifiedActivation(nn.Module):
    def __init__(self, upper: float, q: float):
        super().__init__()
        self.upper, self.q = upper, q

    def forward(self, x: Tensor) -> Tensor:
        return RectifiedClamp.apply(x, self.upper, self.q)


def with_activations(model: nn.Module, make) -> nn.Module:
    model = copy.deepcopy(model)
    model.relu1, model.relu2 = make(), make()
    return model


@pytest.mark.parametrize("q", [98.0, 80.0])
@pytest.mark.parametrize("relu6", [False, True])
def test_nobias_rectgrad_equals_hook_free_reference(q, relu6, tiny_model, tiny_batch):
    x, target = tiny_batch
    model = tiny_model
    if relu6:  # pre-activations beyond 6, so ReLU6's upper end matters
        model = with_activations(tiny_model, nn.ReLU6)
        with torch.no_grad():
            model.conv1.weight.mul_(30)
    upper = 6.0 if relu6 else float("inf")
    reference_model = with_activations(model, lambda: RectifiedActivation(upper, q))
    reference = METHODS["gradient"](reference_model, x, target)
    ours = METHODS["nobias_rectgrad"](model, x, target, q=q, internal_batch_size=2)
    assert_close_scaled(ours, reference)
    assert not torch.allclose(ours, METHODS["gradient"](model, x, target))


@pytest.mark.parametrize("q", [98.0, None])
def test_rectgrad_is_nobias_rectgrad_times_input(q, tiny_model, tiny_batch):
    x, target = tiny_batch
    assert torch.equal(METHODS["rectgrad"](tiny_model, x, target, q=q),
                       METHODS["nobias_rectgrad"](tiny_model, x, target, q=q) * x)


@pytest.mark.parametrize("q", [0.0, None])
def test_nobias_rectgrad_without_thresholding_is_the_gradient(q, tiny_model, tiny_batch, lite0):
    x, target = tiny_batch
    assert torch.equal(METHODS["nobias_rectgrad"](tiny_model, x, target, q=q),
                       METHODS["gradient"](tiny_model, x, target))
    x, target = small_images()  # ReLU6 and timm blocks
    assert_close_scaled(METHODS["nobias_rectgrad"](lite0, x, target, q=q),
                        METHODS["gradient"](lite0, x, target), atol=1e-6)


def test_rectgrad_differs_from_gradient_on_lite0(lite0):
    x, target = small_images()
    before = snapshot(lite0)
    ours, plain = (METHODS[m](lite0, x, target) for m in ("nobias_rectgrad", "gradient"))
    assert ours.abs().sum() > 0 and not torch.allclose(ours, plain)
    assert_restored(lite0, before)


# --- CGI --------------------------------------------------------------------------------------

def looped_class_gradients(model: nn.Module, x: Tensor) -> Tensor:
    """Slow reference: one backward per class. x: (n, C, H, W) -> (K, n, C, H, W)."""
    leaf = x.detach().clone().requires_grad_(True)
    logits = model(leaf)
    return torch.stack([torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)[0]
                        for c in range(logits.shape[1])])


def reference_cgi(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class Gradient x Input (K, n, C, H, W) and the target's value (n, C, H, W)."""
    contributions = looped_class_gradients(model, x) * x
    return contributions, contributions[target, torch.arange(len(target))]


def test_batched_class_gradients_equal_the_loop(tiny_model, tiny_batch):
    x, target = tiny_batch
    with torch.no_grad():
        logits, vjp = torch.func.vjp(tiny_model, x)
    order = competing_classes(logits, target, "all", 0)
    batched = torch.zeros(5, *x.shape)
    for columns, gradients in class_gradient_chunks(vjp, logits, order, internal_batch_size=7):
        assert gradients.shape[0] * len(x) <= 7  # one backward stays under the row budget
        for j in range(columns.shape[1]):
            batched[columns[:, j], torch.arange(len(x))] = gradients[j]
    assert_close_scaled(batched, looped_class_gradients(tiny_model, x), atol=1e-6)
    assert (order[:, 0] == target).all()


def test_cgi_on_one_class_model_is_gradient_x_input(tiny_batch):
    x, _ = tiny_batch
    model = MODELS["tiny_cnn"](num_classes=1, seed=1)
    target = torch.zeros(len(x), dtype=torch.long)
    assert_close_scaled(METHODS["cgi"](model, x, target),
                        METHODS["gradient_x_input"](model, x, target), atol=1e-6)


def assert_keeps_exactly_the_winners(ours: Tensor, contributions: Tensor, value: Tensor,
                                     target: Tensor, decided: float) -> None:
    """Against the loop's per-class contributions (K, n, C, H, W): a clear winner keeps a_t, a
    clear loser is 0; only values within float error (1e-5 of the largest) of a tie or of 0 may
    go either way, and more than ``decided`` of the features are clear."""
    others = contributions.clone()
    others[target, torch.arange(len(target))] = float("nan")  # the target's own entry
    best, worst = others.nan_to_num(float("-inf")).amax(0), others.nan_to_num(float("inf")).amin(0)
    margin = 1e-5 * value.abs().max()
    wins = ((value > margin) & (value > best + margin)) | (
        (value < -margin) & (value < worst - margin))
    loses = ((value > 0) & (value < best - margin)) | ((value < 0) & (value > worst + margin))
    kept = ours != 0
    assert kept[wins].all() and not kept[loses].any()
    assert wins.any() and loses.any() and (wins | loses).float().mean() > decided
    torch.testing.assert_close(ours[kept], value[kept], atol=1e-5 * value.abs().max(), rtol=0)


def test_cgi_keeps_exactly_the_winners(tiny_model, tiny_batch):
    x, target = tiny_batch
    ours = METHODS["cgi"](tiny_model, x, target, internal_batch_size=4)
    assert_keeps_exactly_the_winners(ours, *reference_cgi(tiny_model, x, target), target, 0.99)


def test_cgi_ties_keep_the_value(tiny_batch):
    """Two identical classes tie everywhere; a tie is not a loss, so CGI = Gradient x Input."""
    x, _ = tiny_batch
    model = MODELS["tiny_cnn"](num_classes=2, seed=2)
    with torch.no_grad():
        model.fc.weight[1] = model.fc.weight[0]
        model.fc.bias[1] = model.fc.bias[0]
    target = torch.tensor([0, 1, 0])
    assert_close_scaled(METHODS["cgi"](model, x, target),
                        METHODS["gradient_x_input"](model, x, target), atol=1e-6)


def test_cgi_topk(tiny_model, tiny_batch):
    x, target = tiny_batch
    every = METHODS["cgi"](tiny_model, x, target)
    assert torch.equal(METHODS["cgi"](tiny_model, x, target, classes="topk", k=4), every)
    alone = METHODS["cgi"](tiny_model, x, target, classes="topk", k=0)  # no competitor
    assert_close_scaled(alone, METHODS["gradient_x_input"](tiny_model, x, target), atol=1e-6)
    some = METHODS["cgi"](tiny_model, x, target, classes="topk", k=1)
    assert ((some != 0) >= (every != 0)).all()  # fewer competitors, more winners
    with pytest.raises(ValueError, match="classes"):
        METHODS["cgi"](tiny_model, x, target, classes="some")


def test_cgi_on_lite0_equals_reference(lite0):
    """Conv2dSame, BatchNormAct2d (folded by cgi, not by the loop), ReLU6, skip blocks."""
    x, target = small_images()
    ours = METHODS["cgi"](lite0, x, target, internal_batch_size=4)
    assert_keeps_exactly_the_winners(ours, *reference_cgi(lite0, x, target), target, 0.95)


# --- controls ---------------------------------------------------------------------------------

def test_sobel_equals_scipy(tiny_batch):
    from scipy import ndimage

    x, target = tiny_batch
    ours = METHODS["sobel"](None, x, target, internal_batch_size=2)
    reference = np.stack([np.stack([
        np.hypot(ndimage.sobel(channel, axis=0, mode="nearest"),
                 ndimage.sobel(channel, axis=1, mode="nearest"))
        for channel in image]) for image in x.double().numpy()])
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)


def test_random_uniform_fresh_per_call_reproducible_per_run(tiny_model, tiny_batch):
    x, target = tiny_batch
    state = torch.get_rng_state()
    first = [METHODS["random_uniform"](tiny_model, x, target, seed=5) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert first[0].min() >= -1 and first[0].max() <= 1 and first[0].shape == x.shape
    rerun = MODELS["tiny_cnn"](num_classes=5, in_chans=3, seed=0)  # a new run builds its model
    again = [METHODS["random_uniform"](rerun, x, target, seed=5) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = METHODS["random_uniform"](MODELS["tiny_cnn"](), x, target, seed=6)
    assert not torch.equal(other_seed, first[0])
    # another model (the random-label model of the data randomization test): other noise
    other_model = MODELS["tiny_cnn"](num_classes=5, in_chans=3, seed=1)
    assert not torch.equal(METHODS["random_uniform"](other_model, x, target, seed=5), first[0])


METRIC_NORMALIZATION = {"ssim": "absolute", "spearman": "signed", "spearman_abs": "absolute",
                        "hog": "absolute", "pearson": "signed"}


def test_controls_in_cascading_check():
    """sobel scores 1 at every stage; random_uniform about 0 (|mean| < 0.1) at every stage; rows
    record each method's own hyperparameters (method_hparams)."""
    model = MODELS["tiny_cnn"](in_chans=1)
    data = DATASETS["digits"](n=8, data_config=model_meta(model).data_config)
    metrics = [MetricSpec(name, partial(METRICS[name], **({"pixels_per_cell": 8}
                                                         if name == "hog" else {})),
                          METRIC_NORMALIZATION.get(name, "absolute")) for name in sorted(METRICS)]
    methods = {m: partial(METHODS[m], seed=0) for m in ("sobel", "random_uniform")}
    methods["cgi"] = partial(METHODS["cgi"], seed=0, classes="topk", k=2)
    ctx = CheckContext(model=model, data=data, metrics=metrics, progress=False, methods=methods)
    rows = [r for r in CHECKS["cascading"](ctx) if isinstance(r, dict)]
    hparams = {r["method"]: r["method_hparams"] for r in rows}  # the method's knobs, in rows
    assert hparams == {"sobel": "{}", "random_uniform": "{}", "cgi": '{"classes": "topk", "k": 2}'}
    stages = {r["stage_index"] for r in rows}
    assert stages == {0, 1, 2, 3}
    sobel_values = [r["value"] for r in rows if r["method"] == "sobel"]
    assert len(sobel_values) == 4 * 8 * len(METRICS)
    np.testing.assert_allclose(sobel_values, 1.0, atol=1e-6)
    for stage in stages:
        noise = [r["value"] for r in rows
                 if r["method"] == "random_uniform" and r["stage_index"] == stage]
        assert len(noise) == 8 * len(METRICS) and abs(np.mean(noise)) < 0.1, stage
