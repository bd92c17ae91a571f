"""``import harness`` turns on PyTorch's huge-page allocation before torch allocates."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = """
import resource, sys
import harness, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.empty(64 << 18); block.fill_(1.0); del block
before = faults()
block = torch.empty(64 << 18); block.fill_(1.0); del block
print(faults() - before)
"""


def faults_of_64_mib(env: dict) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="the kernel offers no transparent huge pages")
def test_import_enables_huge_page_allocation():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert faults_of_64_mib(env) < 2000  # huge pages: ~32 faults of 2 MiB (+ a few)
    assert faults_of_64_mib({**env, "THP_MEM_ALLOC_ENABLE": "0"}) > 8000  # 16384 of 4 KiB
