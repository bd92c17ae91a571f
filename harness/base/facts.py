"""The facts each kind of registry entry declares at registration, and their checks.

``@METHODS.register(needs=("relu",), ranges={"q": Range(0, 100)})`` makes a
:class:`MethodFacts`; the registry (:mod:`harness.base.registry`) runs the kind's check against
the function when the decorator runs, so a wrong fact fails at import with a
:class:`RegistrationError`. The runner reads facts with ``METHODS.facts(name)``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from harness.base.registry import Range, RegistrationError

NEEDS = ("conv", "relu")  # conv: a GradCAM layer; relu: nn.ReLU / nn.ReLU6 modules


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class MethodFacts:
    """What the harness knows about a method before calling it.

    ``needs``: parts of the model it cannot work without (a subset of :data:`NEEDS`).
    ``deterministic``: two calls on the same input give the same map (the determinism check of
    stage 0 expects a score of 1). ``uses_model``: it calls the model (controls do not).
    ``ranges``: allowed values of its keyword-only hyperparameters, by parameter name; the
    meaning is the method's own (iGOS++'s ``alpha`` is a step size, LRP's a rule weight).
    """

    needs: tuple[str, ...] = ()
    deterministic: bool = True
    uses_model: bool = True
    ranges: Mapping[str, Range] = field(default_factory=dict)

    def __post_init__(self) -> None:  # frozen: no shared mutable defaults, lists -> tuples
        object.__setattr__(self, "needs", tuple(self.needs))
        object.__setattr__(self, "ranges", _frozen(self.ranges))


def check_method_facts(name: str, fn: Callable, facts: MethodFacts) -> None:
    """Every need is known; every range names a keyword-only parameter of ``fn`` and is a Range."""
    unknown = sorted(set(facts.needs) - set(NEEDS))
    if unknown:
        raise RegistrationError(f"method {name!r}: unknown need {', '.join(unknown)}; "
                                f"valid needs: {', '.join(NEEDS)}")
    check_ranges("method", name, fn, facts.ranges)


def check_ranges(kind: str, name: str, fn: Callable, ranges: Mapping[str, Range]) -> None:
    """Each key of ``ranges`` is a keyword parameter of ``fn`` and each value a :class:`Range`.

    Methods take their hyperparameters keyword-only (after ``model, x, target``); metrics take
    theirs after ``a, b`` as plain keywords: both kinds count."""
    params = inspect.signature(fn).parameters
    takes = {p.name for p in params.values()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty}
    for key, bounds in ranges.items():
        if key not in takes:
            raise RegistrationError(f"{kind} {name!r}: range for {key!r}, which is not a "
                                    f"keyword parameter of {name} (it takes "
                                    f"{', '.join(sorted(takes)) or 'none'})")
        if not isinstance(bounds, Range):
            raise RegistrationError(f"{kind} {name!r}: range of {key!r} must be a Range, "
                                    f"got {bounds!r}")


@dataclass(frozen=True)
class MetricFacts:
    """``normalization``: the map normalization (a key of ``metrics.NORMALIZATIONS``) used when
    the config gives none. ``ranges``: allowed values of its keyword parameters. ``title``:
    its name in figures (the paper's wording). ``fit``: ``fit(settings, (H, W)) -> settings``
    adjusting settings that cannot score maps of that size (the runner warns when it does)."""

    normalization: str = "absolute"
    ranges: Mapping[str, Range] = field(default_factory=dict)
    title: str = ""
    fit: Callable[[dict, tuple[int, int]], dict] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", _frozen(self.ranges))


def check_metric_facts(name: str, fn: Callable, facts: MetricFacts) -> None:
    """Every range names a keyword parameter of ``fn``."""
    check_ranges("metric", name, fn, facts.ranges)


Names = tuple[str, ...]
Members = Mapping[str, Names]


@dataclass(frozen=True)
class ModelFacts:
    """A model's randomization blocks (module names, input -> logits), the modules a block spans
    when it is not one module itself (a stem conv with its BatchNorm), and the module whose
    output GradCAM weighs ("" when the model has none). Each is given as a value, or, for
    parametric families (timm, an MLP of any depth), as a function of the built model.
    ``blocks=()`` (the default) takes the generic fallback of :func:`harness.base.meta.model_meta`.
    ``memory_format``: the faster memory format of its forward+backward, measured once on the
    machines it is known to run on (``"contiguous"`` | ``"channels_last"``; ``""``: not
    declared, ``memory_format=auto`` then measures it at the start of a run).
    """

    blocks: Names | Callable[[nn.Module], Names] = ()
    members: Members | Callable[[nn.Module], Members] = field(default_factory=dict)
    gradcam_layer: str | Callable[[nn.Module], str] = ""
    memory_format: str = ""

    def __post_init__(self) -> None:
        if not callable(self.blocks):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if not callable(self.members):
            object.__setattr__(self, "members", _frozen(
                {block: tuple(names) for block, names in self.members.items()}))

    def resolve(self, model: nn.Module) -> tuple[list[str], dict[str, list[str]], str]:
        """(blocks, members, gradcam layer) of the built ``model``."""
        def value(fact):
            return fact(model) if callable(fact) else fact

        members = {block: list(names) for block, names in value(self.members).items()}
        return list(value(self.blocks)), members, value(self.gradcam_layer)


def check_model_facts(name: str, fn: Callable, facts: ModelFacts) -> None:
    """Static blocks are names; static members belong to declared blocks."""
    if not callable(facts.blocks) and not all(isinstance(b, str) for b in facts.blocks):
        raise RegistrationError(f"model {name!r}: blocks must be module names, "
                                f"got {facts.blocks!r}")
    if not callable(facts.gradcam_layer) and not isinstance(facts.gradcam_layer, str):
        raise RegistrationError(f"model {name!r}: gradcam_layer must be a module name or a "
                                f"function of the model, got {facts.gradcam_layer!r}")
    if facts.memory_format not in ("", "contiguous", "channels_last"):
        raise RegistrationError(f"model {name!r}: memory_format must be contiguous or "
                                f"channels_last, got {facts.memory_format!r}")
    if not callable(facts.blocks) and not callable(facts.members):
        stray = sorted(set(facts.members) - set(facts.blocks))
        if stray:
            raise RegistrationError(f"model {name!r}: members of undeclared blocks "
                                    f"{', '.join(stray)}")
