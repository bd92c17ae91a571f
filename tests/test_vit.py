"""Vision transformers in the zoo (``vit``: timm's ViT / DeiT family; ``vit_mnist``): block
metadata, offline failures, and which methods run on them and which refuse before compute."""
import time

import pytest
import torch

from harness.base.meta import block_modules, model_meta
from harness.validate import check_model_needs
from harness.zoo import MODELS
from methods import METHODS
from tests.test_methods import FAST

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_VIT = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 16, "num_heads": 2,
            "num_classes": 5}
# what the issue names as running on a transformer: the gradient family, the IG family,
# SmoothGrad (and VarGrad, its noise), Guided IG, Blur IG, iGOS++
MUST_RUN = {"gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad",
            "guided_ig", "blur_ig", "igos_pp"}
REFUSED = sorted(n for n in METHODS if {"relu", "conv"} & set(METHODS.facts(n).needs))


@pytest.fixture(scope="module")
def vit():
    return MODELS["vit"](**TINY_VIT)


def test_vit_blocks_cover_tokens_and_heads():
    model = MODELS["vit"](**TINY_VIT)
    meta = model_meta(model)
    assert meta.blocks == ["patch_embed", "blocks.0", "blocks.1", "norm", "head"]
    assert {id(p) for p in block_modules(model, "patch_embed")} >= {id(model.cls_token),
                                                                    id(model.pos_embed)}
    assert meta.gradcam_layer == "" and meta.data_config["input_size"] == (3, 32, 32)
    deit = MODELS["vit"](name="deit_tiny_distilled_patch16_224", **TINY_VIT)
    assert model_meta(deit).members == {"patch_embed": ["patch_embed", "cls_token", "pos_embed",
                                                        "dist_token"],
                                        "head": ["head", "head_dist"]}


def test_vit_is_seeded_and_offline_pretrained_fails_fast(monkeypatch):
    first, again = MODELS["vit"](**TINY_VIT), MODELS["vit"](**TINY_VIT)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tic = time.perf_counter()
    with pytest.raises(RuntimeError, match="model.checkpoint=PATH"):
        MODELS["vit"](pretrained=True)
    assert time.perf_counter() - tic < 5  # no retries against an unreachable hub
    with pytest.raises(ValueError, match="not a timm ViT"):
        MODELS["vit"](name="resnet18")


def test_vit_mnist_is_deterministic_from_its_seed():
    a, b, c = MODELS["vit_mnist"](), MODELS["vit_mnist"](), MODELS["vit_mnist"](seed=1)
    assert torch.equal(a.pos_embed, b.pos_embed) and not torch.equal(a.pos_embed, c.pos_embed)
    assert model_meta(a).data_config["input_size"] == (1, 28, 28)
    assert a(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", REFUSED)
def test_relu_and_conv_methods_refuse_a_vit_in_one_line(vit, name):
    with pytest.raises(ValueError, match=f"method {name} needs .* which model vit lacks") as err:
        check_model_needs(vit, "vit", {name: METHODS[name]})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if n not in REFUSED))
def test_every_other_method_runs_on_a_vit(vit, name):
    assert name not in MUST_RUN or not METHODS.facts(name).needs
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 3])
    check_model_needs(vit, "vit", {name: METHODS[name]})
    out = METHODS[name](vit, x, target, **FAST.get(name, {}))
    assert out.shape == x.shape and torch.isfinite(out).all()
    if name in MUST_RUN:  # the map depends on the input: not a constant
        assert out.flatten(1).std(1).gt(0).all()


def test_must_run_methods_are_not_refused():
    assert MUST_RUN <= set(METHODS) and not MUST_RUN & set(REFUSED)


def test_the_generic_timm_entry_knows_vits_too():
    model = MODELS["timm"](name="vit_tiny_patch16_224")  # 12 blocks
    assert model_meta(model).blocks == model_meta(MODELS["vit"]()).blocks
    assert "cls_token" in model_meta(model).members["patch_embed"]
