"""In-place randomization: per-stage seeds, exact block coverage, restoration."""
import pytest
import torch

from harness.base.randomize import (
    INITS,
    execution_order,
    ordered,
    randomize_,
    restored,
    snapshot,
    stage_seed,
    stages,
)
from harness.zoo import MODELS


def changed(model, before) -> set[str]:
    after = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def test_stage_seeds_differ_and_are_stable():
    assert stage_seed(0, "conv1") == stage_seed(0, "conv1")
    assert len({stage_seed(0, s) for s in ["conv1", "conv2", "fc"]} | {stage_seed(1, "conv1")}) == 4


@pytest.mark.parametrize("init", INITS)
def test_randomize_touches_exactly_the_block_and_is_reproducible(tiny_model, init):
    before = snapshot(tiny_model)
    randomize_([tiny_model.conv2], init, seed=3)
    assert changed(tiny_model, before) == {"conv2.weight", "conv2.bias"}
    first = snapshot(tiny_model)
    tiny_model.load_state_dict(before)
    randomize_([tiny_model.conv2], init, seed=3)
    assert not changed(tiny_model, first)


def test_permute_keeps_the_values():
    model = MODELS["tiny_cnn"]()
    weight = model.conv2.weight.detach().clone()
    randomize_([model.conv2], "permute", seed=0)
    assert torch.equal(weight.flatten().sort().values, model.conv2.weight.flatten().sort().values)


def test_batchnorm_affine_only_by_default():
    model = MODELS["timm"](name="resnet18", num_classes=4)
    model.bn1.running_mean.normal_()
    stats = model.bn1.running_mean.clone()
    randomize_([model.bn1], "normal", seed=0)
    assert torch.equal(model.bn1.running_mean, stats)
    randomize_([model.bn1], "normal", seed=0, batchnorm_stats=True)
    assert torch.equal(model.bn1.running_mean, torch.zeros_like(stats))


def test_randomize_leaves_global_rng_alone(tiny_model):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    randomize_([tiny_model.conv1], "default", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_restored_after_exception(tiny_model):
    before = snapshot(tiny_model)
    params = [id(p) for p in tiny_model.parameters()]
    with pytest.raises(RuntimeError):
        with restored(tiny_model):
            randomize_(list(tiny_model.children()), "normal", seed=0)
            raise RuntimeError("interrupted")
    assert not changed(tiny_model, before)
    assert [id(p) for p in tiny_model.parameters()] == params  # restored in place


def test_execution_order_and_orders(tiny_model):
    x = torch.rand(2, 3, 32, 32)
    assert execution_order(tiny_model, x) == ["conv1", "conv2", "fc"]
    names = [n for n, _ in stages(tiny_model, x, "block")]
    assert ordered(names, "top_down") == ["fc", "conv2", "conv1"]
    assert ordered(names, "bottom_up") == names
    with pytest.raises(ValueError, match="granularity"):
        stages(tiny_model, x, "layer")


def test_module_granularity_on_resnet():
    model = MODELS["timm"](name="resnet18", num_classes=4)
    order = execution_order(model, torch.rand(1, 3, 32, 32))
    assert order[:2] == ["conv1", "bn1"] and order[-1] == "fc"
    assert order.index("layer1.0.conv1") < order.index("layer2.0.conv1")


def test_default_init_covers_multihead_attention_and_loose_parameters():
    """nn.MultiheadAttention has no reset_parameters (Quantus skips it): its own initializer
    runs; a parameter of no module initializer (a class token) gets timm's trunc N(0, 0.02²)."""
    from torch import nn

    from harness.base.randomize import LOOSE_STD

    attention = nn.MultiheadAttention(8, 2)
    reference = nn.MultiheadAttention(8, 2)
    torch.manual_seed(0)
    reference._reset_parameters()
    randomize_([attention], "default", seed=0)
    assert torch.equal(attention.in_proj_weight, reference.in_proj_weight)
    token = nn.Parameter(torch.ones(1, 1, 4096))
    randomize_([token], "default", seed=0)
    torch.manual_seed(0)  # randomize_ draws from its seed in a forked generator: the same stream
    expected = nn.init.trunc_normal_(torch.empty(1, 1, 4096), std=LOOSE_STD, a=-2 * LOOSE_STD,
                                     b=2 * LOOSE_STD)
    assert torch.equal(token, expected) and token.abs().max() <= 2 * LOOSE_STD
