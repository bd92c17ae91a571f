"""Benchmarks (``make bench``): how close the harness sits to its floor, and the metrics'
speed against scikit-image/scipy on identical maps. Prints a table; writes nothing.

(a) cascading check on efficientnet_lite0, 8 foolbox photos, method ``gradient``, metrics
    ssim + spearman + spearman_abs + hog: time per stage versus the floor, one batched eager
    contiguous fp32 forward+backward of the same inputs, for each memory format x precision
    (the one-time setup, predictions and reference maps, is printed apart); peak memory.
(b) the four metrics on 64 pairs of 224x224 maps: batched torch versus a loop of
    skimage.metrics.structural_similarity / scipy.stats.spearmanr / skimage.feature.hog.
(c) ``--methods``: every registered method on efficientnet_lite0 and foolbox photos, at its
    defaults (the papers' settings) with internal_batch_size 16: seconds per map and rows per
    map through the model's first conv, forward and backward (a forward+backward of one image
    is 1 + 1); then CGI over all 1000 classes (batched vector-Jacobian products) versus a loop
    of one backward per class on the same photo, same run, same result.
(d) deletion/insertion through the harness versus Quantus's PixelFlipping on equal work, per
    image and per curve, each beside its floor (the same images' forward passes alone).
(e) smooth MPRT through the harness versus Quantus's SmoothMPRT on equal work: timm ResNet-18,
    the same photos, N noisy copies, every parametrized module a stage (bottom-up), the gradient
    and rank correlation of absolute maps.
(f) the Adebayo protocol through the harness versus Quantus's MPRT on equal work: ResNet-18,
    41 module stages, 4 photos, 2 methods x 3 metrics, medians of alternating rounds.

Usage: ``python scripts/bench.py`` runs (a), (b), (d), (e) and (f); ``--methods [NAME ...]``
runs (c), for the named methods only if given; ``--cascading``, ``--deletion``, ``--smooth``
(``--smooth-n`` copies, ``--n`` photos) and ``--mprt`` run (a), (d), (e), (f) alone
(``--repeat`` rounds); ``--compare RUN_A RUN_B`` compares two runs' summaries and conclusions.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from harness.allocator import tune_allocator  # noqa: E402

tune_allocator()  # before torch allocates (harness/allocator.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from checks import CHECKS  # noqa: E402
from harness.base.context import CheckContext, MetricSpec  # noqa: E402
from harness.base.meta import model_meta  # noqa: E402
from harness.base.randomize import stages  # noqa: E402
from harness.data import DATASETS  # noqa: E402
from harness.execution import peak_rss_bytes  # noqa: E402
from harness.zoo import MODELS  # noqa: E402
from methods import METHODS  # noqa: E402
from metrics import METRICS, NORMALIZATIONS  # noqa: E402

FOUR = {"ssim": "absolute", "spearman": "signed", "spearman_abs": "absolute", "hog": "absolute"}


def timed(fn, repeat: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def wall_time(fn) -> float:
    """Wall time of one ``fn()``, no warm-up."""
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


SETTINGS = [(f, p) for p in ("fp32", "bf16") for f in ("contiguous", "channels_last")]


def bench_cascading(n: int = 8, repeat: int = 3) -> None:
    """Per-stage time of the check (randomize a block, explain, normalize, score) over the floor,
    for each memory format and precision (harness/execution.py).

    A check is a setup (the original model's predictions and reference maps, once) followed by
    ``blocks + 1`` stages (stage 0 re-computes the reference, then one stage per randomized
    block). The setup ends when the check yields its first item (the reference maps); the
    stages are timed from there to the end and divided by ``blocks + 1``. The floor is the
    eager contiguous fp32 forward+backward of the same inputs, measured the same way, as
    ``blocks + 1`` passes in a row (a single pass varies by +-20 % on this VM). The floor and
    the four settings alternate ``repeat`` times; each setting's ratio is the median of its
    ratios to the floor of the same round, which shares the machine's state of the moment.
    The check runs with its methods bound as the runner binds them (``BoundMethod``: the
    precision's autocast, maps back as contiguous float32) on the model and inputs converted
    once to the setting's format, with its default ``reuse_prefix=true`` (methods/prefix.py),
    and for both fp32 formats once more without it. Each setting's summary (mean per metric
    and stage over the photos) is compared with contiguous fp32 without reuse.
    """
    from harness.execution import to_format
    from harness.run import BoundMethod

    model = MODELS["efficientnet_lite0"]()
    data = DATASETS["imagenet_samples"](n=n, data_config=model_meta(model).data_config)
    target = torch.zeros(n, dtype=torch.long)
    stages = len(model_meta(model).blocks) + 1  # stage 0, one per block
    models = {"contiguous": model, "channels_last": to_format(
        MODELS["efficientnet_lite0"](), data.inputs, "channels_last")[0]}

    def floor_passes() -> float:
        tic = time.perf_counter()
        for _ in range(stages):
            METHODS["gradient"](model, data.inputs, target, internal_batch_size=n)
        return (time.perf_counter() - tic) / stages

    means: dict[tuple, dict] = {}  # setting -> (metric, stage) -> mean over the photos

    def check(memory_format: str, precision: str, reuse: bool = True) -> tuple[float, float]:
        method = BoundMethod("gradient", METHODS["gradient"], {"internal_batch_size": n},
                             precision)
        inputs = to_format(models[memory_format], data.inputs, memory_format)[1]
        ctx = CheckContext(model=models[memory_format], data=replace(data, inputs=inputs),
                           methods={"gradient": method},
                           metrics=[MetricSpec(k, METRICS[k], v) for k, v in FOUR.items()],
                           batch_size=n, progress=False)
        rows = []
        tic = time.perf_counter()
        items = CHECKS["cascading"](ctx, reuse_prefix=reuse)
        next(items)  # the first reference map: the setup is done
        setup_end = time.perf_counter()
        for item in items:
            if isinstance(item, dict):
                rows.append(item)
        seconds = (time.perf_counter() - setup_end) / stages
        sums: dict = {}
        for row in rows:
            total, count = sums.get((row["metric"], row["stage_index"]), (0.0, 0))
            sums[(row["metric"], row["stage_index"])] = (total + row["value"], count + 1)
        means[(memory_format, precision, reuse)] = {k: t / c for k, (t, c) in sums.items()}
        return setup_end - tic, seconds

    settings = [(*setting, True) for setting in SETTINGS] + [("contiguous", "fp32", False),
                                                             ("channels_last", "fp32", False)]
    for setting in settings:
        check(*setting)  # warm-up
    floors, per_stage = [], {setting: [] for setting in settings}
    for _ in range(repeat):
        floors.append(floor_passes())
        for setting in settings:
            per_stage[setting].append(check(*setting)[1])
    print(f"(a) cascading, efficientnet_lite0, {n} photos, gradient, 4 metrics, "
          f"{stages} stages per check, medians of {repeat} alternating rounds, load average "
          f"{load_average()}")
    print(f"    floor (eager contiguous fp32 forward+backward): "
          f"{statistics.median(floors) * 1e3:8.1f} ms")
    reference = means[("contiguous", "fp32", False)]
    for setting, times in per_stage.items():
        ratios = [t / f for f, t in zip(floors, times)]
        moved = max(abs(v - reference[k]) for k, v in means[setting].items()
                    if v == v and reference[k] == reference[k])
        label = f"{setting[0]} {setting[1]}" + ("" if setting[2] else ", reuse_prefix=false")
        print(f"    {label:>38}: {statistics.median(times) * 1e3:6.1f} ms per stage, "
              f"{statistics.median(ratios):4.2f} x the floor (rounds "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); summary values within {moved:.4f} "
              "of contiguous fp32 without reuse")
    print(f"    peak resident memory of the process: {peak_rss_bytes() / 2**20:.0f} MB")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    import os

    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def reference_metrics(a: np.ndarray, b: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> list:
    from scipy.stats import spearmanr
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    def hog_sim(x, y):
        hx, hy = (hog(z, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(3, 3),
                      block_norm="L2-Hys") for z in (x, y))
        return np.corrcoef(hx, hy)[0, 1]

    out = []
    for i in range(len(a)):
        out.append((structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0),
                    spearmanr(sa[i].ravel(), sb[i].ravel()).statistic,
                    spearmanr(a[i].ravel(), b[i].ravel()).statistic, hog_sim(a[i], b[i])))
    return out


def bench_metrics(pairs: int = 64, size: int = 224) -> None:
    from metrics.similarity import clear_cache

    g = torch.Generator().manual_seed(0)
    raw_a = torch.randn(pairs, 3, size, size, generator=g)
    raw_b = raw_a + 0.5 * torch.randn(pairs, 3, size, size, generator=g)
    maps = {norm: (NORMALIZATIONS[norm](raw_a), NORMALIZATIONS[norm](raw_b))
            for norm in ("absolute", "signed")}

    def metric(name: str):
        return METRICS[name](*maps[FOUR[name]])

    def alone(name: str):
        clear_cache()
        return metric(name)

    def harness(cached: bool = False):
        if not cached:
            clear_cache()  # distinct pairs: nothing memoized from a previous run
        return [metric(name) for name in FOUR]

    ours = timed(harness, repeat=3)
    tic = time.process_time()
    harness()
    ours_cpu = time.process_time() - tic
    per_metric = {name: timed(partial(alone, name), repeat=3) for name in FOUR}
    harness(cached=True)
    cached = timed(partial(harness, cached=True), repeat=3)
    np_maps = {k: (a.double().numpy(), b.double().numpy()) for k, (a, b) in maps.items()}
    tic = time.perf_counter()
    ref = np.array(reference_metrics(*np_maps["absolute"], *np_maps["signed"]))
    theirs = time.perf_counter() - tic
    values = torch.stack(harness(), 1).double().numpy()
    print(f"(b) four metrics on {pairs} pairs of {size}x{size} maps, "
          f"{torch.get_num_threads()} torch threads")
    print(f"    harness (batched):         {ours * 1e3:8.1f} ms  (cpu {ours_cpu * 1e3:.1f} ms)")
    print("    per pair:                  " + "  ".join(
        f"{name} {t * 1e3 / pairs:.2f}" for name, t in per_metric.items()) + " ms")
    print(f"    reference maps memoized:   {cached * 1e3:8.1f} ms  (as in the checks, where "
          f"b is the same at every stage)")
    print(f"    skimage/scipy loop:        {theirs * 1e3:8.1f} ms")
    print(f"    speed-up:                  {theirs / ours:8.1f} x  (target >= 10)")
    print(f"    largest difference:        {np.abs(values - ref).max():.2e}")


def first_conv_weight(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Shape of the weight of the first conv a forward pass runs (the stem)."""
    from harness.base.randomize import execution_order

    for name in execution_order(model, x[:1]):
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Conv2d):
            return list(module.weight.shape)
    raise ValueError("the model has no conv layer")


