"""How a run executes its passes (harness/execution.py, issue #17): memory format and precision
recorded in run.json and in every row, stage 0 scoring 1 under every setting, the two formats'
maps equal up to float32 rounding, ``internal_batch_size=auto`` staying under ``memory_limit``
(measured in a fresh process), and the settings validated in one line before any compute."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import harness
from harness.execution import auto_chunk, pass_bytes, precision_context, to_format
from harness.zoo import MODELS
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(f, p) for f in ("contiguous", "channels_last") for p in ("fp32", "bf16")]
# deterministic methods of the embedded default that run under both precisions (hooks included)
STAGE0_METHODS = ["gradient", "gradient_x_input", "integrated_gradients", "guided_backprop",
                  "gradcam", "guided_gradcam"]
U = 2.0 ** -24  # float32 unit roundoff


def tiny_inputs(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("memory_format,precision", SETTINGS)
def test_stage0_scores_one_under_every_setting(memory_format, precision):
    rows = harness.evaluate("tiny_cnn", tiny_inputs(), methods=STAGE0_METHODS,
                            metrics=["ssim", "spearman"], n_maps=0, progress=False,
                            model_weights="random", memory_format=memory_format,
                            precision=precision)
    stage0 = rows[rows["stage_index"] == 0]
    assert len(stage0) == len(STAGE0_METHODS) * 3 * 2
    assert (stage0["value"] == 1.0).all(), stage0[stage0["value"] != 1.0]
    assert set(rows["memory_format"]) == {memory_format}
    assert set(rows["precision"]) == {precision}
    # bf16 changes the maps, so the later stages differ from fp32's; a sanity bound only
    assert rows[rows["stage_index"] > 0]["value"].notna().all()


def test_choices_recorded_in_run_json_and_rows(tmp_path):
    harness.evaluate("tiny_cnn", tiny_inputs(), methods=["gradient"], metrics=["ssim"],
                     n_maps=0, progress=False, model_weights="random", precision="bf16",
                     memory_format="auto", run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    execution = record["execution"]
    # auto on a small model: contiguous without measuring (its passes are timed by the load)
    assert execution["memory_format"] == "contiguous"
    assert execution["memory_format_source"] == "small model"
    assert execution["precision"] == "bf16" and execution["internal_batch_size"] == 16
    assert record["peak_rss_bytes"] > 0
    rows = harness.read_rows(tmp_path / "run")
    assert set(rows["memory_format"]) == {"contiguous"} and set(rows["precision"]) == {"bf16"}


def test_declared_format_is_used_and_recorded(tmp_path):
    """A model that declares its format (the zoo's efficientnet_lite0 does) gets it under auto;
    a given format wins over the declaration."""
    rows = harness.evaluate("tiny_cnn", tiny_inputs(), methods=["gradient"], metrics=["ssim"],
                            n_maps=0, progress=False, model_weights="random",
                            memory_format="channels_last", run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["execution"]["memory_format"] == "channels_last"
    assert record["execution"]["memory_format_source"] == "given"
    assert set(rows["memory_format"]) == {"channels_last"}
    assert MODELS.facts("efficientnet_lite0").memory_format == "channels_last"


class SmoothNet(nn.Module):
    """Two 3x3 convs with tanh (no kink: both formats take the same branch everywhere)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def test_channels_last_maps_equal_contiguous_up_to_rounding():
    """The gradient of a smooth model in both formats. The format only reorders the sums of
    each conv (and of its backward): a float32 sum of K terms reordered moves by at most
    2 (K - 1) u times the sum of |terms| (Higham, gamma_K, for each order). Along the chain the
    reductions are K = 27 (conv1), 54 (conv2) forward and 54, 27 backward (the tanh, mean and
    fc are elementwise or identical in both formats); the sum of |terms| is bounded by the
    float64 map computed with |weights| and |x| (a majorant of every term). The forward sums'
    errors reach the backward once more through tanh' (|tanh''| < 1): at most the same again,
    so the difference is below 4 * (26 + 53 + 53 + 26) u times that majorant, elementwise."""
    model, x = SmoothNet().eval(), tiny_inputs()
    target = torch.tensor([0, 2, 4])
    contiguous = METHODS["gradient"](model, x, target)
    model_cl, x_cl = to_format(SmoothNet().eval(), x, "channels_last")
    assert model_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    channels_last = METHODS["gradient"](model_cl, x_cl, target)
    majorant = abs_majorant(x, target)
    assert ((channels_last - contiguous).abs() <= 4 * (26 + 53 + 53 + 26) * U * majorant).all()


def abs_majorant(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A float64 bound of the sum of |terms| in every product of the gradient: the same
    network with |weights|, |x| and tanh' <= 1 replaced by 1 (linear in the majorant)."""
    model = SmoothNet().double()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    leaf = x.double().abs().requires_grad_(True)
    h = model.conv2(model.conv1(leaf))
    out = model.fc(h.mean((2, 3)))
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), leaf)
    return grad.abs().float() + 1e-30


