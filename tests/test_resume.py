"""Runs that never lose work and never write twice, through the real CLI:

* a run killed (SIGKILL) after its first parts were written, rerun with the same command (the
  run dir is named by the config's digest), keeps the finished parts untouched, computes only
  the rest, and ends with the same table as an uninterrupted run of the same config, with no
  duplicate row: the determinism check too (SmoothGrad/VarGrad noise, randomization seeds);
* a sweep over shards writes disjoint samples per job, and the collect step reads them as one
  table equal to the unsharded run's rows.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf, open_dict

from harness.collect import collect
from harness.console import counted

ROOT = Path(__file__).resolve().parents[1]
RUN = ["model=tiny_cnn", "dataset=digits", "dataset.n=12", "method=[gradient,smoothgrad,vargrad]",
       "method.smoothgrad.n_samples=32", "method.vargrad.n_samples=32", "metric=[ssim,spearman]",
       "check=cascading", "device=cpu", "figures=false", "progress=false", "n_maps=2", "seed=3"]
KEY = ["check", "stage_index", "method", "sample", "metric"]
RUN_ONLY = ["run_id", "job"]  # differ between two runs of the same config by design


def sanity(args: list[str], cwd: Path) -> subprocess.Popen:
    # one thread: tiny models run faster without thread hand-offs, most so on a busy machine,
    # and the in-process reference run uses one thread too (same float summation order)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return out


def run_in_process(args: list[str], run_dir: Path) -> Path:
    """The same run as the CLI's, without a second interpreter start (the reference)."""
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR
    from harness.run import run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=args, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs with OMP_NUM_THREADS=1
    try:
        return run(cfg, choices, run_dir)
    finally:  # leave no trace in the test process (run() sets flush_denormal=true)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def table(run_dir: Path) -> pd.DataFrame:
    rows = pd.read_parquet(run_dir / "rows").drop(columns=RUN_ONLY, errors="ignore")
    return rows.sort_values(KEY).reset_index(drop=True)


def kill_after_first_part(process: subprocess.Popen, rows_dir_parent: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if list(rows_dir_parent.glob("*/rows/part-*.parquet")):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=30)


def test_killed_run_resumes_to_the_uninterrupted_table(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir()
    reference.mkdir()
    process = sanity(RUN, killed)
    kill_after_first_part(process, killed / "results" / "runs")
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (run_dir,) = (killed / "results" / "runs").iterdir()  # named by the config's digest
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "rows").glob("part-*.parquet")}
    assert 0 < len(before) < 4 * 3  # some of the 4 stages x 3 methods, not all

    out = finish(sanity(RUN, killed))  # the same command again
    assert f"{len(before)} finished parts kept" in out
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "rows").glob("part-*.parquet")}
    assert len(after) == 4 * 3 and all(after[name] == before[name] for name in before)
    assert f"{counted(len(before), 'part')} kept, {counted(len(after) - len(before), 'part')} computed" in out

    reference_dir = run_in_process(RUN, reference)
    claims = [json.loads((d / "claim.json").read_text()) for d in (run_dir, reference_dir)]
    assert claims[0]["config_digest"] == claims[1]["config_digest"] == run_dir.name
    resumed, uninterrupted = table(run_dir), table(reference_dir)
    assert not resumed.duplicated(KEY).any()
    assert len(resumed) == 4 * 3 * 12 * 2
    pd.testing.assert_frame_equal(resumed[uninterrupted.columns], uninterrupted)


def test_shard_sweep_collects_into_the_unsharded_table(tmp_path):
    base = ["model=tiny_cnn", "dataset=digits", "dataset.n=5", "method=[gradient]",
            "metric=[ssim]", "device=cpu", "figures=false", "progress=false", "n_maps=1"]
    sweep = tmp_path / "sweep"
    finish(sanity(["-m", *base, "dataset.shard=0,1", "dataset.num_shards=2",
                   f"hydra.sweep.dir={sweep}"], tmp_path))
    run_in_process(base, tmp_path / "whole")
    rows, report = collect(sweep)
    assert report.complete and report.expected == 2 and report.finished == ["0", "1"]
    by_job = rows.groupby("job")["sample"].agg(lambda s: sorted(set(s)))
    assert by_job.to_dict() == {"0": [0, 1], "1": [2, 3, 4]}  # contiguous, disjoint, in order
    assert not rows.duplicated(KEY).any()
    whole = table(tmp_path / "whole").drop(columns=["shard", "num_shards"])
    sharded = rows.drop(columns=RUN_ONLY + ["shard", "num_shards"])
    sharded = sharded.sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(sharded[whole.columns], whole)  # gradient: batch-independent
