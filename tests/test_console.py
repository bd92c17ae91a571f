"""``cli.log`` keeps what a run printed and every warning, without progress bars (issue #18);
the end-of-run summary names every stage and where each method drops below 0.5."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from checks.summary import similarity_summary
from harness.console import counted

ROOT = Path(__file__).resolve().parents[1]


LOGGED = """
import sys, warnings
from tqdm import tqdm
from harness.console import log_console
log_console(sys.argv[1] + "/first.log")
log_console(sys.argv[1] + "/cli.log")  # the next job of a sweep in the same process
print("[sanity] a message")
warnings.warn("a warning of a library", UserWarning, stacklevel=1)
for _ in tqdm(range(3), mininterval=0):
    pass
for _ in tqdm(range(2), desc="outer", mininterval=0):
    for _ in tqdm(range(2), desc="inner", leave=False, mininterval=0):
        pass
print()
print("sanity: error: the last line", file=sys.stderr)
"""


def test_cli_log_keeps_prints_and_warnings_not_bars(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    shown = subprocess.run([sys.executable, "-c", LOGGED, str(tmp_path)], env=env, check=True,
                           capture_output=True, text=True, timeout=60)
    assert "it/s" in shown.stderr and "a message" in shown.stdout  # the terminal sees all
    lines = (tmp_path / "cli.log").read_text().splitlines()
    assert lines[0] == "[sanity] a message"
    assert "UserWarning: a warning of a library" in lines[1], lines
    assert lines[-1] == "sanity: error: the last line"
    assert len(lines) == 3, lines  # no bar, no blank line
    assert (tmp_path / "first.log").read_text() == ""


def test_summary_names_every_stage_and_the_first_below_half():
    values = {("gradient", "ssim"): [1.0, 0.7, 0.4, 0.6], ("sobel", "ssim"): [1.0] * 4,
              ("gradient", "spearman"): [1.0, 0.45, 0.3, 0.2]}
    stages = ["original", "fc", "conv2", "conv1"]
    rows = pd.DataFrame([{"method": m, "metric": k, "stage_index": i, "stage": stages[i],
                          "sample": s, "value": v + (0.01 if s else -0.01)}
                         for (m, k), vs in values.items() for i, v in enumerate(vs)
                         for s in (0, 1)])
    text = similarity_summary(rows).splitlines()
    assert text[0] == "similarity per stage (0 original, 1 fc, 2 conv2, 3 conv1):"
    assert text[1] == ("mean [95% bootstrap interval] over samples; with n = 2 inputs no stage "
                       "can be told from random_uniform (p < 0.05 needs 6 or more: dataset.n)")
    assert text[2].split() == ["method", "metric", "0", "1", "2", "3", "first", "<", "0.5"]

    def cells(means):  # two samples at mean -/+ 0.01: the bootstrap interval is their range
        return [w for v in means for w in (f"{v:.3f}", f"[{v - 0.01:.2f},{v + 0.01:.2f}]")]

    assert text[3].split() == ["gradient", "ssim", *cells([1.0, 0.7, 0.4, 0.6]), "2", "conv2"]
    assert text[4].split() == ["gradient", "spearman", *cells([1.0, 0.45, 0.3, 0.2]), "1", "fc"]
    assert text[5].split() == ["sobel", "ssim", *cells([1.0] * 4), "never"]
    assert len(text) == 6


def test_counts_read_as_english() -> None:
    """The run's banner and resume lines: "1 input", "2 methods", never "1 methods"."""
    assert [counted(n, "input") for n in (0, 1, 2)] == ["0 inputs", "1 input", "2 inputs"]
