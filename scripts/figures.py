"""Regenerate the paper figures of run directories from their tables and maps (no training).

    python scripts/figures.py RUN_DIR|SWEEP_DIR [...]

The same as ``sanity figures`` and the ``sanity-figures`` console script
(:func:`harness.figures.main`): writes ``RUN_DIR/figures/*.png`` and ``*.pdf`` and prints the
path of every file written. A sweep dir (``sanity -m``) stands for all its job dirs.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `python scripts/figures.py` puts scripts/, not the repo root, on sys.path: add the root so that
# `harness` imports from this checkout without installing the package (harmless when installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.figures import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
