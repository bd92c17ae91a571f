"""Regenerate the paper figures of run directories from their tables and maps (no training).

    python scripts/figures.py RUN_DIR [RUN_DIR ...]

Writes ``RUN_DIR/figures/*.png`` and ``*.pdf`` (see :func:`harness.figures.make_figures`) and
prints the path of every file written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python scripts/figures.py` puts scripts/, not the repo root, on sys.path: add the root so that
# `harness` imports from this checkout without installing the package (harmless when installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.figures import make_figures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            print(f"error: {run_dir} is not a directory", file=sys.stderr)
            status = 1
            continue
        paths = make_figures(run_dir)
        if not paths:
            print(f"{run_dir}: nothing to plot (no rows/ and no maps/)", file=sys.stderr)
        for path in paths:
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
