"""Coarse-grained threads for the normalizations and metrics: slices of rows, not ops.

Every normalization and metric is row-wise, so a batch is cut into slices of rows, and each
slice is computed by one thread, single-threaded: the calling thread plus pool workers, as many
as ``torch.get_num_threads()``. On a shared machine this matters: torch's per-op thread teams
wait at every op for a descheduled thread, which we measured to make SSIM and the absolute
normalization 5-20x slower under load than on one thread, while a slice never waits for
another, and the driving thread keeps claiming slices until none is left. Results are identical
whatever the number of threads.

A decorated function runs on a *driver* thread whose torch ops are single-threaded, while the
calling thread waits. The caller's own thread count is never changed: toggling
``torch.set_num_threads(1)`` and back costs the next forward+backward of a model 90-130 ms
(measured on efficientnet_lite0, 8 images, 2 cores), which between the stages of a check is a
quarter of the work.
"""
from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)
T = TypeVar("T")

_STATE = threading.local()  # .threads, on the driver: the caller's torch thread count
_POOL: ThreadPoolExecutor | None = None
_DRIVER: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def row_slices(n_rows: int, row_pixels: int, chunk_pixels: int, parts: int = 1) -> list[slice]:
    """Slices of about ``chunk_pixels`` pixels covering ``n_rows`` rows, at least ``parts`` of
    them when there are enough rows, of equal sizes (so that threads get equal work)."""
    if n_rows == 0:
        return []
    count = max(parts, -(-n_rows * row_pixels // max(1, chunk_pixels)))
    count = max(1, min(n_rows, -(-count // parts) * parts))
    size = -(-n_rows // count)
    return [slice(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


def _single_threaded_worker() -> None:
    # A thread's first torch op copies the process-wide thread count into the thread's own
    # OpenMP and MKL settings; do that first, then make this thread's settings 1.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _single_threaded_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """``workers`` threads whose torch ops are single-threaded, all started now.

    ``torch.set_num_threads`` in a worker also sets the process-wide default that new threads
    start from, so the caller's count is set again once every worker has started.
    """
    threads = torch.get_num_threads()
    started = threading.Barrier(workers + 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name,
                              initializer=_single_threaded_worker)
    for _ in range(workers):  # every submit starts a thread: none is idle yet
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(threads)
    return pool


def _pool() -> ThreadPoolExecutor:
    """``os.cpu_count() - 1`` single-threaded helpers that claim slices beside the driver."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _single_threaded_pool(max(1, (os.cpu_count() or 1) - 1), "metrics")
        return _POOL


def _driver() -> ThreadPoolExecutor:
    """The single-threaded thread that runs every :func:`coarse_threads` function."""
    global _DRIVER
    with _POOL_LOCK:
        if _DRIVER is None:
            _DRIVER = _single_threaded_pool(1, "metrics-driver")
        return _DRIVER


def _forget_pool() -> None:
    global _POOL, _DRIVER
    _POOL = _DRIVER = None  # a forked child has no pool threads: build new ones on demand


os.register_at_fork(after_in_child=_forget_pool)


def threads() -> int:
    """The number of threads to spread slices over: the caller's torch setting."""
    return getattr(_STATE, "threads", None) or torch.get_num_threads()


def coarse_threads(fn: F) -> F:
    """Decorator: ``fn`` runs on the single-threaded driver thread, which spreads slices of
    rows over as many threads as the caller has set (see :func:`by_chunks`); the caller waits.
    Nested calls run directly on the driver."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_STATE, "threads", None) is not None:  # already on the driver
            return fn(*args, **kwargs)
        caller_threads = torch.get_num_threads()

        def drive():
            _STATE.threads = caller_threads
            try:
                return fn(*args, **kwargs)
            finally:
                _STATE.threads = None

        return _driver().submit(drive).result()

    return wrapper


def by_chunks(fn: Callable[..., T], *arrays, row_pixels: int, chunk_pixels: int,
              **kw) -> list[T]:
    """``[fn(*(x[s] for x in arrays), **kw) for s in slices]`` over slices of rows of about
    ``chunk_pixels`` pixels, for a row-wise ``fn`` of tensors or numpy arrays (B, ...).

    The calling (driver) thread and ``threads() - 1`` pool workers claim slices in turn until none is
    left; numpy and torch release the GIL in their kernels.
    """
    n_threads = threads()
    slices = row_slices(len(arrays[0]), row_pixels, chunk_pixels, parts=n_threads)
    results: list = [None] * len(slices)
    claim = itertools.count()

    def work() -> None:
        for i in iter(claim.__next__, None):  # next() of a count is atomic under the GIL
            if i >= len(slices):
                return
            results[i] = fn(*(x[slices[i]] for x in arrays), **kw)

    helpers = []
    if n_threads > 1 and len(slices) > 1:
        pool = _pool()
        helpers = [pool.submit(work) for _ in range(min(n_threads, len(slices)) - 1)]
    try:
        work()
    finally:
        wait(helpers)
    for helper in helpers:
        helper.result()  # re-raises a helper's exception
    return results
