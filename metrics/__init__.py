"""Similarity metrics. ``METRICS[name](a, b) -> Tensor (B,)`` for maps ``a, b`` of shape (B, H, W).

A metric compares ``a[i]`` with ``b[i]`` only. Maps are normalized first by
``metrics.normalize.NORMALIZATIONS[name]`` (B, C, H, W) -> (B, H, W), chosen per metric in config.
"""
from harness.base.registry import Registry

METRICS = Registry("metric")

from metrics import normalize, similarity  # noqa: E402,F401  (fill the registry)
from metrics.normalize import NORMALIZATIONS  # noqa: E402,F401
