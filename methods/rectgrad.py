"""Rectified Gradient (Kim et al. 2019, "Why are Saliency Maps Noisy? Cause of and Solution to
Noisy Saliency Maps", arXiv 1902.04893) and NoBias-RectGrad (Brocki & Chung 2020, "Input Bias
in Rectified Gradients and Modified Saliency Maps", arXiv 2011.05002).

In the backward pass, at the output of every ReLU / ReLU6 module, the gradient g of a unit is
kept only where its importance a * g (activation times gradient) reaches the q-th percentile of
a * g over all units of that layer output, per sample (q = 98); elsewhere it is set to 0. The
activation's own derivative then applies as usual (0 outside (0, 6) for ReLU6). RectGrad
multiplies the resulting input gradient by the input, NoBias-RectGrad does not; Brocki & Chung
show that the final multiplication is what makes RectGrad's maps follow pixel intensity.

Every method: ``(model, x, target, *, q=98.0, internal_batch_size=64, seed=0) -> Tensor`` with
x: (B, C, H, W), target: (B,); returns raw, signed (B, C, H, W), detached. ``q=None`` disables
the rectification (the plain gradient); ``q=0`` keeps every unit (a * g >= its minimum), which
gives the plain gradient too. Hooks live only inside ``with`` blocks (removed also on error);
tensor hooks, as in ``methods.guided``, so inplace activations work.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from harness.base.registry import Range
from methods.common import forward_hooks, input_gradients, shared
from methods.registry import METHODS

RECTIFIED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
PERCENTILE = Range(0, 100)  # q; null (None) turns the rectification off


def row_percentile(values: Tensor, q: float) -> Tensor:
    """The q-th percentile of every row, linear interpolation (numpy's and torch.quantile's
    default). values: (n, D) -> (n,). kthvalue has no size limit (torch.quantile has one)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    position = q / 100 * (values.shape[1] - 1)
    low = int(position)
    fraction = position - low
    lower = values.kthvalue(low + 1, dim=1).values
    if fraction == 0:
        return lower
    upper = values.kthvalue(low + 2, dim=1).values
    return lower + fraction * (upper - lower)


def rectify(activation: Tensor, grad: Tensor, q: float) -> Tensor:
    """grad where activation * grad >= its q-th percentile over the sample's units, else 0.

    activation, grad: (n, ...) outputs of one activation call -> (n, ...).
    """
    importance = (activation * grad).flatten(1)
    keep = importance >= row_percentile(importance, q).unsqueeze(1)
    return grad * keep.view_as(grad)


@contextmanager
def rectified_activations(model: nn.Module, q: float | None) -> Iterator[None]:
    """Inside the block, gradients through every nn.ReLU / nn.ReLU6 of model are rectified."""
    if q is None:  # no rectification: the plain gradient
        yield
        return
    activations = [m for m in model.modules() if isinstance(m, RECTIFIED_ACTIVATIONS)]
    if not activations:
        raise ValueError(f"RectGrad needs nn.ReLU or nn.ReLU6 modules; {type(model).__name__} "
                         "has none (functional activations can't be hooked)")

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        if output.requires_grad:
            activation = output.detach()
            output.register_hook(lambda grad: rectify(activation, grad, q))

    with forward_hooks(activations, hook):
        yield


def rectified_gradient(model: nn.Module, x: Tensor, target: Tensor, q: float | None,
                       internal_batch_size: int) -> Tensor:
    """The rectified input gradient (B, C, H, W), computed once for both methods."""
    def compute() -> Tensor:
        with rectified_activations(model, q):
            return input_gradients(model, x, target, internal_batch_size)

    return shared(compute, "rectgrad", model, x, target, q)


@METHODS.register(needs=("relu",), ranges={"q": PERCENTILE})
def rectgrad(model: nn.Module, x: Tensor, target: Tensor, *, q: float | None = 98.0,
             internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Rectified gradient times the input (Kim et al. 2019, arXiv 1902.04893). (B, C, H, W)."""
    return rectified_gradient(model, x, target, q, internal_batch_size) * x.detach()


@METHODS.register(needs=("relu",), ranges={"q": PERCENTILE})
def nobias_rectgrad(model: nn.Module, x: Tensor, target: Tensor, *, q: float | None = 98.0,
                    internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """Rectified gradient without the final multiplication by the input (Brocki & Chung 2020,
    arXiv 2011.05002). (B, C, H, W)."""
    return rectified_gradient(model, x, target, q, internal_batch_size)


# what the runner checks the model has before any compute (harness/validate.py)
