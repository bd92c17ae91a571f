"""``sanity --help`` is the project's own (conf/hydra/help/sanity.yaml, issue #18): every group
with its choices, what this command selects, ``sanity list``, presets, resume, outputs."""
import os
import subprocess
import sys
from pathlib import Path

from harness.cli import CHOICE_GROUPS, options

ROOT = Path(__file__).resolve().parents[1]


def test_help_names_groups_choices_selection_and_where_outputs_go(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "model=tiny_cnn",
                          "method=[gradient,smoothgrad]", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for group in CHOICE_GROUPS:
        assert f"{group}: {', '.join(options(group))}\n" in out, group
    assert "model=tiny_cnn  dataset=imagenet_samples  check=cascading" in out  # with overrides
    assert "method=[gradient,smoothgrad]" in out
    assert "metric=[ssim,spearman,spearman_abs,hog]" in out
    for said in ("sanity list", "+experiment=adebayo2018_cascading", "resume=auto", "wait",
                 "results/runs/<digest>/", "hydra.run.dir=PATH", "report.html"):
        assert said in out, said
    assert "powered by Hydra" not in out
    assert not (tmp_path / "results").exists()  # help writes nothing
