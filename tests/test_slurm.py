"""The SLURM path on a real cluster (``scripts/slurm_local.sh start``, or any cluster whose
``sinfo`` answers): ``sanity -m hydra/launcher=slurm`` submits sharded sweeps through sbatch.

* 4 shards on the cluster, collected, equal the unsharded local run (same rows, same values);
* a sweep with one job cancelled by ``scancel`` while it runs and one shard out of range:
  the sweep command and ``sanity-collect`` report the cancelled job as unfinished and the failed
  one with its one-line error; the same command again resubmits only those two, the cancelled
  job computes only its missing parts (its finished parts untouched), and the collected table
  is complete with no duplicate row.

Found by probing ``sinfo`` (with ``SLURM_CONF``, else the local cluster's default config).
Skipped when no cluster answers, except in CI (``CI=true``), where it fails with the log.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_resume import run_in_process, table  # the in-process reference run

from harness.collect import main as collect_main
from harness.console import counted

ROOT = Path(__file__).resolve().parents[1]
LOCAL_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/sanity-slurm"))
HOW = ("no SLURM cluster answers `sinfo`: run `make slurm-start` (scripts/slurm_local.sh, a "
       "one-node cluster on this machine), then this test again")
KEY = ["check", "stage_index", "method", "sample", "metric"]
DROP = ["run_id", "job", "shard", "num_shards"]  # differ between a sharded and a whole run
BASE = ["model=tiny_cnn", "dataset=digits", "dataset.n=8", "metric=[ssim]", "device=cpu",
        "figures=false", "progress=false", "n_maps=1", "seed=1"]


def _cluster_log() -> str:
    logs = [p for p in (LOCAL_DIR / "slurmctld.log", LOCAL_DIR / "slurmd.log") if p.is_file()]
    return "\n".join(f"--- {p}\n" + "\n".join(p.read_text().splitlines()[-40:]) for p in logs) \
        or f"(no cluster log in {LOCAL_DIR})"


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """The environment for SLURM commands, and the partition to submit to."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if "SLURM_CONF" not in env and (LOCAL_DIR / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(LOCAL_DIR / "slurm.conf")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], env=env, check=False,
                             capture_output=True, text=True, timeout=30)
        states = [line.split() for line in out.stdout.splitlines() if line.strip()]
        reason = out.stderr.strip() or "no partition with an idle or mixed node"
    except (OSError, subprocess.SubprocessError) as err:
        states, reason = [], str(err)
    usable = [p for p, state in states if state.rstrip("*~#") in ("idle", "mixed")]
    if not usable:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SLURM cluster unreachable in CI ({reason})\n{_cluster_log()}")
        pytest.skip(HOW)
    env["PARTITION"] = usable[0].rstrip("*")
    return env


def sanity(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    launcher = ["-m", "hydra/launcher=slurm", f"hydra.launcher.partition={env['PARTITION']}",
                "hydra.launcher.timeout_min=10"]
    with open(log, "w") as handle:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "harness.cli", *launcher, *args],
                                cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, status: int) -> str:
    process.wait(timeout=300)
    text = log.read_text()
    assert process.returncode == status, text[-3000:]
    return text


def sanity_collect(sweep: Path, capsys) -> tuple[int, str]:
    """``sanity-collect SWEEP`` (its main, in this process): exit status and output."""
    capsys.readouterr()
    status = collect_main([str(sweep)])
    return status, capsys.readouterr().out


