"""Read every run of a sweep into one table; report missing, failed or unfinished jobs.

    python scripts/collect.py SWEEP_DIR [--out FILE.parquet]

The same as ``sanity collect`` and the ``sanity-collect`` console script (:mod:`harness.collect`).
Exit status 1 when a job is missing, failed or unfinished.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `python scripts/collect.py` puts scripts/, not the repo root, on sys.path: add the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.collect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
