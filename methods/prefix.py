"""The unchanged part of a forward pass, reused across randomization stages.

In the top-down cascade of Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", arXiv
1810.03292, §4) stage k changes only the top k blocks: every activation below them is what the
original model computed for the same input. In independent randomization stage k changes one
block: everything before it is original. A gradient map of a randomized stage therefore needs
the forward pass only from the first changed layer on (the *suffix*), started from the original
pass's activations at its border (the *frontier*), then the backward through the suffix and,
from the frontier, through the original pass's kept autograd graph (the *prefix*).

:func:`reused_prefix` opens such a cache for one model. Inside it,
:func:`methods.common.logit_gradient` asks :meth:`PrefixCache.gradient` first:

* while the model is original, a chunk of rows seen for the first time is *recorded*: one
  forward pass through the model's ``torch.fx`` trace that keeps every node's value and its
  autograd graph (``retain_graph``), under a memory budget;
* once tensors have changed (found by comparing every parameter and buffer with the values at
  the start, whenever one's version counter or storage moved), a recorded chunk runs only the
  nodes that depend on a changed tensor.

In the trace every eval-mode BatchNorm that follows a convolution is merged into it
(:mod:`methods.fold`; refolded whenever the weights change): the same function, whose
backward skips BatchNorm's (22 % of a forward+backward of efficientnet_lite0 in channels-last).
A chunk that cannot reuse a recording (never recorded, over the budget, a frontier tensor that
an in-place operation changed after it was made, a stage whose first layer changed, recording
off) runs a full pass through the same trace, so that every map of a run comes from one
computation and a re-computed original map equals its reference bit for bit. Hooks on any module
(Guided Backprop, GradCAM, LRP), autocast and training mode run on the model as given, as does
everything when the model cannot be traced.

A reused chunk computes the same operations on the same values as a full pass through the
trace, up to the order in which autograd adds two gradient contributions where a frontier
tensor also feeds the prefix (~1 ulp); against the model as given, the merged BatchNorms add
float rounding (tests/test_prefix.py: within 1e-9 of the largest value in float64).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from methods.fold import Fold, fold_graph_module, polyphase_stems, refold, trace_model

Score = Callable[[Tensor], Tensor]  # logits (n, K) -> the scalar to differentiate
_ACTIVE: ContextVar[PrefixCache | None] = ContextVar("reused_prefix", default=None)


@contextmanager
def reused_prefix(model: nn.Module, budget_bytes: int, enabled: bool = True,
                  fold: bool = True, record: bool = True) -> Iterator[PrefixCache | None]:
    """Inside the block, input gradients of ``model`` reuse its unchanged prefix (module doc).

    ``budget_bytes`` bounds the recorded activations; the cache is freed on exit. ``fold``:
    the trace has its BatchNorms merged into their convolutions (:mod:`methods.fold`).
    ``record=False`` (a bottom-up cascade: nothing below a change to reuse): every pass runs
    through the trace, for the merged BatchNorms alone. Yields the cache, or None when not
    ``enabled`` or ``model`` cannot be traced (all runs on the model as given).
    """
    cache = PrefixCache.of(model, budget_bytes, fold, record) if enabled else None
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
        if cache is not None:
            cache.clear()


def active_cache(model: nn.Module) -> PrefixCache | None:
    """The open cache of ``model`` (the very object), if any."""
    cache = _ACTIVE.get()
    return cache if cache is not None and cache.model is model else None


@dataclass
class Recording:
    """The original model's pass of one chunk: ``leaf`` (n, C, H, W) is the input (a private
    copy, the leaf of the kept autograd graph), ``values`` every node's output by node name."""
    leaf: Tensor
    values: dict[str, object]
    mutated: frozenset[str]  # nodes whose tensor an in-place op changed after it was made
    nbytes: int


@dataclass
class Suffix:
    """The nodes that depend on a changed tensor, as a module of the frontier's values."""
    frontier: list[fx.Node]
    module: fx.GraphModule
    from_input: frozenset[str]  # frontier nodes that depend on the input (gradient flows back)


@dataclass
class Stats:
    recorded: int = 0  # chunks recorded (full pass, graph kept)
    reused: int = 0  # chunks computed from a recording
    full: int = 0  # chunks run as a full pass through the trace
    declined: int = 0  # chunks run on the model as given (hooks, autocast, training mode)
    nbytes: int = 0  # bytes held by the recordings
    over_budget: bool = False
    reasons: dict[str, int] = field(default_factory=dict)  # why chunks were not reused
    polyphase_stems: list[str] = field(default_factory=list)  # methods.polyphase in the trace

    def record(self) -> dict:
        return {"recorded_chunks": self.recorded, "reused_chunks": self.reused,
                "full_passes": self.full, "passes_on_the_model": self.declined,
                "recorded_bytes": self.nbytes, "over_budget": self.over_budget,
                "reasons": dict(self.reasons), "polyphase_stems": list(self.polyphase_stems)}


