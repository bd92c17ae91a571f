"""Eval-mode BatchNorm folded into the convolution before it, for methods that only need input
gradients of the model as it is.

In eval mode BatchNorm is a per-channel affine map, y = (z - mean) * s + beta with
s = gamma / sqrt(var + eps); after a convolution z = W * x + b it merges into one convolution with
weights W * s and bias (b - mean) * s + beta. The folded model computes the same function (up to
float rounding), so it has the same input gradients, but its forward and backward skip one pass
over every activation per BatchNorm: on efficientnet_lite0 CGI's batched backward is ~30 %,
Guided IG and iGOS++ ~16-20 % faster. :func:`gradient_model` (folding and the polyphase stem of
:mod:`methods.polyphase`) is used by the methods that only call the model (cgi, guided_ig,
blur_ig, igos_pp); methods that hook its layers (GradCAM, Guided Backprop, RectGrad,
LRP) or share pieces keyed on the model object see the model as given.
(The same identity as zennit's ``MergeBatchNorm`` canonizer; zennit edits the model in place
and keeps the BatchNorm as an identity, here the original model is never touched and the
BatchNorm leaves the graph.)
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.fx as fx
from torch import nn

from methods.polyphase import PolyphaseConv2d, is_stem


class _ConvBatchNormTracer(fx.Tracer):
    """Keeps convolutions and BatchNorms (also subclasses such as timm's) as graph nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(
            module, qualified_name)


def _after_normalization(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What a BatchNorm module does after normalizing: None for plain ``nn.BatchNorm2d``, its
    dropout and activation for timm's ``BatchNormAct2d``. Raises for another subclass (its
    forward is unknown, so it is not folded)."""
    if type(bn) is nn.BatchNorm2d:
        return None
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "drop") and hasattr(bn, "act"):
        return nn.Sequential(bn.drop, bn.act)
    raise TypeError(type(bn).__name__)


def folded_convolution(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` that also applies the eval-mode ``bn`` after it."""
    merged = copy.deepcopy(conv)
    weight, bias = merged_weights(conv, bn)
    merged.weight = nn.Parameter(weight, requires_grad=False)
    merged.bias = nn.Parameter(bias, requires_grad=False)
    return merged


@torch.no_grad()
def merged_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (O, I/g, kh, kw) and bias (O,) of ``conv`` followed by the eval-mode ``bn``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return conv.weight * scale.view(-1, 1, 1, 1), bias


def _conv_subclasses() -> tuple[type, ...]:
    """timm's ``Conv2dSame`` (it pads in its forward and then convolves with its weights:
    folding is exact), when timm is loaded. A model holding one was built by timm, so timm is
    imported by then; importing it here would cost every command line, a failing one too,
    about a second (timm.layers pulls in torch._dynamo)."""
    layers = sys.modules.get("timm.layers")
    return (layers.Conv2dSame,) if hasattr(layers, "Conv2dSame") else ()


def _foldable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A BatchNorm node in eval mode whose only input is a convolution used by nothing else."""
    if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
        return False
    bn, source = modules[node.target], node.args[0] if node.args else None
    return (not bn.training and bn.running_mean is not None and len(node.args) == 1
            and not node.kwargs and isinstance(source, fx.Node) and source.op == "call_module"
            and type(modules[source.target]) in (nn.Conv2d, *_conv_subclasses())
            and len(source.users) == 1)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every eval-mode BatchNorm2d that directly follows a Conv2d merged into it.

    Returns a ``torch.fx.GraphModule`` that shares the other submodules with ``model`` (so it
    must be rebuilt after the weights change), or ``model`` itself when there is nothing to fold
    or it cannot be traced symbolically (e.g. data-dependent control flow). ``model`` itself is
    never modified. Input (B, C, H, W) -> the same logits as ``model``.
    """
    if not any(isinstance(m, nn.BatchNorm2d) and not m.training for m in model.modules()):
        return model
    traced = trace_model(model)
    if traced is None or not fold_graph_module(traced):
        return model
    return traced.train(model.training)


def gradient_model(model: nn.Module) -> nn.Module:
    """``model`` as the input-gradient methods run it: BatchNorms folded (:func:`fold_batchnorm`)
    and each stem convolution's input gradient in polyphase form (:mod:`methods.polyphase`).
    The same function and the same input gradients up to float rounding; weights are constants
    (no parameter gradient through it). ``model`` itself when neither applies or it cannot be
    traced; never modified."""
    traced = trace_model(model)
    if traced is None:
        return model
    folded = fold_graph_module(traced) if not model.training else []
    stems = polyphase_stems(traced)
    if not folded and not stems:
        return model
    return traced.train(model.training)


def trace_model(model: nn.Module) -> fx.GraphModule | None:
    """The trace with convolutions and BatchNorms as leaves (new containers, the model's
    leaves), or None when it cannot be traced symbolically."""
    try:
        graph = _ConvBatchNormTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the model as it is"
        return None
    return fx.GraphModule(model, graph)


Fold = tuple[str, nn.Conv2d, nn.BatchNorm2d]  # target of the merged conv, the pair it came from


def fold_graph_module(folded: fx.GraphModule) -> list[Fold]:
    """Merge, in place in ``folded`` (a GraphModule of a model, sharing its leaves), every
    foldable BatchNorm into the convolution before it. Returns the merged pairs
    ``(conv target, conv, bn)`` with the model's own conv and bn modules, so that
    :func:`refold` can redo the merge after their weights changed."""
    graph = folded.graph
    modules = dict(folded.named_modules())
    pairs: list[Fold] = []
    for node in list(graph.nodes):
        if not _foldable(node, modules):
            continue
        try:
            rest = _after_normalization(modules[node.target])
        except TypeError:
            continue
        source = node.args[0]
        conv, bn = modules[source.target], modules[node.target]
        _replace_submodule(folded, source.target, folded_convolution(conv, bn))
        pairs.append((source.target, conv, bn))
        if rest is None:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        else:
            _replace_submodule(folded, node.target, rest)
    if pairs:
        graph.lint()
        folded.delete_all_unused_submodules()
        folded.recompile()
    return pairs


def polyphase_stems(traced: fx.GraphModule) -> list[str]:
    """Every stem convolution (:func:`methods.polyphase.is_stem`) of ``traced`` replaced, in
    place, by a :class:`methods.polyphase.PolyphaseConv2d` around it. Returns the targets."""
    replaced = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or node.target in replaced:
            continue
        module = traced.get_submodule(node.target)
        if is_stem(module):
            _replace_submodule(traced, node.target, PolyphaseConv2d(module))
            replaced.append(node.target)
    return replaced


@torch.no_grad()
def refold(folded: fx.GraphModule, pairs: list[Fold]) -> None:
    """The merged convolutions of ``folded`` computed again from their pairs' current weights
    (in place: the same arithmetic as the first merge, so unchanged pairs get the same bits)."""
    for target, conv, bn in pairs:
        merged, (weight, bias) = folded.get_submodule(target), merged_weights(conv, bn)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)


def _replace_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Set ``root.<target>`` to ``module`` (``GraphModule`` containers are its own copies)."""
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
