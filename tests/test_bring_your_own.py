"""A user's own model and method, from files outside the package, through three doors with one
code path: ``harness.evaluate`` in-process, the CLI with the user's config dir and
``_target_``, and an entry point of an installed distribution. The three tables are equal."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import harness
from harness.base.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
KEY = ["method", "stage_index", "sample", "metric"]
RUN_ONLY = ["run_id", "weights", "shard", "num_shards", "method_hparams"]

MYMODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's classifier: one conv, global pooling, a dense layer (any input size)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def build(seed: int = 0) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net()
'''
MYMETHODS = '''
import torch


def my_saliency(model, x, target):
    """|d logit / d x| summed over channels: a plain function returning (B, H, W)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = model(x).gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad.abs().sum(1)
'''
PLUGIN = '''
"""A plugin package: registers the user's model and method in the harness's registries."""
from harness.zoo import MODELS, finish, plain_data_config
from methods import METHODS

import mymethods
import mymodel


@MODELS.register(blocks=("conv", "fc"), gradcam_layer="relu")
def mynet(seed: int = 0) -> "mymodel.Net":
    """The user's Net (its weights: a checkpoint in real life; random here, said so)."""
    return finish("mynet", mymodel.build(seed), plain_data_config(1, 28), 10)


METHODS.register(mymethods.my_saliency)
'''
ARGS = ["dataset=digits", "dataset.n=3", "method=[gradient,my_saliency]", "metric=[spearman]",
        "check=cascading", "figures=false", "progress=false", "n_maps=0", "seed=0"]


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """The user's folder: mymodel.py, mymethods.py, a config dir, an installed plugin."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodel.py").write_text(MYMODEL)
    (folder / "mymethods.py").write_text(MYMETHODS)
    conf = folder / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "method").mkdir()
    (conf / "model" / "mynet.yaml").write_text(
        "_target_: mymodel.build\nname: Net\nseed: 0\nweights: random\n"
        "blocks: [conv, fc]\ngradcam_layer: relu\n")
    (conf / "method" / "my_saliency.yaml").write_text(
        "my_saliency:\n  _target_: mymethods.my_saliency\n")
    site = folder / "site"  # an installed distribution: its dist-info and its package
    (site / "mylab" / "conf" / "model").mkdir(parents=True)
    (site / "mylab" / "conf" / "method").mkdir()
    (site / "mylab" / "__init__.py").write_text("")
    (site / "mylab" / "sanity.py").write_text(PLUGIN)
    (site / "mylab" / "conf" / "model" / "mynet.yaml").write_text(
        "name: Net\nseed: 0\nweights: random\n")
    (site / "mylab" / "conf" / "method" / "my_saliency.yaml").write_text("my_saliency: {}\n")
    info = site / "mylab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mylab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sanity_harness.plugins]\nmylab = mylab.sanity\n")
    return folder


def sanity(user: Path, *args: str, plugin: bool = False) -> subprocess.CompletedProcess:
    path = [str(user), str(ROOT)] + ([str(user / "site")] if plugin else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, cwd=user, env=env, timeout=300)


def table(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.drop(columns=[c for c in RUN_ONLY if c in rows])
    return rows.sort_values(KEY).reset_index(drop=True)[sorted(rows.columns)]


def test_three_doors_give_one_table(user, tmp_path):
    sys.path.insert(0, str(user))
    try:
        import mymethods
        import mymodel
    finally:
        sys.path.remove(str(user))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs with OMP_NUM_THREADS=1
    try:
        in_process = harness.evaluate(mymodel.build(0), "digits", methods=[
            "gradient", mymethods.my_saliency], metrics=["spearman"], blocks=["conv", "fc"],
            gradcam_layer="relu", dataset_n=3, n_maps=0, seed=0)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    by_target = sanity(user, "hydra.searchpath=[file://conf]", "model=mynet", *ARGS,
                       f"hydra.run.dir={tmp_path}/target")
    assert by_target.returncode == 0, by_target.stderr[-2000:]
    by_plugin = sanity(user, "model=mynet", *ARGS, f"hydra.run.dir={tmp_path}/plugin",
                       plugin=True)
    assert by_plugin.returncode == 0, by_plugin.stderr[-2000:]
    tables = [table(in_process)] + [table(pd.read_parquet(tmp_path / d / "rows"))
                                    for d in ("target", "plugin")]
    assert len(tables[0]) == 2 * 3 * 3  # methods x stages (original, conv, fc) x inputs
    assert set(tables[0]["model"]) == {"Net"}
    for other in tables[1:]:
        pd.testing.assert_frame_equal(other, tables[0])
    plugin_rows = pd.read_parquet(tmp_path / "plugin" / "rows")
    assert set(plugin_rows["weights"]) == {"random"}  # said on purpose, recorded in each row


def test_plugin_entries_are_listed(user):
    listed = sanity(user, "list", plugin=True)
    assert listed.returncode == 0, listed.stderr
    assert "mynet" in listed.stdout and "my_saliency" in listed.stdout


@pytest.mark.parametrize("args,fragment", [
    (["model=mynet", "model.sed=1"], "model.sed: unknown key; valid keys: _target_, name, seed"),
    (["model=tiny_cnn", "+model.sed=1"], "model.sed: unknown key of model tiny_cnn"),
    (["model=mynet", "model._target_=nowhere.build"], "model._target_=nowhere.build"),
    (["model=tiny_cnn", "model.weights=auto"], "has random weights (neither loaded nor trained)"),
], ids=["typo", "typo with +", "missing module", "silent random weights"])
def test_bad_user_input_one_line(user, tmp_path, args, fragment):
    done = sanity(user, "hydra.searchpath=[file://conf]", *ARGS, *args,
                  f"hydra.run.dir={tmp_path}/run")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert fragment in lines[0]


def test_wrong_map_shape_fails_in_one_line():
    from harness.zoo import MODELS

    def flat_map(model, x, target):
        """A map of the wrong shape."""
        return x.flatten(1)

    with pytest.raises(ValueError) as err:
        harness.evaluate(MODELS["tiny_cnn"](), torch.rand(2, 3, 16, 16), methods=[flat_map],
                         metrics=["spearman"], n_maps=0)
    assert str(err.value) == ("method flat_map returned a map of shape (2, 768) for inputs of "
                              "shape (2, 3, 16, 16); a method returns (B, C, H, W) like its "
                              "input, or (B, H, W) / (B, 1, H, W)")


def test_registering_again_replaces_with_a_warning():
    registry = Registry("method")

    def my_method(model, x, target):
        """First version."""

    registry.register(my_method)
    first = registry["my_method"]

    def my_method(model, x, target):  # noqa: F811  (a notebook cell run again)
        """Second version."""

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry.register(my_method)
    assert registry["my_method"] is my_method is not first
    assert "registered again" in str(caught[0].message)


def test_readme_example_runs():
    """The README's "Bring your own model and method" example, run as it is written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Bring your own model and method"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    namespace: dict = {}
    threads = torch.get_num_threads()
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    rows = namespace["rows"]
    assert set(rows["method"]) == {"gradient", "my_saliency"}
    assert set(rows["metric"]) == {"spearman_abs", "ssim"}
    assert len(rows) == 2 * 2 * 4 * 3  # methods x metrics x inputs x stages (original + 2)
    assert rows.loc[rows["stage_index"] == 0, "value"].eq(1.0).all()