class _Recorder(fx.Interpreter):
    """Runs the trace and keeps every node's value and the version it had when made."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)
        self.versions: dict[str, tuple[int, ...]] = {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        self.versions[node.name] = _versions(value)
        return value


def _versions(value) -> tuple[int, ...]:
    return tuple(t._version for t in tree_flatten(value)[0] if isinstance(t, Tensor))


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module
    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks
            or getattr(torch_module, "_global_backward_pre_hooks", None)):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or getattr(m, "_backward_pre_hooks", None) for m in model.modules())


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


class PrefixCache:
    """Recordings of the original model's passes and the suffix of its current changes."""

    def __init__(self, model: nn.Module, live: fx.GraphModule, folds: list[Fold],
                 budget_bytes: int, record: bool = True):
        self.model = model
        self.record = record  # False: no recordings, every pass through the (folded) trace
        # the model's trace on its own modules (merged convolutions refolded when it changes):
        # a suffix runs the current weights
        self.live = live
        self.folds = folds
        # the recordings run on a private copy: their kept graphs hold its weights, which no
        # randomization touches (a weight randomized and restored in place would fail autograd's
        # version check in the kept graph, though its values are the original ones again)
        self.frozen = copy.deepcopy(live)
        self.original = dict(_named_tensors(self.frozen))
        self.budget = budget_bytes
        self.recordings: dict[tuple, list[Recording]] = {}
        self.stats = Stats()
        self._fingerprint: tuple | None = None
        self._changed: frozenset[str] = frozenset()
        self._suffixes: dict[frozenset[str], Suffix | None] = {}

    @classmethod
    def of(cls, model: nn.Module, budget_bytes: int, fold: bool = True,
           record: bool = True) -> PrefixCache | None:
        live = trace_model(model)
        if live is None:  # untraceable (data-dependent control flow...): no reuse
            return None
        folds = fold_graph_module(live) if fold and not model.training else []
        stems = polyphase_stems(live)  # the stem's input gradient as one dense convolution
        cache = cls(model, live, folds, _device_budget(model, budget_bytes), record)
        cache.stats.polyphase_stems = stems
        return cache

    def clear(self) -> None:
        self.recordings.clear()
        self._suffixes.clear()

    # --- what changed -------------------------------------------------------------------------

    def changed(self) -> frozenset[str]:
        """Names (in the trace) of the tensors whose values differ from the start's. Compared
        again, after refolding, only when a tensor of the model moved: its version counter or
        storage (cheap to read per call)."""
        fingerprint = tuple((t.data_ptr(), t._version) for _, t in _named_tensors(self.model))
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            refold(self.live, self.folds)
            self._changed = frozenset(
                name for name, t in _named_tensors(self.live)
                if name not in self.original or t.shape != self.original[name].shape
                or not torch.equal(t.detach(), self.original[name]))
        return self._changed

    # --- the input gradient -------------------------------------------------------------------

    def gradient(self, x: Tensor, score: Score) -> Tensor | None:
        """d score(logits) / dx (n, C, H, W): through a recording where one applies, else a full
        pass through the (folded) trace; None when the model must run as given (hooks,
        autocast, training mode). ``score``: logits (n, K) -> the scalar to differentiate
        (rows independent)."""
        reason = self._refusal()
        if reason:
            self._count("declined", reason)
            return None
        changed = self.changed()
        recording = self._find(x)
        if recording is None:
            if not self.record or changed or self.stats.over_budget:
                reason = ("recording off" if not self.record else "not recorded" if changed
                          else "over budget")
                return self._full_pass(x, score, reason)
            return self._record(x, score)
        suffix = self._suffix(changed)
        if suffix is None:
            return self._full_pass(x, score, "nothing to reuse")
        if any(node.name in recording.mutated for node in suffix.frontier):
            return self._full_pass(x, score, "frontier changed in place")
        grad = _suffix_gradient(suffix, recording, score)
        if grad is None:
            return self._full_pass(x, score, "frontier holds a container")
        self.stats.reused += 1
        return grad

    def _refusal(self) -> str:
        if self.model.training:
            return "training mode"
        if _autocast_on():
            return "autocast"
        if _has_hooks(self.model):
            return "hooks"
        return ""

    def _count(self, kind: str, reason: str) -> None:
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1

    def _full_pass(self, x: Tensor, score: Score, reason: str) -> Tensor:
        """The whole trace with the current weights (its merged BatchNorms refolded by
        :meth:`changed`): the same function as every recording, so that the maps of a run
        come from one computation, whichever path each chunk took."""
        self._count("full", reason)
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score(self.live(leaf)), leaf)
        return grad.detach()

    @staticmethod
    def _key(x: Tensor) -> tuple:
        return (tuple(x.shape), x.stride(), x.dtype, str(x.device), float(x.detach().sum()))

    def _find(self, x: Tensor) -> Recording | None:
        for recording in self.recordings.get(self._key(x), []):
            if torch.equal(recording.leaf.detach(), x.detach()):
                return recording
        return None

    def _record(self, x: Tensor, score: Score) -> Tensor:
        """The full pass through the trace, every value and the graph kept; its gradient."""
        leaf = x.detach().clone().requires_grad_(True)  # a private copy: the caller may reuse x
        recorder = _Recorder(self.frozen)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score(recorder.run(leaf)), leaf, retain_graph=True)
        values = {node.name: recorder.env[node] for node in self.frozen.graph.nodes}
        mutated = frozenset(name for name, value in values.items()
                            if _versions(value) != recorder.versions.get(name))
        recording = Recording(leaf, values, mutated, _storage_bytes(values.values()))
        if self.stats.nbytes + recording.nbytes > self.budget:
            self.stats.over_budget = True  # not kept: this and later chunks run full passes
        else:
            self.recordings.setdefault(self._key(x), []).append(recording)
            self.stats.nbytes += recording.nbytes
            self.stats.recorded += 1
        return grad.detach()

    # --- the suffix of the current changes ----------------------------------------------------

    def _suffix(self, changed: frozenset[str]) -> Suffix | None:
        if changed not in self._suffixes:
            self._suffixes[changed] = self._build_suffix(changed)
        return self._suffixes[changed]

    def _build_suffix(self, changed: frozenset[str]) -> Suffix | None:
        nodes = list(self.live.graph.nodes)
        dirty: set[fx.Node] = set()
        from_input: set[fx.Node] = set()
        owners = _owners(changed)
        for node in nodes:
            inputs = node.all_input_nodes
            if node.op == "placeholder" or any(n in from_input for n in inputs):
                from_input.add(node)
            if (node.op in ("call_module", "get_attr") and str(node.target) in owners) or any(
                    n in dirty for n in inputs):
                dirty.add(node)
        output = nodes[-1]
        # clean nodes a dirty node (or the output) reads; clean get_attr nodes are copied instead
        frontier = [n for n in nodes if n not in dirty and n.op not in ("output", "get_attr")
                    and any(u in dirty or u is output for u in n.users)]
        if all(n.op == "placeholder" for n in frontier):
            return None  # the whole pass depends on the changes (or reads only the input)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in frontier:
            env[node] = graph.placeholder(f"frontier_{node.name}")
        for node in nodes:
            if node in env:
                continue
            if node is output or node in dirty or (
                    node.op == "get_attr" and any(u in dirty for u in node.users)):
                env[node] = graph.node_copy(node, lambda n: env[n])
        return Suffix(frontier, fx.GraphModule(self.live, graph),
                      frozenset(n.name for n in frontier if n in from_input))