def rows_through_stem(fn, weight_shape: list[int]) -> tuple[float, int, int]:
    """Wall time of ``fn()`` and the rows (images) it runs through the stem conv, forward and
    backward: a TorchDispatchMode sees every aten convolution below torch.func.vmap (batches
    folded into rows), captum and zennit (including the forwards its rules recompute). The time
    includes the mode's Python call per aten op (about 1 ms per backward of one image)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    weight_index = {aten.convolution.default: 1, aten.convolution_backward.default: 2}
    rows = {aten.convolution.default: 0, aten.convolution_backward.default: 0}

    class StemRows(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in rows and list(args[weight_index[func]].shape) == weight_shape:
                rows[func] += args[0].shape[0]
            return func(*args, **(kwargs or {}))

    with StemRows():
        tic = time.perf_counter()
        fn()
        seconds = time.perf_counter() - tic
    return seconds, rows[aten.convolution.default], rows[aten.convolution_backward.default]


def bench_methods(names: list[str] | None = None, n: int = 1,
                  internal_batch_size: int = 16) -> None:
    from checks.scoring import predict

    names = [name for name in (names or sorted(METHODS)) if METHODS[name]]  # unknown: fail now
    torch.set_flush_denormal(True)  # as the runner does by default
    model = MODELS["efficientnet_lite0"]()
    data = DATASETS["imagenet_samples"](n=n, data_config=model_meta(model).data_config)
    x = data.inputs
    target = predict(model, x, n)
    stem = first_conv_weight(model, x)
    METHODS["gradient"](model, x, target)  # warm-up
    print(f"(c) every method on efficientnet_lite0, {n} photo(s), defaults, "
          f"internal_batch_size={internal_batch_size}")
    print(f"    {'method':<22}{'s/map':>10}{'fwd rows/map':>14}{'bwd rows/map':>14}")
    for name in names:
        method = partial(METHODS[name], internal_batch_size=internal_batch_size, seed=0)
        seconds, forward, backward = rows_through_stem(lambda: method(model, x, target), stem)
        print(f"    {name:<22}{seconds / n:>10.2f}{forward / n:>14.1f}{backward / n:>14.1f}",
              flush=True)
    if "cgi" in names:
        bench_cgi_batching(model, x[:1], target[:1], internal_batch_size)


def looped_cgi(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CGI with one forward and a loop of one backward per class (the baseline of (c))."""
    leaf = x.detach().clone().requires_grad_(True)
    logits = model(leaf)
    value = best = worst = None
    for c in [int(target[0]), *[c for c in range(logits.shape[1]) if c != int(target[0])]]:
        (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)
        contribution = grad * x
        if value is None:
            value, best, worst = contribution, contribution, contribution
        best, worst = torch.maximum(best, contribution), torch.minimum(worst, contribution)
    wins = ((value > 0) & (value >= best)) | ((value < 0) & (value <= worst))
    return torch.where(wins, value, torch.zeros_like(value))


