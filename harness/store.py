"""The one module that writes results: parquet row parts, map arrays, run.json.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness.base.context import MapRecord
from harness.data import Dataset

if TYPE_CHECKING:  # pandas is imported when rows are written: a failing command line never waits
    import pandas as pd

ROWS, MAPS, FIGURES = "rows", "maps", "figures"
CLAIM = "claim.json"  # written when a run starts: its run_id and config digest, for resuming
FAILED = "failed.json"  # written when a run stops on an error, for the collect step
# keys that change neither rows nor maps: left out of the config digest
DIGEST_EXCLUDES = ("progress", "figures", "resume", "cache_dir", "hydra")


def _atomic(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


PartKey = tuple[str, int, str]  # (check, stage_index, method): one finished unit of work


def part_name(key: PartKey) -> str:
    """File name of a unit's rows; registry names hold no '-', so the name parses back."""
    check, stage_index, method = key
    return f"part-{check}-{stage_index:03d}-{method or '_'}.parquet"


def finished_parts(run_dir: Path | str) -> frozenset[PartKey]:
    """The units whose rows a run directory already holds (renamed into place, so whole)."""
    keys = set()
    for path in (Path(run_dir) / ROWS).glob("part-*-*-*.parquet"):
        check, index, method = path.name[len("part-"):-len(".parquet")].split("-", 2)
        keys.add((check, int(index), "" if method == "_" else method))
    return frozenset(keys)


class RunStore:
    """Writes rows as parquet parts under ``run_dir/rows/``, one part per finished unit of work
    (check x stage x method), named after the unit. Rows of a unit already on disk (a resumed
    run) are dropped, so a unit is never written twice and an interrupted run keeps what it
    finished."""

    def __init__(self, run_dir: Path, common: dict):
        self.run_dir = Path(run_dir)
        self.common = common  # columns shared by every row (run_id, model, dataset, seed)
        self.buffer: list[dict] = []
        self.key: PartKey | None = None
        (self.run_dir / ROWS).mkdir(parents=True, exist_ok=True)
        for stale in (self.run_dir / ROWS).glob(".*.tmp-*"):  # left by a killed writer
            stale.unlink()
        self.done = finished_parts(self.run_dir)  # kept from an earlier, interrupted run
        self.written: set[PartKey] = set()
        self.rows_written = 0

    @property
    def parts(self) -> int:
        return len(self.written)

    def add(self, item: dict | MapRecord | None) -> None:
        if isinstance(item, MapRecord):
            self.write_maps(item)
        elif item is not None:
            key = (str(item.get("check", "")), int(item.get("stage_index", 0)),
                   str(item.get("method", "")))
            if key != self.key:
                self.flush()
                if key in self.written:
                    raise RuntimeError(f"rows of part {part_name(key)} came in two runs of rows; "
                                       "a check must yield a unit's rows together")
                self.key = key
            if key not in self.done:
                self.buffer.append(item)

    def flush(self) -> None:
        if not self.buffer:
            return
        import pandas as pd

        frame = pd.DataFrame([{**self.common, **row} for row in self.buffer])
        path = self.run_dir / ROWS / part_name(self.key)
        tmp = _atomic(path)
        frame.to_parquet(tmp, index=False)
        tmp.rename(path)
        self.written.add(self.key)
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
        return self.write_json_to(self.run_dir, name, payload)

    @staticmethod
    def write_json_to(run_dir: Path, name: str, payload: dict) -> Path:
        path = run_dir / name
        tmp = _atomic(path)
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        tmp.rename(path)
        return path


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = _atomic(path)
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    tmp.rename(path)


def read_rows(run_dir: Path | str) -> "pd.DataFrame":
    """The whole table of a run."""
    import pandas as pd

    return pd.read_parquet(Path(run_dir) / ROWS)


def config_digest(config: dict) -> str:
    """12 hex digits identifying a resolved config (without keys that change no result)."""
    kept = {k: v for k, v in config.items() if k not in DIGEST_EXCLUDES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def claim_run_dir(run_dir: Path, digest: str, resume: str | bool) -> tuple[str, int]:
    """(run_id, number of finished parts kept) for a run of config ``digest`` in ``run_dir``.

    ``resume``: ``auto`` resumes a run of the same config found there, ``true`` insists on one,
    ``false`` starts over (its rows and maps are deleted). A run of another config is never
    touched: that is an error.
    """
    resume = str(resume).lower()
    if resume not in ("auto", "true", "false"):
        raise ValueError(f"resume must be auto, true or false, got {resume!r}")
    path = Path(run_dir) / CLAIM
    earlier = json.loads(path.read_text()) if path.is_file() else None
    (Path(run_dir) / FAILED).unlink(missing_ok=True)
    if earlier and earlier["config_digest"] != digest and not finished_parts(run_dir):
        earlier = None  # a run that stopped before finishing any part: nothing to protect
    if earlier and earlier["config_digest"] != digest:
        raise ValueError(f"run dir {run_dir} holds a run of a different config (digest "
                         f"{earlier['config_digest']}, this config {digest}); choose another "
                         "hydra.run.dir or delete that one")
    if earlier is None and resume == "true":
        raise ValueError(f"resume=true but run dir {run_dir} holds no earlier run to resume")
    if not path.is_file() and any((Path(run_dir) / ROWS).glob("*.parquet")):
        raise ValueError(f"run dir {run_dir} holds rows of a run without {CLAIM} (an older "
                         "harness?); choose another hydra.run.dir or delete that one")
    if earlier and resume != "false":
        return earlier["run_id"], len(finished_parts(run_dir))
    for folder in (ROWS, MAPS, FIGURES):
        shutil.rmtree(Path(run_dir) / folder, ignore_errors=True)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    RunStore.write_json_to(Path(run_dir), CLAIM, {"run_id": run_id, "config_digest": digest})
    return run_id, 0


def record_failure(run_dir: Path, message: str) -> None:
    """Mark a run as failed (read by the collect step); a later successful run clears it."""
    RunStore.write_json_to(Path(run_dir), FAILED, {"error": message})


def write_table(path: Path | str, table: pd.DataFrame) -> Path:
    """One parquet file (e.g. a sweep's collected table), written atomically."""
    path = Path(path)
    tmp = _atomic(path)
    table.to_parquet(tmp, index=False)
    tmp.rename(path)
    return path
