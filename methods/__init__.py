"""Saliency methods. ``METHODS[name](model, x, target, **hparams) -> Tensor shaped like x``.

Every method returns raw, signed attributions; post-processing lives in ``metrics``.
A method leaves the model as it found it (weights, hooks, ``requires_grad``) and never
touches ``x.grad``. Its facts (:class:`harness.base.facts.MethodFacts`: what it needs of the
model, whether it is deterministic or uses the model at all, its hyperparameter ranges) are
given in its decorator and read with ``METHODS.facts(name)``.
"""
from harness.base.facts import MethodFacts, check_method_facts
from harness.base.registry import Registry

METHODS = Registry("method", facts=MethodFacts, check=check_method_facts)

from methods import cgi, controls, gradients, guided, igos, lrp, path_methods, rectgrad  # noqa: F401  (fill the registry)
