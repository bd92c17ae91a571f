"""Configs: every option of every group composes, registry names = config file names, the CLI
rejects unknown names in one line, and an end-to-end run writes rows, run.json and figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from checks import CHECKS
from harness.cli import CONF_DIR, options
from harness.data import DATASETS
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS

REGISTRIES = {"model": MODELS, "dataset": DATASETS, "method": METHODS, "check": CHECKS,
              "metric": METRICS}
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_config_files_match_registry(group):
    assert options(group) == sorted(REGISTRIES[group])


def compose_with(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group,name", [(g, n) for g in sorted(REGISTRIES) for n in options(g)]
                         + [("experiment", n) for n in options("experiment")])
def test_every_option_composes(group, name):
    multi = group in ("method", "metric")
    prefix = "+" if group == "experiment" else ""
    cfg = compose_with([f"{prefix}{group}={'[' + name + ']' if multi else name}"])
    if multi:  # Hydra records no choice for a list: the group node holds exactly the selection
        assert list(cfg[group]) == [name]
    elif group != "experiment":
        assert cfg.hydra.runtime.choices[group] == name
    for key in cfg:  # every interpolation of the run's config resolves (Hydra's own needs a job)
        if key != "hydra" and OmegaConf.is_config(cfg[key]):
            OmegaConf.to_container(cfg[key], resolve=True)


def test_method_hparam_override():
    cfg = compose_with(["method=[smoothgrad]", "method.smoothgrad.n_samples=7"])
    assert cfg.method.smoothgrad.n_samples == 7 and list(cfg.method) == ["smoothgrad"]
    cfg = compose_with([])
    assert cfg.method.smoothgrad.n_samples == 8 and cfg.method.integrated_gradients.steps == 8
    cfg = compose_with(["+experiment=adebayo2018_cascading"])
    assert cfg.method.smoothgrad.n_samples == 50 and cfg.method.integrated_gradients.steps == 50


def cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("arg", ["method=[gradient,gradiant]", "model=resnet9000",
                                 "check=cascade", "metric=[ssim,foo]", "dataset=mnist2"])
def test_unknown_name_exits_with_one_line(arg):
    result = cli(arg, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "valid choices" in lines[0]


def test_end_to_end_cli_run(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("model=tiny_cnn", "dataset=digits", "dataset.n=3", "method=[gradient,gradcam]",
                 "metric=[ssim,spearman_abs]", "check.order=bottom_up", "seed=1", "device=cpu",
                 "n_maps=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pd.read_parquet(run_dir / "rows")
    assert set(rows["method"]) == {"gradient", "gradcam"}
    assert set(rows["metric"]) == {"ssim", "spearman_abs"}
    assert len(rows) == 4 * 2 * 3 * 2 and (rows["seed"] == 1).all()
    stage0 = rows[rows.stage_index == 0]
    assert stage0.loc[stage0.method == "gradient", "value"].between(1 - 1e-6, 1 + 1e-6).all()
    assert (stage0["value"].between(1 - 1e-6, 1 + 1e-6) | (stage0["reason"] != "")).all()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["check"]["order"] == "bottom_up" and record["packages"]["torch"]
    assert set(record["config"]["method"]) == {"gradient", "gradcam"}
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    assert any(f.endswith(".png") for f in figures) and any(f.endswith(".pdf") for f in figures)
    assert str(run_dir / "rows") in result.stdout
