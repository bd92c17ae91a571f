"""The SLURM launcher of ``conf/hydra/launcher/slurm.yaml``: hydra-submitit-launcher's
``submitit_slurm``, with what a real cluster showed it lacks. (Hydra takes launcher classes only
from its ``hydra_plugins`` namespace: the class is in ``harness/hydra_plugins/``, installed as
``hydra_plugins.sanity_harness_launcher``;
its ``launch`` is :func:`launch` here.)

* It waits for every job, and a job that ends without a result (``scancel``, a node failure, a
  wall-time or memory kill) is one log line, not a traceback. submitit asks ``sacct`` for a job's
  state; on a cluster without accounting (the local one of ``scripts/slurm_local.sh``, and many
  small ones) the state of a cancelled job stays UNKNOWN and the sweep waited forever. Here the
  state comes from ``squeue`` (which needs no accounting), and a result is read as soon as its
  file exists (no polling back-off: a 4-job sweep of seconds-long jobs took 36 s with it).
* A job whose run dir holds a finished run (``run.json``) of the same config, with every part
  matching its manifest, is not submitted again: rerunning a sweep command resubmits only the
  jobs with work left (damaged parts included).

The sweep's report (finished, failed, unfinished jobs) is printed by ``harness.cli`` at the end.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

# SLURM job states after which no result comes (squeue --states=all; a job squeue no longer
# lists has ended too)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "OUT_OF_MEMORY", "REVOKED", "GONE"}
GRACE_S = 30.0  # how long a result file may lag behind the job's end (network file systems)
CANCEL_GRACE_S = 5.0  # squeue says CANCELLED before the job's processes have ended
EXECUTOR_KEYS = ("submitit_folder", "max_num_timeout")  # given to the executor, not to sbatch


def launch(self, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> Sequence[JobReturn]:
    """The launcher's ``launch`` (``self``: the hydra-submitit SlurmLauncher, set up by Hydra):
    submit the jobs with work left, wait for every one, return their JobReturns."""
    import submitit

    assert self.config is not None
    sweep_dir = Path(str(self.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    returns: dict[int, JobReturn] = {}
    todo: list[tuple[int, list[str]]] = []
    earlier = any(sweep_dir.glob("*/run.json"))  # else no job can have finished earlier
    for num, overrides in enumerate(job_overrides, initial_job_idx):
        if earlier and _finished_earlier(self, num, list(overrides)):
            log.info(f"job {num} finished earlier (same config): not submitted again")
            returns[num] = _ended(overrides)
        else:
            todo.append((num, list(overrides)))
    if todo:
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params.get("max_num_timeout", 0))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in base else f"slurm_{key}": value
                                      for key, value in self.params.items()
                                      if key not in EXECUTOR_KEYS})
        state = Singleton.get_state()
        jobs = executor.map_array(self, *zip(*[
            (overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", state)
            for num, overrides in todo]))
        log.info(f"submitted {len(jobs)} jobs to SLURM "
                 f"({', '.join(f'#{num}: {job.job_id}' for (num, _), job in zip(todo, jobs))});"
                 f" sweep dir {sweep_dir}")
        returns.update(wait(dict(zip([num for num, _ in todo], jobs)), dict(todo)))
    return [returns[num] for num in sorted(returns)]


def _finished_earlier(self, num: int, overrides: list[str]) -> bool:
    """The job's run dir holds a finished run (run.json) of the job's very config, whose parts
    all match the manifest (a damaged job is submitted again: it recomputes those parts)."""
    from harness.manifest import inspect_run
    from harness.store import CLAIM, config_digest

    try:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        if str(cfg.get("resume", "auto")).lower() == "false":
            return False
        if not (run_dir / "run.json").is_file() or not (run_dir / CLAIM).is_file():
            return False
        if not inspect_run(run_dir).whole:
            return False
        config = {key: OmegaConf.to_container(cfg[key], resolve=True)
                  if OmegaConf.is_config(cfg[key]) else cfg[key]
                  for key in cfg if key != "hydra"}
        claimed = json.loads((run_dir / CLAIM).read_text())["config_digest"]
        return claimed == config_digest(config)
    except Exception as err:  # noqa: BLE001 (any doubt: submit the job, it resumes itself)
        log.debug(f"job {num}: cannot tell whether it finished earlier ({err}); submitting")
        return False


def _ended(overrides: Sequence[str], value: Any = None) -> JobReturn:
    """A JobReturn Hydra accepts without raising: the sweep goes on and reports at its end."""
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = value
    return ret


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """State of each job or array task (``123_4``) as squeue lists the user's jobs (GONE: no
    longer listed, so ended), or None when squeue cannot answer (then nothing is decided)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "--states=all", "--me", "-o", "%i %T"],
                             check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    states = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if " " in line)
    return {job_id: states.get(job_id, "GONE").split()[0] for job_id in job_ids}


def wait(jobs: dict[int, Any], overrides: dict[int, list[str]],
         poll_s: float = 1.0, max_poll_s: float = 15.0) -> dict[int, JobReturn]:
    """Each job's JobReturn once it has a result or SLURM says it ended without one."""
    returns: dict[int, JobReturn] = {}
    ended_at: dict[int, float] = {}
    start = time.monotonic()
    while len(returns) < len(jobs):
        pending = {num: job for num, job in jobs.items() if num not in returns}
        states = squeue_states([job.job_id for job in pending.values()]) or {}
        for num, job in pending.items():
            if job.paths.result_pickle.exists():
                returns[num] = _result(num, job, overrides[num])
                continue
            state = states.get(job.job_id)
            if state not in ENDED:
                continue
            ended_at.setdefault(num, time.monotonic())
            grace = CANCEL_GRACE_S if state == "CANCELLED" else GRACE_S
            if time.monotonic() - ended_at[num] > grace:
                log.error(f"job {num} (SLURM job {job.job_id}) ended {state} without a result;"
                          " its finished parts are kept: rerun the same command to resume it")
                returns[num] = _ended(overrides[num])
        if len(returns) < len(jobs):
            # every second at first, then less often: squeue is a shared server's time
            time.sleep(min(max_poll_s, poll_s + (time.monotonic() - start) / 60))
    return returns


def _result(num: int, job: Any, overrides: list[str]) -> JobReturn:
    """The job's JobReturn, logged in one line; a job that raised becomes an error line (its
    traceback is in its log) and a return Hydra does not raise, so the sweep goes on."""
    try:
        ret = job.results()[0]
        error = ret._return_value if ret.status == JobStatus.FAILED else None
    except Exception as err:  # noqa: BLE001 (submitit raises the job's exception as text)
        ret, error = None, err
    if error is None:
        if isinstance(ret._return_value, str):  # the sanity app's summary of the job
            log.info(f"job {num} (SLURM job {job.job_id}) done: {ret._return_value}")
        return ret
    lines = [line for line in str(error).splitlines() if line.strip()]
    log.error(f"job {num} (SLURM job {job.job_id}) failed: {lines[-1] if lines else error!r} "
              f"(log: {job.paths.stderr})")
    return _ended(overrides)
