"""The input gradient of a strided convolution with few input channels (a network's stem), as
one dense convolution: its polyphase form.

The gradient of y = conv(x, W, stride s) with respect to x is the transposed convolution of the
output gradient g (N, O, Ho, Wo) with W (O, C, kh, kw). For the stem of an image classifier,
C = 3 and s >= 2 (ResNet's 7x7/2, a ViT's 16x16/16 patch embedding), PyTorch's CPU kernels
(oneDNN's backward-data and conv_transpose2d alike) run it 2.5-9x slower than the forward
convolution of the same layer: they vectorize over the C = 3 channels they write. On ResNet-18
it was 19 % of a cascading check's time (torch profiler, bench (f)).

The same sums, grouped by output phase: input pixel (s*r + a, s*q + b) (in padded coordinates)
receives W[o, c, a + s*t, b + s*u] * g[o, r - t, q - u] summed over o, t, u. For each of the
s*s phases (a, b) that is a "full" stride-1 correlation of g with the sub-kernel
W[:, :, a::s, b::s] (zero-extended to ceil(k / s) taps), so all phases together are one
ordinary convolution from O to C * s * s channels (flipped, transposed sub-kernels), whose
output is interleaved back into the image (``pixel_shuffle`` generalised to sh != sw) and
cropped by the padding. It writes C * s * s >= 12 channels: 2.5x faster than the backward-data
kernel on ResNet-18's stem, 4.5x on a ViT's patch embedding, 16 images at 224 px on this CPU.
The result differs from autograd's only in the order of the sums (tests/test_polyphase.py
bounds it by the summation error).

:func:`methods.fold.polyphase_stems` swaps every such convolution of a ``torch.fx`` trace
for :class:`PolyphaseConv2d`, whose forward is the convolution itself and whose backward gives the
input gradient this way. The weights are constants to autograd: the trace serves input
gradients only (:mod:`methods.prefix`). On a GPU the layer runs as given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEM_MAX_CHANNELS = 4  # measured: C = 3 (s = 2, 4, 16) gains 2-4.5x; 64 -> 128, s = 2 loses 2x


def is_stem(conv: nn.Module) -> bool:
    """A plain strided convolution whose input gradient has few channels."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and max(conv.stride) > 1 and conv.in_channels <= STEM_MAX_CHANNELS)


def polyphase_kernel(weight: Tensor, stride: tuple[int, int]) -> Tensor:
    """The convolution that computes all phases at once: weight (O, C, kh, kw) ->
    (C * sh * sw, O, th, tw), th = ceil(kh / sh), channel c * sh * sw + a * sw + b holding the
    flipped taps W[:, c, a + sh * t, b + sw * u]."""
    o, c, kh, kw = weight.shape
    sh, sw = stride
    th, tw = -(-kh // sh), -(-kw // sw)
    padded = F.pad(weight, (0, tw * sw - kw, 0, th * sh - kh))  # zero taps past the kernel
    phases = padded.view(o, c, th, sh, tw, sw).permute(0, 1, 3, 5, 2, 4)  # (O, C, sh, sw, th, tw)
    return phases.reshape(o, c * sh * sw, th, tw).flip(-2, -1).transpose(0, 1)


def polyphase_input_gradient(grad: Tensor, weight: Tensor, stride: tuple[int, int],
                             padding: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """d <grad, conv(x, weight)> / dx: grad (N, O, Ho, Wo) -> (N, C, H, W) for ``size`` (H, W)."""
    (sh, sw), (ph, pw), (h, w) = stride, padding, size
    kernel = polyphase_kernel(weight.to(grad.dtype), stride)  # bf16 under autocast
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    th, tw = kernel.shape[-2:]
    phases = F.conv2d(grad, kernel, padding=(th - 1, tw - 1))  # (N, C*sh*sw, Ho+th-1, Wo+tw-1)
    n, _, rows, cols = phases.shape
    c = weight.shape[1]
    # (N, C, sh, sw, rows, cols) -> (N, C, rows, sh, cols, sw): phase (a, b) of cell (r, q)
    image = phases.view(n, c, sh, sw, rows, cols).permute(0, 1, 4, 2, 5, 3)
    image = image.reshape(n, c, rows * sh, cols * sw)  # padded coordinates
    short_h, short_w = max(0, ph + h - rows * sh), max(0, pw + w - cols * sw)
    if short_h or short_w:  # the last rows/columns no window reads: gradient 0
        image = F.pad(image, (0, short_w, 0, short_h))
    return image[:, :, ph:ph + h, pw:pw + w]


class _PolyphaseConvolution(torch.autograd.Function):
    """conv2d(x, weight, bias) forward; the input gradient by :func:`polyphase_input_gradient`.
    ``weight`` and ``bias`` arrive detached: no weight gradient is ever asked for. In the
    ``setup_context`` form with a generated vmap rule, so that ``torch.func.vjp`` + ``vmap``
    (CGI's batched backward) run it too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        x, weight, _, stride, padding = inputs
        ctx.save_for_backward(weight)
        ctx.geometry = (stride, padding, tuple(x.shape[-2:]))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        stride, padding, size = ctx.geometry
        return polyphase_input_gradient(grad, weight, stride, padding, size), None, None, None, None


class PolyphaseConv2d(nn.Module):
    """``conv`` (kept as a submodule, so that its weights stay the ones randomized in place or
    refolded) with the polyphase input gradient on the CPU; ``weight`` and ``bias`` read
    through, for :func:`methods.fold.refold`."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if x.device.type != "cpu":
            return conv(x)
        bias = None if conv.bias is None else conv.bias.detach()
        return _PolyphaseConvolution.apply(x, conv.weight.detach(), bias, conv.stride,
                                           conv.padding)
