"""The harness: the runner on top (plan, run, CLI, store, collect, figures driver) and the base
at the bottom (:mod:`harness.base`: registry, run context, model metadata, dataset type,
randomization), with the model zoo (:mod:`harness.zoo`) and the datasets (:mod:`harness.data`).

Importing it changes nothing in the process; :func:`harness.allocator.tune_allocator` is the
opt-in for faster CPU memory (the ``sanity`` command applies it).
"""

from harness.manifest import read_rows  # the reader of a run's table (imports no torch)

__all__ = ["evaluate", "read_rows"]


def __getattr__(name: str):
    """``harness.evaluate`` (:func:`harness.api.evaluate`), imported on first use: importing
    ``harness`` stays light."""
    if name == "evaluate":
        from harness.api import evaluate

        return evaluate
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
