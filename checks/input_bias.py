"""Input-bias probes (Brocki & Chung 2020, "Input Bias in Rectified Gradients and Modified
Saliency Maps", arXiv 2011.05002; Kindermans et al. 2017, "The (Un)reliability of saliency
methods", arXiv 1711.00867).

Methods that multiply by the input (Gradient x Input, RectGrad, LRP-like rules) cannot
highlight pixels whose input value is near zero, whatever their importance; after a change of
the input encoding the blind spot moves to whichever colour maps to zero. Three probes:

* ``shift`` (Kindermans et al.): x' = x + delta for each of ``deltas`` (model input units), the
  first layer compensated (:mod:`checks.compensation`: weights, bias, and an exact border
  correction for zero padding) so that the model computes the same logits. Stage
  ``shift=+0.25`` etc. compares each method's map of x' with its map of x.
* ``scale``: a change of encoding x' = alpha * x + beta, from the model's own normalization
  to pixels in [0, 1] (``unit``), in [-1, 1] (``signed``) or ImageNet's mean/std
  (``imagenet``), compensated likewise; stage ``scale=[0,1]`` etc. An encoding equal to the
  model's own is skipped (it is stage 0).
* ``intensity``: the bias itself, at stage 0 (``original``) and at every shift / scale stage,
  from the attribution mass m = sum_c |a| (B, H, W) of each map:
  ``intensity_correlation`` (Spearman over pixels between m and the pixel intensity, the mean
  over channels of the display image in [0, 1]), ``zero_point_correlation`` (Spearman between
  m and the distance of the model input from the input space's zero, ||x'||_2 over channels),
  ``dark_mass_ratio`` (share of m in the darkest ``dark_fraction`` of pixels divided by that
  fraction: 1 = no bias, near 0 = dark pixels ignored) and, for datasets with ground-truth
  object masks (``dark_object``), ``mass_in_object`` (share of m inside the object; the
  ``polarity`` column says whether the object is dark or bright, ``object_fraction`` its area).

Rows: the similarity rows of :func:`checks.scoring.score` per (stage, method, sample, metric);
the intensity rows (``normalization`` ``mass``); and per shift / scale stage one
``max_logit_change`` row (method empty, sample and target -1): the largest absolute change of any
logit of any input under the compensated encoding. Above ``tolerance`` the check fails loudly
(a :class:`CompensationError`) instead of scoring maps of a different function. Every row of the
check has the same columns (``probe``, ``delta``, ``encoding``, ``alpha``, ``beta``,
``first_layer``, ``compensation``, ``border_correction``, ``tolerance``, ``polarity``,
``object_fraction``), so the parquet parts share one schema.

The model is changed only inside :func:`checks.compensation.compensated` and the whole model is
restored on exit (also when the generator is closed early or a method raises).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from checks.compensation import compensated
from checks.input_bias_figures import bias_figure
from checks.plotting import grid_figures, similarity_figure
from checks.registry import CHECKS
from checks.scoring import explain_all, map_record, method_hparams, score
from checks.summary import measurement_summary, similarity_summary
from harness.base.context import CheckContext, MapRecord, StageDone
from harness.base.randomize import restored
from metrics import METRICS

PROBES = ("shift", "scale", "intensity")
TARGETS = ("fixed", "label")
# pixel encodings p in [0, 1] -> (p - mean) / std; stage names
ENCODINGS = {"unit": ((0.0,), (1.0,), "[0,1]"), "signed": ((0.5,), (0.5,), "[-1,1]"),
             "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")}
COMPENSATION = "first-layer weights/bias + border map"
MASS = "mass"  # the normalization column of intensity rows: m = sum_c |a|


class CompensationError(RuntimeError):
    """The compensated model's logits differ from the original ones by more than the
    tolerance: its maps would not be maps of the same function."""


@dataclass
class InputChange:
    """One shift / scale stage: x' = alpha * x + beta, alpha and beta (C,) per channel."""

    stage: str  # shift=+0.25, scale=[0,1], ...
    probe: str  # shift | scale
    alpha: Tensor
    beta: Tensor
    columns: dict  # delta / encoding / alpha / beta columns of its rows


