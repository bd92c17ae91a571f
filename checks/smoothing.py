"""The smoothing option of the randomization checks (Hedström et al. 2024, "A Fresh Look at
Sanity Checks for Saliency Maps", arXiv 2401.06465, sMPRT): every explanation, of the original
and of each randomized model, is the mean over N copies of the input, one of them clean and
N - 1 noisy,

    e(x) = 1/N sum_n E(f, x + eps_n),  eps_0 = 0,  eps_n ~ N(0, sigma^2),
    sigma = noise_magnitude * (max x - min x) per sample,

which averages out the high-frequency noise of gradient-like maps before they are compared.

The noise of an input is drawn from a private generator seeded by the run's seed and a digest of
the input's values: the same for the original model and every stage (so stage 0 still scores 1
for deterministic methods), for every method, and whatever the batch or shard the input is in.
The N copies of a batch go to the method in ONE call of B * N rows, which the method splits
into chunks of ``internal_batch_size`` rows like its own noise samples or path steps.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.base.context import Method
from methods.common import noise_sigma, shared


@dataclass(frozen=True)
class Smoothing:
    """``n`` copies per input (0 or 1: no smoothing), noise std ``noise_magnitude`` * range."""

    n: int = 0
    noise_magnitude: float = 0.1

    @classmethod
    def of(cls, settings: Mapping | None) -> Smoothing:
        """From the check's ``smooth`` setting, e.g. ``{n: 50, noise_magnitude: 0.1}``; one-line
        errors for unknown keys and values out of range."""
        settings = dict(settings or {})
        unknown = sorted(set(settings) - {"n", "noise_magnitude"})
        if unknown:
            raise ValueError(f"check.smooth: unknown key {', '.join(unknown)}; valid keys: n, "
                             "noise_magnitude")
        smoothing = cls(**settings)
        if isinstance(smoothing.n, bool) or not isinstance(smoothing.n, int) or smoothing.n < 0:
            raise ValueError(f"check.smooth.n must be a whole number >= 0, got {smoothing.n!r}")
        if not smoothing.noise_magnitude >= 0:
            raise ValueError("check.smooth.noise_magnitude must be >= 0, got "
                             f"{smoothing.noise_magnitude!r}")
        return smoothing

    @property
    def on(self) -> bool:
        return self.n > 1

    def columns(self) -> dict:
        """The row columns that record it (``smooth_n`` 0: not smoothed)."""
        return {"smooth_n": self.n if self.on else 0,
                "smooth_noise": float(self.noise_magnitude) if self.on else 0.0}


COLUMNS = {"smooth_n": 0, "smooth_noise": 0.0}


def input_seed(seed: int, x: Tensor) -> int:
    """A 63-bit seed from the run's seed and the values of one input ``x`` (C, H, W)."""
    digest = hashlib.sha256(str(seed).encode())
    digest.update(x.detach().to("cpu").contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def noisy_copies(x: Tensor, smoothing: Smoothing, seed: int) -> Tensor:
    """x (B, C, H, W) -> (B * N, C, H, W), sample-major: for each input first the clean copy,
    then N - 1 copies with N(0, sigma_i^2) noise from the input's own generator."""
    sigma = noise_sigma(x, smoothing.noise_magnitude)
    copies = []
    for row, s in zip(x.detach(), sigma):
        generator = torch.Generator(device=x.device).manual_seed(input_seed(seed, row))
        noise = torch.randn((smoothing.n - 1, *row.shape), generator=generator,
                            device=x.device, dtype=x.dtype)
        copies += [row[None], row + noise * s]
    return torch.cat(copies)


class SmoothedMethod:
    """A method whose map is the mean of its maps of :func:`noisy_copies` of the input.

    Called as ``(model, x, target)`` like the method; ``keywords`` are the method's (the row's
    ``method_hparams``)."""

    def __init__(self, method: Method, smoothing: Smoothing, seed: int):
        self.method, self.smoothing, self.seed = method, smoothing, seed
        self.keywords = getattr(method, "keywords", None) or {}

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        n = self.smoothing.n
        # inside ``shared_pieces`` every method of a batch gets the same copies tensor, so the
        # methods' own shared pieces (the input gradient of gradient and gradient_x_input, ...)
        # are still computed once
        rows = shared(lambda: noisy_copies(x, self.smoothing, self.seed), "smooth_copies",
                      model, x, target, n, self.smoothing.noise_magnitude, self.seed)
        maps = self.method(model, rows, target.repeat_interleave(n))
        return maps.reshape(x.shape[0], n, *x.shape[1:]).mean(dim=1)


def smoothed(methods: Mapping[str, Method], smoothing: Smoothing,
             seed: int) -> dict[str, Method]:
    """Every method wrapped in :class:`SmoothedMethod` (unchanged when smoothing is off)."""
    if not smoothing.on:
        return dict(methods)
    return {name: SmoothedMethod(fn, smoothing, seed) for name, fn in methods.items()}
