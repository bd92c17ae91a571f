"""The one module that writes results: parquet row parts, map arrays, run.json, and the
manifest that lists every committed part with its unit, row count and checksum
(:mod:`harness.manifest`).

Every file is written to a temporary name and renamed, so a reader never sees half a file; a
part is committed when the manifest lists it, and a resumed run trusts only committed parts that
still match their checksums (the others are moved aside and their units recomputed).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness.base.context import REQUIRED_COLUMNS, CheckFacts, MapRecord, RunNote, StageDone
from harness.data import Dataset
from harness.manifest import (  # noqa: F401  (read_rows: the reader, also harness.read_rows)
    CLAIM,
    DAMAGED,
    FAILED,
    FIGURES,
    MANIFEST,
    MAPS,
    RECORD,
    ROWS,
    VERSION,
    Inspection,
    inspect_run,
    load_manifest,
    part_entry,
    read_rows,
)

if TYPE_CHECKING:  # pandas is imported when rows are written: a failing command line never waits
    import pandas as pd

SUMMARY = "summary.parquet"  # means, bootstrap intervals and control tests (checks.uncertainty)
LOCK = "run.lock"  # held while a process owns the run dir: its pid and host, for the message
# keys that change neither rows nor maps: left out of the config digest
DIGEST_EXCLUDES = ("progress", "figures", "resume", "cache_dir", "hydra")


def _atomic(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


Unit = tuple  # (check, *values of the check's unit columns): one finished unit of work


def part_name(unit: Unit) -> str:
    """File name of a unit's rows, e.g. ``part-cascading-003-gradient.parquet``: integers with
    three digits (so names sort in stage order), an empty value as ``_``."""
    return "part-" + "-".join(f"{v:03d}" if isinstance(v, int) else (str(v) or "_")
                              for v in unit) + ".parquet"


def finished_parts(run_dir: Path | str) -> frozenset[str]:
    """The names of the rows parts a run directory holds that its manifest lists (committed;
    :class:`RunStore` also checks their checksums before it trusts them)."""
    entries, _ = load_manifest(run_dir)
    return frozenset(Path(p).name for p in entries
                     if p.startswith(ROWS + "/") and (Path(run_dir) / p).is_file())


def set_aside_damaged(run_dir: Path) -> tuple[Inspection, list[str]]:
    """Check every part against the manifest before a run trusts it: a part that is not in the
    manifest or differs from its checksum is moved to ``rows/.damaged/`` (``maps/.damaged/``),
    never deleted. Returns the inspection and one log line per problem; the manifest keeps the
    entries of damaged and lost parts, so their units count as unfinished until recomputed."""
    inspection = inspect_run(run_dir)
    lines = []
    for relative, why in inspection.damaged.items():
        moved = _move_aside(run_dir, relative)
        again = ", its unit is recomputed" if relative in inspection.entries else ""
        lines.append(f"damaged part {relative} ({why}): moved to {moved}{again}")
    lines += [f"missing part {relative} (committed, then deleted or moved): its unit is "
              "recomputed" for relative in inspection.lost]
    lines += [f"warning: {line}" for line in inspection.warnings()]
    return inspection, lines


def _move_aside(run_dir: Path, relative: str) -> str:
    top, _, rest = relative.partition("/")
    target = run_dir / top / DAMAGED / rest
    target.parent.mkdir(parents=True, exist_ok=True)
    number = 0
    while target.exists():  # damaged again: keep every copy
        number += 1
        target = run_dir / top / DAMAGED / f"{rest}.{number}"
    (run_dir / relative).rename(target)
    return target.relative_to(run_dir).as_posix()


class RunStore:
    """Writes rows as parquet parts under ``run_dir/rows/``, one part per unit of work, the
    unit being the check's declared ``unit`` columns (``CheckFacts.unit``, by default stage x
    method). The only place that knows what is finished: a check asks :meth:`finished` to skip
    finished units; rows of a finished unit are a check's bug and raise.

    Rows are completed with the check's declared columns (so every part has one schema) and
    may carry no other. A unit's rows are buffered until the check says the stage is done
    (:class:`StageDone`), moves to another value of the unit's first column (the next stage)
    or ends, so within a stage they may come in any order; an interrupted run keeps every stage
    the check finished.
    """

    def __init__(self, run_dir: Path, common: dict, facts: CheckFacts = CheckFacts()):
        self.run_dir = Path(run_dir)
        self.common = common  # columns shared by every row (run_id, model, dataset, seed)
        self.facts = facts
        self.defaults = facts.row_defaults()
        self.allowed = set(REQUIRED_COLUMNS) | set(common) | set(self.defaults)
        self.buffers: dict[Unit, list[dict]] = {}
        self.current: object = None  # the value of the unit's first column being buffered
        (self.run_dir / ROWS).mkdir(parents=True, exist_ok=True)
        for stale in (self.run_dir / ROWS).glob(".*.tmp-*"):  # left by a killed writer
            stale.unlink()
        inspection, self.problems = set_aside_damaged(self.run_dir)  # lines for the log
        self.entries = inspection.entries  # the manifest, rewritten at every commit
        again = {part_name(tuple(u.values())) for u in inspection.units_to_recompute()}
        # kept from an earlier, interrupted run: committed, whole, and no map of it damaged
        self.done = frozenset(Path(p).name for p in inspection.row_parts()
                              if Path(p).name not in again and not inspection.unlisted)
        self.written: set[str] = set()
        self.rows_written = 0
        self.notes: dict[str, RunNote] = {}  # run-level facts of the check, for run.json

    @property
    def parts(self) -> int:
        return len(self.written)

    def finished(self, check: str, *values) -> bool:
        """Is the unit ``(check, *values)`` stored, by an earlier run or this one?"""
        name = part_name((check, *values))
        return name in self.done or name in self.written

    def add(self, item: dict | MapRecord | StageDone | RunNote | None) -> None:
        if isinstance(item, MapRecord):
            self.write_maps(item)
        elif isinstance(item, RunNote):
            self.notes[item.key] = item  # written into run.json with the run's record
        elif isinstance(item, StageDone):
            self.flush()
        elif item is not None:
            unit = self.unit_of(item)
            stage = unit[1] if len(unit) > 1 else None
            if stage != self.current:
                self.flush()
                self.current = stage
            if self.finished(*unit):
                raise RuntimeError(f"the check yielded rows of {part_name(unit)}, which is "
                                   "already stored: a check skips finished units "
                                   "(ctx.pending / ctx.finished)")
            self.buffers.setdefault(unit, []).append(item)

    def unit_of(self, row: dict) -> Unit:
        extra = set(row) - self.allowed
        if extra:
            raise ValueError(f"check {row.get('check')!r} yielded undeclared columns "
                             f"{', '.join(sorted(extra))}: declare them in its registration "
                             "(@CHECKS.register(columns={...}))")
        values = (row.get(c, self.defaults.get(c)) for c in self.facts.unit)
        # unit columns hold integers (stage_index) or names (method)
        return (str(row.get("check", "")), *(v if isinstance(v, str) else int(v) for v in values))

    def flush(self) -> None:
        """Write every buffered unit as its part."""
        import pandas as pd

        for unit, rows in self.buffers.items():
            frame = pd.DataFrame([self.complete(row) for row in rows])
            path = self.run_dir / ROWS / part_name(unit)
            tmp = _atomic(path)
            frame.to_parquet(tmp, index=False)
            tmp.rename(path)
            self.commit(path, self.unit_dict(unit), len(frame))
            self.written.add(path.name)
            self.rows_written += len(frame)
        self.buffers.clear()

    def unit_dict(self, unit: Unit) -> dict:
        return {"check": unit[0], **dict(zip(self.facts.unit, unit[1:]))}

    def commit(self, path: Path, unit: dict | None, rows: int) -> None:
        """Record a part renamed into place in the manifest (rewritten atomically): a part
        the manifest does not list is not trusted by a resumed run."""
        relative = path.relative_to(self.run_dir).as_posix()
        self.entries[relative] = part_entry(path, unit, rows)
        self.write_json(MANIFEST, {"version": VERSION, "parts": self.entries})

    def committed_rows(self) -> dict[str, int]:
        """Rows part name -> its number of rows, for every rows part of the manifest."""
        return {Path(p).name: e["rows"] for p, e in sorted(self.entries.items())
                if p.startswith(ROWS + "/")}

    def complete(self, row: dict) -> dict:
        """The row with the common columns first and every declared column it leaves out."""
        full = {**self.common, **row}
        full.update({k: v for k, v in self.defaults.items() if k not in full})
        return full

    def write_maps(self, record: MapRecord) -> None:
        path = (self.run_dir / MAPS / record.check / record.method
                / f"stage_{record.stage_index:03d}.npz")
        arrays = {k: v.float().numpy().astype(np.float16) for k, v in record.maps.items()}
        _save_npz(path, samples=record.samples.numpy().astype(np.int64),
                  stage=np.array(record.stage), **arrays)
        known = {"stage_index": record.stage_index, "method": record.method}
        unit = {c: known.get(c, self.defaults.get(c)) for c in self.facts.unit}
        self.commit(path, {"check": record.check, **unit}, len(record.samples))

    def write_inputs(self, data: Dataset, k: int) -> None:
        k = min(k, len(data.samples))
        arrays = {"images": data.display_images()[:k],
                  "samples": data.samples[:k].numpy().astype(np.int64),
                  "labels": data.labels[:k].numpy().astype(np.int64)}
        if data.class_names:
            arrays["class_names"] = np.array([data.class_names[i] for i in
                                              data.labels[:k].tolist()])
        _save_npz(self.run_dir / MAPS / "inputs.npz", **arrays)
        self.commit(self.run_dir / MAPS / "inputs.npz", None, k)

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


def config_digest(config: dict) -> str:
    """12 hex digits identifying a resolved config (without keys that change no result)."""
    kept = {k: v for k, v in config.items() if k not in DIGEST_EXCLUDES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


class RunDirTaken(ValueError):
    """The run dir is another run's (of another config, or of a live process): an error of
    this run that marks nothing there (no failed.json written into the other's dir)."""


class RunDirBusy(RunDirTaken):
    """Another live process owns the run dir (its lock is held)."""


def claim_run_dir(run_dir: Path, digest: str, resume: str | bool) -> tuple[str, int]:
    """(run_id, number of finished parts kept) for a run of config ``digest`` in ``run_dir``.

    ``resume``: ``auto`` resumes a run of the same config found there, ``true`` insists on one,
    ``false`` starts over (its rows and maps are deleted). A run of another config is never
    touched: that is an error.
    """
    resume = str(resume).lower()
    if resume not in ("auto", "true", "false", "wait"):
        raise ValueError(f"resume must be auto, true, false or wait, got {resume!r}")
    path = Path(run_dir) / CLAIM
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier and earlier["config_digest"] != digest and not _any_part(run_dir):
        earlier = None  # a run that stopped before finishing any part: nothing to protect
    if earlier and earlier["config_digest"] != digest:
        raise RunDirTaken(f"run dir {run_dir} holds a run of a different config (digest "
                          f"{earlier['config_digest']}, this config {digest}); choose another "
                          "hydra.run.dir or delete that one")
    if earlier is None and resume == "true":
        raise ValueError(f"resume=true but run dir {run_dir} holds no earlier run to resume")
    if not path.is_file() and _any_part(run_dir):
        raise RunDirTaken(f"run dir {run_dir} holds rows of a run without {CLAIM} (an older "
                          "harness?); choose another hydra.run.dir or delete that one")
    (Path(run_dir) / FAILED).unlink(missing_ok=True)  # this run is the dir's now
    if earlier and resume != "false":
        return earlier["run_id"], len(finished_parts(run_dir))
    for folder in (ROWS, MAPS, FIGURES):
        shutil.rmtree(Path(run_dir) / folder, ignore_errors=True)
    (Path(run_dir) / MANIFEST).unlink(missing_ok=True)
    (Path(run_dir) / RECORD).unlink(missing_ok=True)  # the record of the run started over
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    RunStore.write_json_to(Path(run_dir), CLAIM, {"run_id": run_id, "config_digest": digest})
    return run_id, 0


def _any_part(run_dir: Path | str) -> bool:
    """Does the dir hold parquet rows, committed or not (never overwritten by another config)?"""
    return any((Path(run_dir) / ROWS).glob("*.parquet"))


def record_failure(run_dir: Path, message: str) -> None:
    """Mark a run as failed (read by the collect step); a later successful run clears it. The
    dir's record of an earlier finished run goes: the dir's last run did not finish."""
    RunStore.write_json_to(Path(run_dir), FAILED, {"error": message})
    (Path(run_dir) / RECORD).unlink(missing_ok=True)


def record_finished(run_dir: Path, record: dict) -> Path:
    """Write ``run.json``, the record of a finished run, and clear a failure of an earlier one."""
    path = RunStore.write_json_to(Path(run_dir), RECORD, record)
    (Path(run_dir) / FAILED).unlink(missing_ok=True)
    return path


@contextmanager
def own_run_dir(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold the run dir's lock (``run.lock``: an exclusive ``flock``, with the owner's pid and
    host written in it) for the body; released at the end, also on an error or a signal.

    A lock held by a live process raises :class:`RunDirBusy` naming the owner, or with
    ``wait`` blocks until it is released. The kernel releases a dead process's ``flock``
    (also after SIGKILL), so a lock file left behind is taken over, with a message.
    """
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, wait)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes: a waiter re-checks the inode
        handle.close()


def _acquire(path: Path, wait: bool):
    """The open lock file, flocked, with this process's pid and host written in it."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (held open: the flock lives with it)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(path)
            if not wait:
                handle.close()
                raise RunDirBusy(f"run dir {path.parent} is in use by {owner} (lock {path}); "
                                 "wait for it, or rerun with resume=wait") from None
            print(f"[sanity] run dir {path.parent} is in use by {owner}: waiting for it "
                  "(resume=wait)", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        if _same_file(handle, path):  # not a file its last owner removed meanwhile
            break
        handle.close()
    if handle.seek(0, os.SEEK_END):  # a lock file left by a process that died
        print(f"[sanity] taking over the stale lock of {_owner(path)} (that process is "
              f"gone) in {path.parent}", file=sys.stderr, flush=True)
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    return handle


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _owner(path: Path) -> str:
    """``pid 123 on host h (since ...)`` from a lock file (what it says; maybe half-written)."""
    try:
        owner = json.loads(path.read_text())
        return f"pid {owner['pid']} on host {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def write_text(path: Path | str, text: str) -> Path:
    """A text file (e.g. report.html), written atomically."""
    path = Path(path)
    tmp = _atomic(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(path)
    return path


def write_table(path: Path | str, table: pd.DataFrame) -> Path:
    """One parquet file (e.g. a sweep's collected table), written atomically."""
    path = Path(path)
    tmp = _atomic(path)
    table.to_parquet(tmp, index=False)
    tmp.rename(path)
    return path