def bench_cgi_batching(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                       internal_batch_size: int) -> None:
    """CGI over all classes of one photo: batched VJPs (``METHODS["cgi"]``) vs the loop of one
    backward per class, on the model as given and on the same BatchNorm-folded model that
    ``cgi`` uses (that ratio is the batching alone)."""
    from methods.fold import gradient_model

    timings, maps = {}, {}
    runs = {"batched": lambda: METHODS["cgi"](model, x, target, classes="all",
                                              internal_batch_size=internal_batch_size),
            "loop": lambda: looped_cgi(model, x, target),
            "loop_folded": lambda: looped_cgi(gradient_model(model), x, target)}
    for name, run in runs.items():
        tic = time.perf_counter()
        maps[name] = run()
        timings[name] = time.perf_counter() - tic
    batched, looped = maps["batched"], maps["loop"]
    agree = ((batched != 0) == (looped != 0)).float().mean().item()
    scale = looped.abs().max()
    print(f"    CGI, all {model_meta(model).num_classes or 'the'} classes, one photo")
    print(f"    batched VJPs, BatchNorm folded (internal_batch_size={internal_batch_size}): "
          f"{timings['batched']:6.1f} s")
    print(f"    loop of one backward per class, model as given:         "
          f"{timings['loop']:6.1f} s   ratio {timings['loop'] / timings['batched']:.2f}x")
    print(f"    loop of one backward per class, BatchNorm folded:       "
          f"{timings['loop_folded']:6.1f} s   ratio "
          f"{timings['loop_folded'] / timings['batched']:.2f}x (batching alone)")
    print(f"    same winners: {agree:.5f} of the features; largest difference "
          f"{((batched - looped).abs().max() / scale).item():.1e} of the largest value")


