"""Compaction: the small files a sweep leaves folded into few large ones, with readers never
seeing a partial state.

While a sweep runs, each finished trial adds one small file to ``trials_parts/`` (the first
one, while there is no trials.parquet, is written as trials.parquet itself) and each flush of
the writer one part to ``history/``: recording costs the same for the 2,000th trial as for the
first. Every TRIAL_BATCH trials the single trial parts are folded into one batch part
(``trials_parts/compact-*``, :func:`batch_trials`): constant work, so that readers open few
files. At the end of the sweep and on resume (writer.ResultsWriter.compact) all are folded:

- trials: trials.parquet is rewritten with the rows of every part (the newest row of a trial
  wins), its metadata listing the part names it holds (``COVERS_KEY``); then the parts are
  deleted.
- history: the parts (and a compact file smaller than ``HISTORY_ROWS``, when the parts alone
  are fewer rows) are concatenated in name order into ``compact-*.parquet`` files of at least
  ``HISTORY_ROWS`` rows (fewer only where the whole history is), each listing the files it
  replaces; then those are deleted.

Each new file is written under a dot-named temp name and renamed into place before anything
it replaces is deleted. A reader (readers.py) skips every file a compacted one covers, so
between the rename and the deletes, or after a SIGKILL there, no row counts twice; a file
deleted after a reader listed it makes the reader list again. The next compaction deletes
covered files a killed one left behind.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tune_sana.record.atomic import write_atomic
from tune_sana.record.readers import covers, trials_with_parts
from tune_sana.record.schema import (
    COMPACT_PREFIX,
    COVERS_KEY,
    HISTORY_DIR,
    TRIALS_FILE,
    TRIALS_PARTS_DIR,
)
from tune_sana.record.storage import Location

# Rows of a compacted history file, at least: 10 M rows are 100 files, each read in one go.
HISTORY_ROWS = 100_000
# Single trial parts folded into one batch part (trials_parts/compact-*) once this many wait:
# a constant amount of work every TRIAL_BATCH trials, so a reader of a running sweep, and the
# final compaction, open about n / TRIAL_BATCH + TRIAL_BATCH files instead of n.
TRIAL_BATCH = 64


def _new_name() -> str:
    return f"{COMPACT_PREFIX}{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"


def _with_covers(table: pa.Table, names: Sequence[str]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[COVERS_KEY] = json.dumps(sorted(names)).encode()
    return table.replace_schema_metadata(meta)


def _remove_if_empty(folder: Location) -> None:
    """The trial parts' folder once compaction emptied it (so a finished run holds
    trials.parquet and history/ only)."""
    if folder.is_local:
        try:
            os.rmdir(folder.path)
        except OSError:
            pass  # not empty, or gone


def compact_trials(run_dir: str | os.PathLike[str] | Location) -> int:
    """Fold trials_parts/ into trials.parquet; returns the number of parts folded (0: none
    were waiting). CorruptFile where trials.parquet or a part cannot be read (nothing is
    changed then)."""
    folder = Location.of(run_dir)
    parts_dir = folder / TRIALS_PARTS_DIR
    parts = parts_dir.entries(suffix=".parquet", dirs=False)
    if not parts:
        _remove_if_empty(parts_dir)
        return 0
    table, covered = trials_with_parts(folder, parts)
    if table is not None:
        fresh = [p for p in parts if p.name not in covered]
        if fresh:  # else: a killed compaction's file already holds them all
            write_atomic(_with_covers(table, [p.name for p in parts]), folder / TRIALS_FILE)
    for part in parts:
        part.delete()
    _remove_if_empty(parts_dir)
    return len(parts)


def batch_trials(run_dir: str | os.PathLike[str] | Location) -> int:
    """Fold the single trial parts (not yet in a batch) into one batch part that covers them,
    then delete them; returns how many were folded. The work is bounded by TRIAL_BATCH (the
    writer calls it when that many wait), not by the trials recorded before."""
    folder = Location.of(run_dir)
    parts = (folder / TRIALS_PARTS_DIR).entries(suffix=".parquet", dirs=False)
    batches = [p for p in parts if p.name.startswith(COMPACT_PREFIX)]
    held = frozenset().union(*(covers(b.read_schema().metadata) for b in batches))
    singles = [p for p in parts if not p.name.startswith(COMPACT_PREFIX)]
    fresh = [p for p in singles if p.name not in held]
    if len(fresh) > 1:
        table, _ = trials_with_parts(folder, fresh, base=False)
        if table is not None:
            meta = fresh[0].read_schema().metadata  # not trials.parquet's: it covers nothing
            table = table.replace_schema_metadata(meta)
            write_atomic(_with_covers(table, [p.name for p in fresh]),
                         folder / TRIALS_PARTS_DIR / _new_name())
    else:
        fresh = []
    for part in singles:
        if part.name in held or part in fresh:
            part.delete()
    return len(fresh)


def _rows(file: Location) -> int:
    meta = pq.read_metadata(file.path, filesystem=None if file.is_local else file.fs)
    return int(meta.num_rows)


def _groups(files: Sequence[Location], rows: dict[str, int],
            min_rows: int) -> list[list[Location]]:
    """``files`` in order, cut into runs of at least ``min_rows`` rows; a short remainder joins
    the run before it (or is the one run, when all of them together are short)."""
    groups: list[list[Location]] = [[]]
    count = 0
    for file in files:
        if count >= min_rows:
            groups.append([])
            count = 0
        groups[-1].append(file)
        count += rows[file.name]
    if len(groups) > 1 and count < min_rows:
        tail = groups.pop()
        groups[-1] += tail
    return groups


def compact_history(run_dir: str | os.PathLike[str] | Location,
                    min_rows: int = HISTORY_ROWS) -> int:
    """Fold history/'s parts into compact-* files of at least ``min_rows`` rows; returns the
    number of files replaced (0: nothing to do). Files a compacted one covers (left by a
    compaction killed before its deletes) are deleted first. The caller holds the writer's
    lock (no flush runs meanwhile)."""
    folder = Location.of(run_dir) / HISTORY_DIR
    files = folder.entries(suffix=".parquet", dirs=False)
    held: dict[str, frozenset[str]] = {}
    for file in files:
        if file.name.startswith(COMPACT_PREFIX):
            held[file.name] = covers(file.read_schema().metadata)
    covered = frozenset().union(*held.values()) if held else frozenset()
    for file in files:
        if file.name in covered:
            file.delete()
    live = [f for f in files if f.name not in covered]
    parts = [f for f in live if not f.name.startswith(COMPACT_PREFIX)]
    if not parts:
        return 0
    rows = {f.name: _rows(f) for f in live}
    inputs = list(parts)
    if sum(rows[f.name] for f in parts) < min_rows:
        short = [f for f in live if f.name in held and rows[f.name] < min_rows]
        inputs = sorted(inputs + short[-1:], key=lambda f: f.name)
    replaced = 0
    for group in _groups(inputs, rows, min_rows):
        if len(group) == 1 and group[0].name in held:
            continue
        tables = [f.read_table() for f in group]
        table = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
        names = {f.name for f in group}.union(*(held.get(f.name, ()) for f in group))
        write_atomic(_with_covers(table, sorted(names)), folder / _new_name())
        for file in group:
            file.delete()
        replaced += len(group)
    return replaced
