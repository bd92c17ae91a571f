"""Regenerate the paper figures of run directories from their tables and maps (no training).

    python scripts/figures.py RUN_DIR|SWEEP_DIR [...]

Writes ``RUN_DIR/figures/*.png`` and ``*.pdf`` (see :func:`harness.figures.make_figures`) and
prints the path of every file written. A sweep dir (``sanity -m``) stands for all its job dirs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python scripts/figures.py` puts scripts/, not the repo root, on sys.path: add the root so that
# `harness` imports from this checkout without installing the package (harmless when installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.collect import run_dirs  # noqa: E402
from harness.figures import make_figures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR|SWEEP_DIR")
    args = parser.parse_args(argv)
    status = 0
    for given in args.dirs:
        if not given.is_dir():
            print(f"error: {given} is not a directory", file=sys.stderr)
            status = 1
            continue
        status = max(status, _figures_of(run_dirs(given) or [given]))
    return status


def _figures_of(dirs: list[Path]) -> int:
    status = 0
    for run_dir in dirs:
        paths = make_figures(run_dir)
        if not paths:
            print(f"{run_dir}: nothing to plot (no rows/ and no maps/)", file=sys.stderr)
        for path in paths:
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
