"""Saliency methods. ``METHODS[name](model, x, target, **hparams) -> Tensor shaped like x``.

Every method returns raw, signed attributions; post-processing lives in ``metrics``.
A method leaves the model as it found it (weights, hooks, ``requires_grad``) and never
touches ``x.grad``. Its facts (:class:`harness.base.facts.MethodFacts`: what it needs of the
model, whether it is deterministic or uses the model at all, its hyperparameter ranges) are
given in its decorator and read with ``METHODS.facts(name)``.
"""
# in the order of the README's method table: the registry's order is the order of figure legends
from methods import (  # noqa: F401,I001  (fill the registry)
    gradients, guided, cgi, rectgrad, lrp, path_methods, igos, controls)
from methods.registry import METHODS

__all__ = ["METHODS"]