@dataclass
class Reference:
    """What every stage is compared with: the original input's logits, targets and maps."""

    logits: Tensor  # (N, K)
    target: Tensor  # (N,)
    maps: dict  # explain_all output of the original input
    base: dict  # columns common to every row
    tolerance: float
    dark_fraction: float
    intensity: bool  # the intensity probe is on


COLUMNS = {"probe": "", "delta": math.nan, "encoding": "", "alpha": "", "beta": "",
           "first_layer": "", "compensation": COMPENSATION, "border_correction": math.nan,
           "tolerance": math.nan, "polarity": "", "object_fraction": math.nan}
BIAS_METRICS = ("intensity_correlation", "zero_point_correlation", "dark_mass_ratio",
                "mass_in_object")


def summary(rows) -> str:
    """The similarity of the shifted / rescaled maps, then the bias of the original maps."""
    bias = measurement_summary(rows[rows["stage_index"] == 0], BIAS_METRICS)
    return "\n\n".join(t for t in (similarity_summary(rows), bias) if t)


@CHECKS.register(title="Input bias (compensated shift / rescaling)", columns=COLUMNS,
                 summary=summary, figures=(similarity_figure, grid_figures, bias_figure))
def input_bias(ctx: CheckContext, probes: list[str] | tuple[str, ...] = PROBES,
               deltas: list[float] | tuple[float, ...] = (-0.5, -0.25, 0.25, 0.5),
               encodings: list[str] | tuple[str, ...] = ("unit", "signed", "imagenet"),
               tolerance: float = 1e-4, dark_fraction: float = 0.1,
               target: Literal["fixed", "label"] = "fixed",
               **_) -> Iterator[dict | MapRecord]:
    """Shift / scale the input with the first layer compensated and compare maps; measure the
    maps' bias towards the input's zero point. x: ctx.data.inputs (N, C, H, W)."""
    _validate(probes, encodings, target, dark_fraction)
    changes = _plan(ctx, probes, deltas, encodings)
    x = ctx.data.inputs
    # a resumed run explains only the methods with a unit left to do
    todo = [ctx.pending(index) for index in range(len(changes) + 1)]
    needed = {m: ctx.methods[m] for m in set().union(*(stage.methods for stage in todo))}
    with restored(ctx.model):
        logits = _logits(ctx, x)
        explained = logits.argmax(1) if target == "fixed" else ctx.data.labels.to(x.device)
        ref = Reference(logits=logits, target=explained,
                        maps=explain_all(replace(ctx, methods=needed), explained,
                                         {MASS: _mass}) if needed else {},
                        base={"check": "input_bias", "probe": "original",
                              "tolerance": float(tolerance)},
                        tolerance=float(tolerance), dark_fraction=dark_fraction,
                        intensity="intensity" in probes)
        yield from _maps(ctx, ref.maps, "original", 0)
        if ref.intensity:
            yield from intensity_rows(
                todo[0], {m: ref.maps[m] for m in todo[0].methods}, x,
                {**ref.base, "stage": "original", "stage_index": 0}, explained, dark_fraction)
        yield StageDone(0)
        for index, change in enumerate(changes, start=1):
            yield from _changed_input(todo[index], change, index, ref)


