"""The method test table (captum style): every entry of ``METHODS`` passes the contract tests
with no new test code; then equalities with the reference implementations (captum)."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from harness.base.meta import ModelMeta, attach_meta
from methods import METHODS
from methods.common import noise_sigma

# Small overrides that keep the table fast; a method not listed runs with its defaults.
FAST: dict[str, dict] = {
    "smoothgrad": {"n_samples": 4},
    "vargrad": {"n_samples": 4},
    "integrated_gradients": {"steps": 8},
    "guided_ig": {"steps": 8},
    "blur_ig": {"steps": 8, "max_sigma": 4.0},
    "igos_pp": {"iterations": 1, "ig_iter": 2, "size": 8},
}
NAMES = sorted(METHODS)
# Facts a method declares at registration (methods/controls.py): ``deterministic=False`` (two
# calls differ on purpose, e.g. random_uniform) and ``uses_model=False`` (never calls it).
DETERMINISTIC = [n for n in NAMES if METHODS.facts(n).deterministic]
MODEL_BASED = [n for n in NAMES if METHODS.facts(n).uses_model]
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def run(name: str, model: nn.Module, x: Tensor, target: Tensor, **kwargs) -> Tensor:
    return METHODS[name](model, x, target, **{**FAST.get(name, {}), **kwargs})


def assert_close_scaled(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    """Equal up to ``atol`` relative to the largest |expected| (maps of tiny models are ~1e-4)."""
    scale = expected.detach().abs().max()
    assert scale > 0, "a zero reference proves nothing"
    torch.testing.assert_close(actual / scale, expected.detach() / scale, atol=atol, rtol=0)


def differ(a: Tensor, b: Tensor) -> bool:
    return bool(((a - b).abs().max() > 1e-3 * b.abs().max()).item())


def assert_no_hooks(model: nn.Module) -> None:
    for module_name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr), f"hook left in {module_name or 'model'}.{attr}"
    from torch.nn.modules import module as module_lib
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        assert not getattr(module_lib, attr), f"global {attr} left"


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    return state, flags


def assert_model_as_found(model: nn.Module, before: tuple[dict, dict]) -> None:
    state, flags = before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)


# --- the table: every registered method -------------------------------------------------------

@pytest.mark.parametrize("mode", ["plain", "x_requires_grad", "no_grad_context"])
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, mode, tiny_model, tiny_batch):
    x, target = tiny_batch
    tiny_model.conv1.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    x = x.clone().requires_grad_(mode == "x_requires_grad")
    x_before, before = x.detach().clone(), snapshot(tiny_model)
    with torch.set_grad_enabled(mode != "no_grad_context"):
        out = run(name, tiny_model, x, target)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(x.detach(), x_before) and x.grad is None
    assert x.requires_grad == (mode == "x_requires_grad")
    assert_model_as_found(tiny_model, before)


class FailOnCall(nn.Module):
    """Raises on its ``n``-th call, i.e. in the middle of a method with several chunks."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("forced failure")
        return x


@pytest.mark.parametrize("name", MODEL_BASED)
def test_model_restored_after_exception(name, tiny_model, tiny_batch):
    x, target = tiny_batch
    tiny_model.add_module("fail", FailOnCall(2))  # after the logits: hooks already ran
    before = snapshot(tiny_model)
    with pytest.raises(RuntimeError, match="forced failure"):
        run(name, tiny_model, x, target, internal_batch_size=1)
    assert_model_as_found(tiny_model, before)


# Chunking and batch composition are properties of the algorithm (no row dropped, repeated or
# mixed with another), not of rounding, so they are tested in float64. In float32 the two code
# paths differ by the rounding of reordered sums, amplified by the method: LRP's alpha-beta rule
# divides by sums of positive and negative contributions, and on AVX-512 kernels its chunked map
# differs by ~18 float32 ulps (1.07e-6 of the map's scale), more than on the default kernels.
# In float64 the same reordering costs <= ~100 ulps of 2.2e-16 (blur_ig's 1.8e-14 is the
# largest seen, on default, avx2 and avx512 kernels alike): 1e4 ulps leaves two orders of
# magnitude to any CPU, and a real chunking bug moves the map by O(1) of its scale.
CHUNKING_ATOL = 1e4 * torch.finfo(torch.float64).eps