def wait_for(predicate, what: str, seconds: float = 180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def parts(job_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (job_dir / "rows").glob("part-*.parquet")}


def test_slurm_sharded_sweep_cancel_resume_collect(slurm_env, tmp_path, record_property,
                                                   capsys):
    env = slurm_env
    sweeps = tmp_path / "results" / "sweeps"
    whole = table(run_in_process(BASE + ["method=[gradient]"], tmp_path / "whole"))
    whole = whole.drop(columns=["shard", "num_shards"])

    # 1. four shards on the cluster, collected: the unsharded local run's table
    tic = time.monotonic()
    args = BASE + ["method=[gradient]", "dataset.shard=0,1,2,3", "dataset.num_shards=4"]
    out = finish(sanity(args, tmp_path, env, tmp_path / "a.log"), tmp_path / "a.log", 0)
    record_property("sharded sweep", time.monotonic() - tic)
    assert re.search(r"submitted 4 jobs to SLURM \(#0: \d+_0, #1: \d+_1", out), out
    (sweep_a,) = sweeps.iterdir()
    status, report = sanity_collect(sweep_a, capsys)
    assert status == 0 and "4 of 4 jobs finished" in report, report
    rows = pd.read_parquet(sweep_a / "collected.parquet")
    assert rows.groupby("job")["sample"].agg(lambda s: sorted(set(s))).to_dict() == {
        "0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}
    assert not rows.duplicated(KEY).any()
    sharded = rows.drop(columns=DROP).sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(sharded[whole.columns], whole)

    # 2. job 0 cancelled while it runs (SmoothGrad makes its parts last), shard 2 of 2 does
    # not exist
    args = BASE + ["method=[gradient,smoothgrad]", "method.smoothgrad.n_samples=1000",
                   "dataset.shard=0,1,2", "dataset.num_shards=2"]
    process = sanity(args, tmp_path, env, tmp_path / "b.log")
    submitted = wait_for(lambda: re.search(r"submitted 3 jobs to SLURM \(#0: (\d+_0)",
                                           (tmp_path / "b.log").read_text()), "submission")
    (sweep_b,) = set(sweeps.iterdir()) - {sweep_a}
    wait_for(lambda: parts(sweep_b / "0"), "job 0's first part")
    subprocess.run(["scancel", submitted[1]], env=env, check=True, timeout=30)
    out = finish(process, tmp_path / "b.log", 1)
    assert f"job 0 (SLURM job {submitted[1]}) ended CANCELLED without a result" in out, out
    assert "sanity: job 0 unfinished" in out and "sanity: job 2 failed: dataset.shard" in out
    status, report = sanity_collect(sweep_b, capsys)
    assert status == 1, report
    assert "1 of 3 jobs finished" in report and "job 0 unfinished" in report, report
    failed = [line for line in report.splitlines() if line.startswith("job 2 failed: ")]
    assert failed == [("job 2 failed: dataset.shard must be an integer in [0, 1] for "
                       "dataset.num_shards=2, got 2")], report
    kept = parts(sweep_b / "0")
    assert 0 < len(kept) < 4 * 2, kept  # cancelled mid-run: some of 4 stages x 2 methods
    assert not (sweep_b / "0" / "run.json").exists()

    # 3. the same command again: only the cancelled job's missing parts are computed
    tic = time.monotonic()
    out = finish(sanity(args, tmp_path, env, tmp_path / "c.log"), tmp_path / "c.log", 1)
    record_property("resumed sweep", time.monotonic() - tic)
    assert "job 1 finished earlier (same config): not submitted again" in out, out
    assert "submitted 2 jobs to SLURM" in out, out
    assert (f"done: {counted(len(kept), 'part')} kept, {counted(8 - len(kept), 'part')} computed, "
            f"{(8 - len(kept)) * 4} rows") in out, out
    after = parts(sweep_b / "0")
    assert len(after) == 8 and all(after[name] == kept[name] for name in kept)
    status, report = sanity_collect(sweep_b, capsys)
    assert status == 1 and "2 of 3 jobs finished" in report, report
    assert "unfinished" not in report and "job 2 failed: dataset.shard" in report, report
    rows = pd.read_parquet(sweep_b / "collected.parquet")
    assert not rows.duplicated(KEY).any()
    assert len(rows) == 4 * 2 * 8 and set(rows["sample"]) == set(range(8))
    gradient = rows[rows["method"] == "gradient"].drop(columns=DROP)
    gradient = gradient.sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(gradient[whole.columns], whole)  # resumed rows are right
