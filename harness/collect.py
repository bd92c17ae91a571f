"""Read every run of a sweep (``sanity -m ...``) into one table, and say which jobs are missing,
failed, unfinished or damaged (parts that differ from their manifest: left out of the table,
recomputed when the sweep command is rerun).

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
from harness.manifest import inspect_run, read_parts
from harness.store import FAILED, write_table
from harness.verify import expected_jobs, run_dirs

PER_MODEL = ("run_id", "shard", "num_shards", "job",  # columns that differ between the shards
             "memory_format")  # (memory_format=auto measures per job on models without a choice)


@dataclass
class SweepReport:
    expected: int | None  # jobs the sweep's overrides expand to (None: multirun.yaml unreadable)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job -> error message
    unfinished: list[str] = field(default_factory=list)  # started, neither done nor failed
    missing: list[str] = field(default_factory=list)  # never started
    # job -> its parts that are not what it committed (damaged, missing): left out of the table
    damaged: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # foreign files, ignored

    def lines(self) -> list[str]:
        total = "?" if self.expected is None else self.expected
        lines = [f"{len(self.finished)} of {total} jobs finished"]
        lines += [f"job {job} failed: {error}" for job, error in self.failed.items()]
        lines += [f"job {job} unfinished (killed or still running; rerun the sweep command to "
                  "resume it)" for job in self.unfinished]
        lines += [f"job {job} missing (never started)" for job in self.missing]
        lines += [f"job {job} damaged: {problem} (rerun the sweep command to recompute it)"
                  for job, problems in self.damaged.items() for problem in problems]
        lines += [f"warning: {line}" for line in self.warnings]
        return lines

    @property
    def complete(self) -> bool:
        return not (self.failed or self.unfinished or self.missing or self.damaged)


def collect(sweep_dir: Path | str) -> tuple[pd.DataFrame, SweepReport]:
    """One table of every finished part of every job (column ``job``: the job dir's name), and
    the report. Rows that describe a model rather than an input (the metrics a check declares
    ``per_model_metrics``, e.g. the accuracies of trained models) come once per model, not once
    per shard."""
    sweep_dir = Path(sweep_dir)
    parts = {job: inspect_run(job).row_parts() for job in run_dirs(sweep_dir)}
    tables = [read_parts(job, names).assign(job=job.name) for job, names in parts.items()
              if names]  # the parts each job's manifest lists and that match their checksums
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
    inspection = inspect_run(job)
    report.warnings += [f"job {job.name}: {line}" for line in inspection.warnings()]
    if (job / FAILED).is_file():
        report.failed[job.name] = json.loads((job / FAILED).read_text()).get("error", "")
    elif not inspection.whole and not inspection.unlisted:
        report.damaged[job.name] = inspection.problems()
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