def _owners(changed: frozenset[str]) -> set[str]:
    """The changed tensors' names and every module path above them ("a.b.weight" -> "a.b.weight",
    "a.b", "a"): a module call or attribute read of one of these reads a changed tensor."""
    owners = set()
    for name in changed:
        parts = name.split(".")
        owners.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return owners


def _suffix_gradient(suffix: Suffix, recording: Recording, score: Score) -> Tensor | None:
    """Forward and backward of the suffix from the recorded frontier, then backward through the
    recording's kept graph: (n, C, H, W), or None when a frontier value holds tensors in a
    container (not handled: the caller runs the full pass)."""
    args, leaves, originals = [], [], []
    for node in suffix.frontier:
        value = recording.values[node.name]
        if not isinstance(value, Tensor):
            if any(isinstance(v, Tensor) for v in tree_flatten(value)[0]):
                return None
            args.append(value)
        elif node.name in suffix.from_input and value.requires_grad:
            leaf = value.detach().requires_grad_(True)
            leaves.append(leaf)
            originals.append(value)
            args.append(leaf.clone())  # the suffix may write into it in place; the record stays
        else:
            args.append(value.detach())
    with torch.enable_grad():
        grads = torch.autograd.grad(score(suffix.module(*args)), leaves, allow_unused=True)
        pairs = [(o, g) for o, g in zip(originals, grads) if g is not None]
        if not pairs:
            return torch.zeros_like(recording.leaf).detach()
        direct = [g for o, g in pairs if o is recording.leaf]  # the input itself on the frontier
        through = [(o, g) for o, g in pairs if o is not recording.leaf]
        total = direct[0] if direct else None
        if through:
            (prefix,) = torch.autograd.grad([o for o, _ in through], recording.leaf,
                                            [g for _, g in through], retain_graph=True)
            total = prefix if total is None else total + prefix
    return total.detach()


def _device_budget(model: nn.Module, budget_bytes: int) -> int:
    """On a GPU the recordings live in its memory: at most half of what it has free."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cuda":
        return budget_bytes
    free, _ = torch.cuda.mem_get_info(device)
    return min(budget_bytes, free // 2)


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _storage_bytes(values) -> int:
    """Bytes of the distinct storages of the tensors in ``values``."""
    seen: dict[int, int] = {}
    for value in values:
        for t in tree_flatten(value)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
