"""``report.html``: one self-contained page per run and per sweep (issue #18), to read a result
without a notebook or send it by mail: no script, no network, every figure embedded as a
base64 PNG.

A run's page: what was selected, the summary table (mean similarity per method, metric and
stage, and where it drops below 0.5), the check's own summary, every figure, the accuracy of
trained models, the warnings of ``cli.log``, the timings and the resolved config. A sweep's page:
which jobs finished, failed or are missing, then each finished job's page as a section.

The runner writes it at the end of a run, ``sanity`` at the end of a sweep, and
``sanity report RUN_OR_SWEEP_DIR`` remakes it from what the dir holds (written through
:func:`harness.store.write_text`, like every result).
"""
from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

import pandas as pd

from checks import CHECKS
from checks.summary import similarity_table
from harness.store import FIGURES, RECORD, ROWS, read_rows, write_text

REPORT = "report.html"
STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em}
td{text-align:right}th{background:#f3f3f3}figure{display:inline-block;margin:.5em}
img{max-width:38em}pre{background:#f7f7f7;padding:.5em;overflow-x:auto}
.warn{color:#a40}section.job{border-top:2px solid #888;margin-top:2em}"""


def write_report(folder: Path | str) -> Path:
    """Write ``report.html`` into a run dir or a sweep dir; return its path."""
    folder = Path(folder)
    body = sweep_body(folder) if is_sweep(folder) else run_body(folder)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>sanity report: {html.escape(folder.name)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
    return write_text(folder / REPORT, page)


def is_sweep(folder: Path) -> bool:
    from harness.collect import run_dirs

    return not (folder / ROWS).is_dir() and not (folder / RECORD).is_file() \
        and bool(run_dirs(folder))


def run_body(run_dir: Path, level: int = 1) -> str:
    """The sections of one run's page."""
    record = json.loads((run_dir / RECORD).read_text()) if (run_dir / RECORD).is_file() else {}
    rows = read_rows(run_dir) if (run_dir / ROWS).is_dir() else pd.DataFrame()
    h = f"h{level + 1}"
    parts = [f"<h{level}>Run {html.escape(record.get('run_id', run_dir.name))}</h{level}>",
             f"<p>{html.escape(str(run_dir))}</p>"]
    if not record:
        parts.append("<p class=\"warn\">unfinished: no run.json (rerun its command to resume)"
                     "</p>")
    parts += [f"<{h}>Selected</{h}>", selected_html(record)]
    parts += [f"<{h}>Summary</{h}>", summary_html(rows)]
    parts += [f"<{h}>Figures</{h}>", figures_html(run_dir / FIGURES)]
    if record.get("trained"):
        parts += [f"<{h}>Trained models</{h}>", records_html(record["trained"])]
    if record.get("coverage"):
        parts += [f"<{h}>Parameter coverage</{h}>", coverage_html(record)]
    if record.get("execution") or record.get("peak_rss_bytes"):
        parts += [f"<{h}>Execution</{h}>", execution_html(record)]
    parts += [f"<{h}>Warnings</{h}>", warnings_html(run_dir / "cli.log")]
    if record.get("timings"):
        parts += [f"<{h}>Timings (s)</{h}>",
                  records_html({"seconds": {k: round(v, 2) for k, v in
                                            record["timings"].items()}})]
    where = ", ".join(f"{key} {record.get(key, '?')}"
                      for key in ("git_sha", "host", "device", "data_source"))
    parts += [f"<{h}>Config</{h}>", pre(json.dumps(record.get("config", {}), indent=2)),
              f"<p>{html.escape(where)}</p>"]
    return "\n".join(parts)


def coverage_html(record: dict) -> str:
    """The randomization checks' coverage audit: the summary line (a warning when a parameter
    was never randomized), the never-randomized tensors and what each stage changed."""
    coverage = record["coverage"]
    lines = [line for line in record.get("summary_lines", []) if "coverage" in line]
    parts = [f"<p class=\"{'warn' if line.startswith('warning') else ''}\">"
             f"{html.escape(line)}</p>" for line in lines]
    never = coverage.get("never_randomized", {})
    for kind in ("parameters", "buffers"):
        if never.get(kind):
            parts.append(f"<p>never randomized {kind}: "
                         f"{html.escape(', '.join(never[kind]))}</p>")
    stages = {stage: ", ".join(names) for stage, names in coverage.get("stages", {}).items()}
    if stages:
        table = "".join(f"<tr><th>{html.escape(stage)}</th><td style=\"text-align:left\">"
                        f"{html.escape(names)}</td></tr>" for stage, names in stages.items())
        parts.append(f"<details><summary>tensors changed per stage</summary><table>{table}"
                     "</table></details>")
    return "\n".join(parts)


def execution_html(record: dict) -> str:
    """Memory format, precision and rows per pass as chosen for the run, and its peak memory."""
    execution = dict(record.get("execution") or {})
    if record.get("peak_rss_bytes"):
        execution["peak resident memory (MB)"] = round(record["peak_rss_bytes"] / 2**20)
    return records_html({"execution": {k: str(v) for k, v in execution.items()}})


def sweep_body(sweep_dir: Path) -> str:
    """The jobs' status, then each job's sections."""
    from harness.collect import run_dirs, sweep_report

    lines = sweep_report(sweep_dir).lines()
    parts = [f"<h1>Sweep {html.escape(sweep_dir.name)}</h1>",
             f"<p>{html.escape(str(sweep_dir))}</p>",
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"]
    for job in run_dirs(sweep_dir):
        parts.append(f"<section class=\"job\" id=\"job-{html.escape(job.name)}\">"
                     f"<h2>Job {html.escape(job.name)}</h2>{run_body(job, level=3)}</section>")
    return "\n".join(parts)


def selected_html(record: dict) -> str:
    selected = record.get("selected", {})
    return "<table>" + "".join(f"<tr><th>{html.escape(group)}</th><td style=\"text-align:left"
                               f"\">{html.escape(', '.join(names))}</td></tr>"
                               for group, names in selected.items()) + "</table>"


def summary_html(rows: pd.DataFrame) -> str:
    """Per check: the similarity table, and the check's own summary when it declares one."""
    if rows.empty:
        return "<p>no rows</p>"
    parts = []
    for check in rows["check"].unique():
        own = rows[rows["check"] == check]
        table = similarity_table(own)
        parts.append(f"<h4>{html.escape(str(check))}</h4>")
        if not table.empty:
            parts.append(f"<p>stages: {html.escape(', '.join(table.attrs['stages']))}</p>")
            parts.append("<p>cells: mean over samples [95 % bootstrap interval]; ~: not "
                         "distinguishable from the random_uniform control (paired Wilcoxon "
                         "test, p &ge; 0.05); summary.parquet holds the numbers</p>")
            parts.append(table.to_html(index=False, classes="summary", float_format="%.3f",
                                       border=0))
        facts = CHECKS.facts(check) if check in CHECKS else None
        if facts is not None and facts.summary is not None:
            parts.append(pre(facts.summary(own)))
    return "\n".join(parts)


def figures_html(folder: Path) -> str:
    """Every PNG of the run's figures, embedded."""
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return "<p>no figures (figures=false, or none drawn)</p>"
    return "\n".join(
        f"<figure><img alt=\"{html.escape(p.stem)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}\"><figcaption>{html.escape(p.stem)}"
        "</figcaption></figure>" for p in pngs)


def records_html(records: dict[str, dict]) -> str:
    """A table with one row per record (e.g. per trained model) and one column per field."""
    return pd.DataFrame(records).T.to_html(border=0, classes="records")


def warnings_html(log: Path) -> str:
    lines = [line for line in (log.read_text().splitlines() if log.is_file() else [])
             if "warning" in line.lower()]
    if not lines:
        return "<p>none</p>"
    return "<ul class=\"warn\">" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) \
        + "</ul>"


def pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def main(argv: list[str] | None = None) -> int:
    """``sanity report RUN_OR_SWEEP_DIR``: remake its report.html."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("sanity: error: usage: sanity report RUN_OR_SWEEP_DIR (an existing directory)",
              file=sys.stderr)
        return 2
    print(f"[sanity] report: {write_report(argv[0])}")
    return 0
