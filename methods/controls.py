"""Control "explanations" that ignore the model: the harness's own sanity check.

* ``sobel``: the edge magnitude of the input. Adebayo et al. 2018 (arXiv 1810.03292, Fig. 1 and
  §5) show that an edge detector, which knows nothing of the model, looks much like several
  saliency maps; under model randomization it scores 1 at every stage by construction.
* ``random_uniform``: fresh uniform noise at every call. It scores about 0 at every stage, i.e.
  it "passes" the randomization test while explaining nothing (Binder et al. 2023, arXiv
  2211.12486): passing the test is necessary, not sufficient.

Both follow the method contract, ``(model, x, target, *, internal_batch_size=64, seed=0) ->
Tensor`` shaped like x (B, C, H, W), and declare in their registration the facts the test table
and the checks read: ``uses_model=False`` (they never call the model) and, for
``random_uniform``, ``deterministic=False`` (two calls differ on purpose).
"""
from __future__ import annotations

import hashlib
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.common import map_chunks
from methods.registry import METHODS

SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def sobel_magnitude(x: Tensor) -> Tensor:
    """sqrt(gx^2 + gy^2) of every channel with the 3x3 Sobel kernels and replicated borders
    (no spurious edge at the image frame). x: (n, C, H, W) -> (n, C, H, W)."""
    channels = x.shape[1]
    kernels = torch.stack([SOBEL_X, SOBEL_X.T]).to(device=x.device, dtype=x.dtype)  # (2, 3, 3)
    weight = kernels.repeat(channels, 1, 1).unsqueeze(1)  # (2C, 1, 3, 3): x then y per channel
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    edges = F.conv2d(padded, weight, groups=channels).unflatten(1, (channels, 2))
    return edges.pow(2).sum(dim=2).sqrt()


@METHODS.register(uses_model=False)
def sobel(model: nn.Module, x: Tensor, target: Tensor, *, internal_batch_size: int = 64,
          seed: int = 0) -> Tensor:
    """Sobel edge magnitude of each input channel; ignores model and target (the edge-detector
    analogy of Adebayo et al. 2018, arXiv 1810.03292). x: (B, C, H, W) -> (B, C, H, W) >= 0."""
    with torch.no_grad():
        return map_chunks(lambda rows, _targets: sobel_magnitude(rows), x.detach(), target,
                          internal_batch_size)



# Per model object: (fingerprint of its weights when first seen, calls so far). A run builds its
# models once, so a rerun of the same run (same seed, same order of calls) draws the same
# sequence of maps; two models (the true-label and the random-label model of the data
# randomization test) start different sequences; the weak keys let models be collected.
_CALLS: WeakKeyDictionary[nn.Module, tuple[str, int]] = WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """A short digest of the model's first parameter (its stem, typically: small and cheap),
    so that different models draw different noise and a rebuilt model the same noise."""
    first = next(iter(model.parameters()), None)
    if first is None:
        return type(model).__name__
    data = first.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def call_seed(seed: int, model: str, call: int) -> int:
    """A 63-bit seed for the ``call``-th draw for a model of fingerprint ``model``."""
    digest = hashlib.sha256(f"random_uniform:{seed}:{model}:{call}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@METHODS.register(uses_model=False, deterministic=False)
def random_uniform(model: nn.Module, x: Tensor, target: Tensor, *,
                   internal_batch_size: int = 64, seed: int = 0) -> Tensor:
    """U(-1, 1) noise, fresh at every call (Binder et al. 2023, arXiv 2211.12486): a control
    that scores about 0 at every randomization stage. x: (B, C, H, W) -> (B, C, H, W).

    The n-th call on a model draws from a private generator seeded by (seed, the model's
    weights when first seen, n): reproducible for a rerun of the run, different for another
    model, the global RNG untouched; the model is never called.
    """
    fingerprint, call = _CALLS.get(model) or (model_fingerprint(model), 0)
    _CALLS[model] = (fingerprint, call + 1)
    generator = torch.Generator(device=x.device).manual_seed(call_seed(seed, fingerprint, call))
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return 2 * noise - 1