def bench_deletion(n: int = 2, steps: int = 21, repeat: int = 3) -> None:
    """(d) deletion/insertion through the harness against Quantus's PixelFlipping on equal
    work: the same model, photos, gradient maps and number of steps, pixel-level ranking
    (resolution 224). Quantus 0.6 flips array elements, not pixels: its curve has
    3 * 224 * 224 / features_in_step points (the map (N, 1, H, W) is spread over the 3
    channels), and features_in_step must divide 224 * 224; 21 steps of 7168 elements meet both
    (with 1024, as 224 * 224 = 49 * 1024 suggests, Quantus runs 147 steps, not 49). The harness
    computes both curves (n predictions + 2n ends + 2n(steps - 1) inner images, as
    tests/test_faithfulness.py counts); Quantus only deletion (its images are counted by a hook
    on the model during the warm-up run), so the ratios are given per image and per curve.

    Both sides are bound by the forward passes, so each gets a floor: the same number of
    images through the network as that side runs it (the harness: the BatchNorm-folded
    channels-last copy, internal_batch_size 16, inference mode; Quantus: the model as given,
    n images per step, no_grad). The ratio of the two floors is the speed-up without either
    side's overhead. Quantus's time per image over the harness's floor per image is
    the ceiling of the speed-up: no harness that runs the same forward passes at the folded
    model's cost can beat it.
    """
    import quantus

    from checks.faithfulness import scoring_model

    model = MODELS["efficientnet_lite0"]()
    data = DATASETS["imagenet_samples"](n=n, data_config=model_meta(model).data_config)
    x = data.inputs
    target = model(x).argmax(1)
    maps = METHODS["gradient"](model, x, target).abs().sum(1, keepdim=True).detach()
    ctx = CheckContext(model=model, data=data, methods={"gradient": lambda m, x, t: maps},
                       metrics=[], progress=False, internal_batch_size=16)

    def harness() -> None:
        for _ in CHECKS["deletion_insertion"](ctx, baseline="zero", resolution=224,
                                              steps=steps):
            pass

    def reference() -> None:
        metric = quantus.PixelFlipping(features_in_step=3 * 224 * 224 // steps,
                                       perturb_baseline="black", disable_warnings=True,
                                       display_progressbar=False)
        metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=maps.numpy(),
               device="cpu")

    ours_images = n + 2 * n + 2 * n * (steps - 1)
    counted = []
    hook = model.register_forward_pre_hook(lambda _, args: counted.append(len(args[0])))
    reference()  # warm-up, counting Quantus's images
    hook.remove()
    theirs_images = sum(counted)
    harness()  # warm-up
    folded = scoring_model(model)
    ours_floor_fn = partial(forward_floor, folded, x, ours_images, ctx.internal_batch_size,
                            channels_last=True)
    theirs_floor_fn = partial(forward_floor, model, x, theirs_images, n, channels_last=False)
    # the four alternate, ``repeat`` times: the machine's speed drifts (shared cores); medians
    ours_floor_fn()  # warm-up (the other three ran above)
    runs = [[wall_time(fn) for fn in (harness, ours_floor_fn, reference, theirs_floor_fn)]
            for _ in range(repeat)]
    ours, ours_floor, theirs, theirs_floor = (statistics.median(r) for r in zip(*runs))
    per = {"ours": ours / ours_images, "theirs": theirs / theirs_images,
           "ours_floor": ours_floor / ours_images, "theirs_floor": theirs_floor / theirs_images}
    print(f"(d) deletion+insertion, {n} photos, gradient, {steps} steps, pixel ranking, "
          f"{torch.get_num_threads()} torch threads, medians of {repeat}")
    print(f"    harness, both curves:        {ours:7.1f} s  {ours_images:4d} images  "
          f"{per['ours'] * 1e3:6.1f} ms/image  {ours / (2 * n):6.2f} s/curve")
    print(f"      its floor (same images, folded, channels-last, batch 16): {ours_floor:6.1f} s "
          f"({per['ours_floor'] * 1e3:.1f} ms/image; harness / floor {ours / ours_floor:.2f}x)")
    print(f"    Quantus PixelFlipping, deletion: {theirs:7.1f} s  {theirs_images:4d} images  "
          f"{per['theirs'] * 1e3:6.1f} ms/image  {theirs / n:6.2f} s/curve")
    print(f"      its floor (same images, model as given, batch {n}): {theirs_floor:6.1f} s "
          f"({per['theirs_floor'] * 1e3:.1f} ms/image; Quantus / floor "
          f"{theirs / theirs_floor:.2f}x)")
    print(f"    speed-up per image {per['theirs'] / per['ours']:.2f}x, per curve "
          f"{theirs / n / (ours / (2 * n)):.2f}x, per call {theirs / ours:.2f}x "
          f"(target >= 10)")
    print(f"    ceiling, Quantus per image / the harness's floor per image: "
          f"{per['theirs'] / per['ours_floor']:.2f}x (the forward passes alone, at the folded "
          f"model's cost); floors alone {per['theirs_floor'] / per['ours_floor']:.2f}x")


