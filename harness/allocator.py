"""Process-wide CPU memory settings for fast forward+backward passes, applied by the entry points
(``sanity``, ``scripts/bench.py``) and, in a notebook, by calling :func:`tune_allocator` before the
first tensor is allocated. Importing the library sets nothing (an import changes no process state).

:func:`tune_allocator` sets two settings; maps are unchanged by both, only
time is. Both fight the same cost: a batched forward+backward allocates activations of several
MB per layer, and memory fresh from the kernel costs one page fault per 4 KB page on first touch.

* ``THP_MEM_ALLOC_ENABLE``: PyTorch's CPU allocator asks for transparent huge pages on
  allocations of 2 MB and more (it reads the variable once, at its first allocation): ~30x fewer
  page faults, a forward+backward of efficientnet_lite0 on 8 images 15-20 % faster on 2 cores.
  A value the user set wins; ``THP_MEM_ALLOC_ENABLE=0`` turns it off.
* glibc's malloc hands blocks over 128 KB-32 MB to the kernel on ``free`` and maps them again on
  the next ``malloc``; ``keep_freed_memory`` makes it keep them in the heap for the next tensor
  (fresh 64 MB tensors: 4.5 -> 12 GB/s written; CGI's batched backward ~25 % faster). The
  process's resident memory then stays at its peak. ``HARNESS_KEEP_FREED_MEMORY=0`` turns it off.
"""
import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks under 1 GB from its heap and never give the heap back
    (mallopt). True when set; False off glibc or when ``HARNESS_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("HARNESS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
            "linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: keep its defaults
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 64 << 20)))


def tune_allocator() -> None:
    """Ask torch's CPU allocator for huge pages (unless the user set ``THP_MEM_ALLOC_ENABLE``)
    and keep freed memory in glibc's heap (unless ``HARNESS_KEEP_FREED_MEMORY=0``). Call it
    before torch's first allocation: torch reads ``THP_MEM_ALLOC_ENABLE`` once, at that time."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_freed_memory()
