"""The one registry type: a name -> callable mapping filled by a decorator (timm style).

The registry key is the function name, which is also the Hydra option name and the yaml file
name in ``conf/<group>/``. Looking up an unknown name raises :class:`UnknownNameError`, whose
one-line message lists the valid names.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError):
    """An unknown registry name; ``str(err)`` is one line naming the valid choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(dict):
    """A mapping ``name -> callable``; ``@REG.register`` adds a function under its own name."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, fn: F) -> F:
        if fn.__name__ in self:
            raise ValueError(f"{self.kind} {fn.__name__!r} is registered twice")
        self[fn.__name__] = fn
        return fn

    def __missing__(self, name: str):
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self))}"
        )