def assert_same_map(actual: Tensor, expected: Tensor) -> None:
    """Equal up to float64 reordering of sums, relative to the largest |expected|."""
    assert actual.dtype == expected.dtype == torch.float64
    assert_close_scaled(actual, expected, atol=CHUNKING_ATOL)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic(name, tiny_model, tiny_batch):
    """Same process, same kernels, same input: bit-equal maps (float32, the dtype of a run)."""
    x, target = tiny_batch
    assert torch.equal(run(name, tiny_model, x, target, seed=3),
                       run(name, tiny_model, x, target, seed=3))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_chunking_invariant(name, tiny_model, tiny_batch):
    x, target = tiny_batch
    model, x = tiny_model.double(), x.double()
    out = run(name, model, x, target, seed=3)
    assert_same_map(run(name, model, x, target, seed=3, internal_batch_size=1), out)


def repeat_row_at_boundaries(fn, rows, targets, internal_batch_size):
    """A chunking bug: every chunk after the first starts with the previous chunk's last row."""
    starts = range(0, len(rows), internal_batch_size)
    picks = [max(s - 1, 0) if i and k == 0 else s + k
             for i, s in enumerate(starts) for k in range(min(internal_batch_size, len(rows) - s))]
    index = torch.tensor(picks)
    return torch.cat([fn(rows[index[s:s + internal_batch_size]],
                         targets[index[s:s + internal_batch_size]]) for s in starts])


def drop_last_row_of_chunks(fn, rows, targets, internal_batch_size):
    """A chunking bug: each chunk's last row is lost and the output padded with zeros."""
    out = [fn(r, t) for r, t in zip(rows.split(internal_batch_size),
                                     targets.split(internal_batch_size))]
    return torch.cat([torch.cat([o[:-1], torch.zeros_like(o[-1:])]) for o in out])


