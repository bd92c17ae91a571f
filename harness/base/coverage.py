"""Parameter coverage audit of a randomization run: which parameter and buffer tensors each
stage changed, and which no stage changed.

The model parameter randomization test (Adebayo et al. 2018, arXiv 1810.03292) is only as
strong as its coverage: Quantus resets only modules with ``reset_parameters``, so on a vision
transformer the class token, the position embedding and ``nn.MultiheadAttention``'s input
projection stay trained (Hedström et al. 2024, arXiv 2401.06465, discuss such partial
randomization). The audit does not trust the list of modules a stage names: a tensor counts as
changed when its values differ from the snapshot taken before the first stage.

A tensor reachable under several names (a module shared by two blocks, tied weights) is counted
once, under its first name in ``named_parameters`` / ``named_buffers`` order; its other names
are listed under ``aliases``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

PARAMETER, BUFFER = "parameter", "buffer"


def unique_tensors(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """First name -> (kind, every name of that tensor), parameters then buffers, each tensor
    once however many modules share it."""
    found: dict[int, tuple[str, list[str]]] = {}
    named = [(PARAMETER, model.named_parameters(remove_duplicate=False)),
             (BUFFER, model.named_buffers(remove_duplicate=False))]
    for kind, pairs in named:
        for name, tensor in pairs:
            found.setdefault(id(tensor), (kind, []))[1].append(name)
    return {names[0]: (kind, names) for kind, names in found.values()}


@dataclass
class CoverageAudit:
    """Filled stage by stage by a randomization check: ``differs`` after each stage's
    randomization, ``restored`` after the model is restored (independent stages)."""

    saved: dict[str, torch.Tensor]  # the snapshot (state dict names) of the original model
    tensors: dict[str, tuple[str, list[str]]]  # from :func:`unique_tensors`
    stages: dict[str, list[str]] = field(default_factory=dict)  # stage -> tensors it changed
    current: set[str] = field(default_factory=set)  # tensors differing from the original now

    @classmethod
    def of(cls, model: nn.Module, saved: dict[str, torch.Tensor]) -> CoverageAudit:
        names = {k: v for k, v in unique_tensors(model).items() if k in saved}  # persistent
        return cls(saved=saved, tensors=names)

    @torch.no_grad()
    def differs(self, model: nn.Module, stage: str) -> list[str]:
        """Record and return the tensors that differ from the original now and did not before
        this stage (for cascading stages: what this stage added)."""
        state = model.state_dict(keep_vars=True)
        now = {n for n in self.tensors if not torch.equal(state[n], self.saved[n])}
        self.stages[stage] = [n for n in self.tensors if n in now - self.current]
        self.current = now
        return self.stages[stage]

    def restored(self) -> None:
        """The model was restored to the original: nothing differs any more."""
        self.current = set()

    def never_randomized(self, kind: str) -> list[str]:
        """Tensors of ``kind`` (parameter or buffer) that no stage changed."""
        changed = {n for names in self.stages.values() for n in names}
        return [n for n, (k, _) in self.tensors.items() if k == kind and n not in changed]

    def record(self) -> dict:
        """What run.json keeps under ``coverage``."""
        return {"stages": self.stages,
                "never_randomized": {"parameters": self.never_randomized(PARAMETER),
                                     "buffers": self.never_randomized(BUFFER)},
                "aliases": {n: names[1:] for n, (_, names) in self.tensors.items()
                            if len(names) > 1},
                "tensors": {kind: sum(k == kind for k, _ in self.tensors.values())
                            for kind in (PARAMETER, BUFFER)}}

    def summary_line(self, batchnorm_stats: bool) -> str:
        """One line for the end-of-run summary: a warning that names the parameters no stage
        changed (a real gap) and buffers left alone although ``batchnorm_stats`` asked for them;
        a plain note when only BatchNorm statistics were left alone, as they are by default."""
        params, buffers = self.never_randomized(PARAMETER), self.never_randomized(BUFFER)
        gaps = []
        if params:
            gaps.append(f"{len(params)} parameter tensors never randomized (a gap in the "
                        f"test: the 'randomized' model still holds them): {_listed(params)}")
        if buffers and batchnorm_stats:
            gaps.append(f"{len(buffers)} buffers never randomized although "
                        f"check.batchnorm_stats=true: {_listed(buffers)}")
        expected = (f"{len(buffers)} buffers left as they were, as expected (BatchNorm running "
                    "statistics; check.batchnorm_stats=true resets them)"
                    if buffers and not batchnorm_stats else "")
        if gaps:
            return "warning: coverage: " + "; ".join(gaps + ([expected] if expected else []))
        total = len(self.tensors) - len(buffers)
        return f"coverage: all {total} parameter tensors randomized" + (
            f"; {expected}" if expected else "")


def _listed(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more (run.json: coverage)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
