"""Results that are copied, archived and synced: the harness notices when what it reads is not
what it wrote (issue #19).

A finished run dir is damaged as a full disk, a crashed copy, a sync tool or a user leave it (a
truncated part, a flipped byte, a deleted part, a part of another config copied in, a damaged map,
a stray file), then the same command runs again: it finishes, its table equals the undamaged
run's, the damaged file is kept in ``rows/.damaged/`` (``maps/.damaged/``) and the log names it.
``sanity verify`` names each problem and exits 1 on the damaged dir, prints one verdict line and
exits 0 on a whole one. The same through ``sanity-collect`` and the sweep command on a two-job
sweep.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_resume import ROOT, finish, run_in_process, sanity

import harness
from harness.collect import collect
from harness.verify import main as verify_main

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["model=tiny_cnn", "dataset=digits", "dataset.n=3", "method=[gradient,smoothgrad]",
       "method.smoothgrad.n_samples=4", "metric=[ssim]", "check=cascading", "device=cpu",
       "figures=false", "progress=false", "n_maps=2", "seed=3"]
OTHER = [a if a != "seed=3" else "seed=4" for a in RUN]  # another config of the same units
KEY = ["check", "stage_index", "method", "sample", "metric"]
PART = "part-cascading-{:03d}-{}.parquet"


def table(run_dir: Path) -> pd.DataFrame:
    return harness.read_rows(run_dir).sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An undamaged finished run of RUN and one of OTHER (the source of foreign parts)."""
    tmp = tmp_path_factory.mktemp("runs")
    return {"whole": run_in_process(RUN, tmp / "whole"), "other": run_in_process(OTHER, tmp / "other")}


def truncate(run_dir: Path, other: Path) -> str:
    path = run_dir / "rows" / PART.format(1, "gradient")
    path.write_bytes(path.read_bytes()[:100])
    return f"rows/{path.name}"


def flip_byte(run_dir: Path, other: Path) -> str:
    path = run_dir / "rows" / PART.format(2, "smoothgrad")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # a value's bit, the file stays readable
    path.write_bytes(bytes(data))
    return f"rows/{path.name}"


def delete(run_dir: Path, other: Path) -> str:
    (run_dir / "rows" / PART.format(3, "gradient")).unlink()
    return f"rows/{PART.format(3, 'gradient')}"


def other_config(run_dir: Path, other: Path) -> str:
    name = PART.format(0, "smoothgrad")  # the same unit, computed with another seed
    shutil.copy(other / "rows" / name, run_dir / "rows" / name)
    return f"rows/{name}"


def damaged_map(run_dir: Path, other: Path) -> str:
    path = run_dir / "maps" / "cascading" / "gradient" / "stage_002.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "maps/cascading/gradient/stage_002.npz"


def stray_file(run_dir: Path, other: Path) -> str:
    (run_dir / "rows" / "notes.txt").write_text("rerun with more samples\n")
    return "rows/notes.txt"


DAMAGES: dict[str, Callable[[Path, Path], str]] = {
    f.__name__: f for f in (truncate, flip_byte, delete, other_config, damaged_map, stray_file)}


def verify(path: Path, capsys) -> tuple[int, list[str]]:
    status = verify_main([str(path)])
    return status, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_run_is_verified_and_recomputed(damage, runs, tmp_path, capsys):
    run_dir = Path(shutil.copytree(runs["whole"], tmp_path / "run"))
    status, lines = verify(run_dir, capsys)
    assert status == 0 and len(lines) == 1 and lines[0].startswith("WHOLE")  # one verdict
    original = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    damaged = DAMAGES[damage](run_dir, runs["other"])

    status, lines = verify(run_dir, capsys)
    assert status == 1 and any(line.startswith(damaged) for line in lines[:-1]), lines
    assert lines[-1].startswith("DAMAGED")
    if damaged.startswith("rows/part-"):  # the reader refuses a damaged or missing part
        with pytest.raises(ValueError, match=re.escape(damaged)):
            harness.read_rows(run_dir)
    kept_bytes = (run_dir / damaged).read_bytes() if (run_dir / damaged).is_file() else None

    run_in_process(RUN, run_dir)  # the same command again
    log = capsys.readouterr().out
    named = [line for line in log.splitlines() if damaged in line]
    assert len(named) == 1, log  # one line, naming the file and why
    pd.testing.assert_frame_equal(table(run_dir), table(runs["whole"]))
    if damage == "stray_file":
        assert "warning" in named[0] and (run_dir / damaged).read_bytes() == kept_bytes
        assert verify(run_dir, capsys)[0] == 1  # pandas.read_parquet(rows/) would fail on it
        (run_dir / damaged).unlink()
    elif kept_bytes is not None:  # never deleted: moved aside with its bytes
        top, _, rest = damaged.partition("/")
        assert (run_dir / top / ".damaged" / rest).read_bytes() == kept_bytes
        assert "moved to" in named[0]
    for relative, data in original.items():  # recomputed parts equal the undamaged ones
        if relative.parts[0] in ("rows", "maps"):
            assert_same_part(run_dir / relative, data)
    assert verify(run_dir, capsys)[0] == 0


