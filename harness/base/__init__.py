"""The base of the stack, imported downward only: the registry type and the facts each kind of
entry declares (:mod:`~harness.base.registry`, :mod:`~harness.base.facts`), what a check gets
and gives (:mod:`~harness.base.context`), model metadata (:mod:`~harness.base.meta`), the
dataset type (:mod:`~harness.base.dataset`) and in-place randomization
(:mod:`~harness.base.randomize`). Nothing here imports ``metrics``, ``methods``, ``checks`` or
the runner."""
