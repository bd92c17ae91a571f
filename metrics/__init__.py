"""Similarity metrics. ``METRICS[name](a, b) -> Tensor (B,)`` for maps ``a, b`` of shape (B, H, W).

A metric compares ``a[i]`` with ``b[i]`` only. Maps are normalized first by
``metrics.normalize.NORMALIZATIONS[name]`` (B, C, H, W) -> (B, H, W), chosen per metric in config;
a metric's facts (:class:`harness.base.facts.MetricFacts`, ``METRICS.facts(name)``) give the
normalization it uses when the config gives none, and the ranges of its settings.
"""
from metrics import normalize, similarity  # noqa: F401  (fill the registry)
from metrics.normalize import NORMALIZATIONS
from metrics.registry import METRICS

__all__ = ["METRICS", "NORMALIZATIONS"]
