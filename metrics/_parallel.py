"""Coarse-grained threads for the normalizations and metrics: slices of rows, not ops.

Every normalization and metric is row-wise, so a batch is cut into slices of rows, and each
slice is computed by one thread, single-threaded: the calling thread plus pool workers, as many
as ``torch.get_num_threads()``. On a shared machine this matters: torch's per-op thread teams
wait at every op for a descheduled thread, which we measured to make SSIM and the absolute
normalization 5-20x slower under load than on one thread, while a slice never waits for
another, and the calling thread, which already holds a core, keeps claiming slices until none
is left. Results are identical whatever the number of threads.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)
T = TypeVar("T")

_STATE = threading.local()  # .threads: the torch thread count set outside coarse_threads
_POOL: ThreadPoolExecutor | None = None
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


def _pool() -> ThreadPoolExecutor:
    """``os.cpu_count() - 1`` helper threads whose torch ops are single-threaded.

    ``torch.set_num_threads`` in a worker also sets the process-wide default that new threads
    start from, so the caller's count is set again once every worker has started.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            workers = max(1, (os.cpu_count() or 1) - 1)
            threads = torch.get_num_threads()
            started = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="metrics",
                                      initializer=_single_threaded_worker)
            for _ in range(workers):  # every submit starts a thread: none is idle yet
                pool.submit(started.wait)
            started.wait()
            torch.set_num_threads(threads)
            _POOL = pool
        return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has no pool threads: build a new pool on demand


os.register_at_fork(after_in_child=_forget_pool)


def threads() -> int:
    """The number of threads to spread slices over: torch's setting outside ``coarse_threads``."""
    return getattr(_STATE, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def _single_threaded_caller() -> Iterator[None]:
    if getattr(_STATE, "threads", None) is not None:  # nested: already single-threaded
        yield
        return
    _STATE.threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_STATE.threads)
        _STATE.threads = None


def coarse_threads(fn: F) -> F:
    """Decorator: ``fn`` runs its torch ops single-threaded in the calling thread and spreads
    slices of rows over the threads that were set (see :func:`by_chunks`). Calls of decorated
    functions from several threads at once are not supported (the setting is process-wide)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _single_threaded_caller():
            return fn(*args, **kwargs)

    return wrapper


def by_chunks(fn: Callable[..., T], *arrays, row_pixels: int, chunk_pixels: int,
              **kw) -> list[T]:
    """``[fn(*(x[s] for x in arrays), **kw) for s in slices]`` over slices of rows of about
    ``chunk_pixels`` pixels, for a row-wise ``fn`` of tensors or numpy arrays (B, ...).

    The calling thread and ``threads() - 1`` pool workers claim slices in turn until none is
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
