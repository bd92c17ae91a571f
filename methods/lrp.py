"""Layer-wise Relevance Propagation through zennit's composites (Bach et al. 2015, "On Pixel-Wise
Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE
10(7); Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview"; zennit: Anders et
al. 2021, arXiv 2106.13200).

* ``lrp_epsilon``: the epsilon rule for every convolution and dense layer.
* ``lrp_alpha_beta``: alpha-beta for convolutions (alpha=2, beta=1 by default: zennit's
  ``EpsilonAlpha2Beta1``), epsilon for dense layers.
* ``lrp_epsilon_plus``: z+ for convolutions, epsilon for dense layers (zennit's ``EpsilonPlus``).

All three keep zennit's base map: activations pass relevance through, sums (residual joins) and
average pooling split it in proportion to their inputs (``Norm``). The relevance entering the
network is the target logit at the target class and 0 elsewhere, so the input relevance sums to
about the explained logit (exactly, up to epsilon and the relevance absorbed by biases, for the
epsilon rule). The map is the relevance at the input, computed by zennit's ``Gradient``
attributor; signed, (B, C, H, W).

Canonization (done for the length of the call and always undone, also on error):
* every BatchNorm in eval mode that directly consumes the output of one conv / dense layer is
  merged into it (found by following tensors through one forward of one input, so it works for
  nn.Sequential, torchvision and timm blocks alike, timm's BatchNormAct2d included). Unlike
  zennit 0.5.1's merge, the emptied BatchNorm gets eps = 0, so it computes exactly the identity
  and the canonized model computes the original logits;
* residual joins get a ``zennit.layer.Sum`` module so the Norm rule applies instead of copying the
  relevance into both branches: torchvision ResNet blocks (zennit's own canonizers), timm ResNet
  ``BasicBlock`` / ``Bottleneck``, and timm EfficientNet / MobileNet blocks with a skip
  (``ConvBnAct``, ``DepthwiseSeparableConv``, ``InvertedResidual``, ``EdgeResidual``: every block
  of efficientnet_lite0).

Not exact: a BatchNorm that does not follow a conv / dense layer stays (passed through, as zennit
does), additions outside the blocks above copy relevance into both branches, and multiplicative
gates (squeeze-excitation in EfficientNet-B*, not in the Lite models) and smooth activations
(SiLU, GELU) have no LRP rule: relevance follows the gradient there. The residual canonizers
assume eval mode (drop-path as the identity).
"""
from __future__ import annotations

from torch import Tensor, nn

from harness.base.registry import Range
from methods.registry import METHODS


@METHODS.register(ranges={"epsilon": Range(0)})
def lrp_epsilon(model: nn.Module, x: Tensor, target: Tensor, *, epsilon: float = 1e-6,
                internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """LRP-epsilon for every conv and dense layer (Bach et al. 2015). (B, C, H, W)."""
    import methods.lrp_zennit as lrp_zennit

    return lrp_zennit.lrp_epsilon(model, x, target, epsilon=epsilon,
                            internal_batch_size=internal_batch_size, seed=seed)


# Rule weights: alpha on positive, beta on negative contributions, both >= 0 and (zennit checks
# it) alpha - beta = 1, so alpha >= 1.
@METHODS.register(ranges={"alpha": Range(1), "beta": Range(0), "epsilon": Range(0)})
def lrp_alpha_beta(model: nn.Module, x: Tensor, target: Tensor, *, alpha: float = 2.0,
                   beta: float = 1.0, epsilon: float = 1e-6, internal_batch_size: int = 64,
                   seed: int = 0) -> Tensor:
    """LRP-alpha-beta for convolutions, epsilon for dense layers (Bach et al. 2015; zennit's
    EpsilonAlpha2Beta1 for alpha=2, beta=1; zennit needs alpha - beta = 1). (B, C, H, W)."""
    import methods.lrp_zennit as lrp_zennit

    return lrp_zennit.lrp_alpha_beta(model, x, target, alpha=alpha, beta=beta, epsilon=epsilon,
                               internal_batch_size=internal_batch_size, seed=seed)


@METHODS.register(ranges={"epsilon": Range(0)})
def lrp_epsilon_plus(model: nn.Module, x: Tensor, target: Tensor, *, epsilon: float = 1e-6,
                     internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """LRP with z+ for convolutions and epsilon for dense layers (zennit's EpsilonPlus; Montavon
    et al. 2019). (B, C, H, W)."""
    import methods.lrp_zennit as lrp_zennit

    return lrp_zennit.lrp_epsilon_plus(model, x, target, epsilon=epsilon,
                                 internal_batch_size=internal_batch_size, seed=seed)