def _changed_input(ctx: CheckContext, change: InputChange, index: int,
                   ref: Reference) -> Iterator[dict | MapRecord]:
    """One stage: the logit check, the maps of x' compared with those of x, their bias."""
    x = ctx.data.inputs
    shifted = change.alpha.view(1, -1, 1, 1).to(x) * x + change.beta.view(1, -1, 1, 1).to(x)
    with compensated(ctx.model, change.alpha, change.beta, x[:1]) as done:
        base = {**ref.base, **change.columns, "probe": change.probe, "stage": change.stage,
                "stage_index": index, "first_layer": done.layer,
                "border_correction": done.border}
        logit_change = float((_logits(ctx, shifted) - ref.logits).abs().max())
        if not logit_change <= ref.tolerance:
            raise CompensationError(
                f"input_bias {change.stage}: the compensated model's logits changed by "
                f"{logit_change:.3g} > check.tolerance={ref.tolerance:g} (first layer "
                f"{done.layer}, {done.kind})")
        maps = explain_all(replace(ctx, data=replace(ctx.data, inputs=shifted)), ref.target,
                           {MASS: _mass}) if ctx.methods else {}
    # rows leave the check only once the model is restored (a consumer may stop at any row)
    if not ctx.finished(index, ""):
        yield {**base, "method": "", "sample": -1, "target": -1, "metric": "max_logit_change",
               "value": logit_change}
    for method, stage_maps in maps.items():
        yield from score(ctx, stage_maps, ref.maps[method], {**base, "method": method},
                         ref.target)
    yield from _maps(ctx, maps, change.stage, index)
    if ref.intensity:
        yield from intensity_rows(ctx, maps, shifted, base, ref.target, ref.dark_fraction)
    yield StageDone(index)


def _validate(probes, encodings, target: str, dark_fraction: float) -> None:
    for name, values, valid in (("probes", probes, PROBES), ("encodings", encodings, ENCODINGS)):
        unknown = [v for v in values if v not in valid]
        if unknown:
            raise ValueError(f"check.{name}: unknown {', '.join(map(str, unknown))}; valid: "
                             f"{', '.join(valid)}")
    if target not in TARGETS:
        raise ValueError(f"check.target must be one of {', '.join(TARGETS)}, got {target!r}")
    if not 0 < dark_fraction < 1:
        raise ValueError(f"check.dark_fraction must be in (0, 1), got {dark_fraction}")


def _plan(ctx: CheckContext, probes, deltas, encodings) -> list[InputChange]:
    """Every shift and scale stage, in that order."""
    channels = ctx.data.inputs.shape[1]
    plan = []
    if "shift" in probes:
        for delta in deltas:
            ones = torch.ones(channels)
            plan.append(InputChange(f"shift={float(delta):+g}", "shift", ones,
                                    ones * float(delta), {"delta": float(delta), "alpha": "1",
                                                          "beta": f"{float(delta):g}"}))
    if "scale" in probes:
        for name in encodings:
            alpha, beta = encoding_change(ctx.data.mean, ctx.data.std, name, channels)
            if torch.allclose(alpha, torch.ones_like(alpha)) and not bool(beta.abs().max()):
                continue  # the model's own encoding: stage 0
            plan.append(InputChange(f"scale={ENCODINGS[name][2]}", "scale", alpha, beta,
                                    {"encoding": name, "alpha": _text(alpha),
                                     "beta": _text(beta)}))
    return plan


def encoding_change(mean, std, name: str, channels: int) -> tuple[Tensor, Tensor]:
    """alpha, beta (C,) with x' = alpha * x + beta: from the model's normalization
    x = (p - mean) / std of pixels p in [0, 1] to the encoding ``name``'s (p - m) / s."""
    m, s, _ = ENCODINGS[name]
    m, s = (_per_channel(v, channels) for v in (m, s))
    mean, std = (_per_channel(v, channels) for v in (mean, std))
    return std / s, (mean - m) / s


def _per_channel(values, channels: int) -> Tensor:
    values = torch.tensor(values, dtype=torch.float64)
    if len(values) == channels:
        return values.float()
    return values.mean().repeat(channels).float()  # e.g. ImageNet statistics for a gray model


def _text(values: Tensor) -> str:
    unique = values.unique()
    return f"{float(unique[0]):.6g}" if len(unique) == 1 else \
        ",".join(f"{float(v):.6g}" for v in values)


@torch.no_grad()
def _logits(ctx: CheckContext, x: Tensor) -> Tensor:
    return torch.cat([ctx.model(chunk) for chunk in x.split(ctx.batch_size)])


def _mass(raw: Tensor) -> Tensor:
    """Attribution mass per pixel: sum_c |a|, (B, C, H, W) -> float64 (B, H, W)."""
    return raw.detach().abs().sum(1, dtype=torch.float64).cpu()


