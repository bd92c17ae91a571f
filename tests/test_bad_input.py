"""Bad input fails early: one line on stderr that says what is wrong, a non-zero exit, before
any check runs (no rows are written).

Each case is a real command line of the ``sanity`` CLI; ``{tmp}`` is a folder prepared by the
``bad_inputs`` fixture (an empty image folder, one with an unreadable image, a run dir of
another config). Hyperparameters of a wrong name or type, shards out of range and resume=true
without an earlier run are tested in-process (tests/test_validate.py): each CLI case costs an
interpreter start with torch.
"""
import json
import os
import subprocess
import sys
import resource
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=tiny_cnn", "dataset=digits", "dataset.n=2", "method=[gradient]", "metric=[ssim]",
        "device=cpu", "figures=false", "progress=false"]

# (id, overrides on top of FAST, fragment the one stderr line must contain)
CASES = [
    ("unknown method", ["method=[gradient,gradiant]"], "unknown method 'gradiant'; valid choices"),
    ("unknown model", ["model=resnet9000"], "unknown model 'resnet9000'; valid choices"),
    ("negative steps", ["method=[integrated_gradients]",
                        "method.integrated_gradients.steps=-5"],
     "method.integrated_gradients.steps must be >= 1, got -5"),
    ("sigma zero", ["method=[smoothgrad]", "method.smoothgrad.noise_level=0"],
     "method.smoothgrad.noise_level must be > 0, got 0"),
    ("q above 100", ["method=[rectgrad]", "method.rectgrad.q=150"],
     "method.rectgrad.q must be within [0, 100], got 150"),
    ("gradcam without conv", ["model=mlp", "method=[gradcam]"],
     "method gradcam needs a conv layer, which model mlp lacks"),
    ("rectgrad without relu", ["model=mlp", "model.activation=gelu", "method=[rectgrad]"],
     "method rectgrad needs nn.ReLU or nn.ReLU6 modules, which model mlp lacks"),
    ("missing weights", ["model=timm", "model.name=resnet18", "model.pretrained=true"],
     "pass model.checkpoint=PATH"),
    ("missing data", ["dataset=mnist", "dataset.root={tmp}/empty"],
     "dataset.root={tmp}/empty: no MNIST IDX files"),  # the message says where to get them
    ("empty image folder", ["dataset=imagenet_folder", "dataset.root={tmp}/empty"],
     "no images in class sub-folders"),
    ("unreadable image", ["dataset=imagenet_folder", "dataset.root={tmp}/broken"],
     "cannot read image {tmp}/broken/cls/bad.jpg"),
    ("image size", ["model=mlp", "dataset=imagenet_samples"],
     "the model takes 1-channel 28x28 inputs; this dataset's photos are RGB (3 channels)"),
    ("output dir not writable", ["hydra.run.dir={tmp}/a_file/run"],
     "output dir {tmp}/a_file/run is not writable"),
    ("resume another config", ["hydra.run.dir={tmp}/foreign"],
     "holds a run of a different config"),
    ("no method", ["method=[]"], "method=[] selects no method; choose at least one of"),
    ("no metric", ["metric=[]"], "metric=[] selects no metric; choose at least one of"),
    ("seed not a number", ["seed=abc"], "seed must be a whole number >= 0, got 'abc'"),
    ("batch size zero", ["batch_size=0"], "batch_size must be a whole number >= 1, got 0"),
    ("key typo without +", ["method=[smoothgrad]", "method.smoothgrad.n_sample=4"],
     "method.smoothgrad.n_sample: unknown key; valid keys: n_samples, noise_level"),
    ("key typo with +", ["+model.nmae=resnet50"], "model.nmae: unknown key of model tiny_cnn"),
    ("unknown order", ["check.order=sideways"],
     "check.order must be one of top_down, bottom_up, got 'sideways'"),
    ("bad smoothing", ["check.smooth.n=-1"], "check.smooth.n must be a whole number >= 0, got -1"),
    ("not a switch", ["check.reuse_prefix=maybe"],
     "check.reuse_prefix must be true or false, got 'maybe'"),
    ("unknown split", ["dataset.split=val"], "dataset.split must be one of all, train, test"),
    ("override syntax", ["method=[gradient"], "cannot read 'method=[gradient'"),
]


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "broken" / "cls").mkdir(parents=True)
    (tmp / "broken" / "cls" / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp / "a_file").write_text("a file, not a folder")
    foreign = tmp / "foreign"
    (foreign / "rows").mkdir(parents=True)
    (foreign / "claim.json").write_text(json.dumps({"run_id": "x", "config_digest": "0" * 12}))
    (foreign / "rows" / "part-cascading-000-gradient.parquet").write_bytes(b"")
    return tmp


@pytest.mark.parametrize("overrides,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_fast(bad_inputs, overrides, fragment, request):
    args = [a.replace("{tmp}", str(bad_inputs)) for a in FAST + overrides]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={bad_inputs}/runs/{request.node.callspec.id.replace(' ', '_')}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    tic, before = time.perf_counter(), _children_cpu()
    result = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=60)
    elapsed, cpu = time.perf_counter() - tic, _children_cpu() - before
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    assert fragment.replace("{tmp}", str(bad_inputs)) in lines[0]
    # the wall time is reported, not asserted: it measures the machine's load as much as the
    # harness (a benchmark's job); that nothing was computed is asserted below
    print(f"{request.node.callspec.id}: {elapsed:.1f} s wall, {cpu:.1f} s CPU: {lines[0]}")
    run_dir = Path(args[-1].split("=", 1)[1]) if "runs/" in args[-1] else None
    if run_dir is not None:  # nothing was computed
        assert not list(run_dir.glob("rows/*.parquet"))
    if "foreign" in args[-1]:  # another config's run dir: nothing marked there
        assert not (bad_inputs / "foreign" / "failed.json").exists()


def test_a_failing_command_line_loads_no_heavy_library():
    """What the CLI imports before it validates the config (harness.run and the registries)
    leaves out the libraries only a computation needs: timm (it pulls in torch._dynamo and
    sympy, ~2 s), scipy. That is what lets a bad input fail in about 2 s of CPU here (printed
    by the test above) instead of 5."""
    heavy = ("timm", "scipy", "sympy", "torch._dynamo")
    code = ("import sys, harness.run, harness.cli; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True, timeout=120).stdout.strip()
    assert loaded == "[]", loaded



def test_more_inputs_than_the_data_holds_warns_in_one_line_and_records_what_was_used(tmp_path):
    """``dataset.n`` above what the dataset has: the run goes on with what there is, says so in
    one warning line (also in run.json's warnings) and records the number actually used."""
    from harness.api import evaluate

    rows = evaluate("tiny_cnn", "digits", methods=["gradient"], metrics=["ssim"],
                    run_dir=tmp_path, dataset_n=100000, dataset_split="test",
                    model_weights="random", n_maps=0, figures=False, progress=False)
    record = json.loads((tmp_path / "run.json").read_text())
    said = [w for w in record["warnings"] if "dataset.n=100000" in w]
    assert said == ["dataset.n=100000 but digits has 500 inputs: using 500"], record["warnings"]
    assert record["inputs"] == 500 and rows["sample"].nunique() == 500
