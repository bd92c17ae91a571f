"""The coverage audit of randomization runs (harness/base/coverage.py): which tensors each stage
changed, which none changed, on vision transformers (class token, position embedding, attention
projections), with a shared module, and with a block that misses a parameter; through the check,
the runner's run.json and summary, the CLI and a resumed run."""
import json
import os
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from checks import CHECKS
from harness.base.context import RunNote
from harness.base.coverage import CoverageAudit
from harness.base.meta import attach_meta, fallback_meta, model_meta
from harness.base.randomize import randomize_, restored, stages
from harness.zoo import MODELS, plain_data_config
from tests.test_checks import make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 16, "num_heads": 2,
            "num_classes": 5}


def as_trained(model: nn.Module) -> nn.Module:
    """Move every parameter and buffer off its initial value, as training does: a fresh
    LayerNorm is (1, 0), exactly what its reset gives, and a reset to the value a tensor
    already holds changes nothing (the audit, comparing values, rightly says so)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.01 * torch.randn(t.shape, generator=generator))
            else:  # BatchNorm's num_batches_tracked
                t.add_(100)
    return model


def tiny_vit() -> nn.Module:
    return as_trained(MODELS["vit"](**TINY_VIT))


def torchvision_vit() -> nn.Module:
    """torchvision's ViT: nn.MultiheadAttention (in_proj without reset_parameters), the class
    token on the model itself, the position embedding on the encoder."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5)
    return as_trained(model.eval())


def coverage_of(items) -> RunNote:
    notes = [item for item in items if isinstance(item, RunNote)]
    assert [n.key for n in notes] == ["coverage", "prefix_reuse"]
    return notes[0]


def run_check(model, check="cascading", methods=("gradient",), **settings) -> RunNote:
    return coverage_of(CHECKS[check](make_ctx(model, methods=methods, n=2), **settings))


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_full_cascade_on_a_vit_randomizes_every_tensor(granularity):
    model = tiny_vit()
    note = run_check(model, granularity=granularity)
    stage_lists = list(note.value["stages"].values())
    assert note.value["never_randomized"] == {"parameters": [], "buffers": []}
    assert all(stage_lists), "every stage changes something"
    named = [n for names in stage_lists for n in names]
    assert len(named) == len(set(named)) == len(dict(model.named_parameters()))  # disjoint
    assert "cls_token" in named and "pos_embed" in named
    assert note.line.startswith("coverage: all") and "warning" not in note.line


def test_multihead_attention_and_loose_tokens_are_randomized():
    """Quantus resets only modules with reset_parameters: class token, position embedding and
    MultiheadAttention's in_proj would stay trained. Block stages that name the loose tensors,
    and module stages, leave nothing behind."""
    model = torchvision_vit()
    # blocks conv_proj, encoder, heads (its top-level children): the class token is in none
    attach_meta(model, replace(fallback_meta(model), data_config=plain_data_config(3, 32)))
    note = run_check(model)
    assert note.value["never_randomized"]["parameters"] == ["class_token"]
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in \
        note.value["stages"]["encoder"]
    meta = model_meta(model)
    meta.members = {"conv_proj": ["conv_proj", "class_token"]}
    assert run_check(model).value["never_randomized"]["parameters"] == []
    assert run_check(model, granularity="module").value["never_randomized"]["parameters"] == []


def test_a_block_that_misses_a_parameter_is_listed_and_warned(tmp_path):
    from harness import evaluate
    from harness.run import summary

    model = tiny_vit()
    meta = model_meta(model)
    meta.members = {"patch_embed": ["patch_embed", "cls_token"]}  # pos_embed forgotten
    note = run_check(model, check="independent")
    assert note.value["never_randomized"]["parameters"] == ["pos_embed"]
    assert note.line.startswith("warning: coverage: 1 parameter tensors never randomized")
    assert "pos_embed" in note.line
    evaluate(model, torch.rand(2, 3, 32, 32), methods=["gradient"], metrics=["spearman"],
             run_dir=tmp_path, figures=False, n_maps=0)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["coverage"]["never_randomized"]["parameters"] == ["pos_embed"]
    assert summary(tmp_path).endswith(note.line)
    assert {"method", "sample"} <= set(pd.read_parquet(tmp_path / "rows").columns)
    assert not pd.read_parquet(tmp_path / "rows")["method"].eq("").any()  # no audit rows


def shared_model() -> nn.Module:
    """The same nn.Linear used twice (blocks ``a`` and ``b``), then a head."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(OrderedDict(flatten=nn.Flatten(), a=shared, act=nn.Tanh(), b=shared,
                                      head=nn.Linear(4, 3)))
    # named_children() lists a shared module once: the blocks say both of its names
    return attach_meta(as_trained(model), replace(fallback_meta(model), blocks=["a", "b", "head"]))


def test_a_shared_module_is_counted_once_under_its_first_name():
    model = shared_model()
    x = torch.rand(2, 1, 2, 2)
    with restored(model) as saved:
        audit = CoverageAudit.of(model, saved)
        for name, parts in stages(model, x, "block")[::-1]:  # head, b, a: top down
            randomize_(parts, "default", seed=0)
            audit.differs(model, name)
    record = audit.record()
    assert record["stages"] == {"head": ["head.weight", "head.bias"],
                                "b": ["a.weight", "a.bias"], "a": []}
    assert record["aliases"] == {"a.weight": ["b.weight"], "a.bias": ["b.bias"]}
    assert record["tensors"] == {"parameter": 4, "buffer": 0}
    assert record["never_randomized"] == {"parameters": [], "buffers": []}


def test_batchnorm_statistics_are_expected_buffers_not_a_gap():
    model = as_trained(MODELS["timm"](name="resnet18", num_classes=4))
    note = run_check(model, methods=())
    buffers = note.value["never_randomized"]["buffers"]
    assert note.value["never_randomized"]["parameters"] == []
    assert "bn1.running_mean" in buffers and "bn1.num_batches_tracked" in buffers
    assert not note.line.startswith("warning") and "as expected" in note.line
    strict = run_check(model, methods=(), batchnorm_stats=True, init="normal")
    assert "bn1.running_mean" not in strict.value["never_randomized"]["buffers"]


def cli(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_vit_cascade_through_the_cli_records_the_audit_and_resume_keeps_it(tmp_path):
    from tests.test_resume import run_in_process

    run_dir, checkpoint = tmp_path / "run", tmp_path / "vit.pt"
    torch.save(tiny_vit().state_dict(), checkpoint)  # "trained" weights, loaded by the zoo
    args = ["model=vit", *(f"model.{k}={v}" for k, v in TINY_VIT.items()),
            f"model.checkpoint={checkpoint}", "dataset=digits", "dataset.n=2",
            "method=[gradient]", "metric=[spearman]", "check=cascading", "device=cpu",
            "figures=false", "progress=false", "n_maps=0", f"hydra.run.dir={run_dir}"]
    out = cli(args, tmp_path)
    first = json.loads((run_dir / "run.json").read_text())
    assert first["coverage"]["never_randomized"]["parameters"] == []
    assert list(first["coverage"]["stages"]) == ["head", "norm", "blocks.1", "blocks.0",
                                                 "patch_embed"]
    assert "coverage: all" in out
    again = run_in_process(args[:-1], run_dir)  # every part finished: all kept
    second = json.loads((again / "run.json").read_text())
    assert second["parts_computed"] == 0 and second["parts_kept"] == first["parts_computed"]
    assert second["coverage"] == first["coverage"]
