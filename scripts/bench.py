"""Benchmarks (``make bench``): how close the harness sits to its floor, and the metrics'
speed against scikit-image/scipy on identical maps. Prints a table; writes nothing.

(a) cascading check on efficientnet_lite0, 8 foolbox photos, method ``gradient``, metrics
    ssim + spearman + spearman_abs + hog: time per stage versus the floor, one batched
    forward+backward of the same inputs.
(b) the four metrics on 64 pairs of 224x224 maps: batched torch versus a loop of
    skimage.metrics.structural_similarity / scipy.stats.spearmanr / skimage.feature.hog.
"""
from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checks import CHECKS  # noqa: E402
from harness.context import CheckContext, MetricSpec  # noqa: E402
from harness.data import DATASETS  # noqa: E402
from harness.meta import model_meta  # noqa: E402
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


def bench_cascading(n: int = 8) -> None:
    model = MODELS["efficientnet_lite0"]()
    data = DATASETS["imagenet_samples"](n=n, data_config=model_meta(model).data_config)
    target = torch.zeros(n, dtype=torch.long)
    floor = timed(lambda: METHODS["gradient"](model, data.inputs, target, internal_batch_size=64))
    ctx = CheckContext(model=model, data=data, methods={"gradient": METHODS["gradient"]},
                       metrics=[MetricSpec(k, METRICS[k], v) for k, v in FOUR.items()],
                       batch_size=n, progress=False)
    explains = len(model_meta(model).blocks) + 2  # reference, stage 0, one per block

    def check():
        for _ in CHECKS["cascading"](ctx):
            pass

    per_stage = timed(check, repeat=1) / explains
    print(f"(a) cascading, efficientnet_lite0, {n} photos, gradient, 4 metrics")
    print(f"    floor (one batched forward+backward): {floor * 1e3:8.1f} ms")
    print(f"    time per stage:                       {per_stage * 1e3:8.1f} ms")
    print(f"    ratio to the floor:                   {per_stage / floor:8.2f} x  (target <= 1.2)")


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
    g = torch.Generator().manual_seed(0)
    raw_a = torch.randn(pairs, 3, size, size, generator=g)
    raw_b = raw_a + 0.5 * torch.randn(pairs, 3, size, size, generator=g)
    maps = {norm: (NORMALIZATIONS[norm](raw_a), NORMALIZATIONS[norm](raw_b))
            for norm in ("absolute", "signed")}

    def harness():
        return [METRICS[k](*maps[v]) for k, v in FOUR.items()]

    ours = timed(harness, repeat=3)
    np_maps = {k: (a.double().numpy(), b.double().numpy()) for k, (a, b) in maps.items()}
    tic = time.perf_counter()
    ref = np.array(reference_metrics(*np_maps["absolute"], *np_maps["signed"]))
    theirs = time.perf_counter() - tic
    values = torch.stack(harness(), 1).double().numpy()
    print(f"(b) four metrics on {pairs} pairs of {size}x{size} maps")
    print(f"    harness (batched torch):   {ours * 1e3:8.1f} ms")
    print(f"    skimage/scipy loop:        {theirs * 1e3:8.1f} ms")
    print(f"    speed-up:                  {theirs / ours:8.1f} x  (target >= 10)")
    print(f"    largest difference:        {np.abs(values - ref).max():.2e}")


def main() -> None:
    torch.set_grad_enabled(True)
    bench_cascading()
    bench_metrics()


if __name__ == "__main__":
    main()
