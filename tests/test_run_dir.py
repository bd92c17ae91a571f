"""A run dir has one owner, and a stopped run loses nothing (issue #18), through the real CLI:

* two runs into one dir: the second fails in one line naming the owner (pid and host), exit 2,
  and writes nothing there; with ``resume=wait`` it waits for the owner, then resumes with
  nothing left to do; the dir ends with one complete table, ``run.json``, no ``failed.json``
  and no lock; a lock file left by a dead process is taken over with a message;
* Ctrl-C (SIGINT) and SIGTERM after the first part: one stderr line (parts kept, rerun
  resumes), exit 130 / 143; the same command again ends with the uninterrupted run's table.

The owner is paused with SIGSTOP while the others try the dir, so that the overlap does not
depend on how fast the machine is.
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from test_resume import KEY, run_in_process, sanity, table

from harness.console import counted
from harness.store import FAILED, LOCK, RunDirBusy, finished_parts, own_run_dir

RUN = ["model=tiny_cnn", "dataset=digits", "dataset.n=6", "method=[gradient,smoothgrad]",
       "method.smoothgrad.n_samples=16", "metric=[ssim,spearman]", "check=cascading",
       "device=cpu", "figures=false", "progress=false", "n_maps=1", "seed=2"]
PARTS = 4 * 2  # stages x methods
ROWS = PARTS * 6 * 2  # x inputs x metrics


def wait_for_first_part(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if list((run_dir / "rows").glob("part-*.parquet")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no part appeared (exit {process.poll()})")


def communicate(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def test_lock_names_its_owner(tmp_path):
    with own_run_dir(tmp_path):
        owner = json.loads((tmp_path / LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        busy = pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()} on host ")
        with busy, own_run_dir(tmp_path):
            pass
    assert not (tmp_path / LOCK).exists()  # released


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone; the kernel released whatever it held
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "since": "earlier"}))
    with own_run_dir(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"[sanity] taking over the stale lock of pid {dead.pid} on "), \
        message


def test_second_run_into_one_dir_fails_or_waits(tmp_path):
    run_dir = tmp_path / "run"
    args = RUN + [f"hydra.run.dir={run_dir}"]
    owner = sanity(args, tmp_path)
    wait_for_first_part(owner, run_dir)
    owner.send_signal(signal.SIGSTOP)  # holds the lock until SIGCONT
    try:
        status, out, err = communicate(sanity(args, tmp_path))
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"sanity: error: run dir {run_dir} is in use by pid {owner.pid} "
                              f"on host {socket.gethostname()} "), err
        assert "resume=wait" in err and not (run_dir / FAILED).exists()

        waiter = sanity(args + ["resume=wait"], tmp_path)
        line = waiter.stdout.readline()  # its first line: it waits for the owner
        assert f"is in use by pid {owner.pid}" in line and "waiting" in line, line
    finally:
        owner.send_signal(signal.SIGCONT)
    status, out, err = communicate(owner)
    assert status == 0, err
    status, out, err = communicate(waiter)
    assert status == 0, err
    assert f"resumed: {counted(PARTS, 'part')} kept, 0 parts computed" in out, out

    rows = pd.read_parquet(run_dir / "rows")
    assert len(rows) == ROWS and not rows.duplicated(KEY).any()
    assert rows["run_id"].nunique() == 1
    assert len(list((run_dir / "rows").glob("part-*.parquet"))) == PARTS
    assert (run_dir / "run.json").is_file()
    assert not (run_dir / FAILED).exists() and not (run_dir / LOCK).exists()
    assert not list(run_dir.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pd.DataFrame:
    return table(run_in_process(RUN, tmp_path_factory.mktemp("reference") / "run"))


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "Ctrl-C"),
                                                  (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_stops_with_one_line_and_the_rerun_completes(tmp_path, uninterrupted, signum,
                                                            status, said):
    run_dir = tmp_path / "run"
    args = RUN + [f"hydra.run.dir={run_dir}"]
    process = sanity(args, tmp_path)
    wait_for_first_part(process, run_dir)
    process.send_signal(signum)
    code, out, err = communicate(process)
    assert code == status, err
    # the parts the manifest lists: a signal between a part's rename and its manifest entry
    # leaves a file the next run does not trust (it moves it aside and computes it again)
    kept = len(finished_parts(run_dir))
    assert 0 < kept < PARTS, "the run finished before the signal"
    line = (f"[sanity] stopped by {said}: {kept} finished parts kept in {run_dir}; rerun the "
            "same command to resume")
    assert err.strip().splitlines() == [line], err
    assert (run_dir / "cli.log").read_text().splitlines()[-1] == line  # kept with the run
    assert not (run_dir / FAILED).exists() and not (run_dir / "run.json").exists()
    assert not (run_dir / LOCK).exists()

    code, out, err = communicate(sanity(args, tmp_path))
    assert code == 0, err
    assert f"resumed: {counted(kept, 'part')} kept, {counted(PARTS - kept, 'part')} computed" in out, out
    assert "[sanity] figures" not in out  # figures=false: no path for what was not written
    assert not list(run_dir.rglob(".*.tmp-*"))
    resumed = table(run_dir)
    pd.testing.assert_frame_equal(resumed[uninterrupted.columns], uninterrupted)
