"""Sanity checks. ``CHECKS[name](ctx: CheckContext, **check_cfg) -> Iterator[dict | MapRecord]``.

A check is one module: a generator of tidy rows (dicts, see results/README.md) and map records
that does no file I/O (the runner writes), registered with what it declares about itself
(:class:`harness.base.context.CheckFacts`: its extra columns, its unit of work for resume, its
end-of-run summary and its figures, which may live in a module ``checks/<name>_figures.py``).
"""
from checks import (  # noqa: F401  (fill it)
    deletion_insertion,
    efficient_mprt,
    input_bias,
    model_randomization,
    pic,
    random_logit,
    random_labels,
    road,
)
from checks.registry import CHECKS

__all__ = ["CHECKS"]
