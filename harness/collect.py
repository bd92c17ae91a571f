"""Read every run of a sweep (``sanity -m ...``) into one table, and say which jobs are missing,
failed or unfinished.

    sanity-collect SWEEP_DIR [--out FILE.parquet]
    python scripts/collect.py SWEEP_DIR

A sweep dir holds one run dir per job (``<sweep>/<job number>/``, Hydra's layout for every
launcher) and Hydra's ``multirun.yaml``, from which the expected number of jobs is computed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from checks import CHECKS
from harness.store import CLAIM, FAILED, ROWS, read_rows, write_table

PER_MODEL = ("run_id", "shard", "num_shards", "job")  # columns that differ between the shards


@dataclass
class SweepReport:
    expected: int | None  # jobs the sweep's overrides expand to (None: multirun.yaml unreadable)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job -> error message
    unfinished: list[str] = field(default_factory=list)  # started, neither done nor failed
    missing: list[str] = field(default_factory=list)  # never started

    def lines(self) -> list[str]:
        total = "?" if self.expected is None else self.expected
        lines = [f"{len(self.finished)} of {total} jobs finished"]
        lines += [f"job {job} failed: {error}" for job, error in self.failed.items()]
        lines += [f"job {job} unfinished (killed or still running; rerun the sweep command to "
                  "resume it)" for job in self.unfinished]
        lines += [f"job {job} missing (never started)" for job in self.missing]
        return lines

    @property
    def complete(self) -> bool:
        return not (self.failed or self.unfinished or self.missing)


def run_dirs(sweep_dir: Path | str) -> list[Path]:
    """The job dirs of a sweep, by job number (a run dir itself is its own only job)."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / ROWS).is_dir() or (sweep_dir / CLAIM).is_file():
        return [sweep_dir]
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
            and any((d / name).exists() for name in (ROWS, CLAIM, FAILED, ".hydra"))]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit()
                                       else 0, d.name))


def expected_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep's overrides (and its sweeper params) expand to."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    hydra_cfg = OmegaConf.load(path).hydra
    params = hydra_cfg.sweeper.get("params")
    params = OmegaConf.to_container(params) if params is not None else {}
    given = list(hydra_cfg.overrides.task)
    keys = {o.split("=", 1)[0] for o in given}
    given += [f"{k}={v}" for k, v in params.items() if k not in keys]
    overrides = OverridesParser.create().parse_overrides(given)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def collect(sweep_dir: Path | str) -> tuple[pd.DataFrame, SweepReport]:
    """One table of every finished part of every job (column ``job``: the job dir's name), and
    the report. Rows that describe a model rather than an input (the metrics a check declares
    ``per_model_metrics``, e.g. the accuracies of trained models) come once per model, not once
    per shard."""
    sweep_dir = Path(sweep_dir)
    tables = [read_rows(job).assign(job=job.name) for job in run_dirs(sweep_dir)
              if any((job / ROWS).glob("*.parquet"))]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return _once_per_model(table), sweep_report(sweep_dir)


def sweep_report(sweep_dir: Path | str) -> SweepReport:
    """Which jobs of a sweep finished, failed (with the error), are unfinished or missing."""
    sweep_dir = Path(sweep_dir)
    jobs = run_dirs(sweep_dir)
    report = SweepReport(expected=expected_jobs(sweep_dir))
    for job in jobs:
        _classify(job, report)
    if report.expected is not None:
        seen = {j.name for j in jobs}
        report.missing = [str(i) for i in range(report.expected) if str(i) not in seen]
    return report


def _classify(job: Path, report: SweepReport) -> None:
    if (job / FAILED).is_file():
        report.failed[job.name] = json.loads((job / FAILED).read_text()).get("error", "")
    elif (job / "run.json").is_file():
        report.finished.append(job.name)
    else:
        report.unfinished.append(job.name)


def _once_per_model(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the metrics a check declares per model (``CheckFacts.per_model_metrics``, e.g.
    the accuracies of trained models) once per model; every shard computed them alike."""
    if table.empty or "check" not in table:
        return table
    shared = pd.Series(False, index=table.index)
    for check in table["check"].unique():
        if check in CHECKS:
            per_model = CHECKS.facts(check).per_model_metrics
            shared |= table["check"].eq(check) & table["metric"].isin(per_model)
    keys = [c for c in table.columns if c not in PER_MODEL]
    once = table[shared].drop_duplicates(subset=keys)
    return pd.concat([once, table[~shared]]).sort_index().reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Read every run of a sweep into one table.")
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table here (default: SWEEP_DIR/collected.parquet)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"sanity-collect: error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    table, report = collect(args.sweep_dir)
    for line in report.lines():
        print(line)
    if not table.empty:
        out = write_table(args.out or args.sweep_dir / "collected.parquet", table)
        print(f"{len(table)} rows from {table['job'].nunique()} jobs: {out}")
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