@pytest.mark.parametrize("bug", [repeat_row_at_boundaries, drop_last_row_of_chunks])
def test_chunking_bug_is_caught(bug, tiny_model, tiny_batch, monkeypatch):
    """The tolerance above still fails a chunk boundary that repeats or drops a row."""
    import methods.common

    x, target = tiny_batch
    model, x = tiny_model.double(), x.double()
    out = run("gradient", model, x, target)
    monkeypatch.setattr(methods.common, "map_chunks", bug)
    with pytest.raises(AssertionError):
        assert_same_map(run("gradient", model, x, target, internal_batch_size=2), out)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batch_independence(name, tiny_model, tiny_batch):
    x, target = tiny_batch
    model, x = tiny_model.double(), x.double()
    others = x.clone()
    noise = torch.rand(x[1:].shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    others[1:] = 4 * noise - 1  # other content and another value range
    out, out_others = (run(name, model, batch, target) for batch in (x, others))
    assert_same_map(out_others[:1], out[:1])


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_signature(name):
    """conf/method/<name>.yaml exists and its keys are keyword defaults of the method."""
    (key, hparams), = yaml.safe_load((CONF / f"{name}.yaml").read_text()).items()
    params = inspect.signature(METHODS[name]).parameters
    assert key == name
    for hparam, value in hparams.items():
        assert params[hparam].kind == params[hparam].KEYWORD_ONLY
        if not str(value).startswith("${"):  # interpolated from the run's budget
            assert params[hparam].default == value, f"{name}.{hparam}"
    assert {"internal_batch_size", "seed"} <= set(params)


# --- equality with captum ---------------------------------------------------------------------

def captum_attr():
    import captum.attr

    return captum.attr


def test_gradient_equals_captum_saliency(tiny_model, tiny_batch):
    x, target = tiny_batch
    reference = captum_attr().Saliency(tiny_model).attribute(x, target=target, abs=False)
    assert_close_scaled(METHODS["gradient"](tiny_model, x, target), reference)


def test_gradient_x_input_equals_captum(tiny_model, tiny_batch):
    x, target = tiny_batch
    reference = captum_attr().InputXGradient(tiny_model).attribute(x, target=target)
    assert_close_scaled(METHODS["gradient_x_input"](tiny_model, x, target), reference)


@pytest.mark.parametrize("method,steps", [("gausslegendre", 50), ("riemann_trapezoid", 20),
                                          ("riemann_middle", 7)])
def test_integrated_gradients_equals_captum(method, steps, tiny_model, tiny_batch):
    x, target = tiny_batch
    ig = captum_attr().IntegratedGradients(tiny_model)
    reference = ig.attribute(x, baselines=0.25, target=target, n_steps=steps, method=method)
    ours = METHODS["integrated_gradients"](tiny_model, x, target, steps=steps, baseline=0.25,
                                           method=method, internal_batch_size=16)
    assert_close_scaled(ours, reference)


def unit_range_batch(tiny_batch) -> tuple[Tensor, Tensor]:
    """Every sample spans exactly [0, 1], so the per-sample sigma is one scalar for captum."""
    x, target = tiny_batch
    x = x.clone()
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0.0, 1.0
    return x, target


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
def test_noise_tunnel_equals_captum_with_same_noise(nt_type, tiny_model, tiny_batch):
    x, target = unit_range_batch(tiny_batch)
    attr = captum_attr()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # captum draws from the global RNG, in our draw order
        reference = attr.NoiseTunnel(attr.Saliency(tiny_model)).attribute(
            x, nt_type=nt_type, nt_samples=8, stdevs=0.15, target=target, abs=False)
    ours = METHODS[nt_type](tiny_model, x, target, n_samples=8, noise_level=0.15, seed=7,
                            internal_batch_size=5)
    assert_close_scaled(ours, reference)
    assert differ(ours, METHODS[nt_type](tiny_model, x, target, n_samples=8, seed=8))


def test_noise_is_per_sample_and_leaves_global_rng_alone(tiny_model, tiny_batch):
    x, target = tiny_batch
    x = x * torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1, 1)
    expected = torch.stack([0.15 * (s.max() - s.min()) for s in x])
    torch.testing.assert_close(noise_sigma(x, 0.15), expected)
    state = torch.get_rng_state()
    METHODS["smoothgrad"](tiny_model, x, target, n_samples=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_guided_backprop_equals_captum(tiny_model, tiny_batch):
    x, target = tiny_batch
    reference = captum_attr().GuidedBackprop(tiny_model).attribute(x, target=target)
    ours = METHODS["guided_backprop"](tiny_model, x, target)
    assert_close_scaled(ours, reference)
    assert differ(ours, METHODS["gradient"](tiny_model, x, target))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("relu", [True, False])
def test_gradcam_equals_captum(mode, relu, tiny_model, tiny_batch):
    x, target = tiny_batch
    attr = captum_attr()
    cam = attr.LayerGradCam(tiny_model, tiny_model.relu2).attribute(
        x, target=target, relu_attributions=relu)
    reference = attr.LayerAttribution.interpolate(cam, x.shape[2:], interpolate_mode=mode)
    ours = METHODS["gradcam"](tiny_model, x, target, relu=relu, interpolate_mode=mode)
    assert_close_scaled(ours, reference.expand_as(x))


def test_guided_gradcam_equals_captum(tiny_model, tiny_batch):
    x, target = tiny_batch
    reference = captum_attr().GuidedGradCam(tiny_model, tiny_model.relu2).attribute(
        x, target=target)
    assert_close_scaled(METHODS["guided_gradcam"](tiny_model, x, target), reference)


# --- ReLU6, models without ReLU, timm ---------------------------------------------------------

class GuidedClamp(torch.autograd.Function):
    """Reference guided ReLU6 written as its own autograd function (no hooks)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad * ((x > 0) & (x < 6))).clamp(min=0)


class GuidedReLU6(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return GuidedClamp.apply(x)


def relu6_model(tiny_model: nn.Module) -> nn.Module:
    model = copy.deepcopy(tiny_model)
    model.relu1, model.relu2 = nn.ReLU6(), nn.ReLU6()
    with torch.no_grad():  # pre-activations beyond 6, so the upper end of ReLU6 matters
        model.conv1.weight.mul_(30)
        model.conv2.weight.mul_(5)
    return attach_meta(model, copy.copy(tiny_model.sanity_meta))


def pre_activations(model: nn.Module, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        first = model.conv1(x)
        return [first, model.conv2(model.relu1(first))]


def test_guided_backprop_relu6_equals_reference(tiny_model, tiny_batch):
    x, target = tiny_batch
    model = relu6_model(tiny_model)
    assert all((a > 6).any() and (a < 0).any() for a in pre_activations(model, x))
    reference_model = copy.deepcopy(model)
    reference_model.relu1, reference_model.relu2 = GuidedReLU6(), GuidedReLU6()
    reference = METHODS["gradient"](reference_model, x, target)
    ours = METHODS["guided_backprop"](model, x, target)
    assert_close_scaled(ours, reference)
    assert_no_hooks(model)


def test_guided_backprop_without_relu_raises(tiny_batch):
    x, target = tiny_batch
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(5))
    model(x)  # materialize the lazy layer
    attach_meta(model, ModelMeta(blocks=["0", "3"], gradcam_layer="0"))
    with pytest.raises(ValueError, match="ReLU"):
        METHODS["guided_backprop"](model, x, target)
    assert_no_hooks(model)


@pytest.fixture(scope="module")
def timm_resnet18() -> nn.Module:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    # timm zero-initializes the last BatchNorm of every residual block (zero_init_last), so
    # the last conv (the meta fallback layer) gets zero gradients and GradCAM would be all 0;
    # give those BatchNorms a non-zero scale so the test checks real maps.
    with torch.no_grad():
        for block in (*model.layer1, *model.layer2, *model.layer3, *model.layer4):
            block.bn2.weight.fill_(1.0)
    return model


def test_gradcam_and_guided_on_timm_resnet18(timm_resnet18):
    x, target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), \
        torch.tensor([1, 7])
    before = snapshot(timm_resnet18)
    for name in ("gradcam", "guided_gradcam"):
        out = METHODS[name](timm_resnet18, x, target)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    assert_model_as_found(timm_resnet18, before)


def test_guided_backprop_inplace_relu_equals_non_inplace(timm_resnet18):
    """timm uses ReLU(inplace=True); the tensor-hook guided backprop must not care."""
    x, target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), \
        torch.tensor([3, 4])
    assert any(getattr(m, "inplace", False) for m in timm_resnet18.modules())
    not_inplace = copy.deepcopy(timm_resnet18)
    for module in not_inplace.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    ours = METHODS["guided_backprop"](timm_resnet18, x, target)
    assert_close_scaled(ours, METHODS["guided_backprop"](not_inplace, x, target), atol=1e-6)
    assert differ(ours, METHODS["gradient"](timm_resnet18, x, target))


# --- shared pieces: computed once, equal to separate computation ------------------------------

def test_shared_pieces_compute_once_and_equal(tiny_model, tiny_batch):
    from methods.common import shared_pieces

    x, target = tiny_batch
    calls = []
    hook = tiny_model.fc.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    try:
        separate = {m: METHODS[m](tiny_model, x, target, **FAST.get(m, {})) for m in sorted(METHODS)}
        n_separate = len(calls)
        calls.clear()
        with shared_pieces():
            together = {m: METHODS[m](tiny_model, x, target, **FAST.get(m, {}))
                        for m in sorted(METHODS)}
    finally:
        hook.remove()
    assert all(torch.equal(separate[m], together[m]) for m in DETERMINISTIC)
    assert len(calls) < n_separate  # gradient/gxi, smoothgrad/vargrad, gbp/gradcam shared
