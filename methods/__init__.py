"""Saliency methods. ``METHODS[name](model, x, target, **hparams) -> Tensor shaped like x``.

Every method returns raw, signed attributions; post-processing lives in ``metrics``.
A method leaves the model as it found it (weights, hooks, ``requires_grad``) and never
touches ``x.grad``.
"""
from harness.base.registry import Registry

METHODS = Registry("method")

from methods import cgi, controls, gradients, guided, igos, lrp, path_methods, rectgrad  # noqa: E402,F401  (fill the registry)
