"""``methods.polyphase``: the stem's input gradient as one dense convolution equals autograd's.

Both compute, for every input pixel, the same sum of m = O * ceil(kh/sh) * ceil(kw/sw) products
W * g, in different orders. A sum of m rounded products is within gamma_m * sum |W| |g| of the
exact value (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1; gamma_m = m u /
(1 - m u), u = eps / 2), whatever the order or blocking; so the two results differ by at most
2 gamma_m times that sum, computed here per pixel as the transposed convolution of |g| with |W|.
A wrong phase, flip or crop moves a pixel by a whole product, far outside that bound.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.zoo import MODELS
from methods.fold import polyphase_stems, trace_model
from methods.polyphase import PolyphaseConv2d, is_stem, polyphase_input_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

# (in channels, out channels, kernel, stride, padding, height, width)
GEOMETRIES = {
    "resnet_stem": (3, 8, 7, 2, 3, 32, 32),
    "odd_sizes": (3, 5, 3, 2, 1, 33, 31),
    "patch_embedding": (3, 6, 4, 4, 0, 16, 16),
    "unread_tail": (3, 4, 4, 4, 0, 18, 17),  # the last rows/columns no window reads
    "anisotropic": (3, 4, (3, 5), (2, 3), (1, 2), 20, 23),
    "stride_over_kernel": (3, 4, 2, 3, 0, 17, 17),
    "one_channel": (1, 4, 3, 2, 1, 28, 28),
}


def pair(v) -> tuple[int, int]:
    return v if isinstance(v, tuple) else (v, v)


def summation_bound(grad: Tensor, weight: Tensor, stride, padding, size) -> Tensor:
    """2 gamma_m * sum |W| |g| per input pixel (module doc), in float64."""
    o, _, kh, kw = weight.shape
    (sh, sw), (h, w) = pair(stride), size
    m = o * -(-kh // sh) * -(-kw // sw)
    u = torch.finfo(grad.dtype).eps / 2
    abs_sum = torch.ops.aten.convolution_backward(
        grad.abs().double(), torch.zeros(grad.shape[0], weight.shape[1], h, w,
                                         dtype=torch.float64),
        weight.abs().double(), None, pair(stride), pair(padding), (1, 1), False, (0, 0), 1,
        (True, False, False))[0]
    return 2 * m * u / (1 - m * u) * abs_sum


def reference_gradient(x: Tensor, weight: Tensor, grad: Tensor, stride, padding) -> Tensor:
    leaf = x.detach().requires_grad_(True)
    (result,) = torch.autograd.grad(F.conv2d(leaf, weight, None, stride, padding), leaf, grad)
    return result


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=list(GEOMETRIES))
def test_polyphase_equals_autograd(geometry, layout: str, dtype: torch.dtype) -> None:
    c, o, k, s, p, h, w = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c, *pair(k), generator=g, dtype=dtype)
    out_shape = F.conv2d(x, weight, None, s, p).shape
    grad = torch.randn(out_shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        x, weight, grad = (t.contiguous(memory_format=torch.channels_last)
                           for t in (x, weight, grad))
    expected = reference_gradient(x, weight, grad, s, p)
    actual = polyphase_input_gradient(grad, weight, pair(s), pair(p), (h, w))
    assert actual.shape == expected.shape
    bound = summation_bound(grad, weight, s, p, (h, w))
    assert ((actual - expected).double().abs() <= bound).all()
    if geometry == GEOMETRIES["unread_tail"]:
        assert (actual[:, :, 16:] == 0).all() and (actual[:, :, :, 16:] == 0).all()


def test_the_bound_catches_a_wrong_phase() -> None:
    """The tolerance is tight enough to see one transposed phase (the kernel not flipped)."""
    c, o, k, s, p, h, w = GEOMETRIES["resnet_stem"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c, k, k, generator=g, dtype=torch.float64)
    grad = torch.randn(F.conv2d(x, weight, None, s, p).shape, generator=g, dtype=torch.float64)
    wrong = polyphase_input_gradient(grad, weight.flip(-1), (s, s), (p, p), (h, w))
    expected = reference_gradient(x, weight, grad, s, p)
    assert not ((wrong - expected).abs() <= summation_bound(grad, weight, s, p, (h, w))).all()


def test_module_forward_is_the_convolution_and_backward_its_gradient() -> None:
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3).double()
    wrapped = PolyphaseConv2d(conv)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out = wrapped(x)
    assert torch.equal(out, conv(x))  # the very same forward
    grad = torch.randn_like(out)
    (actual,) = torch.autograd.grad(out, x, grad)
    expected = reference_gradient(x, conv.weight.detach(), grad, 2, 3)
    assert ((actual - expected).abs() <= summation_bound(grad, conv.weight.detach(), 2, 3,
                                                         (32, 32))).all()
    assert conv.weight.grad is None and wrapped.weight is conv.weight


def test_which_convolutions_are_stems() -> None:
    assert is_stem(nn.Conv2d(3, 64, 7, stride=2, padding=3))
    assert is_stem(nn.Conv2d(3, 192, 16, stride=16))  # a ViT's patch embedding
    assert not is_stem(nn.Conv2d(64, 128, 3, stride=2, padding=1))  # measured slower
    assert not is_stem(nn.Conv2d(3, 32, 3, padding=1))  # stride 1: no gain
    assert not is_stem(nn.Conv2d(4, 8, 3, stride=2, groups=2))
    assert not is_stem(nn.Conv2d(3, 8, 3, stride=2, dilation=2))
    assert not is_stem(nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"))


def test_polyphase_stems_swaps_the_trace_not_the_model() -> None:
    """timm's ResNet-18: its stem is swapped in the trace, the model keeps its own module, and
    the wrapper reads the model's weights (a randomization in place is seen)."""
    model = MODELS["timm"](name="resnet18", num_classes=5).eval()
    traced = trace_model(model)
    assert polyphase_stems(traced) == ["conv1"]
    assert type(model.conv1) is nn.Conv2d and isinstance(traced.conv1, PolyphaseConv2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.conv1.weight.mul_(-1)
        assert torch.equal(traced(x), model(x))
