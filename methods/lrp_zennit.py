"""The zennit side of :mod:`methods.lrp` (composites, canonizers, relevance), imported only
when an LRP method runs: zennit imports torchvision, seconds that a run without LRP (or a
command line that fails validation) should not wait for."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor, nn
from zennit.attribution import Gradient
from zennit.canonizers import AttributeCanonizer, Canonizer, NamedMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlus, LayerMapComposite, layer_map_base
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import AlphaBeta, Epsilon
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import BatchNorm, Convolution
from zennit.types import Linear as LinearLayer

from methods.common import forward_hooks, map_chunks

CompositeFactory = Callable[[list[Canonizer]], Composite]
STABILIZER = 1e-6  # zennit's default stabilizer of the rules other than epsilon


# --- the three methods ------------------------------------------------------------------------

def lrp_epsilon(model: nn.Module, x: Tensor, target: Tensor, *, epsilon: float = 1e-6,
                internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """LRP-epsilon for every conv and dense layer (Bach et al. 2015). (B, C, H, W)."""
    def composite(canonizers: list[Canonizer]) -> Composite:
        rules = [(Convolution, Epsilon(epsilon=epsilon)), (nn.Linear, Epsilon(epsilon=epsilon))]
        return LayerMapComposite(layer_map=layer_map_base(STABILIZER) + rules,
                                 canonizers=canonizers)

    return relevance(model, x, target, composite, internal_batch_size)


def lrp_alpha_beta(model: nn.Module, x: Tensor, target: Tensor, *, alpha: float = 2.0,
                   beta: float = 1.0, epsilon: float = 1e-6, internal_batch_size: int = 64,
                   seed: int = 0) -> Tensor:
    """LRP-alpha-beta for convolutions, epsilon for dense layers (Bach et al. 2015; zennit's
    EpsilonAlpha2Beta1 for alpha=2, beta=1; zennit needs alpha - beta = 1). (B, C, H, W)."""
    def composite(canonizers: list[Canonizer]) -> Composite:
        if (alpha, beta) == (2.0, 1.0):
            return EpsilonAlpha2Beta1(epsilon=epsilon, stabilizer=STABILIZER,
                                      canonizers=canonizers)
        rules = [(Convolution, AlphaBeta(alpha=alpha, beta=beta, stabilizer=STABILIZER)),
                 (nn.Linear, Epsilon(epsilon=epsilon))]
        return LayerMapComposite(layer_map=layer_map_base(STABILIZER) + rules,
                                 canonizers=canonizers)

    return relevance(model, x, target, composite, internal_batch_size)


def lrp_epsilon_plus(model: nn.Module, x: Tensor, target: Tensor, *, epsilon: float = 1e-6,
                     internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """LRP with z+ for convolutions and epsilon for dense layers (zennit's EpsilonPlus; Montavon
    et al. 2019). (B, C, H, W)."""
    def composite(canonizers: list[Canonizer]) -> Composite:
        return EpsilonPlus(epsilon=epsilon, stabilizer=STABILIZER, canonizers=canonizers)

    return relevance(model, x, target, composite, internal_batch_size)


# --- relevance at the input -------------------------------------------------------------------

def target_logit_only(logits: Tensor, target: Tensor) -> Tensor:
    """The initial relevance: logits[i, target[i]] at the target, 0 elsewhere. (n, K)."""
    index = target.to(logits.device).view(-1, 1)
    return torch.zeros_like(logits).scatter(1, index, logits.detach().gather(1, index))


def relevance(model: nn.Module, x: Tensor, target: Tensor, composite: CompositeFactory,
              internal_batch_size: int) -> Tensor:
    """Input relevance (B, C, H, W) of the target logit under ``composite(canonizers)``."""
    canonizers = canonizers_for(model, x)
    attributor = Gradient(model)  # the composite is registered here, for the whole call

    def chunk(rows: Tensor, targets: Tensor) -> Tensor:
        leaf = rows.detach().requires_grad_(True)  # never the caller's x
        _, relevance_in = attributor(leaf, lambda out: target_logit_only(out, targets))
        return relevance_in.detach()

    with torch.enable_grad(), registered(composite(canonizers), model):
        return map_chunks(chunk, x, target, internal_batch_size)


@contextmanager
def registered(composite: Composite, model: nn.Module) -> Iterator[nn.Module]:
    """Canonizers and rule hooks of ``composite`` on model inside the block; all reverted on
    exit, also when registering itself fails half-way."""
    try:
        composite.register(model)
        yield model
    finally:
        composite.remove()


# --- canonizers -------------------------------------------------------------------------------

def canonizers_for(model: nn.Module, x: Tensor) -> list[Canonizer]:
    """BatchNorm merges (traced on x[:1]) and residual Sum canonizers for the known blocks."""
    return [ExactMergeBatchNorm(batchnorm_pairs(model, x[:1])),
            AttributeCanonizer(timm_residual_attributes),
            ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]


class ExactMergeBatchNorm(NamedMergeBatchNorm):
    """zennit's merge of a BatchNorm into the preceding linear layers, exact: zennit 0.5.1 leaves
    the emptied BatchNorm's eps, so it computes x / sqrt(1 + eps) (1e-3 in timm's tf_ models)
    instead of x; here eps is 0 until removal. ``apply`` undoes its merges if one fails."""

    def register(self, linears: list[nn.Module], batch_norm: nn.Module) -> None:
        self.eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.eps = 0.0

    def remove(self) -> None:
        super().remove()
        self.batch_norm.eps = self.eps

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        lookup = dict(root_module.named_modules())
        instances: list[Canonizer] = []
        try:
            for linear_names, batch_norm_name in self.name_map:
                instance = self.copy()
                instance.register([lookup[n] for n in linear_names], lookup[batch_norm_name])
                instances.append(instance)
        except BaseException:
            for instance in reversed(instances):
                instance.remove()
            raise
        return instances


def batchnorm_pairs(model: nn.Module, x: Tensor) -> list[tuple[tuple[str], str]]:
    """``[((linear_name,), batchnorm_name), ...]``: eval-mode BatchNorms whose input is exactly
    the output tensor of one conv / dense layer, found in one no-grad forward of x. A layer or a
    BatchNorm seen in more than one pairing is left out (merging it would not be exact)."""
    norms = [m for m in model.modules()
             if isinstance(m, BatchNorm) and not m.training and m.running_var is not None]
    if not norms:
        return []
    names = {module: name for name, module in model.named_modules()}
    produced: dict[int, tuple[Tensor, nn.Module]] = {}  # id(output) -> (output, layer)
    pairs: list[tuple[str, str]] = []

    def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if isinstance(module, BatchNorm):
            hit = produced.get(id(inputs[0]))
            if hit is not None and hit[0] is inputs[0]:
                pairs.append((names[hit[1]], names[module]))
        else:
            produced[id(output)] = (output, module)  # the reference keeps the id unique

    linears = [m for m in model.modules() if isinstance(m, LinearLayer)]
    with torch.no_grad(), forward_hooks(linears + norms, record):
        model(x)
    unique = list(dict.fromkeys(pairs))
    layers = [layer for layer, _ in unique]
    batch_norms = [norm for _, norm in unique]
    return [((layer,), norm) for layer, norm in unique
            if layers.count(layer) == 1 and batch_norms.count(norm) == 1]


@cache
def _timm_skip_blocks() -> tuple[type, ...]:
    try:
        from timm.models import _efficientnet_blocks as blocks
    except ImportError:
        return ()
    names = ("ConvBnAct", "DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual")
    return tuple(getattr(blocks, name) for name in names if hasattr(blocks, name))


@cache
def _timm_resnet_blocks() -> tuple[type | None, type | None]:
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return None, None
    return BasicBlock, Bottleneck


def timm_residual_attributes(_name: str, module: nn.Module) -> dict | None:
    """AttributeCanonizer map: a Sum module and a forward that uses it for timm's residual
    joins (EfficientNet/MobileNet blocks with ``has_skip``, ResNet BasicBlock/Bottleneck)."""
    basic, bottleneck = _timm_resnet_blocks()
    if isinstance(module, _timm_skip_blocks()) and getattr(module, "has_skip", False):
        forward = _skip_block_forward
    elif basic is not None and type(module) is basic:
        forward = _timm_basic_block_forward
    elif bottleneck is not None and type(module) is bottleneck:
        forward = _timm_bottleneck_forward
    else:
        return None
    return {"forward": forward.__get__(module), "canonizer_sum": Sum()}


def _skip_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    """timm block with a skip: the class's forward without its skip gives the residual branch
    (drop-path is the identity in eval mode); the join goes through ``canonizer_sum``."""
    self.has_skip = False
    try:
        branch = type(self).forward(self, x)
    finally:
        self.has_skip = True
    return self.canonizer_sum(torch.stack([x, branch], dim=-1))


def _residual(self: nn.Module, x: Tensor, branch: Tensor) -> Tensor:
    """timm ResNet tail: (SE, drop-path,) downsampled shortcut, join through ``canonizer_sum``."""
    if self.se is not None:
        branch = self.se(branch)
    if self.drop_path is not None:
        branch = self.drop_path(branch)
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.canonizer_sum(torch.stack([shortcut, branch], dim=-1))


def _timm_basic_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    """timm.models.resnet.BasicBlock.forward (timm 1.0) with the join through a Sum module."""
    branch = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    branch = self.bn2(self.conv2(branch))
    return self.act2(_residual(self, x, branch))


def _timm_bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    """timm.models.resnet.Bottleneck.forward (timm 1.0) with the join through a Sum module."""
    branch = self.act1(self.bn1(self.conv1(x)))
    branch = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(branch)))))
    branch = self.bn3(self.conv3(branch))
    return self.act3(_residual(self, x, branch))
