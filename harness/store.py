"""The one module that writes results: parquet row parts, map arrays, run.json.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from harness.context import MapRecord
from harness.data import Dataset

ROWS, MAPS, FIGURES = "rows", "maps", "figures"


def _atomic(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class RunStore:
    """Buffers rows and writes them as parquet parts under ``run_dir/rows/``: one part per
    finished stage (or every ``flush_every`` rows), so an interrupted run keeps what it did."""

    def __init__(self, run_dir: Path, common: dict, flush_every: int = 20_000):
        self.run_dir = Path(run_dir)
        self.common = common  # columns shared by every row (run_id, model, dataset, seed)
        self.flush_every = flush_every
        self.buffer: list[dict] = []
        self.parts = 0
        self.rows_written = 0
        self.stage: tuple | None = None
        (self.run_dir / ROWS).mkdir(parents=True, exist_ok=True)

    def add(self, item: dict | MapRecord | None) -> None:
        if isinstance(item, MapRecord):
            self.write_maps(item)
        elif item is not None:
            stage = (item.get("check"), item.get("stage_index"))
            if stage != self.stage or len(self.buffer) >= self.flush_every:
                self.flush()
                self.stage = stage
            self.buffer.append(item)

    def flush(self) -> None:
        if not self.buffer:
            return
        frame = pd.DataFrame([{**self.common, **row} for row in self.buffer])
        path = self.run_dir / ROWS / f"part-{self.parts:05d}.parquet"
        tmp = _atomic(path)
        frame.to_parquet(tmp, index=False)
        tmp.rename(path)
        self.parts += 1
        self.rows_written += len(frame)
        self.buffer.clear()

    def write_maps(self, record: MapRecord) -> None:
        path = (self.run_dir / MAPS / record.check / record.method
                / f"stage_{record.stage_index:03d}.npz")
        arrays = {k: v.float().numpy().astype(np.float16) for k, v in record.maps.items()}
        _save_npz(path, samples=record.samples.numpy().astype(np.int64),
                  stage=np.array(record.stage), **arrays)

    def write_inputs(self, data: Dataset, k: int) -> None:
        k = min(k, len(data.samples))
        arrays = {"images": data.display_images()[:k],
                  "samples": data.samples[:k].numpy().astype(np.int64),
                  "labels": data.labels[:k].numpy().astype(np.int64)}
        if data.class_names:
            arrays["class_names"] = np.array([data.class_names[i] for i in
                                              data.labels[:k].tolist()])
        _save_npz(self.run_dir / MAPS / "inputs.npz", **arrays)

    def write_json(self, name: str, payload: dict) -> Path:
        path = self.run_dir / name
        tmp = _atomic(path)
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        tmp.rename(path)
        return path


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = _atomic(path)
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    tmp.rename(path)


def read_rows(run_dir: Path | str) -> pd.DataFrame:
    """The whole table of a run."""
    return pd.read_parquet(Path(run_dir) / ROWS)
