"""How a run executes its forward+backward passes: the memory format of the model and inputs,
the precision of the passes, the rows per pass (``internal_batch_size=auto`` under a
``memory_limit``) and the process's peak memory. Chosen once per run, before any map is made,
so the reference maps and every stage's maps are computed the same way (stage 0 scores 1).

* ``memory_format``: ``channels_last`` stores activations as (B, H, W, C); oneDNN's convolutions
  run faster that way on many CPUs (efficientnet_lite0 on AVX-512: 1.65x per forward+backward,
  issue #17). ``auto`` takes the model's declared choice (``@MODELS.register(memory_format=...)``),
  else measures both on one batch (:func:`choose_format`).
* ``precision``: ``bf16`` runs forward and backward under ``torch.autocast("cpu", bfloat16)``;
  maps come back as float32 and metrics run in float32.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

FORMATS = ("auto", "contiguous", "channels_last")
PRECISIONS = ("fp32", "bf16")
TORCH_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# a forward that keeps less for its backward than this is a small model's: the format gains
# nothing worth a measurement there, and on a loaded machine its passes are timed by the
# scheduler, not the kernels (tiny_cnn: 1 ms per pass idle, 160 ms with the cores shared), so
# a measured choice would only vary a run's kernels (and rounding) with the machine's load
MEASURE_ABOVE_BYTES = 32 << 20
UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def memory_format_name(value) -> str:
    """The config's ``memory_format``, validated (one line)."""
    name = str(value)
    if name not in FORMATS:
        raise ValueError(f"memory_format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, "
                         f"got {value!r}")
    return name


def precision_name(value) -> str:
    """The config's ``precision``, validated (one line)."""
    name = str(value)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, got {value!r}")
    return name


def memory_bytes(value) -> int | None:
    """``memory_limit``: null (half the available memory), a number of bytes or ``"512MB"``,
    ``"2GB"``; validated (one line)."""
    if value is None:
        return None
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTB")
    unit = text[len(number):]
    try:
        amount = int(float(number) * UNITS[unit])
    except (ValueError, KeyError):
        amount = 0
    if amount <= 0:
        raise ValueError(f"memory_limit must be a positive size such as 2GB or 512MB (or null: "
                         f"half the available memory), got {value!r}")
    return amount


def _proc_kilobytes(path: str, field: str) -> int | None:
    """Bytes of a "<field> <n> kB" line of a Linux /proc file; None elsewhere."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """Bytes the machine can still give (``MemAvailable`` of /proc/meminfo; psutil elsewhere;
    else the physical memory)."""
    available = _proc_kilobytes("/proc/meminfo", "MemAvailable:")
    if available is not None:
        return available
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far: ``VmHWM`` of /proc/self/status on Linux
    (the high-water mark of its own address space; ``getrusage``'s ``ru_maxrss`` is carried
    over ``exec`` from a forked parent, a launcher's or pytest's peak), else ``ru_maxrss``
    (KB on Linux, bytes on macOS)."""
    peak = _proc_kilobytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def to_format(model: nn.Module, x: torch.Tensor, name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model's 4-D weights and the inputs x (N, C, H, W) in memory format ``name``, once
    per run (in place for the model: the same parameter objects, new storage)."""
    memory_format = TORCH_FORMATS[name]
    return model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)


@contextmanager
def precision_context(precision: str) -> Iterator[None]:
    """bf16: forward and backward under CPU/CUDA autocast to bfloat16; fp32: nothing."""
    if precision == "fp32":
        with nullcontext():
            yield
        return
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        yield


def input_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gradient of the top logit with respect to x (B, C, H, W): one forward+backward."""
    leaf = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf).max(1).values.sum(), leaf)
    return grad


def pass_seconds(model: nn.Module, x: torch.Tensor, precision: str, repeat: int = 2) -> float:
    """Shortest wall time of ``repeat`` forward+backward passes of x, after one warm-up (the
    shortest: a busy machine only ever adds time)."""
    times = []
    for _ in range(repeat + 1):
        tic = time.perf_counter()
        with precision_context(precision):
            input_gradient(model, x)
        times.append(time.perf_counter() - tic)
    return min(times[1:])