def assert_same_part(path: Path, data: bytes) -> None:
    """The part equals the undamaged run's: the same bytes (parquet), the same arrays (an npz
    archive carries the time it was written)."""
    if path.suffix != ".npz":
        assert path.read_bytes() == data, path
        return
    with np.load(path) as now, np.load(io.BytesIO(data)) as before:
        assert sorted(now.files) == sorted(before.files)
        for key in now.files:
            np.testing.assert_array_equal(now[key], before[key])


def test_read_rows_ignores_what_is_not_a_part(runs, tmp_path):
    run_dir = Path(shutil.copytree(runs["whole"], tmp_path / "run"))
    (run_dir / "rows" / "notes.txt").write_text("x")
    (run_dir / "rows" / "part-cascading-000-gradient (conflict copy).parquet").write_bytes(
        (run_dir / "rows" / PART.format(0, "gradient")).read_bytes())
    with pytest.raises(Exception):  # noqa: B017 (what users hit before: pyarrow's error)
        pd.read_parquet(run_dir / "rows")
    pd.testing.assert_frame_equal(table(run_dir), table(runs["whole"]))


def test_verify_reads_without_torch(runs):
    """``sanity verify`` through the CLI's entry point: exit 0, one line, and torch never
    imported (what keeps it fast on archived results)."""
    code = ("import sys; from harness.cli import main; sys.argv = ['sanity', 'verify', sys.argv[1]]"
            "\ntry:\n    main()\nexcept SystemExit as end:\n    assert 'torch' not in sys.modules"
            "\n    raise")
    out = subprocess.run([sys.executable, "-c", code, str(runs["whole"])], check=False,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 and out.stdout.startswith("WHOLE")
    missing = subprocess.run([sys.executable, "-m", "harness.cli", "verify", "/nonexistent"],
                             check=False, capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def test_sweep_collect_reports_damage_and_rerun_recomputes_it(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    command = ["-m", *RUN, "seed=3,4", f"hydra.sweep.dir={sweep}"]
    finish(sanity(command, tmp_path))
    whole, report = collect(sweep)
    assert report.complete and report.finished == ["0", "1"]
    assert verify(sweep, capsys)[0] == 0
    damaged = [truncate(sweep / "0", sweep / "1"), flip_byte(sweep / "1", sweep / "0")]
    (sweep / "1" / "rows" / "notes.txt").write_text("x")

    rows, report = collect(sweep)
    assert not report.complete and report.finished == []
    lines = report.lines()
    for job, part in zip("01", damaged):
        assert sum(f"job {job} damaged: {part}" in line for line in lines) == 1, lines
    assert sum("rows/notes.txt" in line and "warning" in line for line in lines) == 1
    assert len(rows) == len(whole) - 2 * 3  # the damaged parts' rows (3 samples) left out
    status, lines = verify(sweep, capsys)
    assert status == 1 and [ln.split(":")[0] for ln in lines[:-1]].count("job 0") == 1

    out = finish(sanity(command, tmp_path))  # the sweep command again
    rows, report = collect(sweep)
    assert report.complete, report.lines()
    key = ["job", *KEY]
    pd.testing.assert_frame_equal(rows.sort_values(key).reset_index(drop=True),
                                  whole.sort_values(key).reset_index(drop=True))
    for job, part in zip("01", damaged):
        assert (sweep / job / "rows" / ".damaged" / Path(part).name).is_file()
        assert f"damaged part {part}" in out


def test_verify_checks_the_record_and_duplicate_rows(runs, tmp_path, capsys):
    """A part deleted together with its manifest entry is still missed (run.json records every
    part), and a row key present twice is named."""
    import pyarrow as pa

    from harness.verify import duplicate_problems

    run_dir = Path(shutil.copytree(runs["whole"], tmp_path / "run"))
    name = PART.format(2, "gradient")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["parts"][f"rows/{name}"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "rows" / name).unlink()
    status, lines = verify(run_dir, capsys)
    assert status == 1 and f"rows/{name}: recorded in run.json, not in the manifest" in lines
    assert any(line.startswith("run.json: 24 rows recorded") for line in lines), lines
    rows = pa.table({"check": ["c"] * 3, "stage_index": [0, 0, 1], "method": ["m"] * 3,
                     "sample": [0, 0, 0], "metric": ["ssim"] * 3, "value": [0.1, 0.2, 0.3]})
    assert duplicate_problems(rows) == [
        "2 rows of check=c, stage_index=0, method=m, sample=0, metric=ssim"]
