"""What a run dir holds, and whether it is what the harness wrote: the manifest of committed
parts and the check of the files against it. This module only reads (``harness.store`` writes
the manifest and moves damaged parts aside), and imports neither torch nor pandas at import
time, so that ``sanity verify`` answers in well under a second.

``<run_dir>/manifest.json`` lists every part the store committed (rows and maps), by its path in
the run dir::

    {"version": 1, "parts": {"rows/part-cascading-000-gradient.parquet":
        {"unit": {"check": "cascading", "stage_index": 0, "method": "gradient"},
         "rows": 24, "bytes": 4021, "sha256": "..."}, ...}}

``unit`` names the unit of work that wrote the part (None for ``maps/inputs.npz``, rewritten by
every run), ``rows`` its number of rows (of samples for a map file). A part is trusted only when
the manifest lists it and its bytes hash to the recorded checksum: results are copied, archived
and synced, and a truncated, altered or foreign file must not count as finished work.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

ROWS, MAPS, FIGURES = "rows", "maps", "figures"
CLAIM = "claim.json"  # written when a run starts: its run_id and config digest, for resuming
FAILED = "failed.json"  # written when a run stops on an error, for the collect step
RECORD = "run.json"  # written when a run ends
MANIFEST = "manifest.json"  # every committed part with its unit, row count and checksum
DAMAGED = ".damaged"  # where a resumed run moves parts it cannot trust (hidden from readers)
VERSION = 1


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def part_entry(path: Path, unit: dict | None, rows: int) -> dict:
    """The manifest entry of a part just written to ``path``."""
    return {"unit": unit, "rows": int(rows), "bytes": path.stat().st_size,
            "sha256": sha256(path)}


def load_manifest(run_dir: Path | str) -> tuple[dict[str, dict], str]:
    """(parts of the manifest, "") or ({}, why it cannot be read)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {}, f"no {MANIFEST}"
    try:
        parts = json.loads(path.read_text())["parts"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return {}, f"{MANIFEST} unreadable ({type(err).__name__})"
    if not isinstance(parts, dict):
        return {}, f"{MANIFEST} unreadable (no parts)"
    return parts, ""


def candidate_files(run_dir: Path) -> tuple[list[str], list[str]]:
    """(files that look like parts, other files) in ``rows/`` and ``maps/``, as paths relative to
    the run dir; hidden files and folders (``.damaged/``, temporaries) are left out."""
    parts, foreign = [], []
    for folder, suffix, recursive in ((ROWS, ".parquet", False), (MAPS, ".npz", True)):
        top = run_dir / folder
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*") if recursive else top.iterdir()):
            relative = path.relative_to(run_dir)
            if any(p.startswith(".") for p in relative.parts) or path.is_dir() and recursive:
                continue
            looks_like_part = path.is_file() and path.name.endswith(suffix) and (
                folder == MAPS or path.name.startswith("part-"))
            (parts if looks_like_part else foreign).append(relative.as_posix())
    return parts, foreign


def why_damaged(path: Path, entry: dict | None) -> str:
    """Why the file at ``path`` cannot be trusted, or "" when it is what the manifest says."""
    if entry is None:
        return "not in the manifest (not committed by this run)"
    size = path.stat().st_size
    if size < entry["bytes"]:
        return f"truncated: {size} of {entry['bytes']} bytes"
    if size != entry["bytes"]:
        return f"{size} bytes, {entry['bytes']} committed"
    if sha256(path) != entry["sha256"]:
        return "checksum differs from the manifest (altered or replaced)"
    return ""


@dataclass
class Inspection:
    """A run dir checked against its manifest (:func:`inspect_run`)."""

    entries: dict[str, dict]  # the manifest as read (path -> entry)
    manifest_error: str = ""  # why the manifest cannot be read ("" when it can)
    good: list[str] = field(default_factory=list)  # listed and equal to their checksum
    damaged: dict[str, str] = field(default_factory=dict)  # present, untrusted: path -> why
    lost: list[str] = field(default_factory=list)  # listed, but the file is gone
    foreign: list[str] = field(default_factory=list)  # not parts: ignored by the harness

    @property
    def whole(self) -> bool:
        return not (self.manifest_error or self.damaged or self.lost)

    def units_to_recompute(self) -> list[dict]:
        """Units whose part (rows or maps) is damaged or lost: recomputed when resumed."""
        units = [self.entries[p]["unit"] for p in [*self.damaged, *self.lost]
                 if p in self.entries and self.entries[p].get("unit")]
        return [dict(u) for u in {tuple(u.items()): u for u in units}.values()]

    @property
    def unlisted(self) -> bool:
        """No manifest at all: parts written by hand or by an older harness."""
        return self.manifest_error == f"no {MANIFEST}"

    def row_parts(self) -> list[str]:
        """The rows parts to read: the good ones; without a manifest (:attr:`unlisted`), every
        ``rows/part-*.parquet``."""
        if self.unlisted:
            return sorted(p for p in self.damaged if p.startswith(ROWS + "/"))
        return [p for p in self.good if p.startswith(ROWS + "/")]

    def problems(self) -> list[str]:
        """One line per part that is not what the harness committed."""
        lines = [self.manifest_error] if self.manifest_error else []
        lines += [f"{path}: {why}" for path, why in self.damaged.items()]
        lines += [f"{path}: missing (committed, then deleted or moved)" for path in self.lost]
        return lines

    def warnings(self) -> list[str]:
        return [f"{path}: not a part of this run, ignored (harness.read_rows reads only the "
                "manifest's parts)" for path in self.foreign]


def inspect_run(run_dir: Path | str) -> Inspection:
    """Every part of ``run_dir`` checked against the manifest: size, then checksum."""
    run_dir = Path(run_dir)
    entries, error = load_manifest(run_dir)
    found, foreign = candidate_files(run_dir)
    inspection = Inspection(entries=entries, manifest_error=error, foreign=foreign)
    for relative in found:
        why = why_damaged(run_dir / relative, entries.get(relative))
        if why:
            inspection.damaged[relative] = why
        else:
            inspection.good.append(relative)
    inspection.lost = sorted(set(entries) - set(found))
    return inspection


def read_parts(run_dir: Path | str, parts: list[str]) -> pd.DataFrame:
    """The rows of the given parts (paths relative to the run dir), in the order of their
    names (as ``pandas.read_parquet`` reads a folder)."""
    import pandas as pd

    if not parts:
        return pd.DataFrame()
    return pd.read_parquet([str(Path(run_dir) / p) for p in sorted(parts)])


def read_rows(run_dir: Path | str) -> pd.DataFrame:
    """The whole table of a run: ``harness.read_rows(run_dir)``.

    Reads exactly the parts of ``rows/`` that the run's manifest lists, after checking them
    against their checksums, so anything else in the folder (a ``notes.txt``, a sync tool's
    conflict copy, a part it never committed, ``rows/.damaged/``) is ignored. A listed part that is damaged or missing
    raises with its name: rerunning the run's command recomputes it, ``sanity verify RUN_DIR``
    lists every problem. A run dir without a manifest (parts written by hand or by an older
    harness) is read as every ``rows/part-*.parquet``.
    """
    inspection = inspect_run(run_dir)
    bad = [line for line in inspection.problems() if line.startswith(ROWS + "/")
           and line.split(": ", 1)[0] in inspection.entries]  # unlisted files: ignored
    if bad:
        raise ValueError(f"run dir {run_dir} has damaged rows ({'; '.join(bad)}): rerun its "
                         "command to recompute them (sanity verify RUN_DIR lists every problem)")
    return read_parts(run_dir, inspection.row_parts())