def _maps(ctx: CheckContext, maps: dict, stage: str, index: int) -> Iterator[MapRecord]:
    for method, method_maps in maps.items():
        record = map_record(ctx, method_maps, "input_bias", method, stage, index)
        if record is not None:
            yield record


# --------------------------------------------------------------------------- the bias itself


def intensity_rows(ctx: CheckContext, maps: dict, inputs: Tensor, base: dict,
                   target: Tensor, dark_fraction: float) -> Iterator[dict]:
    """The intensity metrics of every method's maps of ``inputs`` (N, C, H, W), the encoding
    the model was given at this stage (the pixel intensity always comes from the display
    images, in [0, 1])."""
    intensity = pixel_intensity(ctx.data)
    distance = inputs.detach().double().norm(dim=1).cpu()
    masks = ctx.data.masks.cpu() if ctx.data.masks is not None else None
    polarity, area = object_polarity(intensity, masks)
    samples, targets = ctx.data.samples.tolist(), target.cpu().tolist()
    for method, method_maps in maps.items():
        mass = method_maps[MASS]
        values = {"intensity_correlation": METRICS["spearman"](mass, intensity),
                  "zero_point_correlation": METRICS["spearman"](mass, distance),
                  "dark_mass_ratio": dark_mass_ratio(mass, intensity, dark_fraction)}
        if masks is not None:
            values["mass_in_object"] = mass_in_object(mass, masks)
        hparams = method_hparams(ctx.methods.get(method))
        empty = ~(mass.flatten(1).sum(1) > 0)
        for metric, scores in values.items():
            for i, value in enumerate(scores.double().tolist()):
                reason = "no attribution mass" if empty[i] else (
                    "" if value == value else "undefined")
                yield {**base, "method": method, "sample": samples[i], "target": targets[i],
                       "metric": metric, "value": math.nan if empty[i] else value,
                       "normalization": MASS, "reason": reason, "method_hparams": hparams,
                       "polarity": polarity[i], "object_fraction": area[i]}


def pixel_intensity(data) -> Tensor:
    """Brightness of every pixel: the mean over channels of the display image, (N, H, W)."""
    mean = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).view(1, -1, 1, 1)
    return (data.inputs.detach().double().cpu() * std + mean).mean(1)


def dark_mass_ratio(mass: Tensor, intensity: Tensor, fraction: float = 0.1) -> Tensor:
    """Share of the mass (B, H, W) in the darkest ``fraction`` of pixels by ``intensity``
    (B, H, W), divided by the share of pixels taken: 1 = no bias, 0 = dark pixels ignored.
    (B,); NaN for a map without mass."""
    flat_mass, flat_intensity = mass.flatten(1).double(), intensity.flatten(1)
    count = max(1, math.ceil(fraction * flat_mass.shape[1]))
    darkest = flat_intensity.argsort(dim=1, stable=True)[:, :count]
    share = flat_mass.gather(1, darkest).sum(1) / flat_mass.sum(1)
    return share / (count / flat_mass.shape[1])


def mass_in_object(mass: Tensor, masks: Tensor) -> Tensor:
    """Share of the mass (B, H, W) inside the object masks (B, H, W) bool -> (B,)."""
    flat_mass = mass.flatten(1).double()
    return (flat_mass * masks.flatten(1)).sum(1) / flat_mass.sum(1)


def object_polarity(intensity: Tensor, masks: Tensor | None) -> tuple[list[str], list[float]]:
    """Per image: ``dark`` when the object is darker than its background, else ``bright``
    (empty strings without masks), and the object's share of the pixels (NaN without)."""
    if masks is None:
        return [""] * len(intensity), [math.nan] * len(intensity)
    flat, inside = intensity.flatten(1), masks.flatten(1).double()
    object_mean = (flat * inside).sum(1) / inside.sum(1).clamp(min=1)
    background = (flat * (1 - inside)).sum(1) / (1 - inside).sum(1).clamp(min=1)
    polarity = ["dark" if o < b else "bright" for o, b in zip(object_mean, background)]
    return polarity, inside.mean(1).tolist()
