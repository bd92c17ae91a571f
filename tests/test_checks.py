"""Model randomization checks: stage 0 scores 1, exact stage coverage, restoration, rows."""
import math
from functools import partial

import pytest
import torch

from checks import CHECKS
from harness.base.context import CheckContext, MapRecord, MetricSpec
from harness.base.meta import model_meta
from harness.base.randomize import snapshot
from harness.data import DATASETS
from methods import METHODS
from metrics import METRICS

METRIC_NORMALIZATION = {"ssim": "absolute", "spearman": "signed", "spearman_abs": "absolute",
                        "hog": "absolute", "pearson": "signed"}
FAITHFULNESS = ("deletion_insertion", "pic", "road")  # no stages, no similarity metrics
# stages of their own (class, fully randomized model): tests/test_randomization_family.py
OWN_STAGES = ("efficient_mprt", "random_logit")
METRIC_KWARGS = {"hog": {"pixels_per_cell": 8}}  # 32x32 maps: 4x4 cells


def make_ctx(model, methods=("gradient", "guided_backprop"), n=4, **kw) -> CheckContext:
    data = DATASETS["digits"](n=n, data_config=model_meta(model).data_config)
    return CheckContext(
        model=model, data=data,
        methods={m: partial(METHODS[m], seed=0) for m in methods},
        metrics=[MetricSpec(name, partial(METRICS[name], **METRIC_KWARGS.get(name, {})),
                            METRIC_NORMALIZATION.get(name, "absolute"))
                 for name in sorted(METRICS)],
        progress=False, **kw)


def rows_of(items) -> list[dict]:
    return [item for item in items if isinstance(item, dict)]


@pytest.fixture
def model():
    from harness.zoo import MODELS

    return MODELS["tiny_cnn"](in_chans=1)


@pytest.mark.parametrize("check", [c for c in sorted(CHECKS)  # trainers: test_random_labels.py
                                   if not CHECKS.facts(c).trains_models
                                   and c != "input_bias"  # input stages: test_input_bias.py
                                   and c not in FAITHFULNESS  # test_faithfulness.py
                                   and c not in OWN_STAGES])
def test_stage0_scores_one_and_model_restored(model, check):
    before = snapshot(model)
    rows = rows_of(CHECKS[check](make_ctx(model)))
    stage0 = [r for r in rows if r["stage_index"] == 0]
    assert stage0 and all(abs(r["value"] - 1) < 1e-6 for r in stage0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {r["stage"] for r in rows} == {"original", "conv1", "conv2", "fc"}
    required = {"method", "check", "stage", "stage_index", "sample", "target", "metric", "value"}
    assert all(required <= set(r) for r in rows)
    assert len(rows) == 4 * 2 * 4 * len(METRICS)  # stages x methods x samples x metrics


def test_model_restored_when_interrupted(model):
    before = snapshot(model)
    items = CHECKS["cascading"](make_ctx(model))
    for _, item in zip(range(60), items):  # stop in the middle of a randomized stage
        pass
    items.close()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class Recorder:
    """A method that records which parameters differ from the original when it is called."""

    def __init__(self, model):
        self.original = snapshot(model)
        self.calls: list[set[str]] = []

    def __call__(self, model, x, target):
        state = model.state_dict()
        self.calls.append({k.rsplit(".", 1)[0] for k, v in self.original.items()
                           if not torch.equal(v, state[k])})
        return METHODS["gradient"](model, x, target)


@pytest.mark.parametrize("check,order,expected", [
    ("independent", "top_down", [set(), set(), {"fc"}, {"conv2"}, {"conv1"}]),
    ("cascading", "top_down", [set(), set(), {"fc"}, {"fc", "conv2"}, {"fc", "conv2", "conv1"}]),
    ("cascading", "bottom_up", [set(), set(), {"conv1"}, {"conv1", "conv2"},
                                {"conv1", "conv2", "fc"}]),
])
def test_stages_randomize_exactly_the_expected_blocks(model, check, order, expected):
    ctx = make_ctx(model, methods=())
    recorder = Recorder(model)
    ctx.methods = {"recorder": recorder}
    rows_of(CHECKS[check](ctx, order=order))
    assert recorder.calls == expected  # reference, stage 0 recomputation, then one per stage


def test_randomized_stages_lower_gradient_similarity():
    from harness.zoo import MODELS

    model = MODELS["mnist_cnn"]()
    rows = rows_of(CHECKS["cascading"](make_ctx(model, methods=("gradient",), n=6)))
    last = [r["value"] for r in rows if r["stage_index"] == 4 and r["metric"] == "spearman_abs"]
    assert sum(last) / len(last) < 0.5


def test_argmax_target_follows_randomized_prediction(model):
    rows = rows_of(CHECKS["cascading"](make_ctx(model, methods=("gradient",)), target="argmax"))
    assert all(r["target_policy"] == "argmax" for r in rows)


def test_map_records_for_figures(model):
    items = list(CHECKS["cascading"](make_ctx(model, n=4, n_maps=2)))
    records = [i for i in items if isinstance(i, MapRecord)]
    assert len(records) == 2 * 4  # methods x (original + 3 stages)
    assert all(r.maps["absolute"].shape == (2, 32, 32) for r in records)


def test_constant_map_gives_nan_with_reason(model):
    ctx = make_ctx(model, methods=())
    ctx.methods = {"zeros": lambda m, x, t: torch.zeros_like(x)}
    rows = rows_of(CHECKS["cascading"](ctx))
    assert all(math.isnan(r["value"]) and r["reason"] == "constant map" for r in rows)


def test_module_granularity_stages(model):
    rows = rows_of(CHECKS["independent"](make_ctx(model, methods=("gradient",)),
                                         granularity="module", order="bottom_up"))
    assert [r["stage"] for r in rows if r["sample"] == 0 and r["metric"] == "ssim"] == [
        "original", "conv1", "conv2", "fc"]


def test_store_writes_one_part_per_stage_and_method(model, tmp_path):

    from harness.store import RunStore, read_rows

    store = RunStore(tmp_path, {"run_id": "r", "model": "tiny_cnn", "dataset": "digits", "seed": 0},
                     CHECKS.facts("cascading"))
    for item in CHECKS["cascading"](make_ctx(model, n=2, n_maps=1)):
        store.add(item)
    store.flush()
    rows = read_rows(tmp_path)
    parts = sorted(p.name for p in (tmp_path / "rows").glob("part-*.parquet"))
    assert parts == [f"part-cascading-{i:03d}-{m}.parquet" for i in range(4)  # original + 3
                     for m in ("gradient", "guided_backprop")]  # one per stage x method
    assert len(rows) == store.rows_written == 4 * 2 * 2 * len(METRICS)
    assert (rows["run_id"] == "r").all() and not rows.duplicated().any()
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temporaries
    maps = sorted((tmp_path / "maps" / "cascading" / "gradient").glob("stage_*.npz"))
    assert len(maps) == 4
