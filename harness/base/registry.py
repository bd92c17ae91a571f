"""The one registry type: a name -> callable mapping filled by a decorator (timm style).

The registry key is the function name, which is also the Hydra option name and the yaml file
name in ``conf/<group>/``. Looking up an unknown name raises :class:`UnknownNameError`, whose
one-line message lists the valid names.

An entry's facts travel with its registration (timm keeps a model's ``default_cfgs`` beside its
function): ``@METHODS.register(needs=("relu",), ranges={"q": Range(0, 100)})``. A registry is
made with the dataclass of its kind's facts and a check of them against the function; both run
when the decorator runs, i.e. when the module is imported, so a wrong fact (an unknown key, a
range for a parameter the function does not take) or a missing docstring fails at once.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError):
    """An unknown registry name; ``str(err)`` is one line naming the valid choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RegistrationError(TypeError):
    """An entry registered with wrong facts or without a docstring (raised at import)."""


@dataclass(frozen=True)
class NoFacts:
    """The facts of a kind that declares none."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric hyperparameter: ``low <= v <= high`` (``<`` where the bound
    is exclusive). ``Range(0, exclusive_low=True)`` is "positive"."""

    low: float = -math.inf
    high: float = math.inf
    exclusive_low: bool = False
    exclusive_high: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.exclusive_low else value >= self.low
        below = value < self.high if self.exclusive_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.exclusive_low else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{'<' if self.exclusive_high else '<='} {self.high:g}"
        left, right = "(" if self.exclusive_low else "[", ")" if self.exclusive_high else "]"
        return f"within {left}{self.low:g}, {self.high:g}{right}"


FactsCheck = Callable[[str, Callable, Any], None]  # (name, fn, facts) -> None or raise


class Registry(dict):
    """A mapping ``name -> callable``; ``@REG.register`` (or ``@REG.register(**facts)``) adds a
    function under its own name, with its facts (``REG.facts(name)``)."""

    def __init__(self, kind: str, facts: type = NoFacts, check: FactsCheck | None = None):
        super().__init__()
        self.kind = kind
        self.facts_type = facts
        self.check = check
        self._facts: dict[str, Any] = {}

    def register(self, fn: F | None = None, /, **facts) -> F | Callable[[F], F]:
        """``@REG.register`` or ``@REG.register(**facts)``: add ``fn`` under ``fn.__name__``.

        Registering a function of the same module and qualified name again replaces it, with a
        warning (a notebook cell run twice); another function under a taken name is an error."""
        def add(fn: F) -> F:
            self.add(fn.__name__, fn, **facts)
            return fn

        return add(fn) if fn is not None else add

    def add(self, name: str, fn: Callable, **facts) -> None:
        """Register ``fn`` under ``name`` (the decorator's work, for callables without one)."""
        old = dict.get(self, name)
        if old is not None and _origin(old) != _origin(fn):
            raise RegistrationError(f"{self.kind} {name!r} is registered twice "
                                    f"({_origin(old)[0]} and {_origin(fn)[0]})")
        if old is not None and old is not fn:  # a notebook cell run again: the new one wins
            warnings.warn(f"{self.kind} {name!r} registered again: the new definition replaces "
                          "the old one", stacklevel=3)
        if not (getattr(fn, "__doc__", None) or "").strip():
            raise RegistrationError(f"{self.kind} {name!r} has no docstring: say what it "
                                    "computes, cite its paper, give tensor shapes")
        entry_facts = self._make_facts(name, facts)
        if self.check is not None:
            self.check(name, fn, entry_facts)
        self[name] = fn
        self._facts[name] = entry_facts

    def unregister(self, name: str) -> None:
        """Remove an entry (a test's or a notebook's own, when it is done with it)."""
        self[name]  # an unknown name raises UnknownNameError
        del self[name]
        self._facts.pop(name, None)

    def facts(self, name: str):
        """The facts ``name`` was registered with (defaults of the kind when none were given)."""
        self[name]  # an unknown name raises UnknownNameError
        return self._facts.get(name, self.facts_type())

    def _make_facts(self, name: str, facts: dict):
        known = {f.name for f in dataclasses.fields(self.facts_type)}
        unknown = sorted(set(facts) - known)
        if unknown:
            raise RegistrationError(
                f"{self.kind} {name!r}: unknown fact {', '.join(unknown)}; a {self.kind} "
                f"declares {', '.join(sorted(known)) or 'no facts'}")
        return self.facts_type(**facts)

    def __missing__(self, name: str):
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self))}"
        )


def _origin(fn: Callable) -> tuple[str, str]:
    return (getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", repr(fn)))