def test_channels_last_maps_rank_like_contiguous_with_relu():
    """With ReLU kinks a few pixels may take the other side of a kink (issue #17 measured that
    on efficientnet_lite0); the per-image rank correlation of the two maps stays >= 0.9999,
    the bound the issue measured on a real model."""
    model, x = MODELS["tiny_cnn"](), tiny_inputs()
    target = torch.tensor([0, 2, 4])
    contiguous = METHODS["gradient"](model, x, target)
    model_cl, x_cl = to_format(MODELS["tiny_cnn"](), x, "channels_last")
    channels_last = METHODS["gradient"](model_cl, x_cl, target)
    for a, b in zip(contiguous, channels_last):
        assert spearmanr(a.flatten(), b.flatten()).statistic >= 0.9999


def test_bf16_maps_come_back_float32_and_contiguous():
    rows = harness.evaluate("tiny_cnn", tiny_inputs(), methods=["gradient"], metrics=["ssim"],
                            n_maps=0, progress=False, model_weights="random",
                            memory_format="channels_last", precision="bf16")
    assert len(rows)
    model, x = to_format(MODELS["tiny_cnn"](), tiny_inputs(), "channels_last")
    with precision_context("bf16"):
        logits = model(x)
    assert logits.dtype == torch.bfloat16  # autocast is on inside the context


PEAK_SCRIPT = """
import sys, torch
from harness.execution import input_gradient
from harness.zoo import MODELS
rows, size = int(sys.argv[1]), int(sys.argv[2])
model = MODELS["tiny_cnn"]()
x = torch.rand(rows, 3, size, size)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
input_gradient(model, torch.rand(1, 3, 32, 32))  # code pages and lazy init, not the pass's
before = status("VmRSS:")
input_gradient(model, x)
print(status("VmHWM:") - before)
"""


def measured_peak(rows: int, size: int) -> int:
    """Growth of peak resident memory over a forward+backward of ``rows`` images, in a fresh
    process: VmHWM, the high-water mark of its own address space, less the resident memory
    before the pass (the input already allocated). ``ru_maxrss`` would not do: Linux carries
    it over ``exec`` from the forked parent, pytest's process with its own peak. Peaks before
    the baseline only raise the measurement: it bounds the pass's own peak from above."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(rows), str(size)],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


def test_auto_chunk_stays_under_the_limit_on_large_activations():
    """tiny_cnn on 512x512 images keeps ~50 MB per row for its backward and builds a ~54 MB
    im2col matrix: under a 400 MB limit auto picks the largest chunk whose estimate fits, and a
    fresh process running that chunk (after a small warm-up pass that loads the kernels' code)
    grows its peak resident memory by no more than the limit."""
    model, x, limit = MODELS["tiny_cnn"](), tiny_inputs(1, 512), 400 << 20
    rows, probe = auto_chunk(model, x, "fp32", limit)
    assert rows >= 2
    chunk = x.expand(rows, -1, -1, -1).clone()
    assert pass_bytes(model, chunk, "fp32") <= limit  # the estimate, measured at the chunk
    bigger = x.expand(rows + 1, -1, -1, -1).clone()
    assert pass_bytes(model, bigger, "fp32") > limit  # the largest that fits
    assert measured_peak(rows, 512) <= limit, (rows, probe)


def test_auto_chunk_too_small_a_limit_fails_in_one_line():
    with pytest.raises(ValueError, match=r"memory_limit=1\.0MB is below one row") as err:
        auto_chunk(MODELS["tiny_cnn"](), tiny_inputs(1, 512), "fp32", 1 << 20)
    assert "\n" not in str(err.value)


def test_internal_batch_size_auto_in_a_run(tmp_path):
    harness.evaluate("tiny_cnn", tiny_inputs(2, 128), methods=["gradient"], metrics=["ssim"],
                     n_maps=0, progress=False, model_weights="random",
                     internal_batch_size="auto", memory_limit="16MB", run_dir=tmp_path / "run")
    execution = json.loads((tmp_path / "run" / "run.json").read_text())["execution"]
    probe = execution["internal_batch_size_probe"]
    assert probe["limit_bytes"] == 16 << 20
    assert probe["estimated_bytes"] <= probe["limit_bytes"]
    expected = ((16 << 20) - probe["fixed_bytes"]) // probe["per_row_bytes"]
    assert execution["internal_batch_size"] == expected >= 1


@pytest.mark.parametrize("key,value,message", [
    ("memory_format", "nhwc", "memory_format must be auto, contiguous or channels_last"),
    ("precision", "fp16", "precision must be fp32 or bf16"),
    ("internal_batch_size", "big", "internal_batch_size must be a whole number >= 1 or auto"),
    ("memory_limit", "lots", "memory_limit must be a positive size"),
])
def test_bad_settings_fail_in_one_line(key, value, message):
    with pytest.raises(ValueError, match=message) as err:
        harness.evaluate("tiny_cnn", tiny_inputs(), methods=["gradient"], metrics=["ssim"],
                         n_maps=0, progress=False, model_weights="random", **{key: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("init", ["default", "normal", "permute"])
def test_randomizing_and_restoring_keep_the_format(init):
    """The model is converted once per run: randomizing a stage in place and restoring it
    leave its conv weights channels-last (no stage falls back to contiguous kernels)."""
    from harness.base.randomize import randomize_, restored

    model = to_format(MODELS["tiny_cnn"](), tiny_inputs(1, 8), "channels_last")[0]
    convs = [model.conv1, model.conv2]
    with restored(model):
        randomize_(convs, init, seed=0)
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