def bench_smooth_mprt(n: int = 2, copies: int = 10) -> None:
    """(e) smooth MPRT (Hedström et al. 2024, arXiv 2401.06465) through the harness against
    Quantus 0.6's SmoothMPRT on equal work: the same model and photos, ``copies`` noisy copies
    per map (one clean), the bottom-up cascade over every module Quantus resets (the harness's
    ``granularity=module``: every parametrized leaf module; both counts are printed), the
    plain gradient (Quantus: captum's Saliency through ``quantus.explain``; the harness:
    ``gradient``, one forward+backward per row on both sides) and the Spearman correlation of
    absolute maps. Quantus gets the original maps as ``a_batch`` (so it explains the original
    model once, the harness twice: the reference and stage 0's determinism check). Quantus
    explains one noisy copy of the n photos per call; the harness stacks the n * copies rows
    and runs them in chunks of internal_batch_size 16, through :func:`harness.evaluate` with
    the run's defaults (``memory_format=auto``, measured on ResNet-18). One timed run each."""
    import quantus

    import harness as harness_api
    from checks.smoothing import Smoothing, SmoothedMethod

    # timm's ResNet-18 (seeded random weights, 41 modules with reset_parameters), as in the
    # Adebayo protocol's comparison: on efficientnet_lite0 Quantus stops with "all zero
    # attributions" once the bottom-up cascade has made the gradient vanish (the harness gives
    # those maps NaN with the reason "constant map")
    model = MODELS["timm"](name="resnet18").eval()
    data = DATASETS["imagenet_samples"](n=n, data_config=model_meta(model).data_config)
    x = data.inputs
    target = model(x).argmax(1)
    gradient = partial(METHODS["gradient"], internal_batch_size=16)
    ours_stages = len(stages(model, x, "module"))
    theirs_stages = sum(hasattr(m, "reset_parameters") for m in model.modules())

    def harness() -> None:
        harness_api.evaluate(model, x, targets=target, methods=["gradient"],
                             metrics=["spearman_abs"], check="smooth_mprt",
                             check_granularity="module",
                             check_smooth={"n": copies, "noise_magnitude": 0.1}, n_maps=0,
                             progress=False, internal_batch_size=16, batch_size=n)

    a_batch = SmoothedMethod(gradient, Smoothing(copies, 0.1), 0)(model, x, target)

    def reference() -> None:
        metric = quantus.SmoothMPRT(nr_samples=copies, noise_magnitude=0.1,
                                    layer_order="bottom_up", disable_warnings=True,
                                    display_progressbar=False)
        metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(),
               a_batch=a_batch.abs().sum(1, keepdim=True).detach().numpy(), device="cpu",
               explain_func=quantus.explain, explain_func_kwargs={"method": "Saliency"},
               batch_size=n)

    ours, theirs = wall_time(harness), wall_time(reference)
    rows = n * copies * (ours_stages + 2)
    print(f"(e) smooth MPRT, {n} photos x {copies} copies, gradient, spearman_abs, "
          f"{torch.get_num_threads()} torch threads, one run each")
    print(f"    harness: {ours:7.1f} s  {ours_stages} stages + 2 original passes, {rows} rows "
          f"({ours / rows * 1e3:.1f} ms/row)")
    print(f"    Quantus SmoothMPRT: {theirs:7.1f} s  {theirs_stages} stages + 1 original pass")
    print(f"    speed-up {theirs / ours:.2f}x per call, "
          f"{theirs / (theirs_stages + 1) / (ours / (ours_stages + 2)):.2f}x per stage "
          f"(target >= 5)")


