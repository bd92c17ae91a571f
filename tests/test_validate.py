"""The early checks in-process (the CLI table is tests/test_bad_input.py): method
hyperparameters against signatures and declared ranges for every registered method, shards,
run-dir claims, the sweep-dir digest and ``sanity list``."""
import json

import pytest
import torch

from harness.base.registry import Range
from harness.cli import descriptions, options, sweep_dir_override
from harness.data import DATASETS
from harness.run import take_shard
from harness.store import RunStore, claim_run_dir, finished_parts
from harness.validate import check_hparams, check_shard
from methods import METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_accepts_its_defaults(name):
    import inspect

    defaults = {p.name: p.default for p in inspect.signature(METHODS[name]).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in ("internal_batch_size", "seed")}
    check_hparams(name, METHODS[name], defaults)  # the declared ranges hold the paper defaults


@pytest.mark.parametrize("method,hparams,fragment", [
    ("smoothgrad", {"sigma": 0.1}, "method.smoothgrad.sigma: unknown hyperparameter"),
    ("smoothgrad", {"seed": 1}, "unknown hyperparameter"),  # run-wide: set with seed=...
    ("smoothgrad", {"n_samples": 2.5}, "method.smoothgrad.n_samples must be int, got 2.5"),
    ("smoothgrad", {"n_samples": True}, "must be int, got True"),
    ("vargrad", {"noise_level": -0.1}, "method.vargrad.noise_level must be > 0"),
    ("integrated_gradients", {"steps": 0}, "must be >= 1, got 0"),
    ("rectgrad", {"q": -1.0}, "method.rectgrad.q must be within [0, 100]"),
    ("gradcam", {"relu": "yes"}, "method.gradcam.relu must be bool, got 'yes'"),
])
def test_bad_hparams(method, hparams, fragment):
    with pytest.raises(ValueError, match=None) as err:
        check_hparams(method, METHODS[method], hparams)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_good_hparams_pass():
    check_hparams("smoothgrad", METHODS["smoothgrad"], {"n_samples": 3, "noise_level": 1})
    check_hparams("rectgrad", METHODS["rectgrad"], {"q": None})  # null disables rectification
    assert METHODS.facts("rectgrad").ranges["q"] == Range(0, 100)


def test_shards_split_any_dataset_deterministically():
    data = DATASETS["digits"](n=7)
    shards = [take_shard(data, i, 3) for i in range(3)]
    assert [s.samples.tolist() for s in shards] == [[0, 1], [2, 3], [4, 5, 6]]
    assert torch.equal(torch.cat([s.inputs for s in shards]), data.inputs)
    assert torch.equal(take_shard(data, 1, 3).inputs, shards[1].inputs)
    with pytest.raises(ValueError, match="is empty"):
        take_shard(DATASETS["digits"](n=2), 0, 3)
    objects = DATASETS["dark_object"](n=5)  # object masks travel with their images
    parts = [take_shard(objects, i, 2) for i in range(2)]
    assert torch.equal(torch.cat([p.masks for p in parts]), objects.masks)
    for shard, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="dataset"):
            check_shard(shard, count)


def test_claims_resume_same_config_and_refuse_another(tmp_path):
    run_id, kept = claim_run_dir(tmp_path, "a" * 12, "auto")
    assert kept == 0
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "part-cascading-000-gradient.parquet").write_bytes(b"")
    assert not finished_parts(tmp_path)  # not committed: never counted as finished
    store = RunStore(tmp_path, {})  # sets the uncommitted part aside
    part = tmp_path / "rows" / "part-cascading-001-gradient.parquet"
    part.write_bytes(b"")
    store.commit(part, {"check": "cascading", "stage_index": 1, "method": "gradient"}, 0)
    assert finished_parts(tmp_path) == {"part-cascading-001-gradient.parquet"}
    assert claim_run_dir(tmp_path, "a" * 12, "true") == (run_id, 1)  # resumed, same id
    with pytest.raises(ValueError, match="different config"):
        claim_run_dir(tmp_path, "b" * 12, "auto")
    new_id, kept = claim_run_dir(tmp_path, "a" * 12, "false")  # starts over
    assert kept == 0 and new_id != run_id and not finished_parts(tmp_path)
    assert json.loads((tmp_path / "claim.json").read_text())["run_id"] == new_id
    with pytest.raises(ValueError, match="holds no earlier run"):
        claim_run_dir(tmp_path / "fresh", "a" * 12, "true")
    (tmp_path / "old" / "rows").mkdir(parents=True)
    (tmp_path / "old" / "rows" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="without claim.json"):  # never overwritten
        claim_run_dir(tmp_path / "old", "a" * 12, "auto")


def test_sweep_dir_is_a_digest_of_the_command():
    argv = ["-m", "seed=0,1", "model=tiny_cnn"]
    same = sweep_dir_override(["-m", "model=tiny_cnn", "seed=0,1", "hydra/launcher=joblib"])
    assert sweep_dir_override(argv) == same  # order and launcher do not matter
    assert sweep_dir_override(argv) != sweep_dir_override(["-m", "seed=0,2", "model=tiny_cnn"])
    assert sweep_dir_override(argv + ["hydra.sweep.dir=x"]) == []
    assert sweep_dir_override(["seed=0"]) == []  # a single run: the config digest names it


def test_list_describes_every_choice():
    table = descriptions()
    for group in ("model", "dataset", "method", "check", "metric", "experiment"):
        assert sorted(table[group]) == options(group)
        assert all(text for text in table[group].values()), group


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm",
                                      "slurm"])
def test_launchers_compose(launcher):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.split(".")[-1] == {
        "basic": "BasicLauncher", "joblib": "JoblibLauncher",
        "submitit_local": "LocalLauncher"}.get(launcher, "SlurmLauncher")
    if launcher == "slurm":  # the defaults documented in the README: they run on any cluster
        assert cfg.hydra.launcher._target_ == "hydra_plugins.sanity_harness_launcher.SlurmLauncher"
        assert cfg.hydra.launcher.partition is None and cfg.hydra.launcher.gpus_per_node == 0
        assert cfg.hydra.launcher.cpus_per_task == 1 and cfg.hydra.launcher.mem_gb == 4
        assert cfg.hydra.launcher.timeout_min == 240
        folder = OmegaConf.to_container(cfg.hydra.launcher)["submitit_folder"]
        assert folder.startswith("${hydra.sweep.dir}/.submitit/${now:")  # fresh per submission


def test_input_size_probe_names_model_shape_and_dataset():
    from harness.validate import check_input_size
    from harness.zoo import MODELS

    model = MODELS["mlp"](hidden=[8], input_size=28)
    check_input_size(model, "mlp", torch.zeros(2, 1, 28, 28), "digits")
    with pytest.raises(ValueError) as err:
        check_input_size(model, "mlp", torch.zeros(2, 1, 32, 32), "digits")
    assert str(err.value).startswith("model mlp cannot take inputs of shape (1, 32, 32) from "
                                     "dataset digits: ") and "\n" not in str(err.value)
