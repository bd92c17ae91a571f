"""A contributor's check and method: one function each, registered with their facts, plus one
yaml each (in the test's own config dir, reached through ``hydra.searchpath``). They go through
the same code path as the CLI (compose, ``harness.run.run``) and get rows with the check's own
column, resume after an interruption, the end-of-run summary and the figure, with no other file
of the harness edited; a wrong hyperparameter of the method fails in one line."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from test_resume import run_in_process
from torch import Tensor, nn

from checks import CHECKS
from checks.scoring import explain_all, map_record, score
from harness.base.context import CheckContext, FigureData, MapRecord, StageDone
from harness.base.registry import Range
from harness.run import summary
from methods import METHODS
from methods.common import input_gradients

LEVELS = (0.0, 0.1, 0.3)  # stage k adds noise of level LEVELS[k] to the inputs
INTERRUPT = {"at_stage": None}  # set to interrupt the check before a stage (a Ctrl-C)


class Interrupted(RuntimeError):
    pass


def scaled_gradient(model: nn.Module, x: Tensor, target: Tensor, *, scale: float = 2.0,
                    internal_batch_size: int = 16, seed: int = 0) -> Tensor:
    """The input gradient times ``scale`` (a contributor's method). (B, C, H, W)."""
    return scale * input_gradients(model, x, target, internal_batch_size)


def noise_levels(data: FigureData) -> Iterator[tuple[str, Figure]]:
    """Mean similarity per noise level (a contributor's figure)."""
    table = data.rows.groupby("noise_level")["value"].mean()
    fig = Figure()
    fig.subplots().plot(table.index, table.to_numpy(), marker="o")
    yield f"{data.check}_levels", fig


def noise_summary(rows: pd.DataFrame) -> str:
    """Mean similarity per noise level."""
    return "mean similarity by noise level\n" + rows.groupby("noise_level")["value"].mean(
    ).round(3).to_string()


def input_noise(ctx: CheckContext, seed_offset: int = 0, **_) -> Iterator[dict | MapRecord]:
    """Maps of noisy inputs against the maps of the clean ones (a contributor's check)."""
    references = explain_all(ctx, ctx.data.labels)
    generator = torch.Generator().manual_seed(ctx.seed + seed_offset)
    for index, level in enumerate(LEVELS):
        if INTERRUPT["at_stage"] == index:
            raise Interrupted(f"interrupted before stage {index}")
        todo = ctx.pending(index)
        noise = level * torch.randn(ctx.data.inputs.shape, generator=generator)
        if not todo.methods:
            continue
        noisy = replace(todo, data=replace(ctx.data, inputs=ctx.data.inputs + noise))
        maps = explain_all(noisy, ctx.data.labels)
        for method, method_maps in maps.items():
            base = {"check": "input_noise", "method": method, "stage": f"noise={level}",
                    "stage_index": index, "noise_level": level}
            yield from score(ctx, method_maps, references[method], base, ctx.data.labels)
            yield map_record(ctx, method_maps, "input_noise", method, f"noise={level}", index)
        yield StageDone(index)


@pytest.fixture
def contributed(tmp_path: Path) -> Iterator[Path]:
    """The two entries registered (as their modules would at import), their yaml files in a
    config dir of the contributor's; removed again afterwards."""
    METHODS.register(needs=("conv",), ranges={"scale": Range(0, exclusive_low=True)})(
        scaled_gradient)
    CHECKS.register(title="Input noise", columns={"noise_level": math.nan},
                    summary=noise_summary, figures=(noise_levels,))(input_noise)
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "check").mkdir()
    (conf / "method" / "scaled_gradient.yaml").write_text("scaled_gradient:\n  scale: 2.0\n")
    (conf / "check" / "input_noise.yaml").write_text("seed_offset: 0\n")
    try:
        yield conf
    finally:
        METHODS.unregister("scaled_gradient")
        CHECKS.unregister("input_noise")
        INTERRUPT["at_stage"] = None


def run_as_cli(conf: Path, run_dir: Path, *overrides: str) -> Path:
    """What the ``sanity`` app does with a composed config (harness.cli), in this process."""
    return run_in_process([f"hydra.searchpath=[file://{conf}]", "model=tiny_cnn",
                           "dataset=digits", "dataset.n=3", "method=[gradient,scaled_gradient]",
                           "check=input_noise", "metric=[spearman]", "progress=false",
                           "n_maps=2", *overrides], run_dir)


def test_contributed_check_and_method_run_resume_summarize_and_draw(contributed, tmp_path):
    run_dir = tmp_path / "run"
    INTERRUPT["at_stage"] = 2
    with pytest.raises(Interrupted):
        run_as_cli(contributed, run_dir)
    parts = sorted((run_dir / "rows").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-input_noise-{i:03d}-{m}.parquet"
                                       for i in (0, 1) for m in ("gradient", "scaled_gradient")]
    written = {p.name: p.stat().st_mtime_ns for p in parts}

    INTERRUPT["at_stage"] = None
    run_as_cli(contributed, run_dir)
    rows = pd.read_parquet(run_dir / "rows")
    assert {p.name: p.stat().st_mtime_ns for p in parts} == written  # kept, not rewritten
    assert len(rows) == len(LEVELS) * 2 * 3 and not rows.duplicated(
        ["method", "stage_index", "sample", "metric"]).any()
    assert sorted(rows["noise_level"].unique()) == list(LEVELS)
    clean = rows[rows["stage_index"] == 0]
    assert clean["value"].eq(1.0).all()  # noise level 0: the maps themselves
    # scaling a map changes no rank: the two methods score alike at every level
    by_method = rows.pivot_table(index=["stage_index", "sample"], columns="method",
                                 values="value")
    torch.testing.assert_close(torch.tensor(by_method["scaled_gradient"].to_numpy()),
                               torch.tensor(by_method["gradient"].to_numpy()))
    assert summary(run_dir).startswith("mean similarity by noise level")
    assert (run_dir / "figures" / "input_noise_levels.png").stat().st_size > 1000


def test_contributed_method_range_fails_in_one_line(contributed, tmp_path):
    with pytest.raises(ValueError) as err:
        run_as_cli(contributed, tmp_path / "run", "method.scaled_gradient.scale=0")
    assert str(err.value) == "method.scaled_gradient.scale must be > 0, got 0"
    assert not (tmp_path / "run").exists()  # before any compute or file


def test_undeclared_column_of_a_check_fails(contributed, tmp_path):
    CHECKS.unregister("input_noise")
    CHECKS.register(title="Input noise", summary=noise_summary)(input_noise)
    with pytest.raises(ValueError, match="undeclared columns noise_level"):
        run_as_cli(contributed, tmp_path / "run")
