"""``methods.prefix``: randomization stages reuse the original model's unchanged forward pass.

The property that matters: with the cache open, every map is the map of a full pass (the same
function; BatchNorm merged into its convolution). Compared in float64, where the only
differences are the order of a few additions (gradient contributions at a frontier tensor, the
merged BatchNorm's (x - m) * s * w + b against x * (W s) + b'): a few ulp per operation through
some 20 layers, so 1e-9 of the map's largest value holds with a wide margin, while a wrong
frontier or a stale weight moves the map by O(1) of it. And every refusal (hooks, autocast,
training mode, in-place changes, budget) falls back to the full pass.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from checks import CHECKS
from harness.base.meta import ModelMeta, attach_meta
from harness.base.context import CheckContext, MetricSpec, RunNote
from harness.base.randomize import ordered, randomize_, restore_, restored, stage_seed, stages
from harness.data import Dataset
from harness.zoo import MODELS
from methods import METHODS
from methods.common import logit_gradient
from methods.prefix import active_cache, reused_prefix
from metrics import METRICS
from tests.test_fold import with_random_statistics
from tests.test_methods import FAST, MODEL_BASED, assert_no_hooks

pytestmark = pytest.mark.usefixtures("one_thread")
RELATIVE = 1e-9  # of the largest |map|, float64 (module doc)
BUDGET = 2**30


class Residual(nn.Module):
    """A strided conv-BN-ReLU stem, a residual join read by both sides of a later stage, a loose
    parameter."""

    def __init__(self) -> None:
        super().__init__()
        # a strided 3-channel stem: its input gradient runs in polyphase form in the trace
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.offset = nn.Parameter(torch.full((1, 6, 1, 1), 0.1))
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        attach_meta(self, ModelMeta(blocks=["conv1", "conv2", "conv3", "fc"],
                                    gradcam_layer="relu3"))

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)) + h + self.offset)
        return self.fc(self.relu3(self.conv3(h)).mean((2, 3)))


class InPlace(nn.Module):
    """A value read by a later (randomized) operation, then changed in place by an original
    one: the recorded value is no longer what the reader saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.offset = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        y = h + self.offset
        h = h.relu_()
        return self.fc((y * h).mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = x.flatten(1)[:, :12]
        return self.fc(y if y.sum() > 0 else -y)


def build(name: str) -> nn.Module:
    """Small float64 models: a residual net with BatchNorm, the zoo's tiny CNN, timm's ResNet-18
    (BatchNorm folded, residual joins, 62 module stages) with random BatchNorm statistics."""
    if name == "residual":
        model = with_random_statistics(Residual().eval())
    elif name == "resnet18":
        model = with_random_statistics(MODELS["timm"](name="resnet18", num_classes=5))
    else:
        model = MODELS[name](num_classes=5, in_chans=3, seed=0)
    return model.double().eval()


def inputs(n: int = 2, size: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64), torch.tensor([1, 3])


def full_pass(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The gradient with no cache open (a nested context would see the outer one)."""
    from methods import prefix

    token = prefix._ACTIVE.set(None)
    try:
        return logit_gradient(model, x, target)
    finally:
        prefix._ACTIVE.reset(token)


def assert_same_map(actual: Tensor, expected: Tensor) -> None:
    scale = expected.abs().max()
    assert scale > 0
    assert ((actual - expected).abs().max() / scale).item() <= RELATIVE


def stage_plan(model: nn.Module, x: Tensor, granularity: str) -> list:
    return ordered(stages(model, x, granularity), "top_down")


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("cumulative", [True, False], ids=["cascading", "independent"])
@pytest.mark.parametrize("name", ["residual", "tiny_cnn", "resnet18"])
def test_every_stage_equals_the_full_pass(name, cumulative, fold):
    model = build(name)
    x, target = inputs()
    granularity = "module"
    plan = stage_plan(model, x, granularity)
    with restored(model) as saved, reused_prefix(model, BUDGET, fold=fold) as cache:
        assert cache is not None and active_cache(model) is cache
        assert_same_map(logit_gradient(model, x, target), full_pass(model, x, target))
        for name_, parts in plan:
            if not cumulative:
                restore_(model, saved)
            randomize_(parts, "default", stage_seed(0, name_))
            assert_same_map(logit_gradient(model, x, target), full_pass(model, x, target))
        stats = cache.stats
    assert stats.recorded == 1
    # every stage reused the recording but those whose first layer changed (with its
    # BatchNorm when folded): at least half of the top-down stages
    assert set(stats.reasons) == {"nothing to reuse"}
    assert stats.reused + stats.reasons["nothing to reuse"] == len(plan)
    assert stats.reused >= len(plan) // 2
    assert active_cache(model) is None


@pytest.mark.parametrize("name", MODEL_BASED)
def test_every_method_gives_its_full_pass_maps(name):
    """The method table: under the cache, at the original model and at a randomized stage,
    every method's maps equal those without it (it reused the recording, or refused)."""
    model = build("residual")
    x, target = inputs()
    kwargs = FAST.get(name, {})
    expected = []
    with restored(model):
        expected.append(METHODS[name](model, x, target, **kwargs))
        randomize_([model.conv3], "default", 1)
        expected.append(METHODS[name](model, x, target, **kwargs))
    with restored(model), reused_prefix(model, BUDGET):
        METHODS[name](model, x, target, **kwargs)  # records the original model's chunks
        actual = [METHODS[name](model, x, target, **kwargs)]
        randomize_([model.conv3], "default", 1)
        actual.append(METHODS[name](model, x, target, **kwargs))
    for a, e in zip(actual, expected):
        if e.abs().max() == 0:
            assert torch.equal(a, e)
        else:
            assert_same_map(a, e)
    assert_no_hooks(model)


def test_hooks_autocast_and_training_run_the_full_pass():
    model = build("residual")
    x, target = inputs()
    with reused_prefix(model, BUDGET) as cache:
        logit_gradient(model, x, target)  # recorded
        handle = model.conv1.register_forward_hook(lambda m, i, o: None)
        try:
            logit_gradient(model, x, target)
        finally:
            handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logit_gradient(model, x, target)
        with restored(model):  # a training-mode pass updates the BatchNorm statistics
            model.train()
            logit_gradient(model, x, target)
            model.eval()
        logit_gradient(model, x, target)  # the original model again: reused
    assert cache.stats.reasons == {"hooks": 1, "autocast": 1, "training mode": 1}
    assert cache.stats.declined == 3 and cache.stats.reused == 1


def test_a_frontier_changed_in_place_runs_the_full_pass():
    model = InPlace().double().eval()
    x, target = inputs()
    with restored(model), reused_prefix(model, BUDGET) as cache:
        logit_gradient(model, x, target)
        randomize_([model.offset], "default", 3)
        assert_same_map(logit_gradient(model, x, target), full_pass(model, x, target))
    assert cache.stats.reasons == {"frontier changed in place": 1}


def test_untraceable_model_and_budget():
    with reused_prefix(Untraceable(), BUDGET) as cache:
        assert cache is None
    model = build("residual")
    original = copy.deepcopy(model)
    x, target = inputs()
    with restored(model), reused_prefix(model, budget_bytes=1) as cache:
        first = logit_gradient(model, x, target)
        randomize_([model.fc], "default", 3)
        assert_same_map(logit_gradient(model, x, target), full_pass(model, x, target))
    assert cache.stats.over_budget and cache.stats.recorded == 0
    assert cache.stats.reasons == {"not recorded": 1}
    assert_same_map(first, full_pass(original, x, target))


def seeded_residual() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return with_random_statistics(Residual().eval()).double()


def check_rows(check: str, reuse: bool, memory_limit: int | None = None,
               **kwargs) -> tuple[list[dict], dict]:
    model = seeded_residual()
    g = torch.Generator().manual_seed(2)
    data = Dataset(inputs=torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64),
                   labels=torch.arange(4),
                   samples=torch.arange(4), mean=(0.0,) * 3, std=(1.0,) * 3, source="test")
    ctx = CheckContext(model=model, data=data,
                       methods={m: METHODS[m] for m in ("gradient", "integrated_gradients")},
                       metrics=[MetricSpec("spearman", METRICS["spearman"], "signed")],
                       batch_size=4, n_maps=0, progress=False, memory_limit=memory_limit)
    before = copy.deepcopy(model.state_dict())
    rows, notes = [], {}
    for item in CHECKS[check](ctx, reuse_prefix=reuse, granularity="module", **kwargs):
        if isinstance(item, dict):
            rows.append(item)
        elif isinstance(item, RunNote):
            notes[item.key] = item.value
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_no_hooks(model)
    return rows, notes


@pytest.mark.parametrize("check", ["cascading", "independent"])
def test_check_rows_with_and_without_reuse(check):
    """float64 through the whole check, so that no two pixels' values are within the maps'
    rounding of each other: a Spearman correlation of 32 x 32 maps moves by up to 12 / n^2 =
    1.1e-5 when two adjacent ranks swap, which float32's ~1e-7 differences (folded BatchNorm)
    do at the odd near-tie (seen: 1.3e-5 on torch's plainest kernels). The rows agree to 1e-9,
    and the note says what was reused."""
    with_reuse, notes = check_rows(check, True)
    without, off = check_rows(check, False)
    assert off["prefix_reuse"] == "off"
    record = notes["prefix_reuse"]
    assert record["recorded_chunks"] > 0 and record["reused_chunks"] > 0
    assert record["polyphase_stems"] == ["conv1"]
    assert len(with_reuse) == len(without) > 0
    for a, b in zip(with_reuse, without):
        assert (a["method"], a["stage"], a["sample"]) == (b["method"], b["stage"], b["sample"])
        assert a["value"] == pytest.approx(b["value"], abs=1e-9)


def test_bottom_up_cascade_does_not_record():
    """Nothing below a change to reuse: every pass runs through the folded trace, and the table
    is that of the model as given (to 1e-9, as above)."""
    rows, notes = check_rows("cascading", True, order="bottom_up")
    plain, _ = check_rows("cascading", False, order="bottom_up")
    record = notes["prefix_reuse"]
    assert record["recorded_chunks"] == 0 and record["reused_chunks"] == 0
    assert record["full_passes"] > 0 and set(record["reasons"]) == {"recording off"}
    for a, b in zip(rows, plain, strict=True):
        assert a["value"] == pytest.approx(b["value"], abs=1e-9)


def test_stage_zero_scores_one_whichever_path():
    """Over budget the references come from the recording pass and the stages from full passes
    through the trace: the same computation, so the re-computed original maps are the
    reference maps bit for bit (Spearman exactly 1)."""
    rows, notes = check_rows("cascading", True, memory_limit=2)
    assert notes["prefix_reuse"]["over_budget"] and notes["prefix_reuse"]["recorded_chunks"] == 0
    original = [r["value"] for r in rows if r["stage_index"] == 0]
    assert original and all(v == 1.0 for v in original)
