"""``tune_allocator()`` (called by the entry points) sets the CPU memory settings (huge pages,
freed memory kept) before torch allocates; each can be turned off by its environment variable.
Importing the library sets neither."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = """
import resource, sys
import harness.allocator
if sys.argv[2] == 'tune':
    harness.allocator.tune_allocator()
import torch, methods, metrics, checks, harness.run, harness.cli
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.empty(64 << 18); block.fill_(1.0); del block
before = faults()
block = torch.empty(int(sys.argv[1]) << 18); block.fill_(1.0); del block
print(faults() - before)
"""
SETTINGS = ("THP_MEM_ALLOC_ENABLE", "HARNESS_KEEP_FREED_MEMORY")


def faults_of_second_tensor(mib: int = 64, tune: bool = True, **settings: str) -> int:
    """Page faults of a tensor of ``mib`` MiB after a freed one of 64 MiB, in a fresh process
    that imports the library (and calls ``tune_allocator`` when ``tune``)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS} | settings
    done = subprocess.run([sys.executable, "-c", PROBE, str(mib), "tune" if tune else "plain"], capture_output=True, text=True,
                          env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_keeps_freed_memory_for_the_next_tensor():
    # 4 KiB pages, so that fresh memory shows as 8192 faults. (Not 64 MiB again: torch's
    # aligned allocation asks glibc for a little more than the freed block holds.)
    assert faults_of_second_tensor(32, THP_MEM_ALLOC_ENABLE="0") < 200  # the freed pages reused
    assert faults_of_second_tensor(32, THP_MEM_ALLOC_ENABLE="0",
                                   HARNESS_KEEP_FREED_MEMORY="0") > 8000


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="the kernel offers no transparent huge pages")
def test_import_enables_huge_page_allocation():
    fresh = {"HARNESS_KEEP_FREED_MEMORY": "0"}  # each tensor maps fresh memory
    assert faults_of_second_tensor(**fresh) < 2000  # huge pages: ~32 faults of 2 MiB (+ a few)
    assert faults_of_second_tensor(**fresh, THP_MEM_ALLOC_ENABLE="0") > 8000  # 16384 of 4 KiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_changes_no_process_setting():
    """``import harness, methods, metrics, checks``: glibc gives freed memory back as before
    (fresh pages for the next tensor), and no environment variable is set."""
    assert faults_of_second_tensor(32, tune=False, THP_MEM_ALLOC_ENABLE="0") > 8000
    probe = ("import os; before = dict(os.environ); import harness, methods, metrics, checks, "
             "harness.run, harness.cli; print(sorted(set(os.environ.items()) ^ "
             "set(before.items())))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"