def choose_format(model: nn.Module, x: torch.Tensor, precision: str) -> tuple[str, dict]:
    """``memory_format=auto`` without a declared choice: time a forward+backward of one batch x
    (B, C, H, W) in each format (alternating, medians of 2 after a warm-up) and take the
    faster. A forward that keeps under :data:`MEASURE_ABOVE_BYTES` for its backward stays
    contiguous unmeasured (a small model: no gain to find, and the choice would vary with the
    machine's load). Returns the choice and the seconds measured per format (run.json)."""
    model, x = to_format(model, x, "contiguous")
    if saved_bytes(model, x, precision)[0] < MEASURE_ABOVE_BYTES:
        return "contiguous", {}
    seconds = {"contiguous": [], "channels_last": []}
    for _ in range(3):
        for name in ("channels_last", "contiguous"):
            moved, rows = to_format(model, x, name)
            seconds[name].append(pass_seconds(moved, rows, precision, repeat=1))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return min(medians, key=medians.get), medians


def saved_bytes(model: nn.Module, x: torch.Tensor, precision: str) -> tuple[int, int, int]:
    """What the forward of x (B, C, H, W) keeps for the backward: (total bytes, bytes of the
    largest tensor, bytes of the largest convolution workspace of one image). Activations are
    counted once per storage, the model's own weights left out (they are held anyway); the
    workspace is the im2col matrix (C_in / groups * kh * kw, H_out * W_out) of one image, what
    the convolution kernels without oneDNN build per image, forward and backward."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}
    workspace = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def columns(conv: nn.Module, _, out: torch.Tensor) -> None:
        per_image = conv.in_channels // conv.groups * conv.weight[0, 0].numel()
        workspace[0] = max(workspace[0], per_image * out[0, 0].numel() * out.element_size())

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [conv.register_forward_hook(columns) for conv in convs]
    leaf = x.detach().requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                precision_context(precision):
            score = model(leaf).max(1).values.sum()
    finally:
        for handle in handles:
            handle.remove()
    del score
    return sum(storages.values()), max(storages.values(), default=0), workspace[0]


def pass_bytes(model: nn.Module, x: torch.Tensor, precision: str) -> int:
    """Estimated peak memory of one forward+backward of x (B, C, H, W) above what the process
    holds: the tensors saved for the backward (all alive when it starts), x and its gradient,
    the backward's own gradients, of which at most three are alive beside the saved tensors at
    any time (the gradient reaching an op, the one it passes on, and one waiting at a residual
    join), each at most the size of the largest saved tensor, and two convolution workspaces
    (the im2col matrix and its gradient)."""
    saved, largest, workspace = saved_bytes(model, x, precision)
    return saved + 2 * x.nbytes + 3 * largest + 2 * workspace


def auto_chunk(model: nn.Module, x: torch.Tensor, precision: str, limit: int,
               most: int = 1024) -> tuple[int, dict]:
    """``internal_batch_size=auto``: the largest number of rows per forward+backward whose
    memory stays under ``limit`` bytes, at most ``most``.

    Estimated from a probe: :func:`pass_bytes` of one row and of two rows of x (N, C, H, W)
    give the bytes per row (their difference) and a fixed part (what does not grow with the
    rows); a chunk of k rows needs ``fixed + k * per_row``. Activations grow linearly in the
    rows, so the estimate holds for any k (tests/test_execution.py measures the peak resident
    memory of the chosen chunk in a fresh process). A limit below one row's need fails in one
    line."""
    one, two = (pass_bytes(model, x[:1].expand(k, *x.shape[1:]).clone(), precision)
                for k in (1, 2))
    per_row = max(two - one, 1)
    fixed = max(one - per_row, 0)
    rows = min((limit - fixed) // per_row, most)
    if rows < 1:
        raise ValueError(f"memory_limit={limit / 2**20:.1f}MB is below one row's forward+backward "
                         f"({one / 2**20:.1f}MB for this model and input size): raise "
                         "memory_limit or give internal_batch_size=N")
    return int(rows), {"per_row_bytes": per_row, "fixed_bytes": fixed, "limit_bytes": limit,
                       "estimated_bytes": fixed + int(rows) * per_row}
