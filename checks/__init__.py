"""Sanity checks. ``CHECKS[name](ctx: CheckContext, **check_cfg) -> Iterator[dict | MapRecord]``.

A check is a generator of tidy rows (dicts, see results/README.md) and map records; it does
no file I/O: the runner writes.
"""
from harness.base.registry import Registry

CHECKS = Registry("check")

from checks import (  # noqa: E402,F401  (fill the registry)
    input_bias,
    model_randomization,
    random_labels,
)
