"""``sanity verify RUN_OR_SWEEP_DIR``: are the results in a run or sweep dir whole? Checks,
without computing anything, that every part is readable and equal to its checksum in the
manifest, that every unit the run recorded is present once with no duplicate row, and that
``run.json`` agrees with the parts; for a sweep, every job of its overrides. Prints one line per
problem and a verdict; exit status 0 only when the results are whole.

It reads with pyarrow only (no torch, no pandas): archived results are checked in well under a
second. Sweep layout helpers (:func:`run_dirs`, :func:`expected_jobs`) live here for the same
reason; ``harness.collect`` uses them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.manifest import CLAIM, FAILED, RECORD, ROWS, Inspection, inspect_run, load_manifest

# columns that may differ between two rows of the same key (the measurement, its caveat)
NOT_KEY = ("value", "reason")


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


def read_json(path: Path) -> tuple[dict | None, str]:
    """(content, "") or (None, why not)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text()), ""
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"{path.name} unreadable ({type(err).__name__})"


def record_problems(run_dir: Path, inspection: Inspection) -> list[str]:
    """claim.json, failed.json and run.json against the manifest's rows parts."""
    claim, error = read_json(run_dir / CLAIM)
    if claim is None:
        return [f"{error}: not a run dir of the harness"]
    failed, _ = read_json(run_dir / FAILED)
    if failed is not None:
        return [f"the run failed: {failed.get('error', '')}"]
    record, error = read_json(run_dir / RECORD)
    if record is None:
        return [f"unfinished: {error} (rerun the run's command to finish it)"]
    problems = []
    if record.get("run_id") != claim.get("run_id"):
        problems.append(f"{RECORD}: run_id {record.get('run_id')} differs from {CLAIM}'s "
                        f"{claim.get('run_id')}")
    listed = {Path(p).name: e["rows"] for p, e in inspection.entries.items()
              if p.startswith(ROWS + "/")}
    recorded = record.get("parts")
    if recorded is None:  # a run of an older harness: nothing more to compare
        return problems
    problems += [f"{ROWS}/{name}: recorded in {RECORD}, not in the manifest"
                 for name in sorted(set(recorded) - set(listed))]
    problems += [f"{ROWS}/{name}: in the manifest, not recorded in {RECORD}"
                 for name in sorted(set(listed) - set(recorded))]
    total = sum(listed.values())
    if record.get("rows_total") != total:
        problems.append(f"{RECORD}: {record.get('rows_total')} rows recorded, the manifest's "
                        f"parts hold {total}")
    return problems


def table_problems(run_dir: Path, inspection: Inspection, run_id: str | None) -> list[str]:
    """Every good rows part read: its row count, its unit, the run id; no row twice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems, tables = [], []
    for relative in inspection.row_parts():
        try:
            table = pq.ParquetFile(run_dir / relative).read()
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{relative}: unreadable ({str(err).splitlines()[0]})")
            continue
        problems += part_problems(relative, table, inspection.entries.get(relative), run_id)
        tables.append(table)
    if tables:
        problems += duplicate_problems(pa.concat_tables(tables, promote_options="default"))
    return problems


def part_problems(relative: str, table, entry: dict | None, run_id: str | None) -> list[str]:
    """A part's rows against its manifest entry (row count, unit) and the run's id."""
    problems = []
    if entry is not None and table.num_rows != entry["rows"]:
        problems.append(f"{relative}: {table.num_rows} rows, {entry['rows']} committed")
    expected = dict((entry or {}).get("unit") or {})
    if run_id is not None:
        expected["run_id"] = run_id
    for column, value in expected.items():
        values = set(table.column(column).to_pylist()) if column in table.column_names else {}
        if values != {value}:
            shown = ", ".join(map(str, sorted(values, key=str))) or "no such column"
            problems.append(f"{relative}: rows of {column}={shown}, its unit is "
                            f"{column}={value}")
    return problems


def duplicate_problems(table) -> list[str]:
    """One line per row key (every column but the value and its reason) found twice."""
    keys = [c for c in table.column_names if c not in NOT_KEY]
    counts = table.group_by(keys).aggregate([([], "count_all")])
    twice = counts.filter(counts.column("count_all").to_numpy() > 1)
    shown = ("check", "stage_index", "method", "sample", "metric")
    return [f"{row['count_all']} rows of " + ", ".join(f"{c}={row[c]}" for c in shown if c in row)
            for row in twice.to_pylist()]


def verify_run(run_dir: Path) -> list[str]:
    """Every problem of one run dir, one line each ([] when whole)."""
    inspection = inspect_run(run_dir)
    problems = inspection.problems() + [f"{path}: not a part of this run (pandas.read_parquet "
                                        f"of the folder fails on it; harness.read_rows ignores "
                                        "it)" for path in inspection.foreign
                                        if path.startswith(ROWS + "/")]
    problems += record_problems(run_dir, inspection)
    claim, _ = read_json(run_dir / CLAIM)
    problems += table_problems(run_dir, inspection, claim and claim.get("run_id"))
    return problems


def verify(path: Path) -> tuple[list[str], str]:
    """(problem lines, what was checked) for a run dir or a sweep dir."""
    jobs = run_dirs(path)
    if jobs == [path]:
        problems = verify_run(path)
        return problems, f"1 run, {summary(path)}"
    problems = [f"job {job.name}: {line}" for job in jobs for line in verify_run(job)]
    expected = expected_jobs(path) if (path / "multirun.yaml").is_file() else None
    seen = {job.name for job in jobs}
    if expected is not None:
        problems += [f"job {i}: missing (never started; rerun the sweep command)"
                     for i in range(expected) if str(i) not in seen]
    elif not jobs:
        problems.append("neither a run dir nor a sweep dir (no claim.json, no job dirs)")
    return problems, f"{len(jobs)} of {expected or len(jobs)} jobs"


def summary(run_dir: Path) -> str:
    entries, _ = load_manifest(run_dir)
    rows = [e for p, e in entries.items() if p.startswith(ROWS + "/")]
    return (f"{len(rows)} rows parts, {sum(e['rows'] for e in rows)} rows, "
            f"{len(entries) - len(rows)} map files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sanity verify", description="Check the results of a run or sweep dir against "
        "their manifests without computing anything; exit 0 only when they are whole.")
    parser.add_argument("path", type=Path, metavar="RUN_OR_SWEEP_DIR")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        print(f"sanity verify: error: {args.path} is not a directory", file=sys.stderr)
        return 2
    problems, checked = verify(args.path)
    for line in problems:
        print(line)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        print(f"DAMAGED: {count} in {args.path} ({checked}); rerunning its command recomputes "
              "damaged and missing parts (foreign files are left to you)")
        return 1
    print(f"WHOLE: {args.path} ({checked}): every part matches its checksum")
    return 0


def cli() -> None:
    """The ``sanity-verify`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