MPRT_METHODS = {"gradient": ("Saliency", {}),  # harness name -> Quantus/captum name, hparams
                "integrated_gradients": ("IntegratedGradients", {"steps": 10})}
MPRT_METRICS = {"ssim": "ssim", "spearman_abs": "correlation_spearman",
                "pearson": "correlation_pearson"}


def bench_mprt(n: int = 4, repeat: int = 3) -> None:
    """(f) The Adebayo protocol against Quantus's MPRT on equal work: ResNet-18 (timm, random
    weights: speed does not depend on them), cascading top-down over its 41 parametrized
    modules (``granularity=module``; Quantus's ``random_layer_generator_length`` is 41 too),
    ``n`` photos, 2 methods x 3 metrics. Quantus computes one (method, metric) per call and
    runs every explanation again for each metric (6 calls); its IG is captum's with 10 steps
    (hard-coded in quantus.explain), so the harness's runs 10 steps as well. The harness runs
    through :func:`harness.evaluate` with the run's defaults (``memory_format=auto``: measured
    on ResNet-18, which declares no choice) and once with ``memory_format=contiguous``; the
    three alternate ``repeat`` times, medians."""
    import quantus

    import harness

    model = MODELS["timm"](name="resnet18")
    data = DATASETS["imagenet_samples"](n=n, data_config=model_meta(model).data_config)
    x = data.inputs
    target = model(x).argmax(1).detach()

    def ours(memory_format: str):
        def run() -> None:
            harness.evaluate(MODELS["timm"](name="resnet18"), x, targets=target,
                             methods=list(MPRT_METHODS), metrics=list(MPRT_METRICS),
                             check="cascading", check_granularity="module", n_maps=0,
                             progress=False, memory_format=memory_format,
                             method={name: hp for name, (_, hp) in MPRT_METHODS.items() if hp})
        return run

    def batched(name: str):
        """Quantus's similarity function as MPRT calls it (a, b, batched=True), its result as
        an array: Quantus 0.6's ssim returns a list there, on which MPRT's ``.tolist()``
        fails."""
        fn = getattr(quantus.similarity_func, name)
        return lambda a, b, **kwargs: np.asarray(fn(a, b, **kwargs))

    def theirs() -> None:
        for method, _ in MPRT_METHODS.values():
            for name in MPRT_METRICS.values():
                metric = quantus.MPRT(similarity_func=batched(name),
                                      layer_order="top_down", disable_warnings=True,
                                      display_progressbar=False)
                metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=None,
                       explain_func=quantus.explain, explain_func_kwargs={"method": method},
                       batch_size=n, device="cpu")

    runs = {"harness (defaults)": ours("auto"), "harness, contiguous": ours("contiguous"),
            "Quantus MPRT": theirs}
    ours("auto")()  # warm-up
    times = {name: [] for name in runs}
    for round_ in range(repeat):
        for name, run in runs.items():
            times[name].append(wall_time(run))
            print(f"    round {round_ + 1}: {name} {times[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"(f) Adebayo protocol (cascading, 41 module stages of ResNet-18), {n} photos, "
          f"2 methods x 3 metrics, medians of {repeat} alternating runs, load average "
          f"{load_average()}")
    for name, seconds in medians.items():
        print(f"    {name:<22} {seconds:7.1f} s  (runs {', '.join(f'{t:.1f}' for t in times[name])})")
    for name in ("harness (defaults)", "harness, contiguous"):
        ratios = [q / h for h, q in zip(times[name], times["Quantus MPRT"])]
        print(f"    Quantus / {name}: {statistics.median(ratios):5.2f} x (target >= 6; rounds "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")


def ranking(table) -> list[str]:
    """Methods by mean similarity, highest first; ties (every deterministic method scores 1 at
    stage 0) by name, so only a real reordering counts; the control (fresh noise) left out."""
    means = table["mean"].droplevel([0, 1])
    means = means[means.index != "random_uniform"]
    return sorted(means.index, key=lambda m: (-round(float(means[m]), 9), m))


def compare_runs(a: Path, b: Path, tolerance: float = 0.01, control: str = "random_uniform"
                 ) -> None:
    """``--compare RUN_A RUN_B``: how far run B's summary (mean per method, metric and stage)
    is from run A's, and whether a conclusion changes: the ranking of methods by mean
    similarity at each stage (per metric), or whether a method is distinguishable from the
    ``control`` at a stage (the summary's paired test, :mod:`checks.uncertainty`)."""
    import harness
    from checks.uncertainty import summary_table

    keys = ["metric", "stage_index", "method"]
    summaries = []
    for run in (a, b):
        rows = harness.read_rows(run)
        rows = rows[rows["sample"] >= 0]
        summaries.append(summary_table(rows.drop(columns=["check"]), int(rows["seed"].iloc[0]))
                         .set_index(keys))
    ta, tb = summaries
    change = (tb["mean"] - ta["mean"]).abs()
    methods = change.index.get_level_values("method") != control
    print(f"summary of {b} against {a}: {len(change)} values (mean per method, metric, stage)")
    for label, part in (("all methods", change), (f"without {control} (fresh noise per call)",
                                                  change[methods])):
        worst = part.idxmax()
        where = ", ".join(f"{k} {v}" for k, v in zip(keys, worst))
        print(f"    {label}: largest change {part.max():.4f} ({where}); "
              f"{int((part > tolerance).sum())} of {len(part)} move by more than {tolerance}")
    flips = []
    for (metric, stage), part in ta.groupby(level=[0, 1]):
        if ranking(part) != ranking(tb.xs((metric, stage), level=[0, 1], drop_level=False)):
            flips.append(f"{metric} stage {stage}")
    flags = {name: table["distinguishable"].dropna() for name, table in (("a", ta), ("b", tb))}
    both = flags["a"].index.intersection(flags["b"].index)
    changed = [key for key in both if flags["a"][key] != flags["b"][key]]
    print(f"    rankings of the methods (without {control}) that change: {len(flips)} of "
          f"{ta.groupby(level=[0, 1]).ngroups} (metric, stage) pairs"
          + (f": {', '.join(flips[:8])}" if flips else ""))
    print(f"    distinguishable-from-{control} flags that change: {len(changed)}"
          + (f": {changed[:8]}" if changed else ""))


@torch.inference_mode()
def forward_floor(model: torch.nn.Module, x: torch.Tensor, images: int, batch: int,
                  channels_last: bool) -> None:
    """``images`` copies of the inputs x (N, C, H, W) through ``model``, ``batch`` at a time,
    built beforehand: the forward passes alone."""
    copies = x.repeat(-(-images // len(x)), 1, 1, 1)[:images]
    if channels_last:
        copies = copies.contiguous(memory_format=torch.channels_last)
    for chunk in copies.split(batch):
        model(chunk)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Benchmarks of the harness (prints tables).")
    parser.add_argument("--methods", nargs="*", metavar="NAME",
                        help="(c) the per-method table (all registered methods if no name)")
    parser.add_argument("--n", type=int, default=1, help="photos per method in (c)")
    parser.add_argument("--deletion", action="store_true", help="(d) only")
    parser.add_argument("--smooth", action="store_true", help="(e) only")
    parser.add_argument("--smooth-n", type=int, default=10, help="noisy copies per map in (e)")
    parser.add_argument("--cascading", action="store_true", help="(a) only")
    parser.add_argument("--mprt", action="store_true", help="(f) only")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds of (a), (e)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                        help="summary change and conclusions between two runs' tables")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    torch.set_flush_denormal(True)  # as the runner does by default (randomized weights)
    if args.compare:
        compare_runs(*args.compare)
        return
    if args.methods is not None:
        bench_methods(args.methods or None, n=args.n)
        return
    if args.deletion or args.cascading or args.mprt:
        args.deletion and bench_deletion()
        args.cascading and bench_cascading(repeat=args.repeat)
        args.mprt and bench_mprt(repeat=args.repeat)
        return
    if args.smooth:
        bench_smooth_mprt(n=max(args.n, 2), copies=args.smooth_n)
        return
    bench_cascading(repeat=args.repeat)
    bench_metrics()
    bench_deletion()
    bench_smooth_mprt(copies=args.smooth_n)
    bench_mprt(repeat=args.repeat)
    print(f"peak resident memory of the bench: {peak_rss_bytes() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
