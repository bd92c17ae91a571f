"""What the harness needs to know about a model beyond ``nn.Module``: its randomization blocks,
its GradCAM layer and its input preprocessing. The zoo attaches a :class:`ModelMeta` to every
model it builds; other models get a generic fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

_ATTR = "sanity_meta"


@dataclass
class ModelMeta:
    blocks: list[str]  # randomization blocks, module names in execution order (input -> logits)
    gradcam_layer: str  # module whose output activations GradCAM weighs
    members: dict[str, list[str]] = field(default_factory=dict)  # block -> modules, if not itself
    data_config: dict = field(default_factory=dict)  # timm style: input_size, mean, std, ...
    num_classes: int = 0
    # where the weights came from: "pretrained:<source>", "checkpoint:<sha256 of the file>",
    # "random" (initialized, neither loaded nor trained); "" when unknown (a user's model)
    weights: str = ""


def attach_meta(model: nn.Module, meta: ModelMeta) -> nn.Module:
    object.__setattr__(model, _ATTR, meta)  # plain attribute, not a submodule or buffer
    return model


def model_meta(model: nn.Module) -> ModelMeta:
    """The attached metadata, or a fallback from the top-level children and the last conv."""
    meta = getattr(model, _ATTR, None)
    return meta if meta is not None else fallback_meta(model)


def fallback_meta(model: nn.Module) -> ModelMeta:
    blocks = [name for name, child in model.named_children() if _has_parameters(child)]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no parametrized children to randomize")
    return ModelMeta(blocks=blocks, gradcam_layer=convs[-1] if convs else "")


def block_modules(model: nn.Module, block: str) -> list[nn.Module | nn.Parameter]:
    """What a randomization block spans: itself, or its declared members, modules or loose
    parameters (a ViT's ``cls_token`` and ``pos_embed`` belong to no submodule)."""
    names = model_meta(model).members.get(block, [block])
    return [member(model, name) for name in names]


def member(model: nn.Module, name: str) -> nn.Module | nn.Parameter:
    """The submodule or, failing that, the parameter called ``name``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The module whose output GradCAM uses (the last conv block by default)."""
    name = model_meta(model).gradcam_layer
    if not name:
        raise ValueError(f"{type(model).__name__} has no conv layer for GradCAM")
    return model.get_submodule(name)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
