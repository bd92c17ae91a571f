"""Saliency methods. ``METHODS[name](model, x, target, **hparams) -> Tensor shaped like x``.

Every method returns raw, signed attributions; post-processing lives in ``metrics``.
A method leaves the model as it found it (weights, hooks, ``requires_grad``) and never
touches ``x.grad``.
"""
from harness.base.registry import Registry

METHODS = Registry("method")

# in the order of DESIGN.md section 5: the registry's order is the order of figure legends
from methods import (  # noqa: E402,F401,I001  (fill the registry)
    gradients, guided, cgi, rectgrad, lrp, path_methods, igos, controls)
